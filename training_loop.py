"""The training loop: backend setup (seed, precision, devices), the per-epoch commit
(checkpoint + history, resumable after a kill at any point), the monitoring callbacks and
the training of one model on one split.

Runs on any Keras 3 backend. TensorFlow-only parts (``tf.distribute`` strategies, logical
CPUs, GPU memory growth) are used only when TensorFlow is the backend; under JAX several
local devices train with ``keras.distribution.DataParallel``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

import bead_filter
import microbead_io as mio
import training_data
import training_outputs
from microbead_config import HISTORY_COLUMNS, read_history

log = logging.getLogger("microbead.train")

def auto_steps_per_epoch(n_train: int, batch_size: int, minimum: int = 50) -> int:
    """Optimizer steps per epoch, decoupled from the dataset size.

    One pass over 62 images at batch 32 is a single step: the old pipeline took 100 steps in
    100 epochs. nnU-Net fixes 250 iterations per epoch; we use at least ``minimum`` (50) and
    at least one full pass.
    """
    return max(minimum, math.ceil(n_train / max(1, batch_size)))


def auto_bn_momentum(steps_per_epoch: int) -> float:
    """BatchNorm momentum so the moving statistics are refreshed ~5 times per epoch.

    The EMA of momentum ``m`` averages over ~``1/(1-m)`` steps. Keras' 0.99 needs hundreds of
    steps before the moving statistics match the current weights, so a short run validates
    an untrained-looking model (measured: val IoU 0.00 in inference mode vs 0.84 with batch
    statistics after 80 steps). ``1 - 5/steps`` clipped to [0.8, 0.99]: 25 steps -> 0.8,
    50 -> 0.9, 250 -> 0.98.
    """
    return float(np.clip(1.0 - 5.0 / max(1, steps_per_epoch), 0.8, 0.99))



# ----------------------------------------------------------------------------- callbacks

# Early stopping, LR reduction and best-model selection all follow this value.
MONITOR = "val_jacard_coef"
# The resume state travels inside the checkpoint archive (an extra member Keras ignores): the
# weights, the optimizer and the state that says which epoch they are are one file, committed
# by one rename, so they can never disagree (see ``save_checkpoint``).
RESUME_STATE_MEMBER = "microbead_resume_state.json"
RESUME_STATE_VERSION = 1
# Counters of the monitoring callbacks carried across a resume (Keras resets them in
# ``on_train_begin``).
CALLBACK_STATE = {
    "early_stopping": ("wait", "best", "best_epoch", "stopped_epoch"),
    "lr_plateau": ("wait", "best", "cooldown_counter"),
}
# Why training stopped before --epochs (a resumed run does not continue after any of them).
STOP_EARLY_STOPPING, STOP_TIME_LIMIT, STOP_NAN = "early_stopping", "max_minutes", "nan_loss"


def history_best(rows, key: str = MONITOR) -> tuple[float, int | None]:
    """Best (largest) ``key`` over history rows, ignoring NaN and missing values.

    Parameters
    ----------
    rows : list of dict
        History rows with a 1-based ``epoch`` and ``key`` (float, NaN or None).

    Returns
    -------
    (value, epoch)
        The first epoch reaching the maximum; ``(-inf, None)`` when no row has a finite value
        (``max`` over a list starting with NaN would return NaN, after which nothing improves).
    """
    best, best_epoch = -math.inf, None
    for r in rows:
        v = r.get(key)
        v = math.nan if v is None else float(v)
        if math.isfinite(v) and v > best:
            best, best_epoch = v, int(r["epoch"])
    return best, best_epoch


def checkpoint_path(out_dir: Path, model_name: str) -> Path:
    return Path(out_dir) / "checkpoints" / f"last_{model_name}.keras"


def save_checkpoint(model, path: Path, state: dict) -> None:
    """Write the resume point: weights + optimizer (``.keras``) with ``state`` inside it.

    One temporary archive gets the model and the state member, then one ``os.replace``
    commits both: a kill at any moment leaves the previous epoch's checkpoint whole.
    """
    import models

    def write(tmp):
        models.save_model(model, tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(RESUME_STATE_MEMBER, json.dumps(mio.json_ready(state), indent=1))

    mio.atomic_write(path, write)


def read_checkpoint_state(path: Path) -> dict | None:
    """The resume state stored by :func:`save_checkpoint`; None without a checkpoint or for a
    checkpoint written before the state was stored in it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if RESUME_STATE_MEMBER not in archive.namelist():
                return None
            state = json.loads(archive.read(RESUME_STATE_MEMBER))
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({exc}); move it away to restart "
                         "this model from epoch 1") from None
    if state.get("format_version") != RESUME_STATE_VERSION:
        raise ValueError(f"{path}: resume state format_version {state.get('format_version')!r}"
                         f", this trainer reads {RESUME_STATE_VERSION}")
    return state


