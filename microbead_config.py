"""The run configuration (``config.json``) and the facts of a training run folder.

Purpose
    One owner of the schema every script reads or writes, like StarDist's ``Config``: the
    trainer writes ``config.json`` next to the weights through :func:`save_run_config`;
    prediction, export, ``hpc_tools`` and the tests read it through :func:`read_run_config`.
    Unknown keys are an error naming the key and the file, and so are missing required ones.
    The trainer's options (:data:`TRAINING_DEFAULTS`, :data:`TRAINING_PRESETS`) and the keys a
    ``--config`` file may set (:data:`CONFIG_FILE_KEYS`, what ``analyze_microbead_dataset.py``
    recommends) live here too, so those scripts need not import the trainer. Run-folder facts:
    the per-epoch history reader (:func:`read_history`), ``training_summary.csv``
    (:func:`read_summary`), "is this model / run finished" (:func:`finished_models`,
    :func:`run_state`) and the comparison with the previous run.

Schema (``format_version`` 2)
    ``format_version``; ``models`` (per architecture: :class:`ModelSpec`); ``preprocessing``
    (:class:`Preprocessing`: how a frame becomes a network input, with where the pixel scale
    came from); ``postprocessing`` (:class:`Postprocessing`); ``training`` (the resolved
    options: :data:`TRAINING_KEYS`); ``data`` (:class:`DataFacts`); ``environment`` (versions,
    host, GPUs, git commit, PBS job id: a free-form record, never read back into behaviour).
    Format 1 files (written before the provenance keys ``pixel_scale_source``,
    ``scale_source`` and ``channel_mode`` existed) still load: only what prediction needs is
    required of them.

Standard library only at import time (``hpc_tools`` runs with the container's bare Python);
:func:`save_run_config` imports :mod:`microbead_io` for its atomic JSON writer.

Example
    >>> cfg = read_run_config("run/config.json")                            # doctest: +SKIP
    >>> cfg["preprocessing"]["scale"], cfg["postprocessing"]["threshold"]   # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)

MODEL_NAMES = ("unet", "attention_unet", "attention_resunet")

# --------------------------------------------------------------------------- run folder files

CONFIG_FILE = "config.json"
SUMMARY_FILE = "training_summary.csv"
SPLIT_FILE = "split.json"


def fold_dir(run_dir, fold: int) -> Path:
    """``RUN_DIR/fold_NN`` of 1-based ``fold`` (k-fold runs)."""
    return Path(run_dir) / f"fold_{int(fold):02d}"


def final_model_file(model: str) -> str:
    """``final_<model>_model.hdf5``: written once a model's training has completed."""
    return f"final_{model}_model.hdf5"


def history_file(model: str) -> str:
    """``<model>_history.csv``: one row per epoch (see :func:`read_history`)."""
    return f"{model}_history.csv"


# --------------------------------------------------------------------------- training options

#: The trainer's options and their built-in defaults (the seed's recipe).
#: ``steps_per_epoch=0`` and ``bn_momentum=0`` mean "auto"; ``image_size=0`` the stored tile
#: size. Resolution order: these < ``--preset`` < ``--config`` file < explicit flags.
TRAINING_DEFAULTS = {
    "data_dir": "dataset_microscope",
    "output_dir": ".",
    "models": ",".join(MODEL_NAMES),
    "epochs": 100,
    "batch_size": 32,
    "lr": 1e-4,
    "dropout": 0.3,
    "loss": "dice",
    "filters": 64,
    "depth": 4,
    "image_size": 0,
    "patch_size": 0,
    "val_fraction": 0.15,
    "patience": 20,
    "steps_per_epoch": 0,
    "kfold": 0,
    "seed": 42,
    "bn_momentum": 0.0,
    "density_bins": None,
    "channels": 1,
    "pixel_scale": None,
    "normalization": "flatfield",
    "group_pattern": None,
    "val_split": "auto",
    "threshold": 0.5,
    "rotation": 15.0,
    "intensity_aug": True,
    "elastic": False,
    "lr_schedule": "plateau",
    "max_minutes": 0.0,
    "mixed_precision": "auto",
    "strategy": "auto",
    "logical_cpus": 0,
    "verbose": -1,
}

