"""What the assay reads: bead counts per image, concentrations, sample sheets, true counts.

``quantify_assay.py`` turns these into replicates, a calibration curve and detection limits
(``assay_stats``); this module only reads and checks its inputs, so other code (the demo
deciding whether a calibration is possible) can ask the same questions without running it.
Every error is an :class:`AssayError` whose one-line message names the file.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import assay_stats as stats
import microbead_io as mio
import reporting

log = logging.getLogger("microbead.assay")

SUMMARY_NAME = "prediction_summary.csv"

SUMMARY_REQUIRED = ("file", "width", "height", "beads")
# A value with a molar unit between separators: "1.5625pM_...", "..._0pM", "2.5e-3nM-x".
_CONC_RE = re.compile(
    r"(?:^|[_\-\s])(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(aM|fM|pM|nM|uM|µM|μM|mM)(?=$|[_\-\s.])")
GLOB_CHARS = set("*?[")
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
        return Concentration(1.0 / dil, stats.DILUTION_UNIT, False,
                             f"file name: {dil}x -> 1/{dil} (relative)")
    return None


def read_table(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
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
    header, raw = read_table(path, "prediction summary")
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
    header, raw = read_table(path, "sample sheet")
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
        if GLOB_CHARS & set(pat):
            continue
        key = Path(pat).stem
        first = seen.setdefault(key, row)
        if first is not row and ((first["concentration"], first["unit"], first["blank"])
                                 != (row["concentration"], row["unit"], row["blank"])):
            raise AssayError(
                f"{path}: {pat!r} is listed twice with different concentrations: line "
                f"{first['line']} ({reporting.fmt(first['concentration'], 4)} {first['unit']}) "
                f"and line {row['line']} ({reporting.fmt(row['concentration'], 4)} "
                f"{row['unit']}); keep one")


def unused_sheet_rows(sheet: Sequence[dict], files: Sequence[str]) -> list[dict]:
    """Sheet rows that match none of ``files``: a plain name absent from the predictions
    (by name or stem) or a glob that matches nothing. Each is a sample the user expects in
    the calibration and that is not there."""
    names = [(f, Path(f).stem) for f in files]
    unused = []
    for row in sheet:
        pat = row["pattern"]
        if GLOB_CHARS & set(pat):
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
        if not GLOB_CHARS & set(pat) and (pat == name or pat == stem
                                            or Path(pat).stem == stem):
            return row, 1
    hits = [row for row in sheet if GLOB_CHARS & set(row["pattern"])
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
    header, rows = read_table(path, "truth table")
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