def restore_checkpoint(model, path: Path, state: dict) -> None:
    """Load weights and optimizer state into ``model``, built and compiled as for training.

    Rebuilding from the run's options and loading the weights (not ``keras.saving.
    load_model``) always gives a compiled model with the run's loss, metrics and optimizer,
    also where another Keras version cannot deserialize the stored config.
    """
    model.optimizer.build(model.trainable_variables)  # so its variables load too
    try:
        model.load_weights(path)
    except Exception as exc:  # Keras raises ValueError, KeyError... by version
        raise ValueError(f"{path}: cannot load the checkpoint into the configured model "
                         f"({type(exc).__name__}: {str(exc).strip()[:200]})") from exc
    model.optimizer.learning_rate = state["learning_rate"]


def write_history(path: Path, rows: list[dict]) -> None:
    """``<model>_history.csv`` rewritten whole and atomically (NaN as an empty cell)."""
    mio.atomic_write_csv(path, rows, HISTORY_COLUMNS)


def _nan_as_worst(base):
    """``base`` (a Keras monitor callback, mode max) taking a NaN value as the worst one.

    Keras' EarlyStopping adopts a first NaN as its best; every later comparison with NaN is
    False, so it never improves and stops after ``patience`` epochs.
    """

    class NanAsWorst(base):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(self.monitor)
            if value is not None and math.isnan(float(value)):
                logs = {**logs, self.monitor: -math.inf}
            super().on_epoch_end(epoch, logs)

    NanAsWorst.__name__ = NanAsWorst.__qualname__ = base.__name__
    return NanAsWorst


