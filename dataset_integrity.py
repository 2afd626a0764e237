"""Integrity checks of a microbead dataset's image/mask pairs (no statistics, no TensorFlow).

What ``analyze_microbead_dataset.py`` checks before it measures anything: pairing by stem,
every file decoded, mask value sets (0/255, 0/1, anti-aliased, instance labels ...), image/mask
size mismatches, duplicate images (identical decoded pixels), empty and nearly full masks,
blank images, skipped (non-image) files and images whose contrast looks inverted relative to
their mask. Each finding is a :class:`Problem` with one of the codes below (column
``problem`` of ``integrity_problems.csv``); each usable pair becomes an :class:`ImageRecord`
that the statistics (``dataset_stats``) and the label audit (``label_audit``) fill in.

Example
-------
>>> rec, problems = inspect_pair(image_path, mask_path, 256, data_dir)   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

import microbead_io as mio
from label_quality import disk

#: A mask with more than this fraction of foreground pixels is reported as nearly full.
NEARLY_FULL_RATIO = 0.9
#: Inverted-contrast margin, in normalised intensity units (image mapped to [0, 1]).
POLARITY_MARGIN = 0.02
#: Images with beads needed before the dataset's own polarity overrides the dark-rim prior.
POLARITY_CONSENSUS_MIN = 5

# Problem codes (column ``problem`` of integrity_problems.csv).
UNPAIRED_IMAGE = "unpaired_image"
UNPAIRED_MASK = "unpaired_mask"
DUPLICATE_STEM = "duplicate_stem"
UNREADABLE_IMAGE = "unreadable_image"
UNREADABLE_MASK = "unreadable_mask"
SIZE_MISMATCH = "size_mismatch"
MASK_0_1 = "mask_0_1"
MASK_ANTIALIASED = "mask_antialiased"
MASK_ENCODING = "mask_encoding"
EMPTY_MASK = "empty_mask"
NEARLY_FULL_MASK = "nearly_full_mask"
DUPLICATE_IMAGE = "duplicate_image"
INVERTED = "inverted_contrast"
BLANK_IMAGE = "blank_image"
MASK_OFFSET = "mask_offset"
MASK_MISMATCH = "mask_image_mismatch"
MISSED_BEADS = "missed_beads"
MERGED_BEADS = "merged_beads"
SKIPPED_FILE = "skipped_file"


# --------------------------------------------------------------------------- records


@dataclass
class Problem:
    """One integrity finding.

    ``severity`` is ``"error"`` when the file could not be analysed at all (unreadable,
    unpaired, size mismatch) and ``"warning"`` when it was analysed but looks wrong.
    """

    file: str
    problem: str
    detail: str
    severity: str = "warning"


@dataclass
class ImageRecord:
    """What one readable, size-consistent pair contributes (filled in two passes)."""

    image_path: Path
    mask_path: Path
    name: str
    native_shape: tuple[int, int]
    mask_encoding: str
    image_hash: str
    brightness: float
    contrast: float
    mask: np.ndarray  # uint8 (S, S) {0, 1} at the analysis size
    stats: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- small helpers


def _strip_path(msg: str, path: Path) -> str:
    """Error message without its leading ``path: `` (the table already names the file)."""
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _full_scale(raw: np.ndarray) -> float:
    """Full-scale value of the storage type (255, 65535, ...; floats: 1 or their max)."""
    if np.issubdtype(raw.dtype, np.integer):
        return float(np.iinfo(raw.dtype).max)
    top = float(np.nanmax(raw)) if raw.size else 1.0
    return 1.0 if top <= 1.0 else top


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as text (the whole path when it is not under it)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- checks


def describe_mask_levels(raw: np.ndarray) -> tuple[str, str | None, str]:
    """Classify the value set of a raw mask.

    Parameters
    ----------
    raw : ndarray ``(H, W)`` or ``(H, W, C)``
        Mask as stored (``microbead_io._read_raw``), any dtype.

    Returns
    -------
    encoding : str
        ``"0/255"``, ``"0/1"``, ``"0/65535"``, ``"empty"``, ``"constant V"``,
        ``"instance labels (N ids)"`` (read as foreground = non-zero, no problem),
        ``"anti-aliased (N levels)"`` or ``"A/B"``; the rule is ``microbead_io.mask_rule``.
    problem : str or None
        Problem code when the encoding is not the project's two-level 0/255 (or 0/65535).
        Empty and constant masks return None here: the empty / nearly-full checks cover them.
    detail : str
        One-line explanation for the problem table ("" when no problem).
    """
    levels = mio.mask_levels(raw)
    suffix = " (multi-channel)" if raw.ndim == 3 else ""
    if levels.size > 2 and mio.mask_rule(raw) == mio.MASK_RULE_LABELS:
        # Read as foreground = non-zero (microbead_io.mask_rule): a valid mask, no problem.
        return f"instance labels ({levels.size - 1} ids)", None, ""
    if levels.size > 2:
        lo, hi = levels[0], levels[-1]
        return (
            f"anti-aliased ({levels.size} levels)",
            MASK_ANTIALIASED,
            f"{levels.size} grey levels from {lo:g} to {hi:g}{suffix} (resampled or "
            f"anti-aliased); training binarizes it at half max ({float(hi) / 2:g})",
        )
    if levels.size == 1:
        v = levels[0]
        return ("empty" if v == 0 else f"constant {v:g}"), None, ""
    lo, hi = levels
    if lo != 0:
        return (
            f"{lo:g}/{hi:g}",
            MASK_ENCODING,
            f"values {{{lo:g}, {hi:g}}}{suffix}: background is not 0; training binarizes at "
            f"half max, so check which level is foreground",
        )
    if hi in (255, 65535):
        return f"0/{hi:g}", None, ""
    if hi == 1:
        return (
            "0/1",
            MASK_0_1,
            f"values {{0, 1}}{suffix}: looks black in viewers; read correctly, but the "
            "project stores masks as 0/255",
        )
    return f"0/{hi:g}", MASK_ENCODING, f"values {{0, {hi:g}}}{suffix}: unusual foreground value"


def image_hash(raw: np.ndarray) -> str:
    """SHA-1 of the decoded pixels (shape, dtype and bytes): equal for identical content.

    A PNG and a TIFF holding the same pixels hash equal; re-encoded (lossy) copies do not.
    """
    h = hashlib.sha1()
    h.update(repr((raw.shape, str(raw.dtype))).encode())
    h.update(np.ascontiguousarray(raw).tobytes())
    return h.hexdigest()


def mask_polarity(image01: np.ndarray, mask: np.ndarray, ring_width: int) -> float:
    """Mean intensity in a ring around the mask minus the mean intensity inside it.

    Beads in these brightfield images are dark rims on a brighter background, so for a
    correct image/mask pair the value is positive; an image whose grey levels are inverted
    relative to its mask (or a mask of the background) gives a negative value.

    Parameters
    ----------
    image01 : float ``(H, W)``
        Normalised image in [0, 1].
    mask : ``(H, W)`` {0, 1}
        Binary mask, same shape.
    ring_width : int
        Width in pixels of the ring: the hole-filled mask dilated by a disc of this radius,
        minus the filled mask.

    Returns
    -------
    float
        NaN when the mask or the ring is empty.
    """
    m = np.asarray(mask).astype(bool)
    if not m.any():
        return float("nan")
    filled = ndi.binary_fill_holes(m)
    ring = ndi.binary_dilation(filled, structure=disk(max(1, int(ring_width)))) & ~filled
    if not ring.any():
        return float("nan")
    img = np.asarray(image01, dtype=np.float64)
    return float(img[ring].mean() - img[m].mean())


def inspect_pair(image_path: Path, mask_path: Path, image_size: int, root: Path
                 ) -> tuple[ImageRecord | None, list[Problem]]:
    """Integrity pass for one pair: read both, check values and sizes, keep the mask.

    Returns ``(record, problems)``; ``record`` is None when the pair cannot be analysed
    (unreadable file or size mismatch), with an ``error`` problem saying why.
    """
    problems: list[Problem] = []
    img_name, mask_name = rel_path(image_path, root), rel_path(mask_path, root)
    raw_img = raw_mask = None
    try:
        raw_img = mio._read_raw(Path(image_path))
    except mio.ImageReadError as exc:
        problems.append(Problem(img_name, UNREADABLE_IMAGE, _strip_path(str(exc), image_path),
                                "error"))
    try:
        raw_mask = mio._read_raw(Path(mask_path))
    except mio.ImageReadError as exc:
        problems.append(Problem(mask_name, UNREADABLE_MASK, _strip_path(str(exc), mask_path),
                                "error"))
    if raw_img is None or raw_mask is None:
        return None, problems
    if raw_img.shape[:2] != raw_mask.shape[:2]:
        problems.append(Problem(
            img_name, SIZE_MISMATCH,
            f"image is {raw_img.shape[1]}x{raw_img.shape[0]} but mask {mask_name} is "
            f"{raw_mask.shape[1]}x{raw_mask.shape[0]}", "error"))
        return None, problems

    encoding, code, detail = describe_mask_levels(raw_mask)
    if code:
        problems.append(Problem(mask_name, code, detail))
    binary = mio.binarize_mask(raw_mask)
    ratio = float(binary.mean())
    if not binary.any():
        problems.append(Problem(mask_name, EMPTY_MASK, "no foreground pixel"))
    elif ratio > NEARLY_FULL_RATIO:
        problems.append(Problem(mask_name, NEARLY_FULL_MASK,
                                f"{ratio:.1%} foreground (> {NEARLY_FULL_RATIO:.0%}): "
                                "inverted or wrong mask?"))
    gray = mio.to_channels(raw_img, 1)[..., 0]
    scale = _full_scale(raw_img)
    brightness = float(gray.mean()) / scale
    contrast = float(gray.std()) / scale
    if float(gray.max() - gray.min()) == 0.0:
        problems.append(Problem(img_name, BLANK_IMAGE, f"constant image (value {gray.flat[0]:g})"))
    rec = ImageRecord(
        image_path=Path(image_path), mask_path=Path(mask_path), name=Path(image_path).name,
        native_shape=tuple(int(v) for v in raw_img.shape[:2]), mask_encoding=encoding,
        image_hash=image_hash(raw_img), brightness=brightness, contrast=contrast,
        mask=mio.resize_mask(binary, image_size),
    )
    return rec, problems


def skipped_problems(root: Path, folders) -> list[Problem]:
    """One :data:`SKIPPED_FILE` warning per entry of ``folders`` that is not an image
    (``microbead_io.skipped_entries``): listed in integrity_problems.csv, the report and the
    log like every problem, never ignored silently."""
    out = []
    for folder in folders:
        for p in mio.skipped_entries(folder):
            what = ("folder (sub-folders are not searched)" if p.is_dir() else
                    f"not an image ({p.suffix or 'no extension'}; supported: "
                    f"{', '.join(mio.IMAGE_EXTENSIONS)})")
            out.append(Problem(rel_path(p, root), SKIPPED_FILE, f"skipped: {what}"))
    return out


def pairing_problems(pairing: mio.Pairing, root: Path) -> list[Problem]:
    """Unpaired images and masks (errors: not analysed) and duplicated stems."""
    problems = [Problem(rel_path(p, root), UNPAIRED_IMAGE,
                        f"no mask with stem '{mio.stem_key(p)}'", "error")
                for p in pairing.unpaired_images]
    problems += [Problem(rel_path(p, root), UNPAIRED_MASK,
                         f"no image with stem '{mio.stem_key(p)}'", "error")
                 for p in pairing.unpaired_masks]
    problems += [Problem(k, DUPLICATE_STEM, "more than one file with this stem in one folder; "
                         "only the first is analysed") for k in pairing.duplicates]
    return problems


def inspect_pairs(pairs, image_size: int, root: Path, problems: list[Problem],
                  progress: bool) -> list[ImageRecord]:
    """Pass 1, integrity: one record per usable pair (only the resized mask kept in memory);
    unusable pairs and duplicate images are appended to ``problems``."""
    from tqdm import tqdm

    records: list[ImageRecord] = []
    for ip, mp in tqdm(pairs, desc="integrity", unit="img", disable=not progress):
        rec, probs = inspect_pair(ip, mp, image_size, root)
        problems += probs
        if rec is not None:
            records.append(rec)
    by_hash: dict[str, ImageRecord] = {}
    for rec in records:
        first = by_hash.setdefault(rec.image_hash, rec)
        if first is not rec:
            problems.append(Problem(rel_path(rec.image_path, root), DUPLICATE_IMAGE,
                                    f"identical pixels to {rel_path(first.image_path, root)}"))
    return records


def flag_inverted_contrast(records: list[ImageRecord], root: Path,
                           problems: list[Problem]) -> set[str]:
    """Names of the images whose mask polarity contradicts the dataset's (a problem each).

    The dark-rim prior (polarity > 0) holds unless the dataset itself says otherwise: at
    least ``POLARITY_CONSENSUS_MIN`` finite polarities with a median beyond the margin.
    """
    pol = np.array([r.stats["polarity"] for r in records], dtype=np.float64)
    finite = pol[np.isfinite(pol)]
    expected = 1.0
    if finite.size >= POLARITY_CONSENSUS_MIN and abs(float(np.median(finite))) > POLARITY_MARGIN:
        expected = float(np.sign(np.median(finite)))
    inverted = set()
    for rec in records:
        p = rec.stats["polarity"]
        if math.isfinite(p) and p * expected < -POLARITY_MARGIN:
            inverted.add(rec.name)
            side = "brighter" if expected > 0 else "darker"
            problems.append(Problem(
                rel_path(rec.image_path, root), INVERTED,
                f"inside the mask is {side} than the ring around it (polarity {p:+.3f}, "
                f"dataset median {float(np.median(finite)) if finite.size else float('nan'):+.3f})"
                "; inverted image or a mask of the background?"))
    return inverted


def attach_problems(records: list[ImageRecord], problems: list[Problem]) -> None:
    """Sort ``problems`` (errors first, then by file: the table reads as a to-do list) and
    give each record the codes of its image and mask."""
    problems.sort(key=lambda p: (p.severity != "error", p.file, p.problem))
    problem_by_file: dict[str, list[str]] = {}
    for p in problems:
        problem_by_file.setdefault(Path(p.file).stem, []).append(p.problem)
    for rec in records:
        rec.problems = sorted(set(problem_by_file.get(rec.image_path.stem, [])
                                  + problem_by_file.get(rec.mask_path.stem, [])))
