"""Tests of microbead_metrics: hand-computed pixel/object numbers, empty-image rules, the
touching-bead split, agreement with a brute-force reference and with the Keras metrics."""

import math

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import microbead_metrics as mm

R = 6
DISC_AREA = None  # filled in below: pixel count of a digital disc of radius R


def disc(shape, cy, cx, r=R):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


DISC_AREA = int(disc((32, 32), 16, 16).sum())


def ring(shape, cy, cx, r_out=R, r_in=3):
    return disc(shape, cy, cx, r_out) & (1 - disc(shape, cy, cx, r_in))


# --------------------------------------------------------------------------- pixel metrics


def test_iou_exactly_one_third():
    truth = np.zeros((4, 4), np.uint8)
    pred = np.zeros((4, 4), np.uint8)
    truth[:, 0:2] = 1  # 8 px
    pred[:, 1:3] = 1  # 8 px, 4 shared -> union 12
    m = mm.pixel_metrics(pred, truth)
    assert m["jaccard"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["dice"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(8 / 16)  # 4 TP + 4 TN of 16
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 4, 4, 4)


def test_empty_rules():
    z = np.zeros((8, 8), np.uint8)
    one = z.copy()
    one[2:4, 2:4] = 1
    both = mm.pixel_metrics(z, z)
    assert all(both[k] == 1.0 for k in ("jaccard", "dice", "precision", "recall", "accuracy"))
    miss = mm.pixel_metrics(z, one)  # prediction empty, truth not
    assert (miss["jaccard"], miss["dice"], miss["precision"], miss["recall"]) == (0, 0, 0, 0)
    assert miss["accuracy"] == pytest.approx(60 / 64)
    hallucinated = mm.pixel_metrics(one, z)  # truth empty, prediction not
    assert (hallucinated["jaccard"], hallucinated["dice"]) == (0, 0)
    assert (hallucinated["precision"], hallucinated["recall"]) == (0, 0)


def test_value_conventions_and_shape_error():
    truth = np.zeros((4, 4), np.uint8)
    truth[0, :] = 255  # 0/255 mask: non-zero is foreground
    prob = np.zeros((4, 4), np.float32)
    prob[0, :2] = 0.9
    prob[0, 2:] = 0.5  # exactly 0.5 is background (models.py uses > 0.5)
    m = mm.pixel_metrics(prob, truth)
    assert m["tp"] == 2 and m["fn"] == 2 and m["fp"] == 0
    with pytest.raises(ValueError, match="shape"):
        mm.pixel_metrics(np.zeros((4, 5)), truth)


def test_pooled_counts_differ_from_mean():
    # Pooling sums counts: a big good image outweighs a tiny bad one.
    pooled = mm.metrics_from_counts(tp=90 + 0, fp=10 + 1, fn=0 + 1, tn=0)
    assert pooled["jaccard"] == pytest.approx(90 / 102)


def test_pixel_metrics_random_against_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.random((16, 16)) > 0.6
        t = rng.random((16, 16)) > 0.5
        m = mm.pixel_metrics(p, t)
        inter, union = np.sum(p & t), np.sum(p | t)
        assert m["jaccard"] == pytest.approx(inter / union)
        assert m["dice"] == pytest.approx(2 * inter / (p.sum() + t.sum()))
        assert m["accuracy"] == pytest.approx(np.mean(p == t))


# --------------------------------------------------------------------------- object metrics


def three_true_two_pred():
    """3 true beads; prediction 1 covers 60 % of bead A (IoU 0.6), prediction 2 hits nothing."""
    t = np.zeros((40, 40), np.int32)
    p = np.zeros((40, 40), np.int32)
    t[0:10, 0:10] = 1  # A, 100 px
    t[0:10, 20:30] = 2  # B
    t[20:30, 0:10] = 3  # C
    p[0:6, 0:10] = 5  # inside A: inter 60, union 100
    p[25:35, 25:35] = 9  # false positive
    return t, p


def test_three_true_two_pred_hand_numbers():
    t, p = three_true_two_pred()
    m = mm.match_instances(t, p, iou_threshold=0.5)
    assert (m["n_true"], m["n_pred"], m["tp"], m["fp"], m["fn"]) == (3, 2, 1, 1, 2)
    assert m["precision"] == pytest.approx(0.5)
    assert m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert m["mean_matched_iou"] == pytest.approx(0.6)
    assert m["panoptic_quality"] == pytest.approx(0.6 / (1 + 0.5 + 1))
    assert list(m["matched_true"]) == [1] and list(m["matched_pred"]) == [5]
    assert m["count_error"] == -1 and m["rel_count_error"] == pytest.approx(1 / 3)
    # Above the matched IoU nothing is matched.
    strict = mm.match_instances(t, p, iou_threshold=0.65)
    assert (strict["tp"], strict["fp"], strict["fn"]) == (0, 2, 3)
    assert math.isnan(strict["mean_matched_iou"])
    for dtype in (np.uint8, np.uint16, np.uint64):  # label images come in many dtypes
        same = mm.match_instances(t.astype(dtype), p.astype(dtype))
        assert (same["tp"], same["fp"], same["fn"]) == (1, 1, 2)
    curve = mm.object_metrics(t, p)
    assert sorted(curve) == list(mm.IOU_THRESHOLDS)
    assert [curve[k]["tp"] for k in mm.IOU_THRESHOLDS] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]