def make_callbacks(model_name, out_dir: Path, y_val, args, resume_state=None,
                   start_time=None) -> list:
    """Callbacks: LR schedule, stops, the per-epoch commit (checkpoint, then history), best.

    Order matters. Keras runs ``on_epoch_end`` in list order, so the schedule and the stops
    update their counters first, ``EpochRecorder`` then commits the epoch (checkpoint with
    those counters, then the history row) and only then is the best model saved: a kill
    between the commit and the best save is repaired on resume from the checkpoint (see
    ``train_one_model``), whereas a best model saved before its epoch is committed could be
    the weights of an epoch the resumed run redoes differently.

    Parameters
    ----------
    y_val : float array (N, H, W, 1)
        Validation masks (for the foreground fraction the collapse check compares with).
    resume_state : dict or None
        :func:`read_checkpoint_state` of the checkpoint training continues from.
    """
    import keras

    import models

    class TimeLimit(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.fired = False

        def on_epoch_end(self, epoch, logs=None):
            if not args.max_minutes:
                return
            over = time.time() - start_time > 60 * args.max_minutes
            # Each worker has its own clock: they must agree, or the ones that go on hang
            # in their next collective op.
            strategy = getattr(self.model, "distribute_strategy", None)
            if any_replica(strategy, lambda: over):
                log.warning("%s: --max_minutes %.1f reached%s; stopping", model_name,
                            args.max_minutes, "" if over else " on another worker")
                self.fired = True
                self.model.stop_training = True

    early = _nan_as_worst(keras.callbacks.EarlyStopping)(
        monitor=MONITOR, mode="max", patience=args.patience, restore_best_weights=False)
    schedule = lr_callback(args)
    time_limit = TimeLimit()
    stateful = {"early_stopping": early}
    if args.lr_schedule != "cosine":  # the cosine schedule is a function of the epoch
        stateful["lr_plateau"] = schedule
    best_model = models.BestModelCheckpoint(out_dir / f"best_{model_name}_model.hdf5",
                                            monitor=MONITOR, mode="max")
    rows = list(resume_state["history"]) if resume_state else []
    best_model.best, best_epoch = history_best(rows)
    best_model.best_epoch = None if best_epoch is None else best_epoch - 1

    class EpochRecorder(keras.callbacks.Callback):
        """Commit each epoch: checkpoint (weights, optimizer, resume state), then history.

        The history row is written only after the checkpoint it describes; on resume the
        history is rewritten from the state inside the checkpoint, so it never holds an
        epoch whose weights were lost, nor lacks one whose weights were kept.
        """

        def __init__(self):
            super().__init__()
            self.t0, self.lr = time.time(), math.nan
            self.ckpt = checkpoint_path(out_dir, model_name)
            self.history_path = out_dir / f"{model_name}_history.csv"
            self.true_fg = float(np.mean(y_val))

        def on_train_begin(self, logs=None):
            # After the other callbacks' on_train_begin (later in the list), which reset them.
            saved = (resume_state or {}).get("callbacks", {})
            for key, cb in stateful.items():
                for attr in CALLBACK_STATE[key]:
                    value = saved.get(key, {}).get(attr)
                    if value is not None:  # None: non-finite or unset; keep Keras' reset
                        setattr(cb, attr, value)

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()
            # After a scheduler set it: the rate this epoch trains with.
            self.lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            # models.pred_fg is a compiled metric: no extra forward pass over validation.
            fg = float(logs.get("val_pred_fg", np.nan))
            logs["val_true_fg"] = self.true_fg
            if fg < 0.1 * self.true_fg or fg > min(0.95, 3 * self.true_fg + 0.05):
                log.warning(
                    "!!! %s epoch %d: predictions COLLAPSED: %.2f%% of validation pixels "
                    "predicted as bead vs %.2f%% true. The model is predicting (almost) "
                    "all-%s.", model_name, epoch + 1, 100 * fg, 100 * self.true_fg,
                    "background" if fg < self.true_fg else "foreground",
                )
            row = mio.json_ready({
                **{k: float(logs[k]) for k in HISTORY_COLUMNS if k in logs},
                "epoch": epoch + 1, "learning_rate": self.lr,
                "epoch_time_s": round(time.time() - self.t0, 3),
            })
            rows.append(row)
            if early.stopped_epoch == epoch and epoch > 0:
                stop = STOP_EARLY_STOPPING
            elif time_limit.fired:
                stop = STOP_TIME_LIMIT
            else:
                stop = STOP_NAN if self.model.stop_training else None
            save_checkpoint(self.model, self.ckpt, {
                "format_version": RESUME_STATE_VERSION,
                "model": model_name,
                "epoch": epoch + 1,
                "learning_rate": float(
                    keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                "stop_reason": stop,
                "callbacks": {key: {attr: getattr(cb, attr) for attr in CALLBACK_STATE[key]}
                              for key, cb in stateful.items()},
                "history": rows,
            })
            write_history(self.history_path, rows)
            score = logs.get(MONITOR, np.nan)
            log.info(
                "%s epoch %d: loss %.4f  jacard %.4f  val_loss %.4f  val_jacard %.4f%s  "
                "lr %.2e  pred fg %.1f%% (true %.1f%%)  %.1fs", model_name, epoch + 1,
                logs.get("loss", np.nan), logs.get("jacard_coef", np.nan),
                logs.get("val_loss", np.nan), score,
                " *" if history_best(rows)[1] == epoch + 1 else "", self.lr,
                100 * fg, 100 * self.true_fg, row["epoch_time_s"],
            )

    return [
        keras.callbacks.TerminateOnNaN(),
        schedule,
        early,
        time_limit,
        EpochRecorder(),
        best_model,
    ]


def step_timer(on_measured, steps: int, timed: int = 3):
    """Callback timing the first optimizer steps of a ``fit`` (the first one, which traces
    the graph, is left out when there are more), then calling ``on_measured(seconds per
    step)`` once."""
    import keras

    last = max(0, min(int(steps) - 1, timed))  # batch index whose end closes the timing
    first = 1 if last >= 1 else 0

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.t0, self.done = None, False

        def on_train_batch_begin(self, batch, logs=None):
            if batch == first and self.t0 is None:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if not self.done and self.t0 is not None and batch >= last:
                self.done = True
                on_measured((time.perf_counter() - self.t0) / (batch - first + 1))

    return StepTimer()


def cosine_lr(epoch: int, base_lr: float, epochs: int, floor: float = 0.05) -> float:
    """Learning rate of 0-based ``epoch``: cosine from ``base_lr`` to ``floor * base_lr``."""
    t = min(1.0, epoch / max(1, epochs - 1))
    return float(base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))))


