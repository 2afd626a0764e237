"""training_data: the trainer's input pipeline (NumPy / OpenCV augmentation in a PyDataset).

The traps tested by name: the mask follows its image through every augmentation, no
augmentation returns an all-zero image; and the batch stream is a pure function of
``(seed, batch index)``, so the number of loader threads cannot change a run and a resumed
run continues the stream where it stopped. Importing the training modules imports neither
Keras nor TensorFlow (the backend is chosen by the entry point).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import training_data

ROOT = Path(__file__).resolve().parents[1]


def _asymmetric_pair(size=32):
    mask = np.zeros((size, size), np.float32)
    mask[4:24, 4:9] = 1  # an L: no flip or rotation maps it onto itself
    mask[19:24, 4:20] = 1
    image = 0.2 + 0.6 * mask[..., None]
    return image.astype(np.float32), mask


def test_mask_follows_image_through_every_augmentation():
    image, mask = _asymmetric_pair()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        img, msk = training_data.augment_pair(image, mask, rng, patch_size=24, rotation=15.0,
                                              intensity=False, elastic=seed % 2 == 1)
        assert img.shape == (24, 24, 1) and msk.shape == (24, 24, 1)
        assert set(np.unique(msk)) <= {0.0, 1.0}
        bright = img[..., 0] > 0.5
        inter = np.logical_and(bright, msk[..., 0] > 0).sum()
        union = np.logical_or(bright, msk[..., 0] > 0).sum()
        assert union == 0 or inter / union > 0.8, seed


def test_no_augmentation_returns_an_all_zero_image():
    image, mask = _asymmetric_pair()
    table = training_data.AUGMENTATION
    for seed in range(50):
        img, _ = training_data.augment_pair(image, mask, np.random.default_rng(seed))
        assert img.max() > 0 and img.std() > table.min_std
        assert np.mean((img <= 0) | (img >= 1)) < table.max_saturated


def test_intensity_draws_span_the_table_ranges():
    """Gamma, contrast and brightness are drawn from the one table: a constant image (no
    contrast to change) shifts by the brightness offset plus the gamma's effect only."""
    table = training_data.AUGMENTATION
    assert table.gamma == (0.8, 1.25) and table.contrast == (0.8, 1.2)
    assert table.rotation_deg == 15.0
    img = np.full((16, 16, 1), 0.5, np.float32)
    noisy = img + np.random.default_rng(0).normal(0, 0.05, img.shape).astype(np.float32)
    means = [training_data.augment_intensity(noisy, np.random.default_rng(s)).mean()
             for s in range(300)]
    lo = 0.5 ** table.gamma[1] + table.brightness[0]
    hi = 0.5 ** table.gamma[0] + table.brightness[1]
    assert lo - 0.02 <= min(means) and max(means) <= hi + 0.02
    assert max(means) - min(means) > 0.5 * (hi - lo)  # the ranges are really used


def _args(**kw):
    base = {"batch_size": 3, "patch_size": 16, "rotation": 15.0, "intensity_aug": True,
            "elastic": False}
    return argparse.Namespace(**{**base, **kw})


def test_batch_stream_is_a_pure_function_of_seed_and_index():
    rng = np.random.default_rng(0)
    images = rng.random((5, 32, 32, 1)).astype(np.float32)
    masks = (rng.random((5, 32, 32)) > 0.5).astype(np.uint8)
    train_idx, val_idx = [0, 1, 2, 3], [4]
    one, _ = training_data.make_datasets(images, masks, train_idx, val_idx, _args(), 7,
                                         workers=1)
    two, _ = training_data.make_datasets(images, masks, train_idx, val_idx, _args(), 7,
                                         workers=2)
    later, _ = training_data.make_datasets(images, masks, train_idx, val_idx, _args(), 7,
                                           workers=1, first_batch=4)
    other, _ = training_data.make_datasets(images, masks, train_idx, val_idx, _args(), 8,
                                           workers=1)
    for i in range(6):
        a, b = one[i], two[i]
        assert a[0].shape == (3, 16, 16, 1) and a[1].shape == (3, 16, 16, 1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # A resumed run (first_batch = epochs done x steps) continues the same stream.
    assert np.array_equal(later[0][0], one[4][0]) and np.array_equal(later[1][1], one[5][1])
    assert not np.array_equal(other[0][0], one[0][0])
    # Each pass over the training set visits every tile once (shuffle + repeat semantics).
    seen = [training_data._permutation(7, p, tuple(train_idx)) for p in range(3)]
    assert all(sorted(s.tolist()) == train_idx for s in seen)


@pytest.mark.parametrize("replicas", [1, 2])
def test_validation_covers_every_image_in_order(replicas):
    rng = np.random.default_rng(1)
    images = rng.random((5, 16, 16, 1)).astype(np.float32)
    masks = (rng.random((5, 16, 16)) > 0.5).astype(np.uint8)
    _, val = training_data.make_datasets(images, masks, [0, 1], [2, 3, 4],
                                         _args(batch_size=2), 0, replicas=replicas,
                                         workers=1)
    xs = np.concatenate([val[i][0] for i in range(len(val))])
    assert np.array_equal(xs[:3], images[[2, 3, 4]])
    assert len(xs) == (3 if replicas == 1 else 4)  # padded to a multiple of the replicas
    assert all(len(val[i][0]) % replicas == 0 for i in range(len(val)))


def test_importing_the_training_modules_imports_no_backend():
    code = ("import sys, training_data, training_split, training_loop, training_outputs, "
            "train_microbead_optimized; print('keras' in sys.modules, "
            "'tensorflow' in sys.modules, 'jax' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "False", "False"]