def test_object_empty_rules():
    z = np.zeros((8, 8), np.int32)
    one = z.copy()
    one[1:3, 1:3] = 1
    e = mm.match_instances(z, z)
    assert (e["precision"], e["recall"], e["f1"], e["panoptic_quality"]) == (1, 1, 1, 1)
    assert e["count_error"] == 0 and e["rel_count_error"] == 0
    miss = mm.match_instances(one, z)
    assert (miss["precision"], miss["recall"], miss["f1"]) == (0, 0, 0)
    fp = mm.match_instances(z, one)
    assert (fp["precision"], fp["recall"], fp["f1"], fp["fp"]) == (0, 0, 0, 1)
    assert fp["rel_count_error"] == 1.0  # |1 - 0| / max(0, 1)


def test_hungarian_beats_greedy_at_low_threshold():
    t = np.zeros((10, 15), np.int32)
    p = np.zeros((10, 15), np.int32)
    t[0:10, 0:10] = 1  # T1, 100 px
    t[4:10, 10:15] = 2  # T2, 30 px
    p[0:4, 0:10] = 1  # P2 on T1: IoU 40/100 = 0.4
    p[4:10, 0:15] = 2  # P1: T1 60/130 = 0.46, T2 30/90 = 0.33
    # Greedy (best IoU first) would take T1-P1 and leave T2 unmatched; the assignment takes
    # T1-P2 and T2-P1.
    low = mm.match_instances(t, p, iou_threshold=0.3)
    assert low["tp"] == 2
    assert low["sum_matched_iou"] == pytest.approx(0.4 + 1 / 3)
    assert mm.match_instances(t, p, iou_threshold=0.45)["tp"] == 1
    assert mm.match_instances(t, p, iou_threshold=0.5)["tp"] == 0


def test_half_split_at_threshold_half_is_one_to_one():
    t = np.zeros((4, 8), np.int32)
    t[:, :] = 3
    p = np.zeros((4, 8), np.int32)
    p[:, :4] = 1
    p[:, 4:] = 2  # both predictions have IoU exactly 0.5 with the one true object
    m = mm.match_instances(t, p, iou_threshold=0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 0)


def brute_force(t, p, thr):
    """Reference: dense IoU by looping over every pair, dense Hungarian assignment."""
    tid = [i for i in np.unique(t) if i]
    pid = [i for i in np.unique(p) if i]
    iou = np.zeros((len(tid), len(pid)))
    for a, i in enumerate(tid):
        for b, j in enumerate(pid):
            inter = np.sum((t == i) & (p == j))
            union = np.sum((t == i) | (p == j))
            iou[a, b] = inter / union
    w = np.where(iou >= thr, 1.0 + iou / (min(iou.shape) + 1), 0.0) if iou.size else iou
    tp, s = 0, 0.0
    if iou.size:
        r, c = linear_sum_assignment(w, maximize=True)
        ok = w[r, c] > 0
        tp, s = int(ok.sum()), float(iou[r, c][ok].sum())
    return len(tid), len(pid), tp, s


def random_labels(rng, shape, n):
    lab = np.zeros(shape, np.int32)
    for k in range(n):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = int(rng.integers(2, 6))
        lab[disc(shape, cy, cx, r).astype(bool)] = 7 * k + 11  # non-consecutive ids
    return lab