def lr_callback(args):
    """ReduceLROnPlateau on val Jaccard (seed recipe) or a per-epoch cosine schedule."""
    import keras

    if args.lr_schedule == "cosine":
        return keras.callbacks.LearningRateScheduler(
            lambda epoch, lr: cosine_lr(epoch, args.lr, args.epochs))
    return _nan_as_worst(keras.callbacks.ReduceLROnPlateau)(
        monitor=MONITOR, mode="max", factor=0.5,
        patience=max(2, args.patience // 3), min_lr=1e-6, verbose=0,
    )



# ----------------------------------------------------------------------------- devices

def any_replica(strategy, flag_fn) -> bool:
    """True if ``flag_fn()`` is true on any replica (all workers) of ``strategy``.

    An all-reduce across replicas, so every worker of a MultiWorkerMirroredStrategy
    takes the same decision from its own clock. ``flag_fn`` runs in each replica's context.
    Without a strategy, or with one replica, it is just ``flag_fn()``.
    """
    if (strategy is None or getattr(strategy, "num_replicas_in_sync", 1) <= 1
            or isinstance(strategy, SingleDevice)):  # one process, one clock
        return bool(flag_fn())
    import tensorflow as tf

    def step():
        flag = flag_fn()
        value = tf.cast(flag, tf.float32) if tf.is_tensor(flag) else tf.constant(float(flag))
        # ReduceOp has SUM and MEAN only: a sum > 0 means some replica said yes.
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM,
                                                              value)

    result = strategy.experimental_local_results(strategy.run(step))
    return bool(float(result[0]) > 0.5)


def make_strategy(kind: str):
    """Distribution strategy: MirroredStrategy for >1 local GPU, MultiWorker with TF_CONFIG."""
    import tensorflow as tf

    n_workers = 1
    if os.environ.get("TF_CONFIG"):
        cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
        n_workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if kind == "multiworker" or (kind == "auto" and n_workers > 1):
        # Before anything lists devices: collective ops must be configured at startup.
        return _multiworker_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if kind == "mirrored" or (kind == "auto" and len(gpus) > 1):
        devices = [d.name for d in (gpus if gpus else cpus)]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def _multiworker_strategy():
    """MultiWorkerMirroredStrategy whose ``reduce`` accepts what Keras 3 passes it.

    Keras 3 (3.0-3.15 at least) calls ``strategy.reduce`` on a whole ``(x, y)`` batch before
    ``fit`` and on scalar metrics with ``axis=0`` (keras-team/keras#20585); the collective
    strategy only reduces one value of rank >= 1 along an axis. Reduce each leaf, scalars
    with ``axis=None``.
    """
    import tensorflow as tf

    class NestedReduceMultiWorker(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            parent = super()

            def one(v):
                first = self.experimental_local_results(v)[0]
                ax = None if axis is not None and first.shape.rank == 0 else axis
                return parent.reduce(reduce_op, v, ax)

            return tf.nest.map_structure(one, value)

    return NestedReduceMultiWorker()


class SingleDevice:
    """What the trainer needs of a ``tf.distribute`` strategy, for one process that is not
    using one (another backend, or JAX with its ``keras.distribution``): a scope and the
    number of replicas a batch is split over."""

    def __init__(self, replicas: int = 1):
        self.num_replicas_in_sync = int(replicas)

    def scope(self):
        return contextlib.nullcontext()


def accelerators(backend: str) -> list[str]:
    """Names of the accelerators ``backend`` sees (empty on a CPU-only machine)."""
    if backend == "tensorflow":
        import tensorflow as tf

        return [g.name for g in tf.config.list_physical_devices("GPU")]
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices()
                if d.platform != "cpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def _setup_tensorflow(args) -> tuple[list[str], object]:
    """Logical CPUs (tests), GPU memory growth, the ``tf.distribute`` strategy."""
    import tensorflow as tf

    import models

    if args.logical_cpus and args.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)
    gpus = tf.config.list_physical_devices("GPU")  # lists without initialising the runtime
    for g in gpus:
        try:
            tf.config.experimental.set_memory_growth(g, True)
        except (RuntimeError, ValueError):
            pass
    log.info("%s", models.device_line())
    return [g.name for g in gpus], make_strategy(args.strategy)


