"""Train UNet, Attention UNet and Attention ResUNet on microbead tiles ("optimized" recipe).

Purpose
    The seed recipe (Adam 1e-4, batch 32, dropout 0.3, Dice loss, stratified 85/15 split by
    object density, early stopping patience 20 on val Jaccard, flips + ±15° rotation), made to
    actually learn: masks are augmented together with their images, intensity augmentation
    can never blank an image, masks are resized nearest-neighbour, steps per epoch are
    decoupled from the dataset size, and BatchNorm's moving statistics are given a momentum
    that matches the number of optimizer steps (see ``auto_bn_momentum``).

Inputs
    ``DATA_DIR/images/*`` and ``DATA_DIR/masks/*`` paired by file stem (see microbead_io);
    optional ``DATA_DIR/dataset.json`` with ``pixel_scale`` (tile pixels per microscope-frame
    pixel).

Outputs (one new folder per run, never overwritten)
    ``OUTPUT_DIR/microbead_training_YYYYMMDD_HHMMSS/`` with ``best_<model>_model.hdf5``
    (+ ``.keras``), ``final_<model>_model.hdf5`` (+ ``.keras``), ``<model>_history.csv``,
    ``training_summary.csv``, ``config.json`` (everything prediction needs), ``split.json``,
    ``training_console.log``, ``validation_snapshot_<model>.png``; with ``--kfold K`` one
    ``fold_NN/`` subfolder per fold plus ``kfold_summary.csv``.

Example
    python train_microbead_optimized.py --data_dir dataset_microscope --preset cpu
"""


from __future__ import annotations

import argparse
import datetime as _dt
import logging
import math
import sys
from pathlib import Path

import cli
import microbead_config as mcfg
import microbead_io as mio
import microbead_metrics
import runtime
import training_data
import training_loop
import training_outputs
import training_split
from microbead_config import MODEL_NAMES, comparison_lines, fit_warnings
from training_data import TrainingError

log = logging.getLogger("microbead.train")

# Options, defaults and presets live in microbead_config (analysis and hpc_tools need them
# without importing the trainer).
DEFAULTS = mcfg.TRAINING_DEFAULTS
PRESETS = mcfg.TRAINING_PRESETS
# Options that --resume takes from the command line instead of the saved config.json: they
# say how long and how verbosely to run, not what is trained. Every other option is restored;
# an explicit flag that contradicts the saved value is refused (see ``resume_options``).
RESUME_OVERRIDES = frozenset({"epochs", "max_minutes", "verbose", "logical_cpus"})
# Never compared with the saved run: where to resume from, and where to report the folder.
RESUME_IGNORED = frozenset({"resume", "run_dir_file"})
# Paths compared after resolving (the same folder typed two ways is not a conflict).
RESUME_PATH_OPTIONS = frozenset({"data_dir", "output_dir", "config"})


def config_overrides(preset: dict, config: dict, explicit) -> list[str]:
    """``"depth 3 -> 4"`` for every preset value a ``--config`` file replaces (explicit
    flags win over both, so they are not listed)."""
    return [f"{k} {preset[k]!r} -> {config[k]!r}" for k in sorted(config)
            if k in preset and k not in explicit and config[k] != preset[k]]


def run_folder_name(now: _dt.datetime | None = None) -> str:
    """``microbead_training_YYYYMMDD_HHMMSS`` in this machine's local time."""
    return f"microbead_training_{(now or _dt.datetime.now()):%Y%m%d_%H%M%S}"


def read_config_file(path) -> dict:
    """Training options from a JSON file (``microbead_config.read_options``: unknown keys
    are an error naming the key and the file).

    A bad file is a usage error of this command line, like argparse's own: SystemExit
    (``main`` logs it and returns 2; callers of :func:`parse_args` get argparse's contract).
    """
    try:
        return mcfg.read_options(path)
    except mcfg.ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None



# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        epilog="Defaults are the seed's recipe; --preset values replace them, a --config "
               "file replaces those, explicit flags win. Exit status: 0 trained; 2 usage or "
               "fatal error (also written to the run's training_console.log).",
    )

    def add(name, **kw):
        # The help shows the resolved default and every preset's value: defaults are
        # applied after parsing (preset < config < flags), so argparse alone would show None.
        if name in DEFAULTS and "default" not in kw:
            kw["default"] = DEFAULTS[name]
            presets = "".join(f"; --preset {k}: {v[name]}" for k, v in sorted(PRESETS.items())
                              if name in v)
            if kw["default"] is not None and kw.get("help") is not argparse.SUPPRESS:
                kw["help"] = f"{kw.get('help', '')} (default: %(default)s{presets})".lstrip()
        cli.add_option(p, name, **kw)

    add("data_dir", help="dataset folder with images/ and masks/")
    add("output_dir",
        help="where the run folder is created: a new microbead_training_<time> folder every "
             "run, so an existing folder is fine and --overwrite does not apply")
    add("models", help="comma-separated subset of " + ",".join(MODEL_NAMES))
    add("preset", choices=sorted(PRESETS), default=None,
        help="named configuration (cpu: small, minutes on a laptop); flags override it")
    add("config", default=None, help="JSON of option values (e.g. from the dataset analysis)")
    add("epochs", type=int, help="maximum epochs per model")
    add("batch_size", type=int, help="global batch size")
    add("lr", type=float, help="Adam learning rate")
    add("dropout", type=float, help="dropout rate")
    add("loss", help="dice, bce_dice, bce, focal, tversky, jaccard")
    add("filters", type=int, help="base filters (64 = classic U-Net)")
    add("depth", type=int, help="number of poolings")
    add("image_size", type=int,
        help="tiles are resized to this (area / nearest); 0 = the stored tile size (never "
             "upsampled: beads of the users' native 512-px tiles are ~3 px across at 256)")
    add("patch_size", type=int,
        help="train on random crops of this size (0 = whole tile); validation uses whole tiles")
    add("val_fraction", type=float, help="validation share of the tiles (whole source frames)")
    add("patience", type=int, help="early-stopping patience (epochs) on val_jacard_coef")
    add("steps_per_epoch", type=int, help="0 = auto: max(50, one pass over the training set)")
    add("kfold", type=int, help="train K stratified folds (0 = one 85/15 split)")
    add("seed", type=int, help="split, initialisation and augmentation seed")
    add("bn_momentum", type=float, help="BatchNorm momentum; 0 = auto from steps per epoch")
    add("density_bins", type=float, nargs="+",
        help="objects-per-image bin edges e1 < ... < ek for the stratified split: bins "
             "c <= e1, e1 < c <= e2, ..., c > ek (the same meaning as evaluate's "
             "--density_bins and analyze's recommended_config.json); sparse bins are merged. "
             "Default: quantile edges (microbead_metrics.density_edges)")
    add("channels", type=int, choices=(1, 3))
    add("pixel_scale", type=float,
        help="stored tile pixels per microscope-frame pixel (default: DATA_DIR/dataset.json, "
             "else 1.0 for '..._grid_rR_cC' tiles, else an error: pass it)")
    add("normalization", choices=("flatfield", "percentile"),
        help="flatfield: divide by the local background (crop-invariant, evens out uneven "
             "light), dataset-level scale; percentile: per-tile 1-99.8 %% (the old method)")
    add("group_pattern",
        help="regex whose first group names a tile's source frame (default: the name without "
             "'_grid_rR_cC'); tiles of one frame never straddle a split")
    add("val_split", choices=("auto", "frames", "tiles"),
        help="frames: whole source frames validate; tiles: validation tiles from inside "
             "every frame, pixels shared with training tiles cut out; auto: tiles when there "
             "are fewer than 20 frames of grid tiles, else frames")
    add("threshold", type=float, help="probability threshold stored for prediction")
    add("rotation", type=float, help="max random rotation in degrees (0 = off)")
    add("intensity_aug", type=_bool, help="brightness/contrast/gamma/noise on images")
    add("elastic", type=_bool, help="elastic deformation (image and mask together)")
    add("lr_schedule", choices=("plateau", "cosine"),
        help="plateau: halve the LR when val Jaccard stalls; cosine: decay to 5%% of --lr "
             "over --epochs (short runs end on a small, stable LR)")
    add("max_minutes", type=float, help="stop a model's training after this many minutes (0 = no)")
    add("mixed_precision", choices=("auto", "on", "off"))
    add("strategy", choices=("auto", "none", "mirrored", "multiworker"),
        help="auto: MirroredStrategy with >1 GPU, MultiWorker when TF_CONFIG names workers")
    add("logical_cpus", type=int, help=argparse.SUPPRESS)
    add("resume", default=None,
        help="continue an interrupted run folder from its last completed epoch (settings "
             "from its config.json; only --epochs, --max_minutes, --verbose may differ, any "
             "other flag must match the saved value)")
    add("run_dir_file", default=None, help="write the run folder path to this file")
    add("verbose", type=int, help="Keras verbosity (-1: progress bar on a terminal, else 0)")
    return p


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def explicit_options(argv=None) -> set[str]:
    """Names of the options given on the command line (not from defaults, preset or config)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def parse_args(argv=None) -> argparse.Namespace:
    """Resolve options: built-in defaults < --preset < --config file < explicit flags."""
    parser = build_parser()
    first = parser.parse_args(argv)
    defaults = dict(DEFAULTS)
    if first.preset:
        defaults.update(PRESETS[first.preset])
    if first.config:
        defaults.update(read_config_file(first.config))
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in str(args.models).split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODEL_NAMES]
    if bad:
        parser.error(f"unknown model(s) {bad}; choose from {', '.join(MODEL_NAMES)}")
    # A patch size from the defaults, a preset or a --config file adapts to small tiles
    # (fit_patch_size); one typed on the command line is checked as given.
    args._patch_size_explicit = "patch_size" in explicit_options(argv)
    check_ranges(args, parser.error)
    training_data.check_sizes(args, parser.error)
    return args


#: Allowed range of each numeric option: (low, high, low open, high open); None = no bound.
#: Checked on the resolved values (flag, --config or preset alike), before any folder exists.
OPTION_RANGES = {
    "epochs": (1, None, False, False), "batch_size": (1, None, False, False),
    "lr": (0, None, True, False), "dropout": (0, 1, False, True),
    "filters": (1, None, False, False), "depth": (1, None, False, False),
    "image_size": (0, None, False, False), "patch_size": (0, None, False, False),
    "val_fraction": (0, 1, True, True), "patience": (0, None, False, False),
    "steps_per_epoch": (0, None, False, False), "kfold": (0, None, False, False),
    "bn_momentum": (0, 1, False, True), "pixel_scale": (0, None, True, False),
    "threshold": (0, 1, True, True), "rotation": (0, 180, False, False),
    "max_minutes": (0, None, False, False), "logical_cpus": (0, None, False, False),
}


def check_ranges(args, error) -> None:
    """Call ``error(message)`` naming the first option out of :data:`OPTION_RANGES`
    (``--epochs 0``, ``--lr -0.001``: a run of zero epochs or a negative step is no run)."""
    for name, (lo, hi, lo_open, hi_open) in OPTION_RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        bad = (value != value or (lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            low = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
            high = f"{'<' if hi_open else '<='} {hi:g}" if hi is not None else ""
            error(f"--{name} {value:g}: must be {' and '.join(x for x in (low, high) if x)}")



# ----------------------------------------------------------------------------- run


class _DropLegacyH5Advice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "HDF5 file via" not in record.getMessage()


def setup_logging(run_dir: Path) -> list:
    """Log to stderr and to the run's ``training_console.log``; returns both handlers
    (the stderr one None when the root logger already writes to a stream).

    On the root logger, so TensorFlow's and Keras' own messages land in the log file too.
    """
    # .hdf5 is written on purpose (the users' tools read it): drop Keras' per-save advice.
    logging.getLogger("absl").addFilter(_DropLegacyH5Advice())
    return [runtime.add_log_handler(logger=""),
            runtime.add_log_handler(run_dir / "training_console.log", logger="")]


def train_split(data, train_idx, val_idx, args, out_dir: Path, strategy, counts,
                median_area: float) -> list[dict]:
    """Train every requested model on one split into ``out_dir``; skip finished ones.

    ``median_area`` is the ``config.json`` median bead area (model scale) written into
    ``out_dir``: validation beads are counted with the area prediction will use.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files, groups = data["files"], data["groups"]
    mode = data.get("val_split", "frames")
    windows = None
    if mode == "tiles":
        try:
            windows = training_split.validation_windows(
                data.get("overlaps", []), train_idx, val_idx, data["images"].shape[1:3],
                2 ** args.depth)
        except ValueError as exc:
            raise TrainingError(f"{args.data_dir}: {exc}; use --val_split frames") \
                from None
    data = {**data, "val_windows": windows}
    shared = sorted({groups[i] for i in train_idx} & {groups[i] for i in val_idx})
    mio.atomic_write_json(out_dir / "split.json", {
        "mode": mode,
        "train": [files[i] for i in train_idx],
        "val": [files[i] for i in val_idx],
        "train_objects": [int(counts[i]) for i in train_idx],
        "val_objects": [int(counts[i]) for i in val_idx],
        "val_windows": [list(map(int, w)) for w in windows] if windows else None,
        "train_groups": sorted({groups[i] for i in train_idx}),
        "val_groups": sorted({groups[i] for i in val_idx}),
        "groups_on_both_sides": shared,
        "group_pattern": args.group_pattern or "default: name without _grid_rR_cC",
        "seed": args.seed,
    })
    log.info("validation: %d tile(s) from %d frame(s)%s:", len(val_idx),
             len({groups[i] for i in val_idx}),
             f", each cut to {windows[0][1] - windows[0][0]}x{windows[0][3] - windows[0][2]} px "
             "so no pixel is shared with a training tile" if windows else "")
    for i in sorted(val_idx, key=lambda i: counts[i]):
        log.info("  %s (%d objects)", files[i], counts[i])
    log.info("training: %d tile(s) from %d frame(s)", len(train_idx),
             len({groups[i] for i in train_idx}))
    done = mcfg.finished_models(out_dir)
    data = {**data, "median_area_px": float(median_area)}
    rows = []
    for name in args.models:
        if name in done:
            log.info("%s: already finished in %s; skipping", name, out_dir)
            rows.append(done[name])
            continue
        rows.append(training_loop.train_one_model(name, data, train_idx, val_idx, args,
                                                  out_dir, strategy))
        training_outputs.write_summary(out_dir / "training_summary.csv", rows)
    return rows


