"""Resume of train_microbead_optimized.py: a kill at any point of an epoch loses nothing.

A run is killed (an exception that is not an ``Exception``, like the KeyboardInterrupt a
SIGINT raises) at every stage boundary of an epoch, resumed with ``--resume``, and compared
with an uninterrupted run. The validation Jaccard is scripted per epoch (NaN first, then an
improvement, then a plateau), so early stopping, the LR reduction and the best epoch are the
same in both runs by construction, while losses (from a data stream that restarts on resume)
are compared by structure only:

* the history has each epoch once, 1..E, and keeps the rows committed before the kill;
* the resumed model starts from the weights of the last committed epoch, with its optimizer
  state (iterations = epochs x steps at the end);
* early stopping and ReduceLROnPlateau counters survive the kill (same stop epoch, same LR
  column);
* the best model holds the weights of the best epoch, also when the kill came between the
  epoch's commit and the best-model save.

Tiny: 8 tiles of 32 px, a 4-filter depth-1 U-Net, 2 steps per epoch, run eagerly.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

import train_microbead_optimized as tmo
import training_loop
import training_outputs
from synthetic_dataset import generate_dataset

STEPS, EPOCHS = 2, 8
BASE = ["--models", "unet", "--filters", "4", "--depth", "1", "--image_size", "32",
        "--batch_size", "2", "--lr", "1e-2", "--loss", "bce_dice", "--verbose", "0",
        "--epochs", str(EPOCHS), "--steps_per_epoch", str(STEPS), "--patience", "3"]
# val_jacard_coef by epoch. Epoch 1 NaN: the best must still update afterwards. Best epoch 3.
# Early stopping (patience 3): waits 1, 2, 3 at epochs 4, 5, 6 -> stops after epoch 6.
# ReduceLROnPlateau (patience max(2, 3 // 3) = 2): halves the LR after epoch 5.
SCRIPT = [math.nan, 0.5, 0.6, 0.55, 0.55, 0.55, 0.55, 0.55]
EXPECTED_EPOCHS, BEST_EPOCH = 6, 3
LR = 0.01
EXPECTED_LR = [LR] * 5 + [LR / 2]


class Kill(BaseException):
    """Stands for a SIGKILL / walltime kill: no ``except Exception`` handler sees it."""


@pytest.fixture(scope="module", autouse=True)
def eager():
    """Models run eagerly here: tracing the train step would take most of each short run, and
    nothing tested depends on graph mode (test_train.py resumes a traced run)."""
    import models

    real = models.compile_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "compile_model", lambda *a, **k: real(*a, run_eagerly=True, **k))
        yield


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_data") / "ds"
    generate_dataset(out, n=8, size=32, seed=0, radius=8.0, log_file=False, style="rings")
    return out


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def as_float(v: str) -> float:
    return math.nan if v in ("", None) else float(v)


class Trace:
    """Scripts the monitored value and records weights; installed around make_callbacks."""

    def __init__(self):
        self.epoch = 0  # 1-based epoch in progress
        self.weights: dict[int, list] = {}  # epoch -> weights at its end
        self.begin = None  # weights when fit started
        self.kill_batch_at = None  # epoch whose first batch is killed
        self.kill_epoch_end_at = None  # epoch killed after its last callback

    def install(self, mp):
        import keras

        trace, real = self, training_loop.make_callbacks

        class Script(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                trace.begin = self.model.get_weights()

            def on_epoch_begin(self, epoch, logs=None):
                trace.epoch = epoch + 1

            def on_train_batch_end(self, batch, logs=None):
                if trace.epoch == trace.kill_batch_at:
                    raise Kill("mid-epoch")

            def on_epoch_end(self, epoch, logs=None):
                logs[training_loop.MONITOR] = SCRIPT[epoch]
                trace.weights[epoch + 1] = self.model.get_weights()

        class Last(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch + 1 == trace.kill_epoch_end_at:
                    raise Kill("after the epoch's last callback")

        mp.setattr(training_loop, "make_callbacks",
                   lambda *a, **k: [Script(), *real(*a, **k), Last()])


def run_dir_of(out: Path) -> Path:
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    trace = Trace()
    with pytest.MonkeyPatch.context() as mp:
        trace.install(mp)
        assert tmo.main(["--data_dir", str(dataset), "--output_dir", str(out), *BASE]) == 0
    run = run_dir_of(out)
    return {"run": run, "history": read_rows(run / "unet_history.csv"),
            "summary": read_rows(run / "training_summary.csv")[0], "trace": trace}


def test_uninterrupted_run_follows_the_script(reference):
    """Hand-computed: NaN first does not freeze the best, nor stop training early."""
    hist, summary = reference["history"], reference["summary"]
    assert [int(r["epoch"]) for r in hist] == list(range(1, EXPECTED_EPOCHS + 1))
    assert math.isnan(as_float(hist[0]["val_jacard_coef"]))
    assert [as_float(r["learning_rate"]) for r in hist] == pytest.approx(EXPECTED_LR)
    assert int(summary["best_epoch"]) == BEST_EPOCH
    assert float(summary["best_val_jacard"]) == pytest.approx(0.6)
    assert int(summary["epochs_run"]) == EXPECTED_EPOCHS


def _kill_in_save_model(mp, trace, epoch, predicate):
    import models

    real = models.save_model

    def save_model(model, path):
        if trace.epoch == epoch and predicate(Path(path)):
            if Path(path).parent.name == "checkpoints":
                real(model, path)  # the temporary archive is complete: kill before the rename
            raise Kill(f"while saving {Path(path).name}")
        return real(model, path)

    mp.setattr(models, "save_model", save_model)


def _kill_history_write(mp, trace, epoch):
    real = training_loop.write_history

    def write_history(path, rows):
        if trace.epoch == epoch:
            raise Kill("while writing the history")
        return real(path, rows)

    mp.setattr(training_loop, "write_history", write_history)


def _kill_summary_write(mp, trace):
    def write_summary(*a, **k):
        raise Kill("while writing the summary")

    mp.setattr(training_outputs, "write_summary", write_summary)


# name: (install the kill, last epoch committed when it strikes)
KILL_POINTS = {
    "mid_epoch": (lambda mp, t: setattr(t, "kill_batch_at", 5), 4),
    "checkpoint_write": (lambda mp, t: _kill_in_save_model(
        mp, t, 5, lambda p: p.parent.name == "checkpoints"), 4),
    "history_write": (lambda mp, t: _kill_history_write(mp, t, 5), 5),
    "best_model_save": (lambda mp, t: _kill_in_save_model(
        mp, t, BEST_EPOCH, lambda p: p.name.startswith("best_")), BEST_EPOCH),
    "epoch_end": (lambda mp, t: setattr(t, "kill_epoch_end_at", 5), 5),
    "final_model_save": (lambda mp, t: _kill_in_save_model(
        mp, t, EXPECTED_EPOCHS, lambda p: p.name.startswith("final_")), EXPECTED_EPOCHS),
    "summary_write": (_kill_summary_write, EXPECTED_EPOCHS),
}


def same_weights(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_then_resume_matches_uninterrupted_run(point, dataset, reference, tmp_path):
    import models

    install_kill, committed = KILL_POINTS[point]
    killed = Trace()
    with pytest.MonkeyPatch.context() as mp:
        killed.install(mp)
        install_kill(mp, killed)
        with pytest.raises(Kill):
            tmo.main(["--data_dir", str(dataset), "--output_dir", str(tmp_path), *BASE])
    run = run_dir_of(tmp_path)
    ckpt = training_loop.checkpoint_path(run, "unet")
    assert training_loop.read_checkpoint_state(ckpt)["epoch"] == committed
    before = read_rows(run / "unet_history.csv")

    resumed = Trace()
    with pytest.MonkeyPatch.context() as mp:
        resumed.install(mp)
        assert tmo.main(["--resume", str(run)]) == 0

    # The history: each epoch once, as many as uninterrupted, committed rows untouched.
    hist = read_rows(run / "unet_history.csv")
    ref = reference["history"]
    assert [int(r["epoch"]) for r in hist] == [int(r["epoch"]) for r in ref]
    kept = min(committed, len(before))  # a kill in the history write loses its row...
    assert hist[:kept] == before[:kept]  # ...which resume restores from the checkpoint
    for col in ("val_jacard_coef", "learning_rate"):  # scripted / driven by the script
        assert [as_float(r[col]) for r in hist] == pytest.approx(
            [as_float(r[col]) for r in ref], nan_ok=True), col
    assert all(math.isfinite(as_float(r["loss"])) for r in hist)

    summary = read_rows(run / "training_summary.csv")
    assert len(summary) == 1
    for key in ("best_epoch", "best_val_jacard", "epochs_run"):
        assert summary[0][key] == reference["summary"][key], key

    # Weights: the resumed fit starts from the last committed epoch; the best model is the
    # best epoch's weights; the optimizer counted every step exactly once.
    weights = {**{e: w for e, w in killed.weights.items() if e <= committed},
               **resumed.weights}
    if committed < EXPECTED_EPOCHS:
        assert same_weights(resumed.begin, killed.weights[committed])
    else:
        assert resumed.begin is None  # early stopping had ended training: no more epochs
    assert sorted(weights) == list(range(1, EXPECTED_EPOCHS + 1))
    best = models.load_model(run / "best_unet_model.hdf5")
    assert same_weights(best.get_weights(), weights[BEST_EPOCH])
    final = models.load_model(run / "final_unet_model.keras", compile=True)
    assert same_weights(final.get_weights(), weights[EXPECTED_EPOCHS])
    assert int(final.optimizer.iterations.numpy()) == EXPECTED_EPOCHS * STEPS


def test_history_best_ignores_nan():
    rows = [{"epoch": 1, "val_jacard_coef": math.nan}, {"epoch": 2, "val_jacard_coef": 0.4},
            {"epoch": 3, "val_jacard_coef": None}, {"epoch": 4, "val_jacard_coef": 0.4}]
    assert training_loop.history_best(rows) == (0.4, 2)  # first epoch reaching the maximum
    assert training_loop.history_best(rows[:1]) == (-math.inf, None)
    assert training_loop.history_best([]) == (-math.inf, None)


def _two_epoch_run(dataset, out: Path) -> Path:
    args = ["--data_dir", str(dataset), "--output_dir", str(out), *BASE, "--epochs", "2"]
    assert tmo.main(args) == 0
    return run_dir_of(out)


@pytest.fixture(scope="module")
def finished_run(dataset, tmp_path_factory) -> Path:
    return _two_epoch_run(dataset, tmp_path_factory.mktemp("finished"))


def test_resume_refuses_a_conflicting_flag_naming_the_saved_value(finished_run, caplog):
    def state():  # the run's files (its log may record the refusal)
        return {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")
                if p.is_file() and p.suffix != ".log"}

    before = state()
    rc = tmo.main(["--resume", str(finished_run), "--lr", "0.5", "--filters", "4",
                   "--batch-size", "3"])
    assert rc == 2
    msg = caplog.text
    assert "--lr 0.5 (saved: 0.01)" in msg and "--batch_size 3 (saved: 2)" in msg
    assert "--filters" not in msg  # equal to the saved value: fine
    assert str(finished_run / "config.json") in msg
    assert state() == before  # nothing trained, nothing rewritten


def test_resume_honours_epochs_and_says_so(dataset, tmp_path):
    run = _two_epoch_run(dataset, tmp_path)
    (run / "training_summary.csv").unlink()
    for p in run.glob("final_*"):
        p.unlink()
    assert tmo.main(["--resume", str(run), "--epochs", "3", "--data_dir", str(dataset),
                     "--models", "unet"]) == 0
    assert [int(r["epoch"]) for r in read_rows(run / "unet_history.csv")] == [1, 2, 3]
    log_text = (run / "training_console.log").read_text()
    assert "--epochs 3 from the command line (the run was saved with 2)" in log_text


def test_resume_gives_a_compiled_model_where_keras_cannot_deserialize(dataset, tmp_path,
                                                                     monkeypatch):
    """Another Keras version: load_model fails, the fallback rebuild used to be uncompiled."""
    import keras

    import models

    run = _two_epoch_run(dataset, tmp_path)
    (run / "training_summary.csv").unlink()
    for p in run.glob("final_*"):
        p.unlink()

    def cannot(*a, **k):
        raise TypeError("Unrecognized keyword arguments: ['quantization_config']")

    with monkeypatch.context() as mp:
        mp.setattr(keras.saving, "load_model", cannot)
        assert tmo.main(["--resume", str(run), "--epochs", "3"]) == 0
    final = models.load_model(run / "final_unet_model.keras", compile=True)
    assert type(final.optimizer).__name__ == "Adam"
    assert int(final.optimizer.iterations.numpy()) == 3 * STEPS


def test_write_summary_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "training_summary.csv"
    rows = [{"model": "unet", "best_epoch": 3, "best_val_jacard": 0.6}]
    training_outputs.write_summary(path, rows)
    old = path.read_bytes()

    def dies(self, rows):
        raise Kill("while writing the summary rows")

    monkeypatch.setattr(csv.DictWriter, "writerows", dies)
    with pytest.raises(Kill):
        training_outputs.write_summary(path, rows * 2)
    assert path.read_bytes() == old  # a reader never sees a header-only or half file
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
