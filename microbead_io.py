"""Image I/O and preprocessing shared by every microbead script.

Every script (generate, analyze, train, predict, evaluate) reads and writes images only
through this module, so the form an image takes on its way into a network is identical by
construction. The old pipeline mixed BGR and RGB, resized masks bicubically and normalised
differently at predict time; each of those traps has one function here and a test by name.

Conventions
-----------
* Images are ``float32`` arrays of shape ``(H, W, C)``; ``C`` is the configured channel count
  (default 1 = luminance, ITU-R BT.601 weights). Channel order is always RGB.
  :func:`read_image` keeps the file's value range; :func:`normalize_image` maps to ``[0, 1]``.
* Masks are ``uint8`` arrays of shape ``(H, W)`` with values ``{0, 1}``.
* Label images are integer arrays ``(H, W)``: 0 background, 1..N instances.

Nothing here imports TensorFlow.

Example
-------
>>> pairs = pair_files("dataset_microscope/images", "dataset_microscope/masks")  # doctest: +SKIP
>>> img = normalize_image(read_image(pairs.pairs[0][0]))                           # doctest: +SKIP
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

log = logging.getLogger("microbead.io")

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
MASK_SUFFIXES = ("_mask", "-mask", "_masks", "-masks", "_label", "_labels")
# Default percentile normalisation: robust to hot pixels and to 8- vs 16-bit storage.
DEFAULT_NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8}
# Background window of the flat-field normalisation, in bead diameters (see flatfield_window).
FLATFIELD_DIAMETERS = 8.0
# Users' tiles: ``<frame>_grid_r<R>_c<C>`` = grid cell (R, C) of one microscope frame.
GRID_RE = re.compile(r"^(?P<frame>.+?)[_\-]grid[_\-]?r(?P<row>\d+)[_\-]?c(?P<col>\d+)$",
                     re.IGNORECASE)
_DILUTION_RE = re.compile(r"(?:^|[_\-])(\d+)x(?=[_\-])", re.IGNORECASE)


class ImageReadError(Exception):
    """A file could not be read as an image; ``str(err)`` is one line naming the file."""


class PairingError(Exception):
    """Images and masks do not pair up; the message names every unpaired file."""


class SizeMismatchError(Exception):
    """An image and its mask differ in size; the message names both files."""


# --------------------------------------------------------------------------- listing / pairing


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a regular, non-hidden file with a supported image extension."""
    p = Path(path)
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Sorted image files directly inside ``directory`` (not recursive).

    Entries named like images that are not readable files (a folder ``x.png``, a dangling or
    looping symbolic link) are left out with a warning naming each (:func:`unusable_entry`).

    Raises
    ------
    FileNotFoundError
        If ``directory`` does not exist (the message names it).
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: folder not found")
    files = []
    for p in sorted(d.iterdir()):
        if is_image_file(p):
            files.append(p)
        elif not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS:
            log.warning("%s: skipped: %s", p, unusable_entry(p))
    return files


def unusable_entry(path: str | os.PathLike) -> str:
    """Why an entry named like an image is not one: a folder, a symbolic link whose target
    is missing or that loops, or another kind of file (a socket, a device)."""
    p = Path(path)
    if p.is_symlink():
        try:
            os.stat(p)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "symbolic link loop"
            return f"broken symbolic link (target {os.readlink(p)} not found)"
    if p.is_dir():
        return "a folder, not an image file"
    return "not a regular file"


