"""Tiled inference (tiling.py): coverage, blending, fixed batch shapes."""

import cv2
import numpy as np
import pytest

import tiling


def test_tile_starts_cover_everything_with_requested_overlap():
    for length, tile, ov in [(2160, 256, 32), (1080, 256, 64), (300, 256, 32), (256, 256, 32)]:
        starts = tiling.tile_starts(length, tile, ov)
        assert starts[0] == 0 and starts[-1] == length - tile
        covered = np.zeros(length, bool)
        for s in starts:
            covered[s : s + tile] = True
        assert covered.all()
        gaps = np.diff(starts)
        assert np.all(tile - gaps >= ov)


def _local_fn(batch):
    # A purely local "network": 3x3 box filter of the first channel. Any seam or
    # normalisation-per-tile bug would show up as a difference from the whole-image result.
    out = np.empty(batch.shape[:3], np.float32)
    for i, b in enumerate(batch):
        out[i] = cv2.blur(b[..., 0], (3, 3), borderType=cv2.BORDER_REFLECT_101)
    return out


@pytest.mark.parametrize("shape", [(300, 517), (64, 64), (40, 90), (256, 256)])
def test_tiled_prediction_equals_whole_image(shape):
    rng = np.random.default_rng(1)
    img = rng.random(shape + (1,)).astype(np.float32)
    whole = _local_fn(img[None])[0]
    tiled = tiling.predict_tiled(img, _local_fn, tile_size=64, overlap=16, batch_size=3)
    assert tiled.shape == shape
    # Tile borders differ only where the 3x3 filter saw padding; the blend window gives those
    # pixels ~no weight wherever another tile covers them, but image borders still see padding.
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-3)


def test_every_call_gets_the_same_batch_and_one_tile_is_not_padded():
    img = np.random.default_rng(2).random((150, 230, 1)).astype(np.float32)
    seen = []

    def fn(batch):
        seen.append(batch.shape)
        return _local_fn(batch)

    plan = tiling.plan_tiles(img.shape, 64, 16, 16)
    assert plan.n_tiles % 4  # the last batch is short
    tiled = tiling.predict_tiled(img, fn, tile_size=64, overlap=16, batch_size=4)
    assert {s[0] for s in seen} == {4}  # zero tiles fill the last batch: one traced shape
    assert len(seen) == -(-plan.n_tiles // 4)
    inner = (slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(tiled[inner], _local_fn(img[None])[0][inner], atol=1e-3)
    seen.clear()
    whole = tiling.predict_tiled(img, fn, tile_size=256, overlap=16, batch_size=4)
    assert seen == [(1, 160, 240, 1)]  # one tile: one tile computed, not batch_size
    np.testing.assert_allclose(whole, _local_fn(np.pad(img, ((0, 10), (0, 10), (0, 0)),
                                                       mode="reflect")[None])[0][:150, :230])


def test_blend_ramp_positive_and_symmetric():
    r = tiling.blend_ramp(64, 16)
    assert r.shape == (64,) and r.min() > 0 and r.max() == pytest.approx(1.0)
    np.testing.assert_allclose(r, r[::-1])
    # An end on the image border is not tapered.
    assert tiling.blend_ramp(64, 16, taper_start=False)[0] == 1.0


def _blend_whole_windows(image, predict_fn, tile_size, overlap, pad_multiple):
    """Reference blend: every tile's whole window into frame-sized sums, in tile order."""
    x = image[..., None] if image.ndim == 2 else image
    h, w = x.shape[:2]
    plan = tiling.plan_tiles(x.shape, tile_size, overlap, pad_multiple)
    if plan.pad_h or plan.pad_w:
        mode = "reflect" if (plan.pad_h < h and plan.pad_w < w) else "symmetric"
        x = np.pad(x, ((0, plan.pad_h), (0, plan.pad_w), (0, 0)), mode=mode)
    H, W = x.shape[:2]
    th, tw = plan.tile_h, plan.tile_w
    acc = np.zeros((H, W), np.float32)
    wsum = np.zeros((H, W), np.float32)
    for y in plan.ys:
        for xx in plan.xs:
            p = np.asarray(predict_fn(x[None, y:y + th, xx:xx + tw]), np.float32)[0]
            ry = tiling.blend_ramp(th, plan.overlap_h, taper_start=y > 0,
                                   taper_end=y + th < H)
            rx = tiling.blend_ramp(tw, plan.overlap_w, taper_start=xx > 0,
                                   taper_end=xx + tw < W)
            window = np.outer(ry, rx).astype(np.float32)
            acc[y:y + th, xx:xx + tw] += p * window
            wsum[y:y + th, xx:xx + tw] += window
    return (acc / np.maximum(wsum, 1e-12))[:h, :w]


def _nonlocal_fn(batch):
    # Output depends on where the pixel sits in its tile, so tiles disagree in every
    # overlap and each blended pixel shows which tiles and weights went into it.
    t = batch[..., 0]
    ramp = np.linspace(0.0, 1.0, t.shape[2], dtype=np.float32)
    return 1.0 / (1.0 + np.exp(-(3.0 * t - 1.0 + ramp)))


def test_blending_the_shared_cells_only_is_blending_every_window_bit_for_bit():
    # predict_tiled copies a tile's probabilities where it is the only tile (weight 1) and
    # blends only the cells several tiles share: the same float32 result, byte for byte,
    # as summing every tile's whole window, over many layouts.
    rng = np.random.default_rng(7)
    checked = 0
    for _ in range(60):
        h, w = (int(v) for v in rng.integers(8, 400, 2))
        pad = int(rng.choice([1, 4, 8, 16]))
        tile = int(rng.integers(1, 8)) * 16 * max(1, pad // 4)
        overlap = int(rng.integers(0, tile // 2 + 1))
        img = rng.random((h, w, 1), dtype=np.float32)
        try:
            want = _blend_whole_windows(img, _nonlocal_fn, tile, overlap, pad)
        except ValueError:  # a layout plan_tiles refuses
            continue
        got = tiling.predict_tiled(img, _nonlocal_fn, tile_size=tile, overlap=overlap,
                                   batch_size=int(rng.integers(1, 5)), pad_multiple=pad)
        assert got.shape == want.shape and got.tobytes() == want.tobytes(), (h, w, tile,
                                                                             overlap, pad)
        checked += 1
    assert checked >= 40
