"""The trainer under ``KERAS_BACKEND=jax`` with TensorFlow hidden: the same code, not a
substitute. One tiny training epoch through ``train_microbead_optimized.main``, then a
prediction with the model it wrote through ``predict_microscope.main``, in a child process
whose ``import tensorflow`` raises ImportError (a ``sys.meta_path`` finder installed by a
``sitecustomize`` module on PYTHONPATH). Skipped where JAX is not installed.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HIDE_TENSORFLOW = textwrap.dedent('''
    import sys


    class _NoTensorFlow:
        """Makes ``import tensorflow`` (and its submodules) fail as if it were not installed."""

        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None


    sys.meta_path.insert(0, _NoTensorFlow())
''')

CHILD = textwrap.dedent('''
    import json, sys
    import train_microbead_optimized

    data, out, pred = sys.argv[1:4]
    rc = train_microbead_optimized.main([
        "--data_dir", data, "--output_dir", out, "--models", "unet", "--filters", "4",
        "--depth", "1", "--image_size", "32", "--batch_size", "2", "--epochs", "1",
        "--steps_per_epoch", "2", "--verbose", "0", "--val_split", "frames",
        "--run_dir_file", out + "/run_dir.txt"])
    result = {"train_rc": rc, "tensorflow_loaded": "tensorflow" in sys.modules}
    import keras
    result["backend"] = keras.backend.backend()
    if rc == 0:
        run = open(out + "/run_dir.txt").read().strip()
        import predict_microscope
        try:
            result["predict_rc"] = predict_microscope.main([
                "--model", run, "--input_dir", data + "/images", "--output_dir", pred,
                "--no_figures"])
        except Exception as exc:  # reported, so the training half still counts
            import traceback
            result["predict_error"] = traceback.format_exc()[-3000:]
    result["tensorflow_loaded"] = "tensorflow" in sys.modules
    print("RESULT " + json.dumps(result))
''')


def _jax_env(folder, **extra) -> dict:
    """Environment of a child process on the JAX CPU backend in which ``import tensorflow``
    fails (a ``sitecustomize`` under ``folder``); ``extra`` variables are added."""
    hide = folder / "hide_tf"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_TENSORFLOW)
    return dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(hide), str(ROOT)]), **extra)


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    pytest.importorskip("jax")
    from synthetic_dataset import generate_dataset

    tmp = tmp_path_factory.mktemp("jax")
    data = tmp / "ds"
    generate_dataset(data, n=6, size=32, seed=0, radius=8.0, log_file=False, style="rings")
    env = _jax_env(tmp)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data), str(tmp / "runs"),
                           str(tmp / "pred")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"result": json.loads(lines[-1][len("RESULT "):]), "tmp": tmp,
            "log": proc.stderr}


def test_one_training_epoch_under_jax_without_tensorflow(jax_run):
    res = jax_run["result"]
    assert res["backend"] == "jax"
    assert res["train_rc"] == 0, jax_run["log"][-3000:]
    (run,) = (jax_run["tmp"] / "runs").glob("microbead_training_*")
    for name in ("best_unet_model.hdf5", "final_unet_model.keras", "unet_history.csv",
                 "config.json", "training_summary.csv"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["keras_backend"] == "jax"
    assert cfg["environment"]["tensorflow"] is None  # really not importable


def test_prediction_with_the_jax_trained_model_without_tensorflow(jax_run):
    """The prediction half (predict_microscope.py is another module's concern)."""
    res = jax_run["result"]
    assert "predict_error" not in res, res.get("predict_error")
    assert res["predict_rc"] == 0, jax_run["log"][-3000:]
    assert not res["tensorflow_loaded"]
    assert (jax_run["tmp"] / "pred" / "prediction_summary.csv").is_file()


def test_two_jax_devices_train_data_parallel(tmp_path):
    """Several local JAX devices: keras.distribution.DataParallel, one replica per device
    (two CPU devices stand in for GPUs); validation batches split evenly over them."""
    pytest.importorskip("jax")
    from synthetic_dataset import generate_dataset

    data = tmp_path / "ds"
    generate_dataset(data, n=5, size=32, seed=1, radius=8.0, log_file=False, style="rings")
    env = _jax_env(tmp_path, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    code = ("import sys, train_microbead_optimized as t; sys.exit(t.main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, "--data_dir", str(data), "--output_dir",
         str(tmp_path / "runs"), "--models", "unet", "--filters", "4", "--depth", "1",
         "--image_size", "32", "--batch_size", "2", "--epochs", "1", "--steps_per_epoch", "2",
         "--verbose", "0", "--val_split", "frames"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = (tmp_path / "runs").glob("microbead_training_*")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["replicas"] == 2
    assert (run / "best_unet_model.hdf5").is_file()