#: CPU-sized configuration used by the demo and the CPU benchmark (minutes, not hours).
#: Measured on a 2-core CPU: see README "Measured". Explicit flags override a preset.
TRAINING_PRESETS = {
    "cpu": {
        "filters": 8,
        "depth": 3,
        "batch_size": 16,
        "patch_size": 128,
        "lr": 3e-3,
        "loss": "bce_dice",
        "steps_per_epoch": 25,
        "epochs": 8,
        "patience": 5,
    },
}

#: Every trainer option.
OPTION_KEYS = frozenset(TRAINING_DEFAULTS)
#: Options added after format 2 was fixed, with the behaviour runs saved before them had:
#: absent from an older config.json is fine, and a resumed older run keeps that behaviour.
LATER_OPTIONS = {"val_split": "frames"}
#: Options a ``--config`` JSON may set (``recommended_config.json`` holds a subset).
#: Verbosity and the test-only logical CPU split are not settings of a run.
CONFIG_FILE_KEYS = OPTION_KEYS - {"verbose", "logical_cpus"}
#: Keys of ``config.json``'s ``training`` section: the options, how they were resolved
#: (``preset``, ``config``, ``run_dir_file``) and what "auto" became.
TRAINING_KEYS = OPTION_KEYS | {"preset", "config", "run_dir_file", "steps_per_epoch_used",
                               "bn_momentum_used"}


class ConfigError(ValueError):
    """A configuration file is unusable; ``str(err)`` is one line naming the file and key."""


def _read_json_object(path) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: config must be a JSON object")
    return data


def read_options(path) -> dict:
    """Trainer options from a JSON file (``--config``; e.g. ``recommended_config.json``).

    Returns
    -------
    dict of option name -> value, keys from :data:`CONFIG_FILE_KEYS` only.

    Raises
    ------
    ConfigError
        Unreadable, not an object, or an unknown key (named, with the allowed ones).
    """
    data = _read_json_object(path)
    unknown = sorted(set(data) - CONFIG_FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(sorted(CONFIG_FILE_KEYS))}")
    return data


# --------------------------------------------------------------------------- config.json schema