def test_matching_agrees_with_brute_force_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(8):
        t = random_labels(rng, (48, 48), int(rng.integers(0, 12)))
        # Prediction: truth shifted by a pixel or two plus extra objects -> a mix of good,
        # poor and missing matches.
        p = np.roll(t, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        p = np.where(random_labels(rng, (48, 48), 3) > 0, 999, p)
        thresholds = (0.1, 0.3, 0.5, 0.7, 0.9)
        fast = mm.object_metrics(t, p, thresholds)
        for thr in thresholds:
            nt, npr, tp, s = brute_force(t, p, thr)
            got = fast[thr]
            assert (got["n_true"], got["n_pred"], got["tp"]) == (nt, npr, tp), thr
            assert got["sum_matched_iou"] == pytest.approx(s)
            assert got["fp"] == npr - tp and got["fn"] == nt - tp


def test_pixel_and_object_rules_agree_on_empty():
    z = np.zeros((5, 5), np.uint8)
    assert mm.pixel_metrics(z, z)["dice"] == mm.match_instances(z.astype(int), z.astype(int))[
        "f1"
    ] == 1.0


# --------------------------------------------------------------------------- label_beads


def test_touching_pair_splits_into_two_equal_beads():
    m = disc((40, 60), 20, 20) | disc((40, 60), 20, 20 + 2 * R)  # centre distance = 2 r
    lab = mm.label_beads(m, median_area=DISC_AREA)
    assert lab.dtype == np.int32
    assert lab.max() == 2
    a1, a2 = np.sum(lab == 1), np.sum(lab == 2)
    assert abs(int(a1) - int(a2)) <= R
    assert np.array_equal(lab > 0, m > 0)  # every mask pixel belongs to a bead


def test_isolated_beads_not_split_chain_of_three_is_three():
    single = disc((40, 40), 20, 20)
    assert mm.label_beads(single, median_area=DISC_AREA).max() == 1
    assert mm.label_beads(single).max() == 1  # area estimated from the mask itself
    big = disc((40, 40), 20, 20, r=8)  # 1.7 bead areas: watershed runs, one seed, no split
    assert np.sum(big) > 1.5 * DISC_AREA
    assert mm.label_beads(big, median_area=DISC_AREA).max() == 1
    chain = sum(disc((30, 70), 15, 15 + 2 * R * i) for i in range(3)).clip(0, 1)
    assert mm.label_beads(chain, median_area=DISC_AREA).max() == 3


def test_touching_rings_split_and_area_estimated_from_mask():
    shape = (60, 100)
    m = np.zeros(shape, np.uint8)
    for cx in (10, 30, 50, 70):
        m |= ring(shape, 12, cx)
    m |= ring(shape, 40, 20) | ring(shape, 40, 20 + 2 * R)  # touching pair of rings
    ring_area = int(ring((32, 32), 16, 16).sum())
    assert mm.estimate_bead_area(m) == ring_area  # the clump does not bias the median
    lab = mm.label_beads(m)
    assert lab.max() == 6
    assert set(np.unique(lab)) == set(range(7))  # consecutive ids


def test_fragments_dropped_and_threshold_keywords():
    m = disc((40, 60), 20, 20) | disc((40, 60), 20, 20 + 2 * R)
    m[35:37, 55:57] = 1  # 4-px speck, below 0.25 bead areas
    lab = mm.label_beads(m, median_area=DISC_AREA)
    assert lab.max() == 2 and lab[35, 55] == 0
    assert mm.label_beads(m, median_area=DISC_AREA, min_area_fraction=0.0).max() == 3
    # With a high split threshold the pair stays one object.
    assert mm.label_beads(m, median_area=DISC_AREA, split_threshold=3.0).max() == 1


def test_label_beads_empty_and_prob_shape():
    assert not mm.label_beads(np.zeros((16, 16), np.uint8)).any()
    with pytest.raises(ValueError, match="prob shape"):
        m = disc((30, 50), 15, 15) | disc((30, 50), 15, 15 + 2 * R)
        mm.label_beads(m, median_area=DISC_AREA, prob=np.ones((5, 5)))


def test_label_beads_uses_prob_valley():
    # One round blob of two bead areas: the distance transform alone has one peak, but a
    # low-probability line across it (the contact line the network saw) splits it in two.
    m = disc((40, 40), 20, 20, r=8)
    prob = np.where(m > 0, 0.95, 0.0).astype(np.float32)
    prob[:, 19:22] = 0.6  # still foreground (> 0.5): the mask is one component
    assert mm.label_beads(m, median_area=DISC_AREA).max() == 1
    lab = mm.label_beads(m, median_area=DISC_AREA, prob=prob)
    assert lab.max() == 2
    assert lab[20, 15] != lab[20, 25]


def _dense_touching_frame(seed=0, shape=(180, 260), n=150):
    """Many overlapping discs (clumps of 2-6 beads) plus a smooth probability map."""
    rng = np.random.default_rng(seed)
    m = np.zeros(shape, np.uint8)
    for _ in range(n):
        m |= disc(shape, rng.integers(R, shape[0] - R), rng.integers(R, shape[1] - R))
    # Kept inside (0, 1) with noise: a clipped map would be flat (tied) inside the beads.
    prob = 0.05 + 0.9 * cv2_blur(m.astype(np.float32)) + rng.normal(0, 0.01, shape)
    return m, prob.astype(np.float32)


def cv2_blur(x):
    import cv2

    return cv2.GaussianBlur(x, (5, 5), 1.2)


def test_packed_split_equals_one_component_at_a_time():
    m, prob = _dense_touching_frame()
    n, lab, stats, areas, _ = mm._component_stats(m.astype(bool))
    big = np.flatnonzero(areas > 1.5 * DISC_AREA)
    assert len(big) >= 10  # the frame really has many clumps to split
    radius = math.sqrt(DISC_AREA / math.pi)
    crops, pcrops = [], []
    for k in big:
        x, y, w, h = stats[k + 1, :4]
        crops.append(lab[y:y + h, x:x + w] == k + 1)
        pcrops.append(prob[y:y + h, x:x + w])
    min_area = 0.25 * DISC_AREA
    batched = mm._split_components(crops, radius, min_area, pcrops)
    pieces = 0
    for c, pc, got in zip(crops, pcrops, batched):
        one = mm._split_components([c], radius, min_area, [pc])[0]
        # A continuous probability map leaves no ties: identical labels, ids included.
        np.testing.assert_array_equal(got, one)
        pieces += int(got.max())
    assert pieces > len(crops)  # clumps were split
    # Without a probability map the distance transform has plateaus; the watershed breaks
    # those ties by its queue order, which packing changes: a tied pixel may go to the other
    # bead, and rarely a sliver then falls under the merge size. Same beads otherwise.
    n_batched = n_single = 0
    for c, got in zip(crops, mm._split_components(crops, radius, min_area)):
        one = mm._split_components([c], radius, min_area)[0]
        assert abs(int(got.max()) - int(one.max())) <= 1
        assert set(np.unique(got[c])) == set(range(1, int(got.max()) + 1))
        assert np.all((got > 0) == c)
        n_batched, n_single = n_batched + int(got.max()), n_single + int(one.max())
    assert abs(n_batched - n_single) <= 0.05 * n_single
    assert mm._split_components([], radius, min_area) == []


def test_kept_component_areas_equal_a_component_pass_over_the_filtered_mask():
    # The finisher takes the filtered mask's component areas from the split's own component
    # pass: they must be the areas a fresh pass over the mask of the kept beads finds, also
    # where only some beads of a clump are kept (what is left is labelled again).
    import cv2

    m, prob = _dense_touching_frame(seed=5)
    m[3, 3] = m[3, 5] = 1  # specks below the noise size: dropped by the split
    for args in ({"median_area": DISC_AREA, "prob": prob}, {"median_area": 0.0}):
        labels, comps = mm.label_beads_and_components(m, **args)
        np.testing.assert_array_equal(labels, mm.label_beads(m, **args))
        assert sorted(comps.areas) == sorted(mm.component_areas(m))
        n = int(labels.max())
        partial = 0
        for seed in range(6):
            keep = np.random.default_rng(seed).random(n) < (0.5 if seed else 1.0)
            kept = np.isin(labels, np.flatnonzero(keep) + 1).astype(np.uint8)
            got = mm.kept_component_areas(comps, labels, keep)
            assert sorted(got.tolist()) == sorted(mm.component_areas(kept).tolist())
            counts = [int(keep[f - 1:f - 1 + k].sum()) for f, k in zip(comps.first_id,
                                                                       comps.n_ids) if k]
            partial += sum(0 < c < k for c, k in zip(counts, comps.n_ids[comps.n_ids > 0]))
        if args["median_area"]:
            assert partial >= 5  # clumps with some of their beads kept were relabelled
            assert (comps.n_ids == 0).sum() >= 2  # and the specks dropped as noise
    empty, none = mm.label_beads_and_components(np.zeros((4, 4)))
    assert not empty.any() and mm.kept_component_areas(none, empty, np.zeros(0, bool)).size == 0
    # An 8-connected clump whose kept beads touch only at a corner stays one component.
    diag = np.zeros((9, 9), np.uint8)
    diag[1:4, 1:4] = diag[4:7, 4:7] = 1
    _, lab, _, _ = cv2.connectedComponentsWithStats(diag, connectivity=8)
    comps = mm.BeadComponents(np.array([18]), np.array([[1, 1, 6, 6]]), np.array([1]),
                              np.array([2]))
    two = np.where(diag > 0, 1, 0)
    two[4:7, 4:7] = 2
    assert mm.kept_component_areas(comps, two, np.array([True, True])).tolist() == [18]
    assert mm.kept_component_areas(comps, two, np.array([False, True])).tolist() == [9]


def test_estimate_bead_area_rules():
    shape = (64, 64)
    singles = [disc(shape, 12, 12), disc(shape, 12, 40), disc(shape, 40, 12)]
    m = np.clip(sum(singles), 0, 1).astype(np.uint8)
    edge = disc(shape, 40, 0)  # bead cut by the border: smaller, excluded
    assert mm.estimate_bead_area(m | edge) == DISC_AREA
    assert mm.estimate_bead_area([m, np.zeros(shape, np.uint8)]) == DISC_AREA
    assert mm.estimate_bead_area(np.stack([m, m])) == DISC_AREA
    assert mm.estimate_bead_area(np.zeros(shape, np.uint8)) == 0.0
    assert mm.estimate_bead_area([]) == 0.0


def test_count_beads():
    shape = (40, 80)
    m = disc(shape, 20, 10) | disc(shape, 20, 30) | disc(shape, 20, 30 + 2 * R)
    c = mm.count_beads(m, median_area=DISC_AREA)
    assert c == {"n_components": 2, "n_beads": 3, "area_estimate": float(DISC_AREA)}
    assert mm.count_beads(np.zeros(shape, np.uint8))["n_beads"] == 0


def test_r2_identity():
    assert mm.r2_identity([1, 2, 3], [1, 2, 3]) == 1.0
    # Perfectly correlated but biased by +1: 1 - 3/2.
    assert mm.r2_identity([1, 2, 3], [2, 3, 4]) == pytest.approx(-0.5)
    assert math.isnan(mm.r2_identity([5, 5], [5, 6]))


# --------------------------------------------------------------------------- same as models.py


def test_pixel_metrics_match_models_keras_metrics():
    pytest.importorskip("keras")
    models = pytest.importorskip("models")
    from keras import ops

    rng = np.random.default_rng(0)
    t = (rng.random((4, 16, 16)) > 0.5).astype(np.float32)
    p = rng.random((4, 16, 16)).astype(np.float32)  # probabilities, thresholded at 0.5
    t[2] = 0
    p[2] = 0.1  # both empty -> 1
    t[3] = 0  # empty truth, non-empty prediction -> 0
    jac = ops.convert_to_numpy(models.jacard_coef(t[..., None], p[..., None]))
    dice = ops.convert_to_numpy(models.dice_coef(t[..., None], p[..., None]))
    ours = [mm.pixel_metrics(p[i], t[i]) for i in range(4)]
    np.testing.assert_allclose(jac, [o["jaccard"] for o in ours], atol=1e-6)
    np.testing.assert_allclose(dice, [o["dice"] for o in ours], atol=1e-6)
    assert jac[2] == 1.0 and jac[3] == 0.0


def test_count_components_is_8_connected_and_counts_touching_beads_once():
    m = np.zeros((10, 10), np.uint8)
    m[1:3, 1:3] = 1
    m[3:5, 3:5] = 1  # diagonal neighbour of the first square: same 8-connected component
    m[7:9, 7:9] = 1
    assert mm.count_components(m) == 2
    assert mm.count_components(np.zeros((4, 4))) == 0
    assert mm.count_components(m.astype(np.float32) * 0.9) == 2  # float: foreground > 0.5


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_threshold_rule_at_exactly_t_keras_numpy_trainer_and_predictor_agree(t):
    # One rule: foreground is prob > t. Pixels at exactly t (as float32) are background
    # for the Keras metric, microbead_metrics, the trainer's NumPy twin and the predictor.
    pytest.importorskip("keras")
    models = pytest.importorskip("models")
    from keras import ops

    import prediction as pm
    import training_outputs as tr

    t32 = float(np.float32(t))
    prob = np.full((16, 16), 0.05, np.float32)
    prob[2:6, 2:6] = t32  # exactly t: background
    prob[8:12, 8:12] = np.nextafter(np.float32(t32), np.float32(1))  # just above: bead
    truth = np.zeros((16, 16), np.uint8)
    truth[2:6, 2:6] = truth[8:12, 8:12] = 1
    expected = (prob > t32).astype(np.uint8)
    assert expected.sum() == 16
    np.testing.assert_array_equal(mm.above_threshold(prob, t32), expected.astype(bool))
    keras_iou = float(ops.convert_to_numpy(
        models.jacard_coef(truth[None, ..., None].astype(np.float32), prob[None, ..., None],
                           threshold=t32))[0])
    numpy_iou = mm.pixel_metrics(prob, truth, threshold=t32)["jaccard"]
    trainer_iou = float(tr.per_image_jaccard(prob[None], truth[None].astype(np.float32), t32)[0])
    assert keras_iou == pytest.approx(0.5) and numpy_iou == pytest.approx(0.5)
    assert trainer_iou == pytest.approx(0.5)
    cfg = {"preprocessing": {"scale": 1.0}, "postprocessing": {
        "threshold": 0.99, "median_bead_area_px": 16.0}}
    res = pm.finish_frame(prob, prob.shape, cfg, threshold=t32)
    np.testing.assert_array_equal(res["mask"], expected)
    assert res["beads"] == 1


# --------------------------------------------------------------------------- density bins


def test_density_bins_have_one_meaning_upper_edge_inclusive():
    edges = (0, 10, 50, 150)
    counts = [0, 1, 10, 11, 150, 151, 5000]
    assert mm.density_bin_ids(counts, edges).tolist() == [0, 1, 1, 2, 3, 4, 4]
    assert mm.density_bin_names(edges) == ["0", "1-10", "11-50", "51-150", ">150"]
    assert [mm.density_bin_name(c, edges) for c in counts] == \
        ["0", "1-10", "1-10", "11-50", "51-150", ">150", ">150"]
    # Half-integer edges (as analysis recommends) name the integer counts they hold.
    assert mm.density_bin_names([2.5, 7.5]) == ["0-2", "3-7", ">7"]
    # The trainer's strata from the same edges are the evaluation's bins (none sparse here).
    strata = mm.density_strata(counts, edges, min_per_stratum=1)
    assert strata.tolist() == [0, 1, 1, 2, 3, 4, 4]


def test_density_edges_quantiles_by_hand():
    assert mm.density_edges([1, 1, 2, 2, 3, 3, 4, 4, 5, 5]) == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]
    assert mm.density_edges([7]) == [6.5, 7.5] and mm.density_edges([]) == []


