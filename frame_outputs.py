"""One frame's output files: mask, labels, per-bead table, probability and figures.

Purpose
    :func:`write_outputs` writes what ``predict_microscope.py`` promises per frame from the
    result of ``prediction.finish_frame``; :func:`display_gray` and :func:`overlay_image` are
    shared with ``export_model.py`` (its cover image). Nothing happens at import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import microbead_io as mio


def display_gray(image: np.ndarray) -> np.ndarray:
    """Frame ``(H, W[, C])`` -> float32 ``(H, W)`` in [0, 1] for figures: percentiles of
    every 4th pixel in each direction (display only, 16x cheaper on a 4K frame)."""
    g = np.asarray(image, np.float32)
    return mio.normalize_image(g.mean(axis=-1) if g.ndim == 3 else g, sample_step=4)


def overlay_image(gray01: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB uint8: the frame in gray, beads tinted green, each bead outlined in yellow.

    Outline pixels are bead pixels with a 4-neighbour of another label (so touching beads
    are outlined where they meet): the max and min of the label over the pixel's
    4-neighbourhood differ.
    """
    import cv2

    rgb = cv2.cvtColor(mio.to_uint8(gray01), cv2.COLOR_GRAY2RGB)
    fg = labels > 0
    solid = np.zeros_like(rgb)
    solid[..., 1] = 255
    rgb = cv2.copyTo(cv2.addWeighted(rgb, 0.6, solid, 0.4, 0.0), fg.view(np.uint8), rgb)
    lab = labels.astype(np.float32)  # exact for ids < 2**24
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    edge = (cv2.dilate(lab, cross) != cv2.erode(lab, cross)) & fg
    solid[:] = (255, 220, 0)
    return cv2.copyTo(solid, edge.view(np.uint8), rgb)


#: Panel titles of ``comparisons/*.png``.
COMPARISON_TITLES = ("image", "bead probability (black 0 - yellow 1)",
                     "beads found (tinted green, each outlined in yellow)")


def comparison_layout(h: int, w: int, max_side: int = 2400) -> tuple[bool, float]:
    """``(stacked, scale)`` for three ``h x w`` panels within ``max_side`` px each way:
    side by side or one above the other, whichever shows the frame larger (a 3362x512 row
    strip is stacked, a square tile side by side). Never enlarged."""
    side = min(1.0, max_side / (3 * w), max_side / h)
    stacked = min(1.0, max_side / w, max_side / (3 * h))
    return stacked > side, max(side, stacked)


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` under a white banner with ``title`` in black (readable at 100 %)."""
    import cv2

    bar = np.full((30, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (6, 21), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, panel], axis=0)


def comparison_image(gray01, prob, overlay, max_side: int = 2400) -> np.ndarray:
    """Image | probability (inferno) | overlay, each titled, downscaled for viewing: side by
    side, or stacked when the frame is a wide strip (see :func:`comparison_layout`)."""
    import cv2

    h, w = gray01.shape[:2]
    stacked, f = comparison_layout(h, w, max_side)
    size = (max(1, int(round(w * f))), max(1, int(round(h * f))))

    def small(a):  # each panel shrunk first: 9x fewer pixels to move than the full row
        return a if f == 1.0 else cv2.resize(a, size, interpolation=cv2.INTER_AREA)

    g = mio.to_uint8(small(np.asarray(gray01, np.float32)))
    heat = cv2.applyColorMap(mio.to_uint8(np.clip(small(np.asarray(prob, np.float32)), 0, 1)),
                             cv2.COLORMAP_INFERNO)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    panels = [_titled(p, t) for p, t in zip(
        (cv2.cvtColor(g, cv2.COLOR_GRAY2RGB), heat, small(overlay)), COMPARISON_TITLES)]
    gap = 8
    if stacked:
        sep = np.full((gap, panels[0].shape[1], 3), 255, np.uint8)
        return np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=0)
    sep = np.full((panels[0].shape[0], gap, 3), 255, np.uint8)
    return np.concatenate([panels[0], sep, panels[1], sep, panels[2]], axis=1)


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, res: dict, *,
                  save_prob: bool = False, figures: bool = True,
                  exports: frozenset[str] = frozenset()) -> None:
    """One frame's files: mask, labels, per-bead table, optional probability, overlay and
    comparison. ``exports`` adds per-bead files: ``"roi"`` (ImageJ ROI set), ``"geojson"``
    (QuPath detections), ``"ome_tiff"`` (image + labels), all from the written label image
    (``bead_exports.write_bead_outputs``).

    The mask and label files are compressed on a second thread while the per-bead files
    are written (zlib and OpenCV's PNG writer release the GIL): a folder's last frame is
    finished while nothing else runs, and its files are then what the user waits for.
    """
    from concurrent.futures import ThreadPoolExecutor

    import bead_exports

    def mask_and_labels():
        mio.write_mask(out_dir / "masks" / f"{stem}_mask.png", res["mask"])
        mio.write_labels(out_dir / "labels" / f"{stem}_labels.tif", res["labels"])

    with ThreadPoolExecutor(1, thread_name_prefix="mb-write") as pool:
        images = pool.submit(mask_and_labels)
        bead_exports.write_bead_outputs(out_dir, stem, res["labels"], image, res["prob"],
                                        roi="roi" in exports, geojson="geojson" in exports,
                                        ome_tiff="ome_tiff" in exports)
        images.result()
    if save_prob:
        mio.write_image(out_dir / "prob" / f"{stem}_prob.tif", res["prob"])
    if figures:
        gray = display_gray(image)
        ov = overlay_image(gray, res["labels"])
        mio.write_image(out_dir / "overlays" / f"{stem}_overlay.png", ov)
        mio.write_image(out_dir / "comparisons" / f"{stem}_comparison.png",
                        comparison_image(gray, res["prob"], ov))