class _Absent:
    """Default of a key a file may lack (format 1); distinct from a stored ``null``."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __copy__(self):  # one sentinel: copies compare with ``is``
        return self

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "ABSENT"


ABSENT = _Absent()


def _since(version: int):
    """A key required from ``format_version`` ``version`` on (absent is fine before)."""
    return field(default=ABSENT, metadata={"required_from": version})


def _optional():
    """A key no format requires: added later, and runs saved before it lack it."""
    return field(default=ABSENT, metadata={"required_from": None, "optional": True})


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _size_pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)


@dataclass(kw_only=True)
class ModelSpec:
    """``models.<name>``: what ``models.build_model`` needs to rebuild the architecture."""

    architecture: str
    filters: int = _since(2)
    depth: int = _since(2)
    dropout: float = _since(2)
    batch_norm: bool = _since(2)


@dataclass(kw_only=True)
class Preprocessing:
    """``preprocessing``: how a native frame becomes a network input.

    ``pixel_scale`` is stored tile px per microscope-frame px and ``pixel_scale_source`` says
    where it came from (flag, ``dataset.json``, file names): a wrong scale silently changes
    every count. ``scale`` = model px per frame px.
    """

    channels: int
    input_size: list = _since(2)
    stored_tile_size: list = _since(2)
    pixel_scale: float
    pixel_scale_source: str = _since(2)
    scale: float
    scale_source: str = _since(2)
    channel_mode: str = _since(2)
    normalization: dict
    pad_multiple: int = _since(2)

    def problems(self) -> list[str]:
        out = []
        if self.channels not in (1, 3) or not _is_int(self.channels):
            out.append(f"preprocessing.channels = {self.channels!r} (1 or 3)")
        for key in ("pixel_scale", "scale"):
            v = getattr(self, key)
            if not (_is_number(v) and v > 0):
                out.append(f"preprocessing.{key} = {v!r} (a positive number)")
        if not isinstance(self.normalization, dict) or "method" not in self.normalization:
            out.append(f"preprocessing.normalization = {self.normalization!r} (an object "
                       "with a 'method')")
        for key in ("input_size", "stored_tile_size"):
            v = getattr(self, key)
            if v is not ABSENT and not _size_pair(v):
                out.append(f"preprocessing.{key} = {v!r} (two positive integers)")
        if self.pad_multiple is not ABSENT and not (_is_int(self.pad_multiple)
                                                    and self.pad_multiple > 0):
            out.append(f"preprocessing.pad_multiple = {self.pad_multiple!r} (a positive "
                       "integer)")
        return out


@dataclass(kw_only=True)
class Postprocessing:
    """``postprocessing``: probability threshold and the training beads' median area.

    ``per_model`` (optional, added after format 2): for each trained model, what it was
    calibrated to on its validation tiles: ``predicted_bead_area_px`` (the median area of the
    beads it predicts there, model scale: the scale check's reference, since the label masks
    may be shrunk) and ``object_filter`` (which predicted objects count as beads, see
    ``microbead_metrics.filter_objects``; None = all). :func:`for_model` copies one model's
    entry up into ``predicted_bead_area_px`` / ``object_filter``, where prediction reads it.
    """

    threshold: float
    median_bead_area_px: float
    median_bead_area_native_px: float = _since(2)
    per_model: dict = _optional()
    predicted_bead_area_px: float = _optional()
    object_filter: dict | None = _optional()

    def problems(self) -> list[str]:
        out = []
        if not (_is_number(self.threshold) and 0.0 <= self.threshold <= 1.0):
            out.append(f"postprocessing.threshold = {self.threshold!r} (in [0, 1])")
        if not (_is_number(self.median_bead_area_px) and self.median_bead_area_px >= 0):
            out.append(f"postprocessing.median_bead_area_px = {self.median_bead_area_px!r} "
                       "(a number >= 0)")
        return out


@dataclass(kw_only=True)
class DataFacts:
    """``data``: the training set the run saw (``data_dir`` is where export finds tiles)."""

    data_dir: str = _since(2)
    n_images: int = _since(2)
    skipped: list = _since(2)
    mean_objects_per_image: float = _since(2)
    positive_ratio: float = _since(2)
    label_consistency_ceiling: dict | None = _since(2)


#: Top-level sections in file order, and the format each became required in.
SECTIONS = {"format_version": 1, "models": 2, "preprocessing": 1, "postprocessing": 1,
            "training": 2, "data": 2, "environment": 2}


def section_keys(cls) -> tuple[str, ...]:
    """Keys of a schema section (dataclass), in file order."""
    return tuple(f.name for f in dataclasses.fields(cls))


MODEL_KEYS = section_keys(ModelSpec)
PREPROCESSING_KEYS = section_keys(Preprocessing)
POSTPROCESSING_KEYS = section_keys(Postprocessing)
DATA_KEYS = section_keys(DataFacts)


def _required(cls, version: int) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("optional"):
            continue
        since = f.metadata.get("required_from")
        if since is None or version >= since:
            out.append(f.name)
    return out


def _section(cls, raw, where: str, version: int, problems: list[str]):
    """``cls`` built from ``raw`` (a dict), or None; key problems appended to ``problems``."""
    if not isinstance(raw, dict):
        problems.append(f"'{where}' must be an object, got {type(raw).__name__}")
        return None
    known = set(section_keys(cls))
    bad = [f"unknown key '{where}.{k}'" for k in raw if k not in known]
    bad += [f"missing key '{where}.{k}'" for k in _required(cls, version) if k not in raw]
    problems += bad
    if bad:
        return None
    return cls(**raw)


def _keys_of(raw: dict, where: str, allowed, required, problems: list[str]) -> None:
    problems += [f"unknown key '{where}.{k}'" for k in raw if k not in allowed]
    problems += [f"missing key '{where}.{k}'" for k in sorted(required) if k not in raw]


@dataclass(kw_only=True)
class RunConfig:
    """A run's ``config.json``, validated. :meth:`to_dict` is the file's content."""

    format_version: int = FORMAT_VERSION
    models: dict = field(default_factory=dict)  # name -> ModelSpec
    preprocessing: Preprocessing
    postprocessing: Postprocessing
    training: dict = field(default_factory=dict)
    data: DataFacts | None = None
    environment: dict | None = None
    present: tuple = ()  # sections the file had (format 1 files may lack some); () = all

    @classmethod
    def from_dict(cls, raw, source="config.json") -> RunConfig:
        """Validate ``raw`` (as parsed from JSON); :class:`ConfigError` lists every problem.

        Unknown keys anywhere except ``environment`` are errors, as are keys the file's
        ``format_version`` requires (format 1: only what prediction needs).
        """
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: config must be a JSON object")
        version = raw.get("format_version")
        if isinstance(version, bool) or version not in READABLE_FORMATS:
            raise ConfigError(
                f"{source}: format_version {version!r} is not one this code reads "
                f"({', '.join(map(str, READABLE_FORMATS))})"
                + ("; missing key 'format_version'" if "format_version" not in raw else ""))
        problems: list[str] = []
        problems += [f"unknown section '{k}'" for k in raw if k not in SECTIONS]
        problems += [f"missing section '{k}'" for k, since in SECTIONS.items()
                     if version >= since and k not in raw]
        models = {}
        if isinstance(raw.get("models", {}), dict):
            for name, spec in raw.get("models", {}).items():
                m = _section(ModelSpec, spec, f"models.{name}", version, problems)
                if m is not None:
                    models[name] = m
        else:
            problems.append("'models' must be an object")
        pre = post = None
        if "preprocessing" in raw:
            pre = _section(Preprocessing, raw["preprocessing"], "preprocessing", version,
                           problems)
        if "postprocessing" in raw:
            post = _section(Postprocessing, raw["postprocessing"], "postprocessing", version,
                            problems)
        training = raw.get("training", {})
        if isinstance(training, dict):
            _keys_of(training, "training", TRAINING_KEYS,
                     OPTION_KEYS - set(LATER_OPTIONS) if version >= 2 else (), problems)
        else:
            problems.append("'training' must be an object")
        data = None
        if "data" in raw:
            data = _section(DataFacts, raw["data"], "data", version, problems)
        env = raw.get("environment")
        if env is not None and not isinstance(env, dict):
            problems.append("'environment' must be an object")
        if pre is not None:
            problems += pre.problems()
        if post is not None:
            problems += post.problems()
        if problems:
            raise ConfigError(f"{source}: " + "; ".join(problems))
        return cls(format_version=version, models=models, preprocessing=pre,
                   postprocessing=post, training=dict(training), data=data, environment=env,
                   present=tuple(k for k in SECTIONS if k in raw))

    def to_dict(self) -> dict:
        """The JSON content: sections in file order; keys a format 1 file lacked stay absent."""

        def plain(obj):
            return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)
                    if getattr(obj, f.name) is not ABSENT}

        full = {
            "format_version": self.format_version,
            "models": {k: plain(v) for k, v in self.models.items()},
            "preprocessing": plain(self.preprocessing),
            "postprocessing": plain(self.postprocessing),
            "training": dict(self.training),
            "data": plain(self.data) if self.data is not None else None,
            "environment": self.environment,
        }
        keep = set(self.present) if self.present else set(SECTIONS)
        return {k: v for k, v in full.items() if k in keep}

    @classmethod
    def load(cls, path) -> RunConfig:
        """Read and validate a ``config.json``; :class:`ConfigError` names the file."""
        return cls.from_dict(_read_json_object(path), source=str(path))

    def save(self, path) -> None:
        """Write atomically (``microbead_io.atomic_write_json``)."""
        import microbead_io

        microbead_io.atomic_write_json(path, self.to_dict())


def model_name_of(path) -> str | None:
    """The architecture name in ``best_<name>_model.*`` / ``final_<name>_model.*``, else None."""
    stem = Path(path).name.split(".")[0]
    for prefix in ("best_", "final_", "last_"):
        if stem.startswith(prefix) and stem.endswith("_model"):
            return stem[len(prefix):-len("_model")]
    return None


def for_model(config: dict, model_name: str | None) -> dict:
    """``config`` with ``model_name``'s ``postprocessing.per_model`` entry copied up to
    ``postprocessing.predicted_bead_area_px`` / ``object_filter`` (a new dict; the input is
    not changed). Runs saved before these keys, or a model without an entry, come back with
    neither key: prediction then uses the training masks' bead area and no object filter."""
    post = dict(config.get("postprocessing") or {})
    entry = (post.get("per_model") or {}).get(model_name or "") or {}
    for key in ("predicted_bead_area_px", "object_filter"):
        if key in entry:
            post[key] = entry[key]
    return {**config, "postprocessing": post}