def _same_option(name: str, given, saved) -> bool:
    if name in RESUME_PATH_OPTIONS and given is not None and saved is not None:
        return Path(given).resolve() == Path(saved).resolve()
    if isinstance(given, list | tuple) and isinstance(saved, list | tuple):
        return len(given) == len(saved) and all(
            _same_option("", a, b) for a, b in zip(given, saved))
    if (isinstance(given, int | float) and isinstance(saved, int | float)
            and not isinstance(given, bool) and not isinstance(saved, bool)):
        return math.isclose(given, saved, rel_tol=1e-9, abs_tol=0.0)
    return given == saved


def resume_options(args, argv, saved: dict, source: Path) -> list[str]:
    """Put the saved training options of a ``--resume``d run back onto ``args``.

    Explicit flags in :data:`RESUME_OVERRIDES` win (how long and how verbosely to run); any
    other explicit flag must equal the saved value, so a resumed run trains what it started.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options; updated in place.
    argv : list of str or None
        The command line (to tell explicit flags from defaults).
    saved : dict
        The ``training`` section of the run's ``config.json``.
    source : Path
        That ``config.json`` (named in messages).

    Returns
    -------
    list of str
        One line per honoured flag whose value differs from the saved one (for the log).

    Raises
    ------
    TrainingError
        Naming every conflicting flag with its saved value.
    """
    given = explicit_options(argv) - RESUME_IGNORED
    conflicts, notes = [], []
    for name in sorted(given):
        value, old = getattr(args, name), saved.get(name, mcfg.LATER_OPTIONS.get(name))
        if _same_option(name, value, old):
            continue
        if name in RESUME_OVERRIDES:
            notes.append(f"resume: --{name} {value!r} from the command line (the run was "
                         f"saved with {old!r})")
        else:
            conflicts.append(f"--{name} {value!r} (saved: {old!r})")
    if conflicts:
        raise TrainingError(
            f"--resume {source.parent}: {'; '.join(conflicts)} contradict(s) {source}. "
            "A resumed run continues with its saved options; only "
            f"{', '.join('--' + k for k in sorted(RESUME_OVERRIDES))} may change. Drop the "
            "flag(s), or start a new run.")
    for name, value in {**mcfg.LATER_OPTIONS, **saved}.items():
        if name not in RESUME_IGNORED and not (name in RESUME_OVERRIDES and name in given):
            setattr(args, name, value)
    return notes


