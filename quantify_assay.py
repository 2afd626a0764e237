"""Turn bead counts into an assay: calibration curve, limits of blank, detection, quantitation.

The beads report an analyte. Across a dilution series the bead density (beads per imaged
area) is fitted against concentration, and the detection limits follow from the blanks, the
low end of the curve and the spread between replicates. Runs without TensorFlow (NumPy,
SciPy, matplotlib).

Inputs
------
``--predictions``: the output folder of ``predict_microscope.py`` or its
  ``prediction_summary.csv`` (columns ``file, width, height, beads`` are needed; ``status``,
  when present, must be ``ok``: other rows are listed and excluded; extra columns are ignored).
``--samples`` (optional sheet): ``file`` (a file name, a stem or a glob such as ``A1_*``),
  ``concentration`` (number), optional ``unit``, ``replicate`` (well / chip id) and ``blank``
  (true/false; a concentration of 0 is a blank too). Exact name or stem matches win over
  globs; among globs the first row of the sheet wins. Without a sheet the concentration comes
  from the file name: a value with a molar unit (``1.5625pM_...``; aM, fM, pM, nM, uM, mM;
  ``0pM_...`` is a blank), else a dilution factor (``160x_...`` -> relative concentration
  1/160, unit ``1/dilution``). Files that match nothing are listed, never guessed.
``--um_per_px``: pixel size; densities are then beads per mm² of imaged area. Without it they
  are beads per megapixel of image, and every heading says so.
``--model RUN_DIR`` (optional): the training run; its ``validation_counts.csv`` (columns
  ``model, file, n_true, n_pred, area_px``; k-fold runs: ``fold_NN/``) gives the model's own
  counting error. Rows of the model named in the predictions' ``prediction_config.json`` are
  used, else those of the model with the best ``best_val_jacard`` in
  ``RUN_DIR/training_summary.csv``. A missing file is reported and the uncertainty is then
  Poisson only.
``--truth`` (optional): a CSV with ``file`` and ``n_true`` (or ``n_beads``, as the synthetic
  generator's ``large/counts.csv``, or ``true_count``: ``evaluate_predictions.py``'s
  ``per_image_metrics.csv`` as it is): the true curve is fitted and drawn beside the measured one.

Uncertainty of one image
------------------------
``sd_count = sqrt(max(N, 1) + (s * N)^2)``: Poisson sampling (``sqrt(N)``; a count of 0 is
given the variance of 1 so that no image gets infinite weight) combined with the model's
relative counting spread ``s``. ``s`` and the relative bias ``b`` come from the validation
tiles, ``(n_pred - n_true) / n_true`` (tiles with ``n_true = 0`` are left out), in up to 4
density bins of equal tile numbers (>= 5 tiles per bin); an image takes the bin whose density
is nearest on a log scale (outside the validation range the end bin, flagged). Errors of
disjoint tile-sized regions are taken as independent, so the spread of an image ``m`` tiles
large is ``s / sqrt(m)``. The bias is reported, not subtracted: calibrators and unknowns are
counted by the same model, so a bias common to both cancels in the calibration.

Replicates and samples
----------------------
A replicate is one ``replicate`` id of the sheet at one concentration (its images pooled:
density = sum of beads / sum of area), else one image. A sample is all replicates at one
concentration: mean density, SD, CV next to the Poisson CV (``1 / sqrt(mean count)``) and the
CV expected from Poisson plus model error, and Pearson's chi-square dispersion test
``sum (N_i - lambda a_i)^2 / (lambda a_i)`` on ``k - 1`` degrees of freedom
(``lambda = sum N / sum a``); over-dispersed when p < 0.05.

Calibration
-----------
Three weighted least-squares fits of density ``y`` against concentration ``x``, weights
``1 / sd^2``, re-weighted once with the sd of the fitted values (iteratively reweighted least
squares, which removes the downward bias of weights taken from the observed counts);
parameter covariances are scaled by the reduced chi-square, CIs use Student's t:

* ``linear``: ``y = intercept + slope * x`` (blanks included);
* ``loglog``: ``log10 y = log10_intercept + slope * log10 x`` (blanks and zero counts left
  out; sd on the log scale by the delta method ``sd / (y ln 10)``);
* ``4pl``: ``y = d + (a - d) / (1 + (x / c)^b)`` (``a`` response at zero concentration,
  ``d`` at infinite, ``c`` the inflection / EC50, ``b`` the Hill slope), by
  ``scipy.optimize.curve_fit`` from up to 9 start values around the data; it needs >= 4
  distinct concentrations (blanks count) and >= 5 replicates, and a fit that does not
  converge is reported as such and left out of the choice.

R² is ``1 - SS_res / SS_tot`` on each fit's own scale (log10 density for ``loglog``). The
models are compared by ``AIC = n ln(WRSS / n) + 2 (k + 1)`` on the non-blank replicates (where
all three are defined), in density units with the Poisson-plus-model weights of the observed
counts; the lowest AIC is chosen unless ``--fit`` names one.

Detection limits
----------------
* CLSI EP17-A2 (parametric; needs >= 2 blank replicates and >= 2 replicates at some
  non-blank concentration): ``LoB = mean_blank + 1.645 SD_blank``,
  ``LoD = LoB + 1.645 SD_low``, in density units; ``SD_low`` is the SD of the lowest non-blank
  concentration with >= 2 replicates; 1.645 is the one-sided 95th percentile of the normal
  distribution (EP17's small-sample factor is not applied). Concentrations at LoB and LoD by
  inverting the chosen curve.
* ICH Q2(R1) §6.3 / §7.3: ``LoD = 3.3 sigma / S`` and ``LoQ = 10 sigma / S``, with ``S`` the
  slope and ``sigma`` the residual SD of an ordinary least-squares line through the low range
  (blanks plus the ``--low_range`` lowest concentrations, linear axes).

``lod`` in the results is the EP17 LoD when it can be computed, else the ICH one; ``loq``
is ICH's. 95 % CIs: percentile bootstrap over replicates, resampled with replacement within
each concentration, everything refitted (``--n_boot``, ``--seed``).

Outputs (``--output_dir``; an existing non-empty folder is refused unless ``--overwrite``,
which replaces only the files named here)
-------------------------------------------------------------------------------------------
``assay_results.json`` (``n_images, unit, density_unit, fit{model, params, r2, aic}, lob,
lod, loq, lod_ci95, lod_method, per_sample`` and details), ``per_image.csv``,
``per_sample.csv``, ``calibration.png``, ``residuals.png``, ``ASSAY_REPORT.md``,
``quantify_assay.log``.

Exit status: 0 on success; 1 when some images were excluded (status not ok, no concentration;
each named); 2 on unusable input (missing summary, fewer than 3 concentrations, no positive
counts, mixed units, a bad sheet), with a message naming the file.

Example
-------
    python quantify_assay.py --predictions predictions/ --samples samples.csv \\
        --um_per_px 0.345 --model microbead_training_20260101_120000 --output_dir assay/
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import functools
import json
import logging
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import cli
import microbead_io as mio
import runtime

log = logging.getLogger("microbead.assay")

SUMMARY_NAME = "prediction_summary.csv"
PRED_CONFIG_NAME = "prediction_config.json"
VALIDATION_COUNTS_NAME = "validation_counts.csv"
TRAINING_SUMMARY_NAME = "training_summary.csv"
RESULTS_NAME = "assay_results.json"
PER_IMAGE_NAME = "per_image.csv"
PER_SAMPLE_NAME = "per_sample.csv"
FIG_CALIBRATION = "calibration.png"
FIG_RESIDUALS = "residuals.png"
REPORT_NAME = "ASSAY_REPORT.md"
LOG_NAME = "quantify_assay.log"
OUTPUT_FILES = (RESULTS_NAME, PER_IMAGE_NAME, PER_SAMPLE_NAME, FIG_CALIBRATION, FIG_RESIDUALS,
                REPORT_NAME, LOG_NAME)

SUMMARY_REQUIRED = ("file", "width", "height", "beads")
FIT_KINDS = ("linear", "loglog", "4pl")
#: One-sided 95th percentile of the standard normal (CLSI EP17-A2, LoB and LoD).
Z95_ONE_SIDED = 1.645
#: ICH Q2(R1): LoD = 3.3 sigma / S, LoQ = 10 sigma / S.
ICH_LOD_FACTOR = 3.3
ICH_LOQ_FACTOR = 10.0
DILUTION_UNIT = "1/dilution"
OVERDISPERSION_P = 0.05
MIN_TILES_PER_BIN = 5
MAX_ERROR_BINS = 4
# A value with a molar unit between separators: "1.5625pM_...", "..._0pM", "2.5e-3nM-x".
_CONC_RE = re.compile(
    r"(?:^|[_\-\s])(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(aM|fM|pM|nM|uM|µM|μM|mM)(?=$|[_\-\s.])")
_GLOB_CHARS = set("*?[")
_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f", ""}


class AssayError(Exception):
    """Fatal, one-line input problem whose message names the file (exit status 2)."""


# --------------------------------------------------------------------------- concentrations


@dataclass(frozen=True)
class Concentration:
    """Where one image sits on the calibration axis.

    ``value`` is 0 for blanks; ``rule`` says how it was obtained (report); ``source`` is the
    file that set it (sample sheet or prediction summary), named in unit errors.
    """

    value: float
    unit: str
    blank: bool
    rule: str
    replicate: str = ""
    source: str = ""


def parse_concentration(name: str) -> Concentration | None:
    """Concentration from a file name, or None when it carries neither rule.

    ``1.5625pM_...`` -> 1.5625 pM; ``0pM_...`` -> blank (0 pM); ``160x_...`` -> 1/160 with
    unit ``1/dilution`` (relative concentration). A value with a unit wins over a dilution.
    µM and μM are written ``uM``. ``0x`` is not a dilution (None).
    """
    stem = Path(name).stem
    m = _CONC_RE.search(stem)
    if m:
        value, unit = float(m.group(1)), m.group(2).replace("µ", "u").replace("μ", "u")
        blank = value == 0
        rule = f"file name: {m.group(1)}{m.group(2)}" + (" (blank)" if blank else "")
        return Concentration(value, unit, blank, rule)
    dil = mio.parse_dilution(Path(name).name)
    if dil:
        return Concentration(1.0 / dil, DILUTION_UNIT, False,
                             f"file name: {dil}x -> 1/{dil} (relative)")
    return None


def _read_table(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV (BOM and surrounding blanks stripped); AssayError if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() if isinstance(v, str) else ""
                     for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AssayError(f"{path}: cannot read {what} ({exc})") from None
    if not header:
        raise AssayError(f"{path}: {what} is empty (no header row)")
    return header, rows


def resolve_summary(path: str | Path) -> Path:
    """``prediction_summary.csv`` for a prediction folder or the CSV itself.

    Raises
    ------
    AssayError
        Naming the missing file.
    """
    p = Path(path)
    csv_path = p / SUMMARY_NAME if p.is_dir() else p
    if not csv_path.is_file():
        raise AssayError(f"{csv_path}: prediction summary not found"
                         + ("" if p.is_dir() or p.exists() else " (no such file or folder)"))
    return csv_path


def read_predictions(path: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Usable rows of a prediction summary and the excluded ones.

    Returns
    -------
    rows : list of dict
        ``file`` (str), ``width``, ``height``, ``beads`` (int) of rows whose ``status`` is
        ``ok`` (or that have no status column).
    excluded : list of (file, reason)

    Raises
    ------
    AssayError
        Missing columns or no rows; the message names ``path``.
    """
    header, raw = _read_table(path, "prediction summary")
    missing = [c for c in SUMMARY_REQUIRED if c not in header]
    if missing:
        raise AssayError(f"{path}: missing column(s) {', '.join(missing)} (has "
                         f"{', '.join(header)})")
    rows, excluded = [], []
    for r in raw:
        name = r.get("file", "")
        status = r.get("status", "ok") or "ok"
        if status != "ok":
            excluded.append((name, f"status {status!r}"))
            continue
        try:
            w, h, n = int(float(r["width"])), int(float(r["height"])), int(float(r["beads"]))
        except ValueError:
            excluded.append((name, "width/height/beads not numeric"))
            continue
        if w <= 0 or h <= 0 or n < 0:
            excluded.append((name, f"invalid size {w}x{h} or count {n}"))
            continue
        rows.append({"file": name, "width": w, "height": h, "beads": n})
    if not rows and not excluded:
        raise AssayError(f"{path}: no rows")
    return rows, excluded