def read_run_config(path) -> dict:
    """A run's ``config.json`` as a validated dict (what :meth:`RunConfig.to_dict` gives).

    Raises
    ------
    ConfigError
        Unreadable file, unsupported ``format_version``, unknown or missing keys, or a value
        out of range; the one-line message names the file and every offending key.
    """
    return RunConfig.load(path).to_dict()


def save_run_config(path, config) -> None:
    """Validate ``config`` (a :class:`RunConfig` or its dict) and write it atomically.

    A dict is first made plain JSON (``microbead_io.json_ready``: numpy scalars, paths), so
    what is validated is exactly what lands in the file.
    """
    if not isinstance(config, RunConfig):
        import microbead_io

        config = RunConfig.from_dict(microbead_io.json_ready(config), source=str(path))
    config.save(path)


# --------------------------------------------------------------------------- history

#: Columns of ``<model>_history.csv`` as the trainer writes them (one row per epoch).
HISTORY_COLUMNS = (
    "epoch", "loss", "jacard_coef", "dice_coef", "val_loss", "val_jacard_coef",
    "val_dice_coef", "learning_rate", "epoch_time_s", "val_pred_fg", "val_true_fg",
)
#: Old Keras ``CSVLogger`` spellings -> the trainer's names.
HISTORY_ALIASES = {
    "lr": "learning_rate",
    "jaccard_coef": "jacard_coef",
    "val_jaccard_coef": "val_jacard_coef",
}
#: Columns without which a history cannot be plotted or compared.
REQUIRED_HISTORY_COLUMNS = ("loss", "jacard_coef", "val_loss", "val_jacard_coef")