def skipped_entries(directory: str | os.PathLike) -> list[Path]:
    """Entries directly inside ``directory`` that :func:`list_images` skips, sorted.

    Non-hidden files without a supported image extension (``notes.txt``, ``frame.czi``) and
    sub-folders (not searched). Hidden entries (``.DS_Store``) are not listed. Callers name
    these as skipped rather than ignoring them silently. A missing folder gives ``[]``.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir()
                  if not p.name.startswith(".") and not is_image_file(p))


def stem_key(path: str | os.PathLike) -> str:
    """Pairing key of a file: its stem without a trailing mask suffix (``_mask``, ``-mask`` ...).

    ``a_mask.png``, ``a-mask.tif`` and ``a.tif`` all give ``"a"``.
    """
    stem = Path(path).stem
    low = stem.lower()
    for suffix in MASK_SUFFIXES:
        if low.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


@dataclass
class Pairing:
    """Result of :func:`pair_files`.

    Attributes
    ----------
    pairs : list of (Path, Path)
        ``(image, mask)`` sorted by key.
    unpaired_images, unpaired_masks : list of Path
        Files with no partner; never silently dropped.
    duplicates : list of str
        Keys that matched more than one file in one folder (e.g. ``a.png`` and ``a.tif``).
    ignored : list of (Path, Path)
        ``(ignored file, file used)`` for each duplicate: the first file (sorted) of a key
        is paired, the others are not used.
    """

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    ignored: list[tuple[Path, Path]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unpaired_images or self.unpaired_masks or self.duplicates)

    def problems(self) -> list[str]:
        """One human-readable line per problem, naming the file."""
        out = [f"{p}: image has no mask" for p in self.unpaired_images]
        out += [f"{p}: mask has no image" for p in self.unpaired_masks]
        used = {}
        for ignored, first in self.ignored:
            used.setdefault(stem_key(first), (first, []))[1].append(ignored.name)
        out += [f"{k}: more than one file with this stem in one folder"
                + (f" ({used[k][0].name} used; {', '.join(used[k][1])} ignored)"
                   if k in used else "") for k in self.duplicates]
        return out


def _index_by_key(files: list[Path], ignored: list | None = None
                  ) -> tuple[dict[str, Path], list[str]]:
    index: dict[str, Path] = {}
    dups: list[str] = []
    for f in files:
        k = stem_key(f)
        if k in index:
            dups.append(k)
            if ignored is not None:
                ignored.append((f, index[k]))
        else:
            index[k] = f
    return index, dups


def pair_files(
    image_dir: str | os.PathLike, mask_dir: str | os.PathLike, *, strict: bool = False
) -> Pairing:
    """Pair images with masks by :func:`stem_key`, tolerating suffixes and extensions.

    Parameters
    ----------
    image_dir, mask_dir : path
        Folders of images and masks.
    strict : bool
        If True, raise :class:`PairingError` when anything is unpaired or duplicated.
        Otherwise unpaired files are returned (and logged) so the caller skips them
        explicitly; pairs are never shifted.
    """
    ignored: list[tuple[Path, Path]] = []
    images, dup_i = _index_by_key(list_images(image_dir), ignored)
    masks, dup_m = _index_by_key(list_images(mask_dir), ignored)
    result = Pairing(
        ignored=ignored,
        pairs=[(images[k], masks[k]) for k in sorted(images.keys() & masks.keys())],
        unpaired_images=[images[k] for k in sorted(images.keys() - masks.keys())],
        unpaired_masks=[masks[k] for k in sorted(masks.keys() - images.keys())],
        duplicates=sorted(set(dup_i + dup_m)),
    )
    for line in result.problems():
        log.warning(line)
    if strict and not result.ok:
        raise PairingError("; ".join(result.problems()))
    return result


# --------------------------------------------------------------------------- reading


def _read_raw(path: Path) -> np.ndarray:
    """Pixel array as stored (uint8/uint16/float), ``(H, W)`` or ``(H, W, C)`` RGB(A) order."""
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageReadError(f"{path}: unsupported extension (use {', '.join(IMAGE_EXTENSIONS)})")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = tifffile.imread(path)
            # Multi-page / z-stacks: take the first plane, say so.
            if arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4):
                log.warning("%s: %d pages, using the first", path, arr.shape[0])
                arr = arr[0]
            elif arr.ndim > 3:
                raise ImageReadError(f"{path}: unsupported TIFF shape {arr.shape}")
        else:
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ImageReadError(f"{path}: not a readable image (corrupt or wrong format)")
            if arr.ndim == 3:
                # OpenCV decodes to BGR(A); the project is RGB everywhere.
                code = cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
                arr = cv2.cvtColor(arr, code)
    except ImageReadError:
        raise
    except Exception as exc:  # tifffile/cv2 raise many types on corrupt data
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ImageReadError(f"{path}: not a readable image ({msg})") from None
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise ImageReadError(f"{path}: unsupported image shape {arr.shape}")
    return arr


def to_channels(arr: np.ndarray, channels: int = 1) -> np.ndarray:
    """Convert a ``(H, W)`` or ``(H, W, 3|4)`` RGB(A) array to float32 ``(H, W, channels)``.

    Alpha is dropped. ``channels=1`` gives luminance (0.299 R + 0.587 G + 0.114 B);
    ``channels=3`` replicates a grayscale image. Value range is unchanged.
    """
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if channels == 1:
        if a.ndim == 3:
            a = a @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return a[..., None]
    if channels == 3:
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=-1)
        return np.ascontiguousarray(a)
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def read_image(path: str | os.PathLike, channels: int = 1) -> np.ndarray:
    """Read an image file as float32 ``(H, W, channels)`` in its stored value range.

    8- and 16-bit, grayscale, RGB and RGBA are accepted (.tif/.tiff/.png/.jpg/.jpeg/.bmp).
    Use :func:`normalize_image` to map to ``[0, 1]``.

    Raises
    ------
    ImageReadError
        One-line message naming the file, for missing, corrupt or unsupported files.
    """
    return to_channels(_read_raw(Path(path)), channels)


#: Rules :func:`binarize_mask` applies (returned by :func:`mask_rule`).
MASK_RULE_TWO_LEVEL = "two-level"  # <= 2 values: the upper one is foreground
MASK_RULE_LABELS = "instance labels"  # ids 1..N: every non-zero pixel is foreground
MASK_RULE_HALF_MAX = "half max"  # anti-aliased / resampled greyscale: >= max / 2
# Share of the non-zero pixels below half max that must be flat (every non-zero 4-neighbour
# holds the same value) for a multi-level integer mask to be read as labels. Measured on
# drawn masks: instance labels 0.73 (300 overlapping discs in 160 px) to 1.0; smoothly
# resized or anti-aliased 0/255 masks (area, linear, cubic; x0.5 to x6) <= 0.001, where every
# low pixel is a step of a ramp; JPEG-compressed masks 0.12 (quality 50) to 0.49 (95).
LABEL_FLAT_FRACTION = 0.6


def _mask_plane(raw: np.ndarray) -> np.ndarray:
    """One ``(H, W)`` plane of a raw mask: the max over R, G, B (alpha ignored)."""
    a = np.asarray(raw)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1) if a.shape[-1] in (3, 4) else a[..., 0]
    return a


def _flat_low_fraction(a: np.ndarray) -> float:
    """Share of the pixels with ``0 < v < max / 2`` whose non-zero 4-neighbours all equal v
    (1.0 when there are none)."""
    v = a.astype(np.int64, copy=False)
    low = (v > 0) & (2 * v < int(v.max()))
    n_low = int(np.count_nonzero(low))
    if n_low == 0:
        return 1.0
    p = np.pad(v, 1)
    flat = low.copy()
    for nb in (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]):
        flat &= (nb == 0) | (nb == v)
    return float(np.count_nonzero(flat)) / n_low


def mask_rule(raw: np.ndarray) -> str:
    """How :func:`binarize_mask` reads a raw mask: one of the ``MASK_RULE_*`` names.

    * at most two distinct values (0/1, 0/255, 0/65535, empty): :data:`MASK_RULE_TWO_LEVEL`,
      foreground = the upper value (= non-zero when the lower one is 0);
    * integer values (integer dtype, or float holding whole numbers), more than two of them,
      and the pixels below half the maximum form flat regions (at least
      :data:`LABEL_FLAT_FRACTION` of them): :data:`MASK_RULE_LABELS`, an instance-label image
      (``*_labels.tif``, Cellpose / StarDist output), foreground = non-zero. Cutting such an
      image at half its maximum would drop every bead whose id is below N / 2;
    * anything else with more than two values (anti-aliased or resampled masks, whose low
      values are the steps of ramps between 0 and the maximum; probabilities):
      :data:`MASK_RULE_HALF_MAX`, foreground = ``>= max / 2``.
    """
    a = _mask_plane(raw)
    if a.size == 0:
        return MASK_RULE_TWO_LEVEL
    levels = np.unique(a)
    if levels.size <= 2:
        return MASK_RULE_TWO_LEVEL
    whole = np.issubdtype(a.dtype, np.integer) or bool(np.all(np.mod(levels, 1) == 0))
    if whole and levels[0] >= 0 and _flat_low_fraction(a) >= LABEL_FLAT_FRACTION:
        return MASK_RULE_LABELS
    return MASK_RULE_HALF_MAX


def binarize_mask(raw: np.ndarray, rule: str | None = None) -> np.ndarray:
    """Binarize a mask: ``uint8 (H, W)`` in ``{0, 1}``.

    Accepts {0,1}, {0,255}, {0,65535}, anti-aliased grayscale, instance-label images and
    3/4-channel masks (any channel set counts). ``rule`` (default: :func:`mask_rule`):
    non-zero for :data:`MASK_RULE_LABELS`, ``>= max / 2`` otherwise. An all-zero mask stays
    all-zero.
    """
    a = _mask_plane(raw)
    if rule is None:
        rule = mask_rule(a)
    if rule == MASK_RULE_LABELS:
        return (a > 0).astype(np.uint8)
    a = a.astype(np.float32)
    top = float(a.max()) if a.size else 0.0
    if top <= 0:
        return np.zeros(a.shape, dtype=np.uint8)
    return (a >= top / 2.0).astype(np.uint8)


def mask_levels(raw: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a raw mask (all channels)."""
    return np.unique(np.asarray(raw))