def _setup_distribution(args, backend: str) -> tuple[list[str], object]:
    """Devices of a backend other than TensorFlow; data parallel over several local ones
    (``keras.distribution.DataParallel``, where the backend has it: JAX)."""
    import keras

    import models

    gpus = accelerators(backend)
    log.info("%s", models.device_line())
    if args.strategy in ("mirrored", "multiworker"):
        log.warning("--strategy %s is TensorFlow's; the %s backend uses "
                    "keras.distribution instead", args.strategy, backend)
    replicas = 1
    if args.strategy != "none" and backend == "jax":
        devices = keras.distribution.list_devices()
        if len(devices) > 1:
            keras.distribution.set_distribution(
                keras.distribution.DataParallel(devices=devices))
            replicas = len(devices)
    return gpus, SingleDevice(replicas)


def setup_backend(args) -> tuple[dict, object]:
    """Devices, distribution, seed and mixed precision, for the backend Keras runs on.

    TensorFlow: the ``tf.distribute`` strategy is created here, before any other TensorFlow
    call initialises the runtime (MultiWorkerMirroredStrategy cannot be created afterwards).
    Other backends: :class:`SingleDevice` (with ``keras.distribution.DataParallel`` over
    several JAX devices). Returns (facts for config.json, strategy).
    """
    import models  # first: importing it silences TensorFlow's native start-up log

    keras = models.keras
    backend = keras.backend.backend()
    if backend == "tensorflow":
        gpus, strategy = _setup_tensorflow(args)
    else:
        gpus, strategy = _setup_distribution(args, backend)
    keras.utils.set_random_seed(args.seed)
    mp = args.mixed_precision == "on" or (args.mixed_precision == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if mp else "float32")
    return {"gpus": gpus, "mixed_precision": mp}, strategy


# ----------------------------------------------------------------------------- training