class HistoryError(ValueError):
    """A history file cannot be used; ``str(err)`` is one line naming it."""


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def normalize_history(columns, rows, source: str = "history", *,
                      required=()) -> list[dict]:
    """One per-epoch history, either format, as a list of rows sorted by epoch.

    Parameters
    ----------
    columns : sequence of str
        Header as read: the trainer's (1-based ``epoch``, ``learning_rate``) or an old Keras
        ``CSVLogger``'s (no ``epoch`` column or a 0-based one, ``lr``). Names are stripped;
        old spellings (:data:`HISTORY_ALIASES`) renamed unless the new one is present too.
    rows : iterable of sequences
        Values aligned with ``columns`` (short rows padded with NaN).
    source : str
        Name used in error messages (the file path).
    required : sequence of str
        Columns that must be present (after renaming) and then at least one row.

    Returns
    -------
    list of dict
        Per row: ``epoch`` (int, 1-based; the row number when there is no ``epoch`` column)
        and every other column as float (empty or non-numeric -> NaN). A repeated epoch (a
        resumed run appending to its log) keeps its last row.

    Raises
    ------
    HistoryError
        A required column missing, no rows while columns are required, or a non-numeric
        epoch. The message names ``source``.
    """
    names = [str(c).strip() for c in columns]
    names = [HISTORY_ALIASES[n] if n in HISTORY_ALIASES and HISTORY_ALIASES[n] not in names
             else n for n in names]
    missing = [c for c in required if c not in names]
    if missing:
        raise HistoryError(f"{source}: missing column(s) {', '.join(missing)}")
    by_epoch: dict[int, dict] = {}
    n_rows = 0
    for i, values in enumerate(rows):
        n_rows += 1
        values = list(values) + [None] * (len(names) - len(values))
        row = {n: _float(v) for n, v in zip(names, values)}
        if "epoch" in row:
            if math.isnan(row["epoch"]):
                raise HistoryError(f"{source}: non-numeric values in the epoch column")
        else:
            row["epoch"] = float(i + 1)
        by_epoch[int(row["epoch"])] = row  # last row of an epoch wins
    if required and not n_rows:
        raise HistoryError(f"{source}: no epochs (header only)")
    # Keras' CSVLogger counts from 0; the trainer from 1.
    shift = 1 if "epoch" in names and by_epoch and min(by_epoch) == 0 else 0
    out = []
    for epoch in sorted(by_epoch):
        row = by_epoch[epoch]
        row["epoch"] = epoch + shift
        out.append({"epoch": row["epoch"], **{k: v for k, v in row.items() if k != "epoch"}})
    return out