def main(argv=None) -> int:
    """Train; exit 0, or 2 on a usage or fatal error (argparse's own errors raise SystemExit).

    A fatal error is logged instead of raised: once the run folder exists it also lands in
    its ``training_console.log``. There is no --overwrite: every run gets a new folder.
    """
    try:
        return _main(argv)
    except (SystemExit, TrainingError) as exc:  # before the run folder exists: stderr only
        return _fatal_exit(exc)


def _fatal_exit(exc: SystemExit | TrainingError) -> int:
    """A :class:`TrainingError` (or a ``SystemExit("error: ...")``) -> logged, exit 2;
    argparse's own exits (an int code) pass through."""
    if isinstance(exc, TrainingError):
        return cli.fatal(log, "%s", str(exc))
    if exc.code is None or isinstance(exc.code, int):
        raise exc
    return cli.fatal(log, "%s", str(exc.code).removeprefix("error: "))


def _main(argv=None) -> int:
    args = parse_args(argv)
    runtime.configure_threads()
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir:
        cfg_path = resume_dir / "config.json"
        if not cfg_path.is_file():
            raise TrainingError(f"{cfg_path}: not found; cannot resume")
        try:
            saved = mcfg.read_run_config(cfg_path)["training"]
        except mcfg.ConfigError as exc:
            raise TrainingError(f"{exc}; cannot resume") from None
        resume_notes = resume_options(args, argv, saved, cfg_path)
        run_dir = resume_dir
    training_data.check_data(args)  # a typo'd or empty dataset creates no run folder
    if not resume_dir:
        out = Path(args.output_dir)
        made_out = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        run_dir = mio.unique_path(out / run_folder_name())
        run_dir.mkdir(parents=True)
    handlers = setup_logging(run_dir)
    rc = cli.EXIT_FATAL
    try:
        for note in resume_notes if resume_dir else ():
            log.info("%s", note)
        if args.preset and args.config and not resume_dir:
            changed = config_overrides(PRESETS[args.preset], read_config_file(args.config),
                                       explicit_options(argv))
            if changed:
                log.info("--config %s overrides --preset %s: %s (explicit flags override "
                         "both)", args.config, args.preset, ", ".join(changed))
        rc = _run(args, run_dir, resuming=resume_dir is not None)
        return rc
    except (SystemExit, TrainingError) as exc:  # into training_console.log too
        return _fatal_exit(exc)
    finally:
        stderr_handler, file_handler = handlers
        runtime.remove_log_handlers([file_handler], logger="")
        try:
            # A folder announced through --run_dir_file is kept: the job script that asked
            # for it writes its own log there (pbs_microbead_optimized.sh).
            if not resume_dir and rc != cli.EXIT_OK and not args.run_dir_file:
                _remove_if_unused(run_dir, out if made_out else None)  # says so on stderr
        finally:
            runtime.remove_log_handlers([stderr_handler], logger="")