def read_mask(path: str | os.PathLike, *, warn: bool = True, return_rule: bool = False):
    """Read and binarize a mask file: ``uint8 (H, W)`` in ``{0, 1}``.

    The rule is :func:`mask_rule`'s. With ``warn``, an anti-aliased or resampled mask (more
    than two levels, read at half max) is a warning naming the file, since it usually means
    the mask was resized with a smooth interpolator, and an instance-label image is logged
    (INFO) with its number of ids. With ``return_rule``, returns ``(mask, rule)``.
    """
    p = Path(path)
    raw = _read_raw(p)
    rule = mask_rule(raw)
    if warn and rule == MASK_RULE_HALF_MAX:
        log.warning("%s: mask has %d grey levels (anti-aliased or resampled?); binarized at "
                    "half max", p, mask_levels(raw).size)
    elif warn and rule == MASK_RULE_LABELS:
        log.info("%s: instance-label image (%d ids); foreground = every non-zero pixel", p,
                 mask_levels(_mask_plane(raw)).size - 1)
    mask = binarize_mask(raw, rule)
    return (mask, rule) if return_rule else mask


# --------------------------------------------------------------------------- normalisation


def normalize_image(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, clip: bool = True,
    sample_step: int = 1,
) -> np.ndarray:
    """Per-image percentile normalisation to ``[0, 1]`` (float32, same shape).

    ``(x - p_low) / (p_high - p_low)``, percentiles over all pixels and channels. The result
    does not depend on the storage bit depth (an 8-bit image and its 16-bit copy ``x * 257``
    normalise identically) or on exposure gain. A constant image maps to all zeros (never
    NaN). Prediction applies this once per whole frame, never per tile. ``sample_step`` > 1
    takes the percentiles from every n-th row and column only: for display, never for the
    network's input.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.size == 0:
        return x.copy()
    lo, hi = np.percentile(x[::sample_step, ::sample_step], [low, high])
    scale = float(hi - lo)
    if scale <= 1e-12:
        return np.zeros_like(x, dtype=np.float32)
    out = (x - np.float32(lo)) / np.float32(scale)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)


def flatfield_window(bead_diameter_px: float, *, diameters: float = FLATFIELD_DIAMETERS,
                     minimum: int = 15) -> int:
    """Odd background window (px) spanning ``diameters`` bead diameters, at least ``minimum``.

    The grey closing in :func:`flatfield_ratio` removes every dark object narrower than the
    window; 8 diameters clears single beads and the clumps of a 160x tile, while the
    illumination (12-32 % across a 512-px tile) is still smooth on that scale.
    """
    w = int(math.ceil(max(float(minimum), diameters * float(bead_diameter_px))))
    return w if w % 2 else w + 1


def background_estimate(image: np.ndarray, window: int) -> np.ndarray:
    """Local background of dark objects on a bright field: grey closing, then smoothing.

    Closing (max filter, then min filter, ``window`` x ``window``) replaces every dark object
    narrower than the window by its surroundings; a Gaussian (sigma = window / 4) removes the
    closing's blockiness. Each output pixel depends only on input pixels within
    :func:`flatfield_reach` of it (borders: the closing ignores outside pixels, the blur
    reflects), so the estimate of a crop equals the crop of the estimate away from a border
    band of that width. float32, same shape as ``image`` (``(H, W)`` or ``(H, W, C)``).
    """
    x = np.asarray(image, dtype=np.float32)
    window = max(3, int(window) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (window, window))
    chans = x[..., None] if x.ndim == 2 else x
    out = np.empty_like(chans)
    sigma = window / 4.0
    for c in range(chans.shape[-1]):
        closed = cv2.morphologyEx(np.ascontiguousarray(chans[..., c]), cv2.MORPH_CLOSE, kernel,
                                  borderType=cv2.BORDER_REPLICATE)
        out[..., c] = cv2.GaussianBlur(closed, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                       borderType=cv2.BORDER_REFLECT)
    return out[..., 0] if x.ndim == 2 else out


def flatfield_reach(window: int) -> int:
    """How far (px) :func:`background_estimate` looks: an output pixel depends only on input
    pixels at most this far away. The closing's ``window - 1`` plus the Gaussian's
    half-width (OpenCV sizes a float kernel ``round(8 sigma + 1) | 1``, sigma = window / 4)."""
    w = max(3, int(window) | 1)
    return (w - 1) + (int(np.rint(8.0 * (w / 4.0) + 1.0)) | 1) // 2


def normalization_reach(spec: dict | None) -> int | None:
    """Rows of context :func:`apply_normalization` needs around a row (None: the method
    depends on the whole image, the per-image percentiles)."""
    method = (spec or DEFAULT_NORMALIZATION).get("method", "percentile")
    if method == "flatfield":
        return flatfield_reach(int(spec["window"]))
    return 0 if method == "none" else None


def map_row_strips(fn, image: np.ndarray, reach: int, threads: int) -> np.ndarray:
    """``fn(image)`` computed in ``threads`` horizontal strips on as many threads.

    ``fn`` must be local: each output row a function of the input rows at most ``reach``
    away, computed the same way whatever the image height (OpenCV's filters and NumPy's
    element-wise arithmetic are). Each strip gets ``reach`` rows of context on both sides
    and keeps its own rows, so the result is ``fn(image)`` exactly; OpenCV releases the GIL,
    so the strips run side by side. Images under 4 ``reach`` rows per strip are done
    whole.
    """
    h = image.shape[0]
    k = max(1, min(int(threads), h // max(1, 4 * int(reach))))
    if k == 1:
        return fn(image)
    from concurrent.futures import ThreadPoolExecutor

    cuts = [h * i // k for i in range(k + 1)]

    def strip(i):
        a, b = cuts[i], cuts[i + 1]
        lo = max(0, a - reach)
        return fn(image[lo:min(h, b + reach)])[a - lo : b - lo]

    with ThreadPoolExecutor(k, thread_name_prefix="mb-strip") as pool:
        parts = list(pool.map(strip, range(k)))
    return np.concatenate(parts)


def flatfield_ratio(image: np.ndarray, window: int) -> np.ndarray:
    """``image / background``: ~1 on the background, < 1 on dark beads, whatever the light.

    Multiplicative illumination (vignetting, an uneven lamp) cancels; the ratio is local, so
    it does not depend on where a tile was cut from its frame (see
    :func:`background_estimate` for the border band). A zero background gives ratio 0.
    """
    x = np.asarray(image, dtype=np.float32)
    bg = background_estimate(x, window)
    return np.divide(x, bg, out=np.zeros_like(x), where=bg > 1e-6)


def flatfield_normalize(image: np.ndarray, window: int, low: float, high: float) -> np.ndarray:
    """Flat-field ratio mapped linearly so ``low`` -> 0 and ``high`` -> 1, clipped to [0, 1].

    ``low``/``high`` are fixed per dataset (stored in ``config.json``), never per image, so
    a tile and the frame it was cut from get the same values for the same pixels.
    """
    if not high > low:
        raise ValueError(f"flatfield normalization needs high > low, got {low}, {high}")
    out = flatfield_ratio(image, window)  # a new array: scaled in place
    out -= np.float32(low)
    out /= np.float32(high - low)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def flatfield_levels(images, window: int, *, low_pct: float = 0.1, high_pct: float = 99.9,
                     max_pixels: int = 4_000_000, seed: int = 0) -> tuple[float, float]:
    """Dataset-level ``(low, high)`` for :func:`flatfield_normalize`: pooled ratio percentiles.

    ``images`` is an iterable of ``(H, W, C)`` arrays (the training tiles at model scale).
    At most ``max_pixels`` ratios are pooled (a seeded, equal share per image).
    """
    imgs = list(images)
    if not imgs:
        raise ValueError("flatfield_levels needs at least one image")
    rng = np.random.default_rng(seed)
    per = max(1, max_pixels // len(imgs))
    pooled = []
    for im in imgs:
        r = flatfield_ratio(im, window).ravel()
        pooled.append(r if r.size <= per else rng.choice(r, per, replace=False))
    lo, hi = np.percentile(np.concatenate(pooled), [low_pct, high_pct])
    if not hi > lo:
        hi = lo + 1e-3
    return float(lo), float(hi)


def flatfield_spec(images, bead_area_px: float) -> dict:
    """A dataset's flat-field normalisation: window from the median single-bead area
    (px at the images' scale), dataset-level levels pooled over all ``images`` (raw,
    ``(H, W, C)``). The trainer stores it in ``config.json``; the analysis uses the same."""
    diameter = 2.0 * math.sqrt(bead_area_px / math.pi) if bead_area_px > 0 else 5.0
    window = flatfield_window(diameter)
    low, high = flatfield_levels(images, window)
    return {"method": "flatfield", "window": int(window), "low": round(low, 6),
            "high": round(high, 6)}


NORMALIZATION_KEYS = {"percentile": {"low", "high"}, "flatfield": {"window", "low", "high"},
                      "none": set()}
# Read as stored (value range kept): for loaders that normalise later, at model scale.
RAW = {"method": "none"}


def apply_normalization(image: np.ndarray, spec: dict | None = None) -> np.ndarray:
    """Normalise with the config dict the trainer stores in ``config.json``.

    ``{"method": "percentile", "low": 1.0, "high": 99.8}``: per-image percentiles (the
    original method; depends on the whole image, so a tile and its frame differ).
    ``{"method": "flatfield", "window": W, "low": a, "high": b}``: :func:`flatfield_normalize`
    (local background division, fixed dataset-level scale; crop-invariant). The predictor
    passes the stored dict back here, so both sides run exactly this function.
    """
    spec = dict(DEFAULT_NORMALIZATION if spec is None else spec)
    method = spec.pop("method", "percentile")
    if method not in NORMALIZATION_KEYS:
        raise ValueError(f"unknown normalization method {method!r} "
                         f"(known: {', '.join(NORMALIZATION_KEYS)})")
    unknown = set(spec) - NORMALIZATION_KEYS[method]
    if unknown:
        raise ValueError(f"unknown normalization keys {sorted(unknown)} for {method!r}")
    if method == "none":
        return np.asarray(image, dtype=np.float32)
    if method == "flatfield":
        missing = NORMALIZATION_KEYS[method] - set(spec)
        if missing:
            raise ValueError(f"flatfield normalization needs {sorted(missing)}")
        return flatfield_normalize(image, int(spec["window"]), float(spec["low"]),
                                   float(spec["high"]))
    return normalize_image(image, spec.get("low", 1.0), spec.get("high", 99.8))


# --------------------------------------------------------------------------- resizing


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_image(image: np.ndarray, size) -> np.ndarray:
    """Resize an image to ``size`` (int or ``(H, W)``) keeping its channel axis.

    Area interpolation when shrinking (no aliasing), bilinear when enlarging. Returns float32
    ``(H', W', C)`` (or ``(H', W')`` if the input had no channel axis).
    """
    h, w = _as_hw(size)
    x = np.asarray(image, dtype=np.float32)
    if x.shape[:2] == (h, w):
        return x.copy()
    shrink = h * w < x.shape[0] * x.shape[1]
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out = cv2.resize(x, (w, h), interpolation=interp)
    if x.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    return out.astype(np.float32, copy=False)


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
    """Resize a binary mask with nearest-neighbour and re-binarize: ``uint8 {0,1}`` ``(H', W')``.

    Never uses a smooth interpolator, so the result stays two-level; when shrinking a lot,
    nearest-neighbour still keeps bead shapes and the output is exactly binary.
    """
    h, w = _as_hw(size)
    m = binarize_mask(mask)
    if m.shape == (h, w):
        return m
    out = cv2.resize(m, (w, h), interpolation=cv2.INTER_NEAREST)
    return (out > 0).astype(np.uint8)


def resize_labels(labels: np.ndarray, size) -> np.ndarray:
    """Nearest-neighbour resize of an instance label image (ids preserved)."""
    h, w = _as_hw(size)
    lab = np.asarray(labels)
    if lab.shape[:2] == (h, w):
        return lab.copy()
    return cv2.resize(lab.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(
        lab.dtype
    )


def scaled_shape(shape, scale: float, multiple: int = 1) -> tuple[int, int]:
    """``(H, W)`` multiplied by ``scale`` and rounded, at least ``multiple`` each."""
    h, w = shape[:2]
    return (
        max(multiple, int(round(h * scale))),
        max(multiple, int(round(w * scale))),
    )


# --------------------------------------------------------------------------- dataset loading


@dataclass
class LoadedPairs:
    """Arrays ready for training, plus what happened on the way."""

    images: np.ndarray  # float32 (N, H, W, C) in [0, 1]
    masks: np.ndarray  # uint8 (N, H, W) in {0, 1}
    files: list[str]  # image file names, same order
    failures: list[str]  # one line per skipped pair, naming the file


def load_pair(
    image_path,
    mask_path,
    *,
    image_size=None,
    channels: int = 1,
    normalization: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read, check and preprocess one image/mask pair.

    The image is resized (area) and normalised by :func:`preprocess_image`; the mask is
    binarized, resized nearest-neighbour and re-binarized. Returns
    ``(float32 (H, W, C), uint8 (H, W))``.

    Raises
    ------
    ImageReadError, SizeMismatchError
        Naming the file(s).
    """
    img = read_image(image_path, channels)
    mask = read_mask(mask_path)
    if img.shape[:2] != mask.shape[:2]:
        raise SizeMismatchError(
            f"{image_path} is {img.shape[1]}x{img.shape[0]} but its mask {mask_path} is "
            f"{mask.shape[1]}x{mask.shape[0]}"
        )
    img = preprocess_image(img, normalization, size=image_size)
    if image_size is not None:
        mask = resize_mask(mask, image_size)
    return img, mask