def read_history(path, *, strict: bool = False) -> list[dict]:
    """Rows of a ``<model>_history.csv`` (see :func:`normalize_history`).

    ``strict=False`` (the trainer, resuming): a missing or empty file has no epochs yet,
    ``[]``. ``strict=True`` (plotting): a missing, empty or unparsable file, a missing
    :data:`REQUIRED_HISTORY_COLUMNS` column or no rows raise :class:`HistoryError`.
    """
    p = Path(path)
    if not p.is_file():
        if strict:
            raise HistoryError(f"{p}: not found")
        return []
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            table = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HistoryError(f"{p}: cannot read CSV ({reason})") from None
    table = [r for r in table if r]
    if not table:
        if strict:
            raise HistoryError(f"{p}: empty file")
        return []
    return normalize_history(table[0], table[1:], str(p),
                             required=REQUIRED_HISTORY_COLUMNS if strict else ())


# --------------------------------------------------------------------------- summary, state

#: Validation above training by more than this (Jaccard) is flagged: with few validation
#: frames the validation set may simply be easier (sparser) than the training set.
VAL_ABOVE_TRAIN_MARGIN = 0.10
#: Validation above the label-consistency ceiling by more than this is flagged.
ABOVE_CEILING_MARGIN = 0.05
RUN_STATES = ("finished", "unfinished", "missing")