def train_one_model(name, data, train_idx, val_idx, args, out_dir: Path, strategy) -> dict:
    """Train one architecture on one split; returns its ``training_summary.csv`` row."""

    import models

    x, y = data["images"], data["masks"]
    x_val, y_val = training_data.validation_arrays(x, y, val_idx, data.get("val_windows"))
    steps = args.steps_per_epoch or auto_steps_per_epoch(len(train_idx), args.batch_size)
    bn_m = args.bn_momentum or auto_bn_momentum(steps)
    history_path = out_dir / f"{name}_history.csv"
    last_ckpt = checkpoint_path(out_dir, name)
    state = read_checkpoint_state(last_ckpt)
    if state is None and last_ckpt.is_file():
        log.warning("%s: %s holds no resume state (written by an older trainer: which epoch "
                    "it is cannot be told); training this model again from epoch 1",
                    name, last_ckpt)
    initial_epoch = int(state["epoch"]) if state else 0
    # A resumed run continues the batch stream where the committed epochs left it.
    train_ds, val_ds = training_data.make_datasets(
        x, y, train_idx, val_idx, args, args.seed,
        replicas=int(strategy.num_replicas_in_sync), val_data=(x_val, y_val[..., 0]),
        first_batch=initial_epoch * steps)

    with strategy.scope():
        model = models.build_model(
            name, (None, None, args.channels), filters=args.filters, depth=args.depth,
            dropout=args.dropout, batch_norm=True, bn_momentum=bn_m,
        )
        models.compile_model(model, lr=args.lr, loss=args.loss, threshold=args.threshold)
        if state:
            restore_checkpoint(model, last_ckpt, state)
    if state:
        log.info("%s: resuming after epoch %d from %s", name, initial_epoch, last_ckpt)
        # The checkpoint is the commit record; a kill between it and the history write
        # left the file a row short.
        write_history(history_path, state["history"])
        if history_best(state["history"])[1] == initial_epoch:
            # Killed between the commit of the best epoch and the best-model save.
            models.save_model(model, out_dir / f"best_{name}_model.hdf5")
    elif history_path.exists():
        history_path.unlink()  # rows of a run that never committed an epoch
    params = int(model.count_params())
    log.info("%s: %s parameters, %d steps/epoch x %d epochs, batch %d, BN momentum %.3f, "
             "%d train / %d val images", name, f"{params:,}", steps, args.epochs,
             args.batch_size, bn_m, len(train_idx), len(val_idx))
    t0 = time.time()
    # Each epoch is logged in one line by EpochRecorder; Keras' own bar only on a terminal.
    verbose = args.verbose if args.verbose >= 0 else (1 if sys.stdout.isatty() else 0)
    stop = (state or {}).get("stop_reason")
    if stop:  # as the uninterrupted run would have: it stopped there and finished
        log.info("%s: training had stopped after epoch %d (%s); not continuing", name,
                 initial_epoch, stop)
    elif initial_epoch < args.epochs:
        callbacks = make_callbacks(name, out_dir, y_val, args, state, t0)
        notice = data.get("cpu_notice")
        if notice is not None and not notice["done"]:
            notice["done"] = True  # once per run: the first model trained on this CPU
            callbacks.append(step_timer(lambda step_s: training_outputs.log_cpu_notice(
                step_s, args, name, steps, len(val_idx), x.shape[1] * x.shape[2],
                notice["folds"]), steps))
        model.fit(
            train_ds, validation_data=val_ds, epochs=args.epochs, initial_epoch=initial_epoch,
            steps_per_epoch=steps, callbacks=callbacks,
            verbose=verbose, shuffle=False,  # the dataset shuffles itself
        )
    train_time = time.time() - t0
    models.save_model(model, out_dir / f"final_{name}_model.hdf5")
    models.save_model(model, out_dir / f"final_{name}_model.keras")

    hist = read_history(history_path)
    if not hist:
        raise RuntimeError(f"{name}: no epoch completed")
    vj = np.array([r["val_jacard_coef"] for r in hist])
    best_epoch = history_best(hist)[1]
    if best_epoch is None:
        raise RuntimeError(f"{name}: no epoch has a finite {MONITOR} ({history_path}); "
                           "no best model")
    best_i = [int(r["epoch"]) for r in hist].index(best_epoch)
    best = load_best(out_dir, name)
    models.save_model(best, out_dir / f"best_{name}_model.keras")
    prob = predict_in_batches(best, x_val, args.batch_size)
    reloaded = float(np.mean(training_outputs.per_image_jaccard(prob, y_val, args.threshold)))
    batchstat = batchstat_jaccard(best, x_val, y_val, args.threshold, args.batch_size)
    if abs(reloaded - vj[best_i]) > 1e-3:
        log.warning("%s: reloaded best model scores %.4f but %.4f was logged", name,
                    reloaded, vj[best_i])
    training_outputs.save_snapshot(out_dir / f"validation_snapshot_{name}.png", name, x_val,
                                  y_val, prob, [data["files"][i] for i in val_idx],
                                  args.threshold)
    images_dir = training_data.dataset_dirs(args.data_dir)[0]
    rgb_val = training_data.colour_tiles([images_dir / data["files"][i] for i in val_idx],
                                         args.image_size, data.get("val_windows"))
    calib, pred_labels = training_outputs.calibrate_on_validation(
        prob, x_val, y_val, args.threshold, data["median_area_px"], colour=rgb_val)
    mio.atomic_write_json(out_dir / training_outputs.calibration_file(name), calib)
    log.info("%s: %s", name, bead_filter.describe(calib["object_filter"]))
    v = calib["validation"]
    log.info("%s: on the validation tiles the filter keeps %d of %d predicted objects: drops "
             "%d of the %d no labelled bead confirms and %d of the %d it does; predicted beads "
             "are %.1f px (median component, model scale) against %.1f px in the masks",
             name, v["kept"], v["objects"], v["dropped_unmatched"], v["unmatched"],
             v["dropped_matched"], v["matched"], calib["predicted_bead_area_px"] or 0.0,
             data["median_area_px"])
    training_outputs.append_validation_counts(
        out_dir / training_outputs.VALIDATION_COUNTS, name, prob, y_val,
        [data["files"][i] for i in val_idx], args.threshold, data["median_area_px"],
        data["model_scale"], pred_labels)
    return {
        "model": name,
        "best_epoch": int(hist[best_i]["epoch"]),
        "best_val_jacard": round(float(vj[best_i]), 6),
        "final_val_jacard": round(float(vj[-1]), 6),
        "train_time": round(train_time, 1),
        "params": params,
        "epochs_run": len(hist),
        "best_val_dice": round(float(hist[best_i].get("val_dice_coef", np.nan)), 6),
        "best_val_jacard_reloaded": round(reloaded, 6),
        "val_jacard_batchstats": round(batchstat, 6),
        "label_ceiling": (round(data["label_ceiling"]["pooled_jaccard"], 4)
                          if data.get("label_ceiling") else ""),
        "_steps_per_epoch": steps,
        "_bn_momentum": bn_m,
        "_train_jacard": float(hist[best_i].get("jacard_coef", np.nan)),
        "_n_val": len(val_idx),
        "_val_frames": sorted({data["groups"][i] for i in val_idx}),
    }