def _remove_if_unused(run_dir: Path, made_out: Path | None) -> None:
    """Remove a failed run's folder when it holds nothing but its console log (no model,
    no config: nothing to resume or inspect; the messages went to stderr as well), and the
    output folder this run created if that leaves it empty."""
    extra = [p for p in run_dir.iterdir() if p.name != "training_console.log"] \
        if run_dir.is_dir() else [None]
    if extra:
        return
    (run_dir / "training_console.log").unlink(missing_ok=True)
    run_dir.rmdir()
    log.error("%s: removed: the run failed before writing anything but its log", run_dir)
    if made_out is not None and made_out.is_dir() and not any(made_out.iterdir()):
        made_out.rmdir()


def _run(args, run_dir: Path, resuming: bool) -> int:
    log.info("run folder: %s%s", run_dir, " (resuming)" if resuming else "")
    if args.run_dir_file:
        Path(args.run_dir_file).write_text(f"{run_dir.resolve()}\n")
    pixel_scale, scale_source = training_data.resolve_pixel_scale(
        args.data_dir, args.pixel_scale, training_data.image_names(args.data_dir))
    log.info("pixel scale %.4g (stored tile px per frame px) from %s", pixel_scale,
             scale_source)
    data = training_data.load_training_data(args)
    data["model_scale"] = pixel_scale * args.image_size / data["stored_size"][0]
    counts = data["counts"]
    groups = data["groups"]
    strata = microbead_metrics.density_strata(counts, args.density_bins)
    tf_facts, strategy = training_loop.setup_backend(args)
    tf_facts["replicas"] = int(strategy.num_replicas_in_sync)
    if not tf_facts["gpus"]:  # estimate the whole run from the first model's first steps
        data["cpu_notice"] = {"done": False, "folds": max(1, args.kfold or 1)}
    log.info("%d image pairs, %.1f objects/image on average, %d density strata, %d replica(s)",
             len(data["files"]), counts.mean(), strata.max() + 1, tf_facts["replicas"])

    n_groups = len(set(groups))
    log.info("%d source-frame group(s) (%s)", n_groups,
             "no image shares a frame" if n_groups == len(groups) else
             f"largest holds {max(groups.count(g) for g in set(groups))} tiles")
    try:
        if args.kfold and args.kfold > 1:
            splits = training_split.stratified_kfold(strata, args.kfold, args.seed, groups=groups)
            folders = [mcfg.fold_dir(run_dir, k + 1) for k in range(len(splits))]
        else:
            mode, why = training_split.choose_val_split(args.val_split, data["files"], groups)
            log.info("validation split: %s (%s)", mode, why)
            data["val_split"] = mode
            if mode == "tiles":
                splits = [training_split.within_frame_split(strata, groups, args.val_fraction,
                                                            args.seed)]
            else:
                splits = [training_split.stratified_split(strata, args.val_fraction, args.seed,
                                                          groups=groups)]
            folders = [run_dir]
    except ValueError as exc:
        raise TrainingError(f"{args.data_dir}: {exc}") from None
    first_train = splits[0][0]
    config = training_outputs.build_config(args, data, {"train_idx": first_train}, tf_facts,
                                          pixel_scale, scale_source)
    if len(splits) > 1:
        # Written before the folds train so an interrupted k-fold run can be --resume'd.
        mcfg.save_run_config(run_dir / mcfg.CONFIG_FILE, config)
    all_rows = []
    for k, ((tr, va), folder) in enumerate(zip(splits, folders)):
        folder.mkdir(parents=True, exist_ok=True)
        mcfg.save_run_config(folder / mcfg.CONFIG_FILE, config)
        rows = train_split(data, tr, va, args, folder, strategy, counts,
                           config["postprocessing"]["median_bead_area_px"])
        config["postprocessing"]["per_model"] = training_outputs.read_calibrations(folder,
                                                                                  args.models)
        if len(splits) > 1:
            for r in rows:
                r["fold"] = k + 1
        all_rows.extend(rows)
        for r in rows:
            if "_steps_per_epoch" in r:
                config["training"]["steps_per_epoch_used"] = r["_steps_per_epoch"]
                config["training"]["bn_momentum_used"] = r["_bn_momentum"]
        mcfg.save_run_config(folder / mcfg.CONFIG_FILE, config)
    if len(splits) > 1:
        training_outputs.write_summary(run_dir / "training_summary.csv", all_rows,
                                      extra_cols=("fold",))
        training_outputs.write_kfold_summary(run_dir / "kfold_summary.csv", all_rows)
        mcfg.save_run_config(run_dir / mcfg.CONFIG_FILE, config)
    log.info("best validation Jaccard per model (columns of training_summary.csv: see "
             "README 'What each step writes'):")
    for line in comparison_lines(all_rows):
        log.info("%s", line)
    for r in all_rows:
        ceiling = r.get("label_ceiling")
        for line in fit_warnings(r["model"], float(r["best_val_jacard"]), r.get("_train_jacard"),
                                 float(ceiling) if ceiling not in (None, "") else None,
                                 r.get("_n_val"), r.get("_val_frames", ())):
            log.warning("%s", line)
    for r in all_rows:
        infer, batch = float(r["best_val_jacard_reloaded"]), float(r["val_jacard_batchstats"])
        if infer < batch - 0.1:
            log.warning("%s: val Jaccard %.3f with BatchNorm moving statistics but %.3f with "
                        "batch statistics: the moving statistics have not caught up with the "
                        "weights; train more steps or lower --bn_momentum", r["model"], infer,
                        batch)
    log.info("done: %s", run_dir)
    print(f"RUN_DIR={run_dir.resolve()}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