def test_density_edges_merge_until_two_per_stratum():
    assert mm.density_edges([0, 0, 0, 0, 0, 0, 0, 100]) == [-0.5, 100.5]  # lone dense image
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9, 17, 40):
        c = np.concatenate([rng.integers(0, 10, n - 1), [500]])
        edges = mm.density_edges(c)
        per_bin = np.histogram(c, bins=edges)[0]
        assert per_bin.sum() == n and per_bin.min() >= 2, (n, edges, per_bin)
        assert all(e % 1 == 0.5 for e in edges)
        assert len(per_bin) <= mm.DENSITY_MAX_BINS
        # The trainer's strata from these edges are exactly these bins.
        strata = mm.density_strata(c, edges)
        assert sorted(np.bincount(strata).tolist()) == sorted(per_bin.tolist())


def test_density_strata_merge_sparse_bins_into_the_smaller_neighbour():
    counts = [0, 0, 1, 1, 1, 2, 50, 100]
    # edges -> bins {0,0} {1,1,1,2} {50} {100}: the singleton {50} joins its smaller
    # neighbour {100}, so the dense images keep a stratum of their own.
    strata = mm.density_strata(counts, edges=[0.5, 10, 60])
    assert strata.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]


def test_density_strata_quantiles_ordered_and_filled():
    counts = np.arange(20)[::-1]
    strata = mm.density_strata(counts)
    assert np.bincount(strata).tolist() == [4] * 5
    order = np.argsort(counts)
    assert np.all(np.diff(strata[order]) >= 0)  # ids ordered by density
    assert mm.density_strata([3]).tolist() == [0]
    assert mm.density_strata([]).size == 0
    assert mm.density_strata([1, 9, 30]).tolist() == [0, 0, 0]  # 3 images: one stratum