def _parse_bool(text: str, path: Path, line: int) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise AssayError(f"{path}: line {line}: blank must be true/false, got {text!r}")


def read_sample_sheet(path: str | Path) -> list[dict]:
    """Rows of a sample sheet: ``pattern, concentration, unit, replicate, blank, line``.

    A concentration of 0 marks a blank; a blank without concentration is 0.

    Raises
    ------
    AssayError
        Unreadable sheet, missing ``file``/``concentration`` column, a non-numeric or negative
        concentration, a blank with a non-zero concentration, one file listed on two lines
        with different concentrations; the message names the file and line(s).
    """
    path = Path(path)
    header, raw = _read_table(path, "sample sheet")
    header = [h.lower() for h in header]
    if "file" not in header or ("concentration" not in header and "blank" not in header):
        raise AssayError(f"{path}: a sample sheet needs columns file and concentration "
                         f"(has {', '.join(header)})")
    out = []
    for i, r in enumerate(raw, start=2):
        r = {k.lower(): v for k, v in r.items()}
        pattern = r.get("file", "")
        if not pattern:
            continue
        blank = _parse_bool(r.get("blank", ""), path, i)
        text = r.get("concentration", "")
        if text == "" and not blank:
            raise AssayError(f"{path}: line {i}: no concentration for {pattern!r}")
        try:
            value = float(text) if text != "" else 0.0
        except ValueError:
            raise AssayError(f"{path}: line {i}: concentration {text!r} is not a number") \
                from None
        if not math.isfinite(value) or value < 0:
            raise AssayError(f"{path}: line {i}: concentration must be >= 0, got {text!r}")
        if blank and value != 0:
            raise AssayError(f"{path}: line {i}: blank row {pattern!r} has concentration "
                             f"{text}")
        out.append({"pattern": pattern, "concentration": value, "unit": r.get("unit", ""),
                    "replicate": r.get("replicate", ""), "blank": blank or value == 0,
                    "line": i})
    if not out:
        raise AssayError(f"{path}: sample sheet has no rows")
    check_sheet_conflicts(out, path)
    return out


def check_sheet_conflicts(sheet: Sequence[dict], path: str | Path = "") -> None:
    """Raise :class:`AssayError` when one file (a plain name; ``a.tif`` and ``a.png`` are one
    stem) is listed on two lines with a different concentration, unit or blank flag: which
    one is meant cannot be told, and keeping the first would be a silent guess."""
    seen: dict[str, dict] = {}
    for row in sheet:
        pat = row["pattern"]
        if _GLOB_CHARS & set(pat):
            continue
        key = Path(pat).stem
        first = seen.setdefault(key, row)
        if first is not row and ((first["concentration"], first["unit"], first["blank"])
                                 != (row["concentration"], row["unit"], row["blank"])):
            raise AssayError(
                f"{path}: {pat!r} is listed twice with different concentrations: line "
                f"{first['line']} ({_fmt(first['concentration'])} {first['unit']}) and line "
                f"{row['line']} ({_fmt(row['concentration'])} {row['unit']}); keep one")


def unused_sheet_rows(sheet: Sequence[dict], files: Sequence[str]) -> list[dict]:
    """Sheet rows that match none of ``files``: a plain name absent from the predictions
    (by name or stem) or a glob that matches nothing. Each is a sample the user expects in
    the calibration and that is not there."""
    names = [(f, Path(f).stem) for f in files]
    unused = []
    for row in sheet:
        pat = row["pattern"]
        if _GLOB_CHARS & set(pat):
            hit = any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(s, pat)
                      for n, s in names)
        else:
            hit = any(pat in (n, s) or Path(pat).stem == s for n, s in names)
        if not hit:
            unused.append(row)
    return unused


def match_sample(name: str, sheet: Sequence[dict]) -> tuple[dict | None, int]:
    """Sheet row for one file name, and how many rows matched.

    An exact name or stem match wins (``a.tif`` in the sheet matches ``a.png``); otherwise
    the first row whose glob matches the name or the stem.
    """
    stem = Path(name).stem
    for row in sheet:
        pat = row["pattern"]
        if not _GLOB_CHARS & set(pat) and (pat == name or pat == stem
                                            or Path(pat).stem == stem):
            return row, 1
    hits = [row for row in sheet if _GLOB_CHARS & set(row["pattern"])
            and (fnmatch.fnmatchcase(name, row["pattern"])
                 or fnmatch.fnmatchcase(stem, row["pattern"]))]
    return (hits[0] if hits else None), len(hits)


def assign_concentrations(files: Sequence[str], sheet: Sequence[dict] | None = None, *,
                          sheet_path: str | Path = "", summary_path: str | Path = "",
                          ) -> tuple[dict[str, Concentration], list[str]]:
    """Concentration of each file from the sheet (when given) or the file name.

    Returns
    -------
    assigned : dict file -> Concentration
    unmatched : list of the files that match no sheet row / name rule (not guessed)
    """
    assigned: dict[str, Concentration] = {}
    unmatched: list[str] = []
    for name in files:
        if sheet is not None:
            row, n_hits = match_sample(name, sheet)
            if row is None:
                unmatched.append(name)
                continue
            if n_hits > 1:
                log.warning("%s: %d globs of %s match; line %d (%r) used", name, n_hits,
                            sheet_path, row["line"], row["pattern"])
            assigned[name] = Concentration(
                row["concentration"], row["unit"], row["blank"],
                f"sample sheet line {row['line']} ({row['pattern']})"
                + (" (blank)" if row["blank"] else ""),
                row["replicate"], str(sheet_path))
        else:
            c = parse_concentration(name)
            if c is None:
                unmatched.append(name)
                continue
            assigned[name] = Concentration(c.value, c.unit, c.blank, c.rule, "",
                                           str(summary_path))
    return assigned, unmatched


def check_units(assigned: dict[str, Concentration]) -> str:
    """The one concentration unit of ``assigned`` (blanks without a unit do not count).

    Raises
    ------
    AssayError
        When units are mixed; the message names the file(s) that set them and one example
        image per unit.
    """
    example: dict[str, str] = {}
    sources = set()
    for name, c in assigned.items():
        if c.blank and not c.unit:
            continue
        example.setdefault(c.unit, name)
        sources.add(c.source)
    if len(example) > 1:
        listed = "; ".join(f"{u or '(no unit)'} e.g. {f}" for u, f in example.items())
        raise AssayError(f"{', '.join(sorted(sources))}: mixed concentration units "
                         f"({listed}); give every concentration in one unit (a sample sheet "
                         "can convert)")
    return next(iter(example), "")


def n_concentrations(predictions: str | Path, samples: str | Path | None = None) -> int:
    """Distinct non-blank concentrations among the usable images (0 when unreadable).

    Lets a caller (the demo) decide whether a calibration is possible before running one.
    """
    try:
        summary = resolve_summary(predictions)
        rows, _ = read_predictions(summary)
        sheet = read_sample_sheet(samples) if samples else None
        assigned, _ = assign_concentrations([r["file"] for r in rows], sheet)
    except AssayError:
        return 0
    return len({c.value for c in assigned.values() if not c.blank})


def read_truth(path: str | Path) -> dict[str, int]:
    """``stem -> true bead count`` from a CSV with ``file`` and ``n_true`` (or ``n_beads``,
    as the synthetic generator writes, or ``true_count``, as ``evaluate_predictions.py``'s
    ``per_image_metrics.csv`` has it: that table is given as it is).

    Files are matched by stem without a mask suffix (``a_mask.png`` and ``a.tif`` are both
    ``a``), so the evaluation's prediction-mask names find their frames.

    Raises
    ------
    AssayError
        Unreadable file, missing columns or a non-numeric count; the message names the file.
    """
    path = Path(path)
    header, rows = _read_table(path, "truth table")
    col = next((c for c in TRUTH_COUNT_COLUMNS if c in header), None)
    if "file" not in header or col is None:
        raise AssayError(f"{path}: a truth table needs columns file and one of "
                         f"{', '.join(TRUTH_COUNT_COLUMNS)}; has {', '.join(header)}")
    out = {}
    for i, r in enumerate(rows, start=2):
        try:
            out[mio.stem_key(r["file"])] = int(float(r[col]))
        except ValueError:
            raise AssayError(f"{path}: line {i}: {col} {r[col]!r} is not a number") from None
    return out


#: Count columns a truth table may use, in order of preference.
TRUTH_COUNT_COLUMNS = ("n_true", "n_beads", "true_count")


# --------------------------------------------------------------------------- counting error