def read_summary(path) -> list[dict]:
    """Rows of a ``training_summary.csv`` (strings, as written); ``[]`` if it is absent."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def comparison_lines(rows: list[dict], reference: dict | None = None,
                     reference_name: str = "") -> list[str]:
    """One line per model: its best val Jaccard, the label-consistency ceiling when the data
    has one, and the same model of a run the user named (``reference``: model -> best val
    Jaccard, from ``reference_name``). Nothing is compared with figures from elsewhere."""
    out = []
    for r in rows:
        v = float(r["best_val_jacard"])
        ceiling = r.get("label_ceiling")
        line = f"{r['model']:>18}: best val Jaccard {v:.4f} (epoch {r['best_epoch']})"
        if ceiling not in (None, ""):
            line += f"; label-consistency ceiling {float(ceiling):.3f}"
        ref = (reference or {}).get(r["model"])
        if ref is not None and math.isfinite(float(ref)):
            name = reference_name or "reference run"
            line += f"; {name}: {float(ref):.4f} ({v - float(ref):+.4f})"
        out.append(line)
    return out


def fit_warnings(model: str, val_jaccard: float, train_jaccard: float | None = None,
                 ceiling: float | None = None, n_val: int | None = None,
                 val_frames=()) -> list[str]:
    """Warnings a user needs beside a best val Jaccard (empty list: nothing unusual).

    Parameters
    ----------
    val_jaccard : best validation Jaccard.
    train_jaccard : training Jaccard of the same epoch (augmented crops, dropout on), or None.
    ceiling : label-consistency ceiling (pooled Jaccard of grid neighbours' masks), or None.
    n_val : number of validation images (named in the message), or None.
    val_frames : source frames of the validation images (named in the message).
    """
    out = []
    val_n = f" on {n_val} validation image(s)" if n_val else ""
    frames = (f" (validation frame(s): {', '.join(val_frames)})" if val_frames else "")
    if (train_jaccard is not None and math.isfinite(train_jaccard)
            and val_jaccard - train_jaccard > VAL_ABOVE_TRAIN_MARGIN):
        out.append(
            f"{model}: validation Jaccard {val_jaccard:.3f}{val_n} is "
            f"{val_jaccard - train_jaccard:.2f} above training ({train_jaccard:.3f}). Training "
            "is scored on augmented crops with dropout on, but a gap this large usually "
            "means the few validation frames are easier (sparser, cleaner masks) than the "
            f"training frames{frames}: treat the validation score as a rough figure and check "
            "bead counts (k-fold: --kfold 3).")
    if (ceiling is not None and math.isfinite(ceiling)
            and val_jaccard > ceiling + ABOVE_CEILING_MARGIN):
        out.append(
            f"{model}: validation Jaccard {val_jaccard:.3f} is above the label-consistency "
            f"ceiling {ceiling:.3f} (how well neighbouring tiles' masks agree on their shared "
            "pixels, over all tiles). The validation frames' masks agree with the model better "
            f"than the labels agree with themselves on average: they are likely easier than "
            f"the average tile{frames}, so this score overstates accuracy on the whole "
            "dataset.")
    return out


def finished_models(folder) -> dict[str, dict]:
    """Models of one split folder whose training completed, with their summary rows.

    A model is finished when ``FOLDER/training_summary.csv`` has its row and
    ``FOLDER/final_<model>_model.hdf5`` exists (the row alone may predate a crash while the
    final weights were written; the weights alone a crash before the row).
    """
    folder = Path(folder)
    return {r["model"]: r for r in read_summary(folder / SUMMARY_FILE)
            if r.get("model") and (folder / final_model_file(r["model"])).is_file()}


def _run_plan(run_dir: Path) -> tuple[list[str], int] | None:
    """Models and fold count from a run folder's ``config.json``; None if unreadable.

    Read loosely (only ``training.models`` and ``training.kfold``): a folder whose config
    fails validation is still a run folder for :func:`run_state`.
    """
    try:
        training = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))["training"]
        models = training.get("models") or []
        kfold = int(training.get("kfold") or 0)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError, ValueError):
        return None
    if isinstance(models, str):
        models = [m for m in models.split(",") if m]
    return list(models), kfold


def run_state(run_dir) -> str:
    """Whether a training run folder is complete, resumable or not a run.

    ``missing``: no folder or no readable ``config.json`` (training died before writing it:
    start a new run). ``finished``: every model of the config is finished
    (:func:`finished_models`) in the run folder, or with ``kfold`` in every ``fold_NN``
    folder and listed for every fold in the run's own ``training_summary.csv`` (written
    last). ``unfinished`` otherwise (a walltime kill: pass ``--resume``).
    """
    d = Path(run_dir)
    plan = _run_plan(d) if (d / CONFIG_FILE).is_file() else None
    if plan is None:
        return "missing"
    models, kfold = plan
    if not models:
        return "unfinished"
    if kfold > 1:
        folds_done = all(set(models) <= set(finished_models(fold_dir(d, k)))
                         for k in range(1, kfold + 1))
        listed = {(str(r.get("fold")), r.get("model")) for r in read_summary(d / SUMMARY_FILE)}
        need = {(str(k), m) for k in range(1, kfold + 1) for m in models}
        return "finished" if folds_done and need <= listed else "unfinished"
    return "finished" if set(models) <= set(finished_models(d)) else "unfinished"

