"""The repository never takes in the users' images or a step's outputs by accident."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The README's "Using it on your data" folders and every step's default output.
USER_PATHS = ("dataset_microscope/images/160x_a_grid_r0_c0.png",
              "dataset_microscope/masks/160x_a_grid_r0_c0.png",
              "new_frames/frame.tif", "truth/masks/frame.png",
              "dataset_analysis/summary.json", "microbead_training_20260101_120000/x.hdf5",
              "predictions/masks/a_mask.png", "evaluation/per_image_metrics.csv",
              "assay/assay_results.json")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a checkout")
def test_user_data_and_outputs_are_git_ignored():
    proc = subprocess.run(["git", "check-ignore", "--no-index", *USER_PATHS], cwd=ROOT,
                          capture_output=True, text=True)
    ignored = set(proc.stdout.split())
    assert ignored == set(USER_PATHS), sorted(set(USER_PATHS) - ignored)