@dataclass
class CountErrorModel:
    """Relative counting error of a model, piecewise constant in bead density.

    Densities are beads per native frame pixel. ``bias`` and ``spread`` are the mean and SD
    of ``(n_pred - n_true) / n_true`` over the validation tiles of each bin; ``tile_area_px``
    is their mean area.
    """

    density: np.ndarray
    low: np.ndarray
    high: np.ndarray
    bias: np.ndarray
    spread: np.ndarray
    n_tiles: np.ndarray
    tile_area_px: float
    model: str = ""
    source: str = ""
    #: Bins whose own tiles showed no spread (every tile off by the same fraction, often
    #: exactly 0): their spread is the pooled one of all tiles, never a silent 0.
    pooled_spread_bins: tuple = ()

    def at(self, n: float, area_px: float) -> tuple[float, float, bool]:
        """``(relative bias, relative spread, extrapolated)`` for an image of ``n`` beads on
        ``area_px`` native pixels; the spread is scaled by ``sqrt(tile area / area_px)``."""
        d = n / area_px
        ld = np.log10(max(d, 1e-12))
        i = int(np.argmin(np.abs(np.log10(np.maximum(self.density, 1e-12)) - ld)))
        extrapolated = bool(n > 0 and (d < self.low[0] or d > self.high[-1]))
        scale = math.sqrt(self.tile_area_px / area_px)
        return float(self.bias[i]), float(self.spread[i]) * scale, extrapolated

    def bins(self) -> list[dict]:
        """One dict per bin (for JSON and the report); densities in beads per megapixel."""
        return [{"density_low_per_mp": 1e6 * lo, "density_high_per_mp": 1e6 * hi,
                 "n_tiles": int(k), "rel_bias": float(b), "rel_spread": float(s),
                 "spread_note": ("pooled: this bin's tiles showed none" if i in
                                 self.pooled_spread_bins else "own tiles")}
                for i, (lo, hi, k, b, s) in enumerate(zip(self.low, self.high, self.n_tiles,
                                                          self.bias, self.spread))]

    def warnings(self) -> list[str]:
        """What a reader must know before trusting the uncertainty this model gives."""
        out = []
        if self.pooled_spread_bins:
            out.append(
                f"counting error: {len(self.pooled_spread_bins)} density bin(s) of the "
                f"validation tiles showed no spread (every tile off by the same fraction); "
                f"the spread of all {int(self.n_tiles.sum())} tiles "
                f"({float(np.max(self.spread)):.3g}) is used there instead of 0")
        if not np.any(self.spread > 0):
            out.append(
                f"counting error: the model's count error has no spread on its "
                f"{int(self.n_tiles.sum())} validation tiles, so 'Poisson + model CV' equals the "
                "Poisson CV; too few validation tiles to know the model's error")
        return out