def load_best(out_dir: Path, name: str):
    import models

    return models.load_model(out_dir / f"best_{name}_model.hdf5")


def predict_in_batches(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Inference-mode probabilities ``(N, H, W, 1)`` float32, by direct calls on chunks.

    Not ``model.predict``: each reloaded best model gets its own traced predict function,
    and a last batch of another size traces it again, so three models end the log with
    TensorFlow's "triggered tf.function retracing" warning. Direct calls trace nothing.
    """
    import keras

    if len(x) == 0:
        return np.zeros((0, *x.shape[1:3], 1), np.float32)
    chunks = np.array_split(np.arange(len(x)), int(math.ceil(len(x) / max(1, int(batch_size)))))
    return np.concatenate([keras.ops.convert_to_numpy(model(x[i], training=False))
                           for i in chunks]).astype(np.float32)


def batchstat_jaccard(model, x_val, y_val, threshold: float, batch_size: int = 32) -> float:
    """Validation Jaccard when BatchNorm uses the batch's own statistics (training mode).

    Compared with the inference-mode score this exposes the old pipeline's trap: moving
    statistics that never caught up with the weights (inference IoU ~0 while batch-statistics
    IoU is high). Runs on the reloaded copy, since calling with ``training=True`` updates its
    moving statistics; dropout is active too, so expect a slightly lower value.

    The validation set goes through in ``ceil(N / batch_size)`` chunks of near-equal size
    (at most ``batch_size`` images, the training batch size: memory stays that of a training
    step, and each chunk's statistics come from about as many images as a training batch's;
    equal sizes avoid a last chunk of one or two images with unrepresentative statistics).
    With ``batch_size >= N`` it is one batch. Returns the mean per-image Jaccard (NaN for
    an empty validation set).
    """
    import keras

    n = len(x_val)
    if n == 0:
        return float("nan")
    chunks = np.array_split(np.arange(n), int(math.ceil(n / max(1, int(batch_size)))))
    scores = [training_outputs.per_image_jaccard(
        keras.ops.convert_to_numpy(model(x_val[i], training=True)), y_val[i], threshold)
        for i in chunks]
    return float(np.mean(np.concatenate(scores)))