def preprocess_image(image: np.ndarray, normalization: dict | None, *, size=None,
                     scale: float | None = None, threads: int = 1) -> np.ndarray:
    """Resize (to ``size`` or by ``scale``) and normalise, in the order the method needs.

    Flat-field (and raw) images are resized first and normalised at model scale, where
    the stored window applies; the crop-invariance of the result rests on that. The older
    per-image percentile method normalises at the stored resolution first, as it always
    did, so runs trained with it predict exactly as before. Training tiles and prediction
    frames both come through here. ``threads`` > 1 normalises a local method in row strips
    side by side (:func:`map_row_strips`: the same values).
    """
    method = (normalization or DEFAULT_NORMALIZATION).get("method", "percentile")
    if size is None and scale is not None:
        size = scaled_shape(image.shape, scale)

    def resize(x):
        return x if size is None else resize_image(x, size)

    if method == "percentile":
        return resize(apply_normalization(image, normalization))
    x = resize(image)
    reach = normalization_reach(normalization)
    if threads <= 1 or reach is None:  # an unknown method: apply_normalization says so
        return apply_normalization(x, normalization)
    return map_row_strips(lambda rows: apply_normalization(rows, normalization), x, reach,
                          threads)


def load_pairs(
    pairs,
    *,
    image_size=None,
    channels: int = 1,
    normalization: dict | None = None,
    progress: bool = False,
) -> LoadedPairs:
    """Load many pairs; bad ones are skipped and listed in ``failures`` (never shifted).

    With ``image_size=None`` all images must already share one size.
    """
    imgs, masks, files, failures = [], [], [], []
    it = pairs
    if progress:
        from tqdm import tqdm

        it = tqdm(pairs, desc="loading", unit="img")
    for ip, mp in it:
        try:
            img, m = load_pair(
                ip, mp, image_size=image_size, channels=channels, normalization=normalization
            )
        except (ImageReadError, SizeMismatchError) as exc:
            failures.append(str(exc))
            log.error("%s", exc)
            continue
        if imgs and img.shape != imgs[0].shape:
            failures.append(
                f"{ip}: size {img.shape[1]}x{img.shape[0]} differs from the first image "
                f"{imgs[0].shape[1]}x{imgs[0].shape[0]}; pass image_size to resize"
            )
            log.error("%s", failures[-1])
            continue
        imgs.append(img)
        masks.append(m)
        files.append(Path(ip).name)
    if not imgs:
        c = channels
        return LoadedPairs(
            np.zeros((0, 0, 0, c), np.float32), np.zeros((0, 0, 0), np.uint8), [], failures
        )
    return LoadedPairs(np.stack(imgs), np.stack(masks), files, failures)


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | os.PathLike, writer) -> None:
    """Write through ``writer(tmp_path)`` to a temporary file beside ``path``, then rename.

    A reader (resume, ``hpc_tools run_status``, a second job) sees the old file or the new
    one, never half of it; a failed writer leaves ``path`` untouched. The file gets the
    mode a plain ``open(path, "w")`` would give (``0o666`` less the umask): the temporary
    file is created with ``os.open(..., O_CREAT | O_EXCL, 0o666)``, so the kernel applies
    the umask. Nothing reads or changes the process umask, which is shared by every thread
    (prediction writes from up to 8 finisher threads at once). ``writer`` must write into
    the existing file, not replace it (``open(t, "w")``, ``tifffile.imwrite``,
    ``cv2.imwrite`` and ``zipfile`` all do).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
                                f"{path.suffix}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 uuid collisions
        raise FileExistsError(f"{path}: could not create a temporary file beside it")
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def json_ready(obj):
    """Plain JSON types, recursively: numpy scalars/arrays -> Python, Path -> str,
    NaN/inf -> None (strict JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda t: Path(t).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> None:
    """:func:`atomic_write` of ``json_ready(obj)`` as indented JSON."""
    import json

    atomic_write_text(path, json.dumps(json_ready(obj), indent=indent) + "\n")


def atomic_write_csv(path: str | os.PathLike, rows, columns) -> None:
    """:func:`atomic_write` of dict rows as CSV with ``columns`` (extra keys ignored)."""
    import csv

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write uint8/uint16 ``(H, W)`` or RGB ``(H, W, 3)`` to .png/.tif/... (atomic)."""
    p = Path(path)
    arr = np.asarray(image)
    if p.suffix.lower() in (".tif", ".tiff"):
        # zlib level 1: less than half the time of the default level 6 on a 4K label image
        # (0.020 vs 0.046 s); the file is ~3.5x larger but still ~0.5 % of raw (91 kB).
        atomic_write(p, lambda t: tifffile.imwrite(t, arr, compression="zlib",
                                                   compressionargs={"level": 1}))
        return
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)

    def _w(t):
        if not cv2.imwrite(t, arr):
            raise OSError(f"{p}: could not write image")

    atomic_write(p, _w)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a binary mask as 8-bit 0/255 (PNG recommended)."""
    m = np.asarray(mask)
    if m.ndim == 2 and m.dtype in (np.bool_, np.uint8) and m.max(initial=0) <= 1:
        write_image(path, m.view(np.uint8) * np.uint8(255))  # already {0, 1}: no float pass
        return
    write_image(path, (binarize_mask(m) * 255).astype(np.uint8))


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write an instance label image as a zlib-compressed uint16 (or uint32) TIFF."""
    lab = np.asarray(labels)
    dtype = np.uint16 if lab.size == 0 or lab.max() < 65536 else np.uint32
    write_image(path, lab.astype(dtype))


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image as int32 ``(H, W)``."""
    raw = _read_raw(Path(path))
    if raw.ndim == 3:
        raise ImageReadError(f"{path}: label image must be single-channel, got shape {raw.shape}")
    return raw.astype(np.int32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Display helper: scale to [0, 1] if needed, convert to uint8 ``(H, W)`` or ``(H, W, 3)``."""
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.size and (x.min() < 0 or x.max() > 1):
        x = normalize_image(x)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- file names


def parse_dilution(name: str | os.PathLike) -> int | None:
    """Dilution factor from a name like ``640x_2025-05-16_..._grid_r1_c1.tif`` -> 640.

    Returns None when the name carries no ``NNNx_`` token.
    """
    m = _DILUTION_RE.search(Path(name).name)
    return int(m.group(1)) if m else None


def grid_cell(name: str | os.PathLike) -> tuple[str, int, int] | None:
    """``(frame, row, col)`` of a grid tile name like ``640x_..._003_grid_r1_c4.png``.

    None when the stem does not end in ``_grid_r<R>_c<C>`` (mask suffixes are ignored).
    """
    m = GRID_RE.match(stem_key(name))
    return (m.group("frame"), int(m.group("row")), int(m.group("col"))) if m else None


def frame_group(name: str | os.PathLike, pattern: str | None = None) -> str:
    """Source-frame key of a tile, so tiles of one frame never straddle a split.

    Without ``pattern``: the stem without its ``_grid_rR_cC`` ending (the users' layout);
    a name without one is its own group. With ``pattern`` (a regex searched in the stem):
    its first capture group, or the whole match if it has none; a stem it does not match is
    its own group.
    """
    stem = stem_key(name)
    if pattern is None:
        cell = grid_cell(name)
        return cell[0] if cell else stem
    m = re.search(pattern, stem)
    if not m:
        return stem
    return m.group(1) if m.groups() and m.group(1) is not None else m.group(0)


def unique_path(path: str | os.PathLike) -> Path:
    """``path`` if free, else ``path_2``, ``path_3`` ... (never overwrite a result)."""
    p = Path(path)
    if not p.exists():
        return p
    i = 2
    while True:
        cand = p.with_name(f"{p.stem}_{i}{p.suffix}")
        if not cand.exists():
            return cand
        i += 1