def fit_count_error(n_true, n_pred, area_px, *, max_bins: int = MAX_ERROR_BINS,
                    min_per_bin: int = MIN_TILES_PER_BIN) -> CountErrorModel | None:
    """Bias and spread of the relative count error in density bins of equal tile numbers.

    Parameters
    ----------
    n_true, n_pred : array_like of int, shape (T,)
        True and predicted counts of the validation tiles.
    area_px : array_like of float, shape (T,)
        Tile areas in native frame pixels.

    Returns
    -------
    CountErrorModel, or None with fewer than 2 tiles holding beads. Tiles with
    ``n_true = 0`` are left out (their relative error is undefined). Bins hold at least
    ``min_per_bin`` tiles (one bin when there are fewer); a bin's spread is the sample SD
    (ddof=1).
    """
    t = np.asarray(n_true, float)
    p = np.asarray(n_pred, float)
    a = np.asarray(area_px, float)
    ok = (t > 0) & (a > 0) & np.isfinite(p)
    t, p, a = t[ok], p[ok], a[ok]
    if t.size < 2:
        return None
    rel, dens = (p - t) / t, t / a
    order = np.argsort(dens, kind="stable")
    k = int(max(1, min(max_bins, t.size // max(min_per_bin, 2))))
    groups = np.array_split(order, k)
    pooled = float(rel.std(ddof=1))
    spread = np.array([rel[g].std(ddof=1) if g.size > 1 else pooled for g in groups])
    no_spread = tuple(int(i) for i in np.flatnonzero(~(spread > 0)) if pooled > 0)
    spread[list(no_spread)] = pooled
    return CountErrorModel(
        density=np.array([np.median(dens[g]) for g in groups]),
        low=np.array([dens[g].min() for g in groups]),
        high=np.array([dens[g].max() for g in groups]),
        bias=np.array([rel[g].mean() for g in groups]),
        spread=spread,
        n_tiles=np.array([g.size for g in groups]),
        tile_area_px=float(a.mean()),
        pooled_spread_bins=no_spread,
    )


def _model_of_predictions(pred_dir: Path) -> tuple[str | None, int | None, str]:
    """Model name and fold of the model file named in ``prediction_config.json``."""
    cfg_path = pred_dir / PRED_CONFIG_NAME
    if not cfg_path.is_file():
        return None, None, f"{cfg_path} not found"
    try:
        model_file = Path(json.loads(cfg_path.read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, None, f"{cfg_path}: no model file named ({exc})"
    m = re.fullmatch(r"best_(.+)_model", model_file.stem)
    if not m:
        return None, None, f"{cfg_path}: model file {model_file.name} is not best_<name>_model"
    f = re.fullmatch(r"fold_(\d+)", model_file.parent.name)
    return m.group(1), (int(f.group(1)) if f else None), f"{cfg_path} names {model_file}"


def _best_model_of_run(run_dir: Path) -> tuple[str | None, int | None, str]:
    """Model (and fold) with the highest ``best_val_jacard`` in ``training_summary.csv``."""
    path = run_dir / TRAINING_SUMMARY_NAME
    if not path.is_file():
        return None, None, f"{path} not found"
    try:
        _, rows = _read_table(path, "training summary")
        rows = [r for r in rows if r.get("best_val_jacard") and r.get("model")]
        best = max(rows, key=lambda r: float(r["best_val_jacard"]))
    except (AssayError, ValueError) as exc:
        return None, None, f"{path}: no usable model ({exc})"
    fold = int(best["fold"]) if (best.get("fold") or "").strip().isdigit() else None
    return best["model"], fold, (f"{best['model']} has the best val Jaccard "
                                 f"{float(best['best_val_jacard']):.4f} in {path}")


def load_count_error(run_dir: str | Path, pred_dir: Path | None = None,
                     ) -> tuple[CountErrorModel | None, str]:
    """The counting-error model of the model that made the predictions, and a note.

    Returns ``(None, reason)`` when ``validation_counts.csv`` or the model's rows are missing
    (uncertainty then Poisson only). Never raises for a missing or unreadable file.
    """
    run_dir = Path(run_dir)
    name, fold, how = (None, None, "")
    if pred_dir is not None:
        name, fold, how = _model_of_predictions(pred_dir)
    if name is None:
        name, fold, how2 = _best_model_of_run(run_dir)
        how = f"{how}; {how2}" if how else how2
    if name is None:
        return None, f"no model to take the counting error from ({how})"
    if fold is not None:
        candidates = [run_dir / f"fold_{fold:02d}" / VALIDATION_COUNTS_NAME]
    else:
        candidates = [run_dir / VALIDATION_COUNTS_NAME]
        if not candidates[0].is_file():
            candidates = sorted(run_dir.glob(f"fold_*/{VALIDATION_COUNTS_NAME}"))
    files = [c for c in candidates if c.is_file()]
    if not files:
        where = candidates[0] if candidates else run_dir / VALIDATION_COUNTS_NAME
        return None, f"{where} not found"
    t, p, a = [], [], []
    for f in files:
        try:
            header, rows = _read_table(f, "validation counts")
        except AssayError as exc:
            return None, str(exc)
        need = {"model", "n_true", "n_pred", "area_px"}
        if not need <= set(header):
            return None, f"{f}: missing column(s) {', '.join(sorted(need - set(header)))}"
        for r in rows:
            if r["model"] != name:
                continue
            try:
                t.append(float(r["n_true"]))
                p.append(float(r["n_pred"]))
                a.append(float(r["area_px"]))
            except ValueError:
                continue
    src = ", ".join(str(f) for f in files)
    model = fit_count_error(t, p, a)
    if model is None:
        return None, f"{src}: fewer than 2 validation tiles with beads for model {name}"
    model.model, model.source = name, src
    return model, f"model {name} ({how}); {int(model.n_tiles.sum())} validation tiles in {src}"


#: A concentration counts as reliably counted when its images hold at least this many beads
#: on average (Poisson CV <= 32 %).
RELIABLE_MEAN_BEADS = 10
#: Standardised residuals beyond this many SD are flagged.
RESIDUAL_FLAG_SD = 2.0


def extrapolation_warning(n_images: int, model: CountErrorModel) -> str:
    """The sentence for images outside the validation tiles' density range."""
    return (f"{n_images} image(s) lie outside the density range of the validation tiles "
            f"({1e6 * model.low[0]:.4g}-{1e6 * model.high[-1]:.4g} beads per megapixel): no "
            "model error is known there. The nearest bin's bias and spread stand in for it, "
            "which is a guess (column error_model_extrapolated in per_image.csv)")


def residual_flags(reps: Replicates, fit: Fit, limit: float = RESIDUAL_FLAG_SD) -> list[str]:
    """Replicates whose standardised residual ``(y - fit) / sd`` lies beyond ``limit``.

    Returns one line per such replicate, and a first line saying so when all of them do (the
    stated uncertainty then understates the scatter, or the curve does not describe the data).
    """
    if not fit.converged or not len(reps):
        return []
    z = (reps.y - fit.predict(reps.x)) / reps.sd()
    bad = np.flatnonzero(np.isfinite(z) & (np.abs(z) > limit))
    names = [str(x).removeprefix("image:") for x in reps.ids] or [str(i) for i in range(len(reps))]
    out = [f"residual: replicate {names[i]} at "
           f"concentration {reps.x[i]:.4g} is {z[i]:+.1f} SD from the {fit.kind} curve"
           for i in bad]
    finite = int(np.isfinite(z).sum())
    if bad.size and bad.size == finite:
        out.insert(0, f"residual: all {finite} replicate(s) lie beyond ±{limit:g} SD of the "
                      f"{fit.kind} curve: the scatter is larger than the counting uncertainty "
                      "(Poisson + model error) explains, or the curve does not fit; the fit's "
                      "CIs and the limits are too narrow")
    elif bad.size:
        out.insert(0, f"residual: {bad.size} of {finite} replicate(s) lie beyond ±{limit:g} SD "
                      f"of the {fit.kind} curve (expected about {0.05 * finite:.1f})")
    return out


def lowest_counted_concentration(reps: Replicates,
                                 min_beads: float = RELIABLE_MEAN_BEADS) -> float | None:
    """Lowest non-blank concentration whose images hold ``min_beads`` or more beads on
    average (None if none does)."""
    best = None
    for idx in reps.levels():
        if reps.blank[idx[0]] or reps.x[idx[0]] <= 0:
            continue
        per_image = float(reps.n[idx].sum() / max(1, reps.n_images[idx].sum()))
        if per_image >= min_beads and (best is None or reps.x[idx[0]] < best):
            best = float(reps.x[idx[0]])
    return best


def lod_warning(lod, reps: Replicates, unit: str) -> str | None:
    """A sentence when the LoD lies above the lowest concentration that was reliably counted
    (the limit then says less than the data: it comes from the scatter of the low-range
    line, not from blanks), else None."""
    low = lowest_counted_concentration(reps)
    if lod is None or low is None or not math.isfinite(lod) or lod <= low:
        return None
    return (f"LoD {lod:.4g} {unit} is above {low:.4g} {unit}, the lowest concentration whose "
            f"images were counted with >= {RELIABLE_MEAN_BEADS} beads each on average. The "
            "limit comes from the scatter of the low-range line, not from blanks; measure "
            "blanks (EP17) and more replicates at the low end before quoting it")


def count_sd(n, spread=0.0) -> np.ndarray:
    """SD of a bead count: ``sqrt(max(n, 1) + (spread * n)^2)``, element-wise.

    Poisson sampling (``sqrt(n)``, with 0 counted as 1 so no weight is infinite) combined with
    a relative counting spread (0 = Poisson only). ``n`` may be a fitted, non-integer count.
    """
    n = np.asarray(n, float)
    return np.sqrt(np.maximum(n, 1.0) + (np.asarray(spread, float) * n) ** 2)


# --------------------------------------------------------------------------- replicates


@dataclass
class Replicates:
    """Replicate-level data, one entry per replicate (arrays of shape (R,)).

    ``x`` concentration (0 for blanks), ``y`` density, ``n`` beads, ``area`` imaged area in
    density units, ``spread`` relative counting spread, ``y_true`` true density (NaN unknown).
    """

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    area: np.ndarray
    spread: np.ndarray
    blank: np.ndarray
    n_images: np.ndarray
    y_true: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.size)

    def subset(self, idx) -> Replicates:
        idx = np.asarray(idx)
        return Replicates(self.x[idx], self.y[idx], self.n[idx], self.area[idx],
                          self.spread[idx], self.blank[idx], self.n_images[idx],
                          self.y_true[idx], [self.ids[i] for i in idx])

    def sd(self, y=None) -> np.ndarray:
        """Density SD of each replicate at density ``y`` (default: the observed one)."""
        y = self.y if y is None else np.asarray(y, float)
        return count_sd(np.clip(y, 0, None) * self.area, self.spread) / self.area

    def levels(self) -> list[np.ndarray]:
        """Index arrays of the replicates at each concentration, blanks first, ascending."""
        return [np.flatnonzero(self.x == v) for v in np.unique(self.x)]


def build_replicates(images: Sequence[dict]) -> Replicates:
    """Pool per-image rows into replicates.

    ``images`` rows need ``concentration, blank, replicate, file, beads, area,
    count_spread_rel`` and optionally ``n_true``. Images sharing a replicate id at one
    concentration are pooled (density = sum of beads / sum of area; the counting spreads add
    in quadrature); without an id each image is a replicate.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in images:
        key = (r["concentration"], r["replicate"] or f"image:{r['file']}")
        groups.setdefault(key, []).append(r)
    keys = sorted(groups, key=lambda k: (k[0], k[1]))
    x, y, n, area, spread, blank, n_img, y_true, ids = ([] for _ in range(9))
    for k in keys:
        g = groups[k]
        beads = sum(r["beads"] for r in g)
        a = sum(r["area"] for r in g)
        var = sum((r["count_spread_rel"] * r["beads"]) ** 2 for r in g)
        s = (math.sqrt(var) / beads if beads > 0
             else float(np.mean([r["count_spread_rel"] for r in g])))
        truth = [r.get("n_true") for r in g]
        x.append(k[0])
        n.append(beads)
        area.append(a)
        y.append(beads / a)
        spread.append(s)
        blank.append(bool(g[0]["blank"]))
        n_img.append(len(g))
        y_true.append(sum(truth) / a if all(v is not None and v != "" for v in truth)
                      else math.nan)
        ids.append(k[1])
    return Replicates(np.array(x, float), np.array(y, float), np.array(n, float),
                      np.array(area, float), np.array(spread, float), np.array(blank, bool),
                      np.array(n_img, int), np.array(y_true, float), ids)


def dispersion_test(counts, areas) -> tuple[float, int, float]:
    """Pearson chi-square test of replicate counts against one Poisson rate.

    ``chi2 = sum (N_i - lambda a_i)^2 / (lambda a_i)`` with ``lambda = sum N / sum a``, on
    ``k - 1`` degrees of freedom; returns ``(chi2, df, p)`` (upper tail), NaNs when
    ``k < 2`` or no beads.
    """
    from scipy import stats

    c = np.asarray(counts, float)
    a = np.asarray(areas, float)
    if c.size < 2 or c.sum() <= 0:
        return math.nan, max(c.size - 1, 0), math.nan
    expected = c.sum() / a.sum() * a
    chi2 = float(((c - expected) ** 2 / expected).sum())
    df = c.size - 1
    return chi2, df, float(stats.chi2.sf(chi2, df))


def sample_table(reps: Replicates, unit: str) -> list[dict]:
    """One row per concentration: replicates, density mean / SD / CV, Poisson and expected CV,
    dispersion test, mean true density (``per_sample.csv``)."""
    out = []
    for idx in reps.levels():
        y, n = reps.y[idx], reps.n[idx]
        mean = float(y.mean())
        sd = float(y.std(ddof=1)) if idx.size > 1 else math.nan
        mean_n = float(n.mean())
        chi2, df, p = dispersion_test(n, reps.area[idx])
        s = float(np.mean(reps.spread[idx]))
        yt = reps.y_true[idx]
        out.append({
            "concentration": float(reps.x[idx[0]]), "unit": unit,
            "blank": bool(reps.blank[idx[0]]),
            "n_images": int(reps.n_images[idx].sum()), "n_replicates": int(idx.size),
            "beads": int(n.sum()), "mean_density": mean, "sd_density": sd,
            "cv_pct": 100 * sd / mean if mean > 0 else math.nan,
            "poisson_cv_pct": 100 / math.sqrt(mean_n) if mean_n > 0 else math.nan,
            "expected_cv_pct": 100 * math.sqrt(1 / mean_n + s * s) if mean_n > 0 else math.nan,
            "dispersion_chi2": chi2, "dispersion_df": df, "dispersion_p": p,
            "overdispersed": bool(p < OVERDISPERSION_P) if math.isfinite(p) else "",
            "mean_true_density": float(yt.mean()) if np.isfinite(yt).all() else math.nan,
        })
    return out


# --------------------------------------------------------------------------- curve models


def _f_linear(x, p):
    return p[0] + p[1] * np.asarray(x, float)


def _f_loglog(x, p):
    x = np.asarray(x, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, 10.0 ** p[0] * np.abs(x) ** p[1], np.nan)


def _f_4pl(x, p):
    a, b, log_c, d = p
    x = np.asarray(x, float)
    with np.errstate(all="ignore"):
        r = (x / 10.0 ** log_c) ** b  # x = 0: 0 for b > 0, inf (-> y = d) for b < 0
        return d + (a - d) / (1.0 + r)


def _t_quantile(q: float, dof: int) -> float:
    """Student's t quantile (NaN without degrees of freedom); SciPy imported on first use so
    ``--help`` stays instant."""
    from scipy import stats

    return float(stats.t.ppf(q, dof)) if dof > 0 else math.nan


_FUNCTIONS: dict[str, Callable] = {"linear": _f_linear, "loglog": _f_loglog, "4pl": _f_4pl}
_PARAM_NAMES = {"linear": ("intercept", "slope"), "loglog": ("log10_intercept", "slope"),
                "4pl": ("a", "b", "log10_c", "d")}


@dataclass
class Fit:
    """A fitted calibration curve ``density = f(concentration; p)``.

    ``p`` / ``cov`` are the internal parameters (``loglog``: log10 intercept and slope;
    ``4pl``: ``a, b, log10 c, d``); ``cov`` is scaled by the reduced chi-square. ``aic`` is
    filled by :func:`fit_calibration`. A fit that failed has ``converged = False`` and says
    why in ``message``.
    """

    kind: str
    p: np.ndarray
    cov: np.ndarray
    n: int
    dof: int
    r2: float = math.nan
    wrss: float = math.nan
    aic: float = math.nan
    converged: bool = True
    message: str = ""

    @classmethod
    def failed(cls, kind: str, message: str) -> Fit:
        k = len(_PARAM_NAMES[kind])
        return cls(kind, np.full(k, np.nan), np.full((k, k), np.nan), 0, 0,
                   converged=False, message=message)

    @property
    def t95(self) -> float:
        return _t_quantile(0.975, self.dof)

    def predict(self, x) -> np.ndarray:
        """Density at concentration(s) ``x``."""
        return _FUNCTIONS[self.kind](x, self.p)

    def invert(self, y) -> np.ndarray:
        """Concentration at density(ies) ``y``; NaN outside the curve's range."""
        y = np.asarray(y, float)
        p = self.p
        with np.errstate(all="ignore"):
            if self.kind == "linear":
                x = (y - p[0]) / p[1]
            elif self.kind == "loglog":
                x = 10.0 ** ((np.log10(y) - p[0]) / p[1])
            else:
                a, b, log_c, d = p
                x = 10.0 ** log_c * ((a - d) / (y - d) - 1.0) ** (1.0 / b)
        x = np.asarray(x, float)
        return np.where(np.isfinite(x) & (x >= 0), x, np.nan)

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise confidence band of the mean curve (delta method, numeric Jacobian, t
        quantile); for ``loglog`` computed on log10 density. NaN without a finite cov."""
        x = np.asarray(x, float)
        nan = np.full(x.shape, np.nan)
        if not self.converged or self.dof <= 0 or not np.isfinite(self.cov).all():
            return nan, nan.copy()
        log_space = self.kind == "loglog"

        def g(p):
            v = _FUNCTIONS[self.kind](x, p)
            with np.errstate(all="ignore"):
                return np.log10(v) if log_space else v

        jac = np.empty((x.size, self.p.size))
        for j in range(self.p.size):
            h = 1e-6 * max(1.0, abs(self.p[j]))
            up, dn = self.p.copy(), self.p.copy()
            up[j] += h
            dn[j] -= h
            jac[:, j] = (g(up) - g(dn)) / (2 * h)
        se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", jac, self.cov, jac), 0))
        q = _t_quantile(0.5 + level / 2, self.dof)
        mid = g(self.p)
        lo, hi = mid - q * se, mid + q * se
        return (10.0 ** lo, 10.0 ** hi) if log_space else (lo, hi)

    def params(self) -> dict[str, dict]:
        """``name -> {value, se, ci95}``; the 4PL's ``log10_c`` is reported as ``c``."""
        out = {}
        se = np.sqrt(np.abs(np.diag(self.cov))) if self.cov.size else np.array([])
        t = self.t95
        for j, name in enumerate(_PARAM_NAMES[self.kind]):
            v, s = float(self.p[j]), float(se[j])
            ci = [v - t * s, v + t * s]
            if name == "log10_c":
                with np.errstate(over="ignore"):
                    c, lo, hi = np.power(10.0, [v, ci[0], ci[1]])
                name, v, s, ci = "c", float(c), float(c * math.log(10) * s), [lo, hi]
            out[name] = {"value": v, "se": s, "ci95": ci}
        return out


def _wls(x, y, sd) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted straight line: ``(beta [intercept, slope], (X'WX)^-1, weighted RSS)``."""
    w = 1.0 / np.asarray(sd, float) ** 2
    X = np.column_stack([np.ones_like(x), x])
    xtwx = X.T @ (X * w[:, None])
    inv = np.linalg.pinv(xtwx)
    beta = inv @ (X.T @ (w * y))
    wrss = float((w * (y - X @ beta) ** 2).sum())
    return beta, inv, wrss


def _r2(y, yhat) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


def fit_linear(x, y, sd, start=None) -> Fit:
    """Weighted fit ``y = intercept + slope x`` (``start`` unused, for a common signature).

    Parameters
    ----------
    x, y, sd : array_like, shape (n,)
        Concentration, density and density SD (weights ``1 / sd^2``).
    """
    x, y, sd = (np.asarray(v, float) for v in (x, y, sd))
    if np.unique(x).size < 2:
        return Fit.failed("linear", "needs at least 2 distinct concentrations")
    beta, inv, wrss = _wls(x, y, sd)
    dof = x.size - 2
    cov = inv * (wrss / dof) if dof > 0 else np.full((2, 2), np.inf)
    return Fit("linear", beta, cov, x.size, dof, _r2(y, _f_linear(x, beta)), wrss)


def fit_loglog(x, y, sd, start=None, ref=None) -> Fit:
    """Weighted straight line on ``log10 x, log10 y`` (points with ``x, y > 0`` only).

    The SD on the log scale is ``sd / (ref ln 10)`` with ``ref`` the density the SD refers
    to (default the observed ``y``; the fitted one when re-weighting).
    """
    x, y, sd = (np.asarray(v, float) for v in (x, y, sd))
    ref = y if ref is None else np.asarray(ref, float)
    ok = (x > 0) & (y > 0) & (ref > 0)
    if np.unique(x[ok]).size < 2:
        return Fit.failed("loglog", "needs positive densities at >= 2 concentrations")
    lx, ly = np.log10(x[ok]), np.log10(y[ok])
    beta, inv, wrss = _wls(lx, ly, sd[ok] / (ref[ok] * math.log(10)))
    dof = int(ok.sum()) - 2
    cov = inv * (wrss / dof) if dof > 0 else np.full((2, 2), np.inf)
    return Fit("loglog", beta, cov, int(ok.sum()), dof, _r2(ly, beta[0] + beta[1] * lx), wrss)


def _4pl_starts(x, y) -> list[np.ndarray]:
    """Start values around the data: ``a`` = mean at the lowest concentration, ``d`` just past
    / well past the highest mean, ``c`` at the half-way crossing, the geometric mean and the
    highest concentration, ``b = 1``."""
    levels = np.unique(x)
    means = np.array([y[x == v].mean() for v in levels])
    a0, top = means[0], means[-1]
    span = top - a0 if top != a0 else (np.std(y) or 1.0)
    pos = levels[levels > 0]
    cs = [float(np.exp(np.log(pos).mean())), float(pos.max())]
    half = a0 + span / 2
    above = np.flatnonzero((means - half) * np.sign(span) >= 0)
    if above.size and levels[above[0]] > 0:
        cs.insert(0, float(levels[above[0]]))
    starts = []
    for c in cs[:3]:
        for d in (top + 0.05 * span, top + span, top + 10 * span):
            starts.append(np.array([a0, 1.0, math.log10(c), d]))
    return starts


def fit_4pl(x, y, sd, start=None, maxfev: int = 4000) -> Fit:
    """Four-parameter logistic ``y = d + (a - d) / (1 + (x / c)^b)`` by ``curve_fit``.

    Tried from ``start`` (internal parameters ``a, b, log10 c, d``) or from
    :func:`_4pl_starts`; the converged start with the lowest weighted RSS is kept. Needs
    >= 4 distinct concentrations and >= 5 points; otherwise, or when no start converges, a
    failed :class:`Fit` whose message says why.
    """
    from scipy import optimize

    x, y, sd = (np.asarray(v, float) for v in (x, y, sd))
    n_levels = np.unique(x).size
    if n_levels < 4 or x.size < 5:
        return Fit.failed("4pl", f"needs >= 4 distinct concentrations (blanks count) and >= 5 "
                                 f"replicates, got {n_levels} and {x.size}")
    starts = [np.asarray(start, float)] if start is not None else _4pl_starts(x, y)

    def f(xx, a, b, log_c, d):
        return _f_4pl(xx, (a, b, log_c, d))

    best, last = None, "no start value"
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, cov = optimize.curve_fit(f, x, y, p0=p0, sigma=sd, absolute_sigma=False,
                                            maxfev=maxfev)
        except (RuntimeError, ValueError, optimize.OptimizeWarning) as exc:
            last = str(exc).splitlines()[0]
            continue
        pred = _f_4pl(x, p)
        if not (np.isfinite(p).all() and np.isfinite(pred).all()):
            last = "non-finite parameters"
            continue
        wrss = float((((y - pred) / sd) ** 2).sum())
        if best is None or wrss < best[2]:
            best = (p, cov, wrss)
    if best is None:
        return Fit.failed("4pl", f"4PL did not converge from {len(starts)} start value(s) "
                                 f"({last}); the data may not reach the curve's plateaus")
    p, cov, wrss = best
    fit = Fit("4pl", p, np.asarray(cov, float), x.size, x.size - 4, _r2(y, _f_4pl(x, p)),
              wrss)
    # c uncertain by more than a factor of 10 (or no covariance): the data do not pin the
    # inflection, typically because they never approach a plateau.
    if not np.isfinite(fit.cov).all() or not np.sqrt(abs(fit.cov[2, 2])) < 1.0:
        fit.message = ("4PL parameters poorly determined (c uncertain by > 10x): the data "
                       "show no plateau")
    return fit


_FITTERS = {"linear": fit_linear, "loglog": fit_loglog, "4pl": fit_4pl}


def fit_calibration(kind: str, x, y, area, spread=0.0, *, start=None, passes: int = 2) -> Fit:
    """Fit one calibration model with Poisson-plus-model weights, re-weighted from the fit.

    Parameters
    ----------
    kind : {"linear", "loglog", "4pl"}
    x, y : array_like, shape (R,)
        Concentration (0 = blank) and density of each replicate.
    area : array_like, shape (R,)
        Imaged area of each replicate (density units), so ``y * area`` is the count.
    spread : float or array_like
        Relative counting spread of each replicate (0 = Poisson only).
    start : internal parameters to start the 4PL from (bootstrap), else its own grid.
    passes : fits in all; each after the first takes its weights from the previous fit.

    Returns
    -------
    Fit, with ``aic`` computed on the non-blank replicates in density units with the weights
    of the observed counts (comparable between models).
    """
    x, y, area = (np.asarray(v, float) for v in (x, y, area))
    spread = np.broadcast_to(np.asarray(spread, float), x.shape)

    def sd_at(yy):
        return count_sd(np.clip(yy, 0, None) * area, spread) / area

    sd_obs = sd_at(y)
    fitter = _FITTERS[kind]
    fit = fitter(x, y, sd_obs, start=start)
    for _ in range(passes - 1):
        if not fit.converged:
            break
        yhat = fit.predict(x)
        if kind == "loglog":
            ref = np.where(np.isfinite(yhat), yhat, y)
            fit = fit_loglog(x, y, sd_at(ref), ref=ref)
        else:
            fit = fitter(x, y, sd_at(np.where(np.isfinite(yhat), yhat, y)), start=fit.p)
    if fit.converged:
        sel = x > 0
        pred = fit.predict(x[sel])
        if np.isfinite(pred).all() and sel.any():
            m = int(sel.sum())
            wrss = float((((y[sel] - pred) / sd_obs[sel]) ** 2).sum())
            fit.aic = m * math.log(max(wrss, 1e-300) / m) + 2 * (fit.p.size + 1)
    return fit


def choose_fit(fits: dict[str, Fit], forced: str = "auto") -> tuple[str, str]:
    """Name of the chosen model and why: ``forced`` when it converged, else lowest AIC.

    Raises
    ------
    AssayError
        When no model could be fitted.
    """
    usable = {k: f for k, f in fits.items() if f.converged and math.isfinite(f.aic)}
    if not usable:
        raise AssayError("no calibration model could be fitted: "
                         + "; ".join(f"{k}: {f.message}" for k, f in fits.items()))
    aics = ", ".join(f"{k} {_fmt(f.aic, 2) if f.converged else 'n/a'}" for k, f in fits.items())
    if forced != "auto":
        if forced in usable:
            return forced, f"--fit {forced} (AIC: {aics})"
        note = f"--fit {forced} could not be used ({fits[forced].message}); "
    else:
        note = ""
    best = min(usable, key=lambda k: usable[k].aic)
    return best, f"{note}lowest AIC ({aics})"


# --------------------------------------------------------------------------- detection limits


def ep17_limits(blank, low, z: float = Z95_ONE_SIDED) -> dict:
    """CLSI EP17-A2 parametric limits of blank and detection, in response units.

    ``LoB = mean(blank) + z SD(blank)``, ``LoD = LoB + z SD(low)``, SDs with ddof=1,
    ``z = 1.645`` (one-sided 95 %: at most 5 % of blanks exceed LoB, and at most 5 % of
    samples at LoD fall below LoB). CLSI EP17-A2 (2012); Armbruster & Pry, Clin Biochem Rev
    29 Suppl 1:S49-52 (2008). EP17's small-sample factor ``1 / (1 - 1 / (4 (L - K)))`` on
    the second 1.645 is not applied. NaNs when a group has fewer than 2 values.

    Examples
    --------
    >>> r = ep17_limits([2, 4, 6], [10, 12, 14])  # both SDs are 2
    >>> round(r["lob"], 2), round(r["lod"], 2)
    (7.29, 10.58)
    """
    b = np.asarray(blank, float)
    lo = np.asarray(low, float)
    mean_b = float(b.mean()) if b.size else math.nan
    sd_b = float(b.std(ddof=1)) if b.size > 1 else math.nan
    sd_low = float(lo.std(ddof=1)) if lo.size > 1 else math.nan
    lob = mean_b + z * sd_b
    return {"mean_blank": mean_b, "sd_blank": sd_b, "sd_low": sd_low, "lob": lob,
            "lod": lob + z * sd_low, "n_blank": int(b.size), "n_low": int(lo.size)}


def ich_limits(x, y) -> dict:
    """ICH Q2(R1) limits from an ordinary least-squares line: ``LoD = 3.3 sigma / S``,
    ``LoQ = 10 sigma / S``; ``sigma = sqrt(SS_res / (n - 2))``, ``S`` the slope.

    ICH Q2(R1) §6.3 / §7.3 ("based on the standard deviation of the response and the
    slope"), with sigma the residual SD of a regression line in the range of the limit
    (§6.3.2 "based on the calibration curve").

    NaNs with fewer than 3 points, fewer than 2 distinct ``x`` or a slope <= 0.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    nan = {"slope": math.nan, "intercept": math.nan, "sigma": math.nan, "lod": math.nan,
           "loq": math.nan, "n": int(x.size)}
    if x.size < 3 or np.unique(x).size < 2:
        return nan
    slope, intercept = np.polyfit(x, y, 1)
    sigma = math.sqrt(float(((y - intercept - slope * x) ** 2).sum()) / (x.size - 2))
    out = dict(nan, slope=float(slope), intercept=float(intercept), sigma=sigma)
    if slope > 0:
        out.update(lod=ICH_LOD_FACTOR * sigma / slope, loq=ICH_LOQ_FACTOR * sigma / slope)
    return out


def low_range(reps: Replicates, k: int) -> np.ndarray:
    """Indices of the blanks plus the replicates of the ``k`` lowest non-blank levels."""
    pos = np.unique(reps.x[~reps.blank])
    keep = set(pos[:max(k, 2)].tolist())
    return np.flatnonzero(reps.blank | np.isin(reps.x, list(keep)))


def detection_limits(reps: Replicates, kind: str, *, n_low: int = 3, start=None,
                     fit: Fit | None = None) -> dict:
    """LoB / LoD (EP17) and LoD / LoQ (ICH) of one data set, with the chosen curve.

    Used alike for the point estimate and each bootstrap resample. Returns a flat dict:
    ``lob, lod_density`` (EP17, density), ``lob_conc, lod_conc_ep17`` (inverted through the
    curve), ``lod_ich, loq_ich`` (concentration), ``lod`` (EP17 when available, else ICH),
    and the pieces (``ep17``, ``ich``, ``low_concentration``).
    """
    if fit is None:
        fit = fit_calibration(kind, reps.x, reps.y, reps.area, reps.spread, start=start)
    out: dict = {"fit": fit}
    blanks = reps.y[reps.blank]
    low_conc, low = math.nan, np.array([])
    for idx in reps.levels():
        if not reps.blank[idx[0]] and idx.size >= 2:
            low_conc, low = float(reps.x[idx[0]]), reps.y[idx]
            break
    ep = ep17_limits(blanks, low)
    out["ep17"], out["low_concentration"] = ep, low_conc
    out["lob"], out["lod_density"] = ep["lob"], ep["lod"]
    ok = fit.converged
    out["lob_conc"] = float(fit.invert(ep["lob"])) if ok and math.isfinite(ep["lob"]) \
        else math.nan
    out["lod_conc_ep17"] = float(fit.invert(ep["lod"])) if ok and math.isfinite(ep["lod"]) \
        else math.nan
    sel = low_range(reps, n_low)
    ich = ich_limits(reps.x[sel], reps.y[sel])
    ich["concentrations"] = sorted({float(v) for v in reps.x[sel]})
    out["ich"] = ich
    out["lod_ich"], out["loq_ich"] = ich["lod"], ich["loq"]
    out["lod"] = out["lod_conc_ep17"] if math.isfinite(ep["lod"]) else ich["lod"]
    out["lod_method"] = ("CLSI EP17" if math.isfinite(ep["lod"]) else "ICH Q2")
    return out


BOOT_KEYS = ("lob", "lod_density", "lob_conc", "lod_conc_ep17", "lod_ich", "loq_ich", "lod")


def bootstrap_limits(reps: Replicates, kind: str, *, n_boot: int = 2000, seed: int = 0,
                     n_low: int = 3, start=None) -> dict | None:
    """Percentile 95 % CIs of the limits, resampling replicates within each concentration.

    Returns None when no concentration has 2 replicates (nothing to resample). Otherwise
    ``{key: {"ci95": [lo, hi], "n_valid": int}}`` for :data:`BOOT_KEYS` plus ``slope`` of
    the chosen curve (internal parameter 1) and ``n_boot``, ``seed``; resamples where a
    value is undefined (4PL not converged, a curve that cannot be inverted) are counted out.
    """
    levels = reps.levels()
    if all(idx.size < 2 for idx in levels):
        return None
    rng = np.random.default_rng(seed)
    keys = BOOT_KEYS + ("slope",)
    vals = {k: np.full(n_boot, np.nan) for k in keys}
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in levels])
        r = detection_limits(reps.subset(idx), kind, n_low=n_low, start=start)
        for k in BOOT_KEYS:
            vals[k][b] = r[k]
        vals["slope"][b] = r["fit"].p[1] if r["fit"].converged else np.nan
    out: dict = {"n_boot": n_boot, "seed": seed}
    for k in keys:
        v = vals[k][np.isfinite(vals[k])]
        out[k] = {"ci95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                  if v.size else [math.nan, math.nan], "n_valid": int(v.size)}
    return out


# --------------------------------------------------------------------------- writing


def _fmt(v, digits: int = 4) -> str:
    """Numbers with ``digits`` significant digits; NaN / None / "" as n/a."""
    if v is None or v == "" or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, float | np.floating):
        return f"{v:.{digits}g}"
    return str(v)


def _ci(ci) -> str:
    return "n/a" if not ci or ci[0] is None or not all(
        isinstance(c, float) and math.isfinite(c) for c in ci) else \
        f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _table(rows: Sequence[dict], cols: Sequence[tuple[str, str]]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |" for r in rows]
    return lines


def _fit_summary(fit: Fit) -> dict:
    return {"model": fit.kind, "converged": fit.converged, "message": fit.message,
            "params": fit.params() if fit.converged else {}, "r2": fit.r2, "aic": fit.aic,
            "n": fit.n, "dof": fit.dof}


def build_report(res: dict, figures: Sequence[str]) -> str:
    """``ASSAY_REPORT.md``: every number is formatted from ``res`` (the results JSON)."""
    unit = res["unit"] or "(no unit)"
    du = res["density_unit"]
    dh = res["density_heading"]
    st = res["settings"]
    L = ["# Assay report", ""]
    L += [f"- predictions: `{st['summary']}`",
          f"- concentrations: {st['concentration_source']}; unit **{unit}**",
          f"- density: {dh}",
          f"- counting uncertainty: {res['count_error']['note']}",
          f"- images used: {res['n_images']} ({res['n_replicates']} replicates at "
          f"{res['n_concentrations']} concentrations"
          + (" + blanks" if res["n_blank_images"] else "") + ")"
          + (f"; excluded: {len(res['excluded'])}" if res["excluded"] else "")
          + (f"; without concentration: {len(res['unmatched'])}" if res["unmatched"] else ""),
          ""]
    fit = res["fit"]
    L += [f"## Headline; density in {du}", ""]
    L.append(f"- calibration model: **{fit['model']}**, R² {_fmt(fit['r2'])}, chosen by "
             f"{res['fit_choice']}")
    as_dilution = ""
    if res["unit"] == DILUTION_UNIT and res["lod"] is not None and res["lod"] > 0:
        as_dilution = f" (a {1 / res['lod']:.4g}x dilution)"
    L.append(f"- LoD = **{_fmt(res['lod'])} {unit}**{as_dilution} ({res['lod_method']}), "
             f"95 % CI {_ci(res['lod_ci95'])}")
    lob_d = res["detection"]["lob_density"]
    L.append(f"- LoQ = {_fmt(res['loq'])} {unit} (ICH Q2, 10·σ/slope); LoB = "
             + (f"{_fmt(lob_d)} {du} (concentration {_fmt(res['lob'])} {unit})"
                if lob_d is not None else "n/a (needs >= 2 blank replicates)"))
    L += ["", "## Warnings", ""] + [f"- {w}" for w in res.get("warnings") or ["none"]]
    L += ["", f"## Calibration fits; density in {dh}", "",
          "| model | parameters (95 % CI) | R² | AIC | n | note |", "|---|---|---|---|---|---|"]
    for f in res["fits"].values():
        ps = "; ".join(f"{k} {_fmt(v['value'])} {_ci(v['ci95'])}" for k, v in f["params"].items())
        mark = " (chosen)" if f["model"] == fit["model"] else ""
        L.append(f"| {f['model']}{mark} | {ps or 'n/a'} | {_fmt(f['r2'])} | {_fmt(f['aic'])} | "
                 f"{f['n']} | {f['message'] or ''} |")
    tr = res.get("truth")
    if tr:
        L += ["", f"## Truth; density in {dh}", "", tr["note"]]
        if tr.get("fit"):
            ps = "; ".join(f"{k} {_fmt(v['value'])} {_ci(v['ci95'])}"
                           for k, v in tr["fit"]["params"].items())
            L += ["", f"True curve ({tr['fit']['model']} fitted to the true counts): {ps}; "
                      f"R² {_fmt(tr['fit']['r2'])}."]
    L += ["", f"## Detection limits (concentration in {unit}; response in {du})", "",
          "| limit | value | 95 % CI | definition |", "|---|---|---|---|"]
    d = res["detection"]
    boot = res.get("bootstrap") or {}

    def ci(k):
        return _ci(boot.get(k, {}).get("ci95")) if boot else "n/a"

    rows = [
        ("LoB (response)", d["lob_density"], ci("lob"),
         "mean_blank + 1.645·SD_blank (CLSI EP17)"),
        ("LoB (concentration)", d["lob_conc"], ci("lob_conc"), "LoB through the inverse curve"),
        ("LoD EP17 (response)", d["lod_density"], ci("lod_density"),
         "LoB + 1.645·SD_low (CLSI EP17)"),
        ("LoD EP17 (concentration)", d["lod_conc_ep17"], ci("lod_conc_ep17"),
         "EP17 LoD through the inverse of the chosen curve"),
        ("LoD ICH", d["lod_ich"], ci("lod_ich"),
         "3.3·σ/slope, σ = residual SD of the low-range line (ICH Q2)"),
        ("LoQ ICH", d["loq_ich"], ci("loq_ich"), "10·σ/slope (ICH Q2)"),
    ]
    L += [f"| {a} | {_fmt(b)} | {c} | {e} |" for a, b, c, e in rows]
    ep, ich = d["ep17"], d["ich"]
    L += ["", f"EP17: {ep['n_blank']} blank replicate(s), mean {_fmt(ep['mean_blank'])}, SD "
              f"{_fmt(ep['sd_blank'])}; SD_low {_fmt(ep['sd_low'])} from {ep['n_low']} "
              f"replicate(s) at {_fmt(d['low_concentration'])} {unit}. ICH: line through "
              f"{ich['n']} replicates at {', '.join(_fmt(c) for c in ich['concentrations'])} "
              f"{unit}: slope {_fmt(ich['slope'])}, σ {_fmt(ich['sigma'])}.",
          "", (f"Bootstrap: {boot['n_boot']} resamples of the replicates within each "
               f"concentration (seed {boot['seed']}); LoD defined in {boot['lod']['n_valid']} "
               "of them." if boot else
               "Bootstrap: not possible, no concentration has 2 replicates (CIs n/a).")]
    L += ["", f"## Per sample; density in {dh}", ""]
    L += _table(res["per_sample"], [
        ("concentration", f"concentration ({unit})"), ("blank", "blank"),
        ("n_images", "images"), ("n_replicates", "replicates"), ("beads", "beads"),
        ("mean_density", f"mean ({du})"), ("sd_density", "SD"), ("cv_pct", "CV %"),
        ("poisson_cv_pct", "Poisson CV %"), ("expected_cv_pct", "Poisson+model CV %"),
        ("dispersion_p", "dispersion p"), ("overdispersed", "over-dispersed"),
        ("mean_true_density", "true mean")])
    ce = res["count_error"]
    L += ["", "## Counting error of the model; density in beads per megapixel of frame", "",
          ce["note"] + "."]
    if ce.get("bins"):
        L += [""] + _table(ce["bins"], [
            ("density_low_per_mp", "density from (beads/MP)"),
            ("density_high_per_mp", "to"), ("n_tiles", "tiles"), ("rel_bias", "rel. bias"),
            ("rel_spread", "rel. spread (per tile)"), ("spread_note", "note")])
    if figures:
        L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    problems = [f"{f}: excluded, {why}" for f, why in res["excluded"]] + \
        [f"{f}: no concentration ({res['unmatched_reason']})" for f in res["unmatched"]] + \
        list(res.get("missing_samples") or [])
    if problems:
        L += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    L += ["", "## Concentration of each file", "", "<details><summary>"
          f"{len(res['rules'])} files</summary>", "", "| file | concentration | rule |",
          "|---|---|---|"]
    L += [f"| {f} | {_fmt(c)} | {r} |" for f, c, r in res["rules"]]
    L += ["", "</details>", "", "## Definitions", "",
          "- Count SD = sqrt(max(N, 1) + (s·N)²): Poisson plus the model's relative counting "
          "spread s from its validation tiles (scaled by sqrt(tile area / image area)); "
          "bias reported, not subtracted.",
          "- Weighted fits (1/SD²), re-weighted once from the fitted values; covariance scaled "
          "by the reduced chi-square; 95 % CIs with Student's t. AIC = n ln(WRSS/n) + 2(k+1) "
          "on the non-blank replicates. R² on each fit's own scale.",
          "- Dispersion: Pearson chi-square of replicate counts against one Poisson rate, "
          "k - 1 degrees of freedom; over-dispersed when p < 0.05.",
          "- LoB = mean_blank + 1.645·SD_blank; LoD = LoB + 1.645·SD_low (CLSI EP17-A2, "
          "parametric, without the small-sample factor). LoD = 3.3·σ/S, LoQ = 10·σ/S "
          "(ICH Q2(R1)). CIs: percentile bootstrap over replicates within concentrations.", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- figures


def _blank_x(reps: Replicates) -> float:
    """Where blanks are drawn on the log axis: a quarter of the lowest concentration."""
    pos = reps.x[reps.x > 0]
    return float(pos.min()) / 4 if pos.size else 1.0


def _log_x_axis(ax, reps: Replicates, unit: str) -> None:
    """Log concentration axis without crowded minor labels; blanks marked at their spot."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    if reps.blank.any():
        xb = _blank_x(reps)
        ax.axvline(xb * 1.6, color="lightgrey", lw=0.8)
        ax.annotate("blank", (xb, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                    textcoords="offset points", ha="center", fontsize=8)
    ax.set_xlabel(f"concentration ({unit or 'no unit'}), log axis")


#: Colour, line style and legend note of each fit that is not the chosen one (the chosen one
#: is solid red). A straight line only looks straight on the axes it was fitted on.
FIT_STYLES = {
    "linear": ("tab:orange", "--", " (straight on linear axes; curved on this log x axis)"),
    "loglog": ("tab:cyan", "-.", " (straight on log-log axes, right panel)"),
    "4pl": ("tab:brown", (0, (1, 1.5)), " (4-parameter logistic)"),
}


def plot_calibration(path: Path, reps: Replicates, fits: dict[str, Fit], chosen: str,
                     limits: dict, *, unit: str, density_label: str, title: str = "",
                     true_fit: Fit | None = None, dpi: int = 110) -> None:
    """Replicates, per-concentration mean ± SD, the chosen fit with its 95 % band, the other
    fits, LoB / LoD / LoQ, and the true curve; log x, linear and log y panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xb = _blank_x(reps)
    xp = np.where(reps.x > 0, reps.x, xb)
    pos = reps.x[reps.x > 0]
    grid = np.geomspace(pos.min() / 1.5, pos.max() * 1.5, 200)
    fit = fits[chosen]
    lo, hi = fit.band(grid)
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5))
    for ax, logy in zip(axes, (False, True)):
        ax.scatter(xp, reps.y, s=14, alpha=0.5, color="tab:blue", label="replicates")
        for i, idx in enumerate(reps.levels()):
            m = reps.y[idx].mean()
            s = reps.y[idx].std(ddof=1) if idx.size > 1 else 0.0
            ax.errorbar(xp[idx[0]], m, yerr=s, fmt="s", color="navy", ms=5, capsize=3,
                        label="mean ± SD" if i == 0 else None)
        if np.isfinite(lo).any():
            ax.fill_between(grid, lo, hi, color="tab:red", alpha=0.18, label="95 % CI of fit")
        ax.plot(grid, fit.predict(grid), color="tab:red", lw=2, label=f"{chosen} fit")
        for k, f in fits.items():
            if k != chosen and f.converged:
                color, ls, note = FIT_STYLES.get(k, ("grey", ":", ""))
                ax.plot(grid, f.predict(grid), lw=1.3, ls=ls, color=color,
                        label=f"{k} fit{note}")
        if true_fit is not None and true_fit.converged:
            ax.plot(grid, true_fit.predict(grid), lw=1.5, ls="--", color="tab:green",
                    label="true curve")
            yt = reps.y_true
            if np.isfinite(yt).any():
                ax.scatter(xp, yt, marker="D", facecolors="none", edgecolors="tab:green",
                           s=22, label="true density")
        for key, style, name in (("lob", ":", "LoB"), ("lod_density", "--", "LoD (EP17)")):
            v = limits.get(key)
            if v is not None and math.isfinite(v):
                ax.axhline(v, color="k", ls=style, lw=1, label=name)
        for key, style, name in (("lod", "-.", "LoD"), ("loq_ich", ":", "LoQ (ICH)")):
            v = limits.get(key)
            if v is not None and math.isfinite(v) and v > 0:
                ax.axvline(v, color="purple", ls=style, lw=1, label=f"{name} {v:.3g}")
        _log_x_axis(ax, reps, unit)
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(density_label)
        ax.set_title(f"{chosen} fit, R² {fit.r2:.3f}" + (", log y" if logy else ""))
    handles, labels = axes[0].get_legend_handles_labels()
    # Below the panels: the fits' notes are long and would cover the right panel.
    fig.legend(handles, labels, loc="lower center", fontsize=9, ncols=3, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.03 + 0.045 * math.ceil(len(labels) / 3), 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_residuals(path: Path, reps: Replicates, fits: dict[str, Fit], chosen: str, *,
                   unit: str, dpi: int = 110) -> None:
    """Standardised residuals ``(y - fit) / sd`` vs concentration, one panel per fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [k for k in FIT_KINDS if k in fits and fits[k].converged]
    xb = _blank_x(reps)
    xp = np.where(reps.x > 0, reps.x, xb)
    fig, axes = plt.subplots(1, max(1, len(ok)), figsize=(4.5 * max(1, len(ok)), 3.8),
                             squeeze=False)
    sd = reps.sd()
    for ax, k in zip(axes[0], ok):
        r = (reps.y - fits[k].predict(reps.x)) / sd
        good = np.isfinite(r)
        ax.scatter(xp[good], r[good], s=14, color="tab:red" if k == chosen else "tab:blue")
        far = good & (np.abs(np.where(good, r, 0)) > RESIDUAL_FLAG_SD)
        if far.any():
            ax.scatter(xp[far], r[far], s=70, facecolors="none", edgecolors="k", lw=1,
                       label=f"beyond ±{RESIDUAL_FLAG_SD:g} SD" + (" (listed in the report)"
                                                                 if k == chosen else ""))
            ax.legend(fontsize=8, loc="best")
        for v, ls in ((0, "-"), (RESIDUAL_FLAG_SD, ":"), (-RESIDUAL_FLAG_SD, ":")):
            ax.axhline(v, color="k", lw=0.8, ls=ls)
        _log_x_axis(ax, reps, unit)
        ax.set(ylabel="(y - fit) / SD",
               title=f"{k}{' (chosen)' if k == chosen else ''}: R² {fits[k].r2:.3f}")
    if not ok:
        axes[0][0].text(0.5, 0.5, "no fit converged", ha="center")
    fig.suptitle("Standardised residuals (y - fit) / SD, SD = Poisson + model counting error; "
                 f"dotted: ±{RESIDUAL_FLAG_SD:g} SD", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Calibration curve and detection limits (LoB/LoD/LoQ) from bead counts.",
        formatter_class=cli.HelpFormatter)
    add = functools.partial(cli.add_option, p)
    add("predictions", required=True,
        help="predict_microscope.py output folder or its prediction_summary.csv")
    add("output_dir", required=True,
        help="results folder (created; refused if non-empty without --overwrite)")
    add("samples", default=None,
        help="sample sheet CSV: file (name/stem/glob), concentration, unit, replicate, blank "
             "(default: concentrations from the file names)")
    add("um_per_px", type=float, default=None,
        help="pixel size in µm: densities per mm² (default: beads per megapixel)")
    add("model", default=None,
        help="training run folder: validation_counts.csv gives the model's counting error")
    add("truth", default=None, help="CSV of true counts (file, and n_true, n_beads or true_count: "
             "evaluate_predictions.py's per_image_metrics.csv works as it is)")
    add("fit", choices=("auto",) + FIT_KINDS, default="auto",
        help="calibration model (auto: lowest AIC)")
    add("low_range", type=int, default=3,
        help="lowest non-blank concentrations (plus blanks) in the ICH low-range line")
    add("n_boot", type=int, default=2000, help="bootstrap resamples for the 95 %% CIs")
    add("seed", type=int, default=0, help="bootstrap seed")
    add("dpi", type=int, default=110, help="figure resolution")
    cli.add_overwrite(p)
    args = p.parse_args(argv)
    if args.um_per_px is not None and not args.um_per_px > 0:
        p.error(f"--um_per_px must be positive, got {args.um_per_px}")
    if args.n_boot < 0:
        p.error(f"--n_boot must be >= 0, got {args.n_boot}")
    if args.low_range < 2:
        p.error(f"--low_range must be >= 2, got {args.low_range}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = [runtime.add_log_handler()]
    try:
        return _run(args, handlers)
    finally:
        runtime.remove_log_handlers(handlers)


def _precheck(args) -> Path:
    """Input paths that must exist, checked before the output folder is made."""
    summary = resolve_summary(args.predictions)
    for flag, value in (("--samples", args.samples), ("--truth", args.truth)):
        if value and not Path(value).is_file():
            raise AssayError(f"{value}: {flag} file not found")
    if args.model and not Path(args.model).is_dir():
        raise AssayError(f"{args.model}: --model run folder not found")
    return summary


def _run(args: argparse.Namespace, handlers: list) -> int:
    try:
        summary_path = _precheck(args)
    except AssayError as exc:
        return cli.fatal(log, "%s", exc)
    out = Path(args.output_dir)
    inputs = [summary_path, *(Path(v) for v in (args.samples, args.truth, args.model) if v)]
    try:
        claim = cli.claim_output_dir(out, OUTPUT_FILES, script="quantify_assay",
                                     overwrite=args.overwrite, log_name=LOG_NAME,
                                     inputs=inputs)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    with claim:
        handlers.append(runtime.add_log_handler(out / LOG_NAME, mode="w"))
        claim.report(log)
        try:
            return _quantify(args, summary_path, out)
        except AssayError as exc:
            return cli.fatal(log, "%s", exc)


def _quantify(args: argparse.Namespace, summary_path: Path, out: Path) -> int:
    rows, excluded = read_predictions(summary_path)
    for f, why in excluded:
        log.warning("%s: excluded (%s) in %s", f, why, summary_path)
    sheet = read_sample_sheet(args.samples) if args.samples else None
    source = f"sample sheet {args.samples}" if sheet else "file names"
    why_unmatched = (f"matches no row of {args.samples}" if sheet else
                     "no NNNx_ or <value><unit>_ token in the name")
    assigned, unmatched = assign_concentrations(
        [r["file"] for r in rows], sheet, sheet_path=args.samples or "",
        summary_path=summary_path)
    for f in unmatched:
        log.warning("%s: no concentration (%s); left out", f, why_unmatched)
    missing = [f"{args.samples}: line {r['line']}: {r['pattern']!r} "
               + ("matches no file" if _GLOB_CHARS & set(r["pattern"]) else "not found")
               + f" in {summary_path}"
               for r in unused_sheet_rows(sheet or [], [r["file"] for r in rows]
                                          + [f for f, _ in excluded])]
    for line in missing:
        log.warning("%s", line)
    unit = check_units(assigned)
    rows = [r for r in rows if r["file"] in assigned]
    named = f"{summary_path}" + (f" with {args.samples}" if args.samples else "")
    levels = sorted({c.value for c in assigned.values() if not c.blank})
    if len(levels) < 3:
        raise AssayError(f"{named}: {len(levels)} concentration(s) "
                         f"({', '.join(_fmt(v) for v in levels) or 'none'}) among "
                         f"{len(rows)} usable image(s); a calibration needs at least 3")
    if not any(r["beads"] > 0 for r in rows if not assigned[r["file"]].blank):
        raise AssayError(f"{named}: no positive bead counts at any non-blank concentration")

    if args.um_per_px:
        px_area, area_unit = (args.um_per_px * 1e-3) ** 2, "mm²"
        density_unit = "beads/mm²"
        heading = f"beads per mm² of imaged area ({args.um_per_px} µm/px)"
    else:
        px_area, area_unit = 1e-6, "MP"
        density_unit = "beads/MP"
        heading = "beads per megapixel of image (no --um_per_px, so not per mm²)"

    err_model, err_note = None, "Poisson only (no --model)"
    if args.model:
        pred_dir = summary_path.parent
        err_model, err_note = load_count_error(args.model, pred_dir)
        if err_model is None:
            err_note = f"Poisson only: {err_note}"
            log.warning("counting error: %s", err_note)
        else:
            log.info("counting error from %s", err_note)
    truth = read_truth(args.truth) if args.truth else None

    images = []
    n_extrapolated = 0
    for r in rows:
        c = assigned[r["file"]]
        area_px = r["width"] * r["height"]
        area = area_px * px_area
        n = r["beads"]
        bias, spread, extra = err_model.at(n, area_px) if err_model else (0.0, 0.0, False)
        n_extrapolated += extra
        sd_n = float(count_sd(n, spread))
        n_true = truth.get(mio.stem_key(r["file"])) if truth is not None else None
        images.append({
            "file": r["file"], "concentration": c.value, "unit": unit, "blank": c.blank,
            "replicate": c.replicate, "concentration_rule": c.rule,
            "width": r["width"], "height": r["height"], "area": area, "area_unit": area_unit,
            "beads": n, "density": n / area, "density_unit": density_unit,
            "count_sd_poisson": math.sqrt(max(n, 1)), "count_bias_rel": bias,
            "count_spread_rel": spread, "count_sd": sd_n, "density_sd": sd_n / area,
            "cv_pct": 100 * sd_n / n if n else math.nan,
            "error_model_extrapolated": extra if err_model else "",
            "n_true": n_true if n_true is not None else "",
            "true_density": n_true / area if n_true is not None else math.nan,
        })
    checks = err_model.warnings() if err_model else []
    if n_extrapolated:
        checks.append(extrapolation_warning(n_extrapolated, err_model))

    reps = build_replicates(images)
    per_sample = sample_table(reps, unit)
    fits = {k: fit_calibration(k, reps.x, reps.y, reps.area, reps.spread) for k in FIT_KINDS}
    for k, f in fits.items():
        if not f.converged:
            log.warning("%s fit: %s", k, f.message)
        elif f.message:
            log.warning("%s fit: %s", k, f.message)
    chosen, why = choose_fit(fits, args.fit)
    log.info("calibration: %s chosen by %s", chosen, why)
    limits = detection_limits(reps, chosen, n_low=args.low_range, fit=fits[chosen])
    boot = None
    if args.n_boot > 0:
        boot = bootstrap_limits(reps, chosen, n_boot=args.n_boot, seed=args.seed,
                                n_low=args.low_range, start=fits[chosen].p)
        if boot is None:
            log.warning("bootstrap skipped: no concentration has 2 replicates (CIs n/a)")

    truth_res = None
    true_fit = None
    if truth is not None:
        have = np.isfinite(reps.y_true)
        n_img_true = sum(1 for r in images if r["n_true"] != "")
        note = (f"True counts from `{args.truth}` for {n_img_true} of {len(images)} images.")
        if np.unique(reps.x[have & (reps.x > 0)]).size >= 3:
            t = reps.subset(np.flatnonzero(have))
            true_fit = fit_calibration(chosen, t.x, t.y_true, t.area)
            if not true_fit.converged:
                note += f" True curve not fitted: {true_fit.message}."
        else:
            note += " Fewer than 3 concentrations have true counts: no true curve."
        truth_res = {"note": note, "n_images": n_img_true,
                     "fit": _fit_summary(true_fit) if true_fit and true_fit.converged
                     else None}

    checks += residual_flags(reps, fits[chosen])
    lod_check = lod_warning(limits["lod"], reps, unit)
    if lod_check:
        checks.append(lod_check)
    for line in checks:
        log.warning("%s", line)
    lod_key = "lod_conc_ep17" if limits["lod_method"] == "CLSI EP17" else "lod_ich"
    res = {
        "n_images": len(images),
        "n_replicates": len(reps),
        "n_concentrations": len(levels),
        "n_blank_images": int(sum(1 for r in images if r["blank"])),
        "unit": unit,
        "density_unit": density_unit,
        "density_heading": heading,
        "fit": _fit_summary(fits[chosen]),
        "fit_choice": why,
        "fits": {k: _fit_summary(f) for k, f in fits.items()},
        "lob": limits["lob_conc"] if reps.blank.any() else None,
        "lod": limits["lod"],
        "loq": limits["loq_ich"],
        "lod_ci95": boot[lod_key]["ci95"] if boot else None,
        "lod_method": ("CLSI EP17: LoB + 1.645·SD_low, through the inverse "
                       f"{chosen} curve" if limits["lod_method"] == "CLSI EP17" else
                       "ICH Q2: 3.3·σ/slope of the low-range line"),
        "detection": {"lob_density": limits["lob"],
                      **{k: limits[k] for k in ("lod_density", "lob_conc", "lod_conc_ep17",
                                                "lod_ich", "loq_ich", "ep17", "ich",
                                                "low_concentration")}},
        "bootstrap": boot,
        "per_sample": per_sample,
        "count_error": {"note": err_note, "model": err_model.model if err_model else None,
                        "bins": err_model.bins() if err_model else [],
                        "n_extrapolated": n_extrapolated},
        "truth": truth_res,
        "warnings": checks,
        "excluded": [list(e) for e in excluded],
        "unmatched": unmatched,
        "unmatched_reason": why_unmatched,
        "missing_samples": missing,
        "rules": [[r["file"], r["concentration"], r["concentration_rule"]] for r in images],
        "settings": {"summary": str(summary_path), "samples": args.samples,
                     "concentration_source": source, "um_per_px": args.um_per_px,
                     "model": args.model, "truth": args.truth, "fit": args.fit,
                     "low_range": args.low_range, "n_boot": args.n_boot, "seed": args.seed},
    }
    res = mio.json_ready(res)

    from evaluate_predictions import write_csv  # one CSV writer for all reports

    write_csv(out / PER_IMAGE_NAME, images)
    write_csv(out / PER_SAMPLE_NAME, per_sample)
    plot_calibration(out / FIG_CALIBRATION, reps, fits, chosen, limits, unit=unit,
                     density_label=f"density ({density_unit})",
                     title=f"Calibration; density in {heading}", true_fit=true_fit,
                     dpi=args.dpi)
    plot_residuals(out / FIG_RESIDUALS, reps, fits, chosen, unit=unit, dpi=args.dpi)
    figures = [FIG_CALIBRATION, FIG_RESIDUALS]
    mio.atomic_write_json(out / RESULTS_NAME, res)
    (out / REPORT_NAME).write_text(build_report(res, figures), encoding="utf-8")
    log.info("%d image(s), %d concentration(s): %s fit R² %s; LoD %s %s (%s), CI %s; LoQ %s",
             len(images), len(levels), chosen, _fmt(fits[chosen].r2), _fmt(res["lod"]), unit,
             limits["lod_method"], _ci(res["lod_ci95"]), _fmt(res["loq"]))
    log.info("wrote %s", out)
    n_bad = len(excluded) + len(unmatched)
    if n_bad:
        log.warning("%d image(s) not used (listed in %s)", n_bad, REPORT_NAME)
    if missing:
        log.warning("%d sample sheet row(s) match no predicted image (listed in %s)",
                    len(missing), REPORT_NAME)
    return 1 if n_bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
