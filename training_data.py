"""The trainer's input pipeline: pairing and loading the tiles, augmentation, batching.

One table of augmentation constants (:data:`AUGMENTATION`) and one implementation in NumPy /
OpenCV, served by a ``keras.utils.PyDataset`` with worker threads, so the same pipeline runs
on every Keras 3 backend (TensorFlow, JAX, PyTorch). ``train_microbead_optimized`` and
``benchmarks/bench_train_gpu.py`` both use :func:`make_datasets`.

Augmentation (:func:`augment_pair`): flips, 90-degree turns, a random rotation of
+-``rotation`` degrees (bilinear, reflect padding), an optional elastic warp and a random
crop act on the image and its mask *stacked along channels*, so the mask follows its image
by construction, and the mask is re-binarized at 0.5 afterwards. Intensity changes (gamma,
contrast, brightness, noise) touch the image only and fall back to the un-augmented image
when the result would be flat or mostly saturated (never an all-zero training image).

Batch ``i`` of the training stream depends only on ``(seed, i)``: a run is reproducible
whatever the number of workers, and a resumed run continues the stream where it stopped.

There is no ``tf.data`` twin: on TensorFlow it was not measurably faster (2-core development
machine, 2026-12: loader alone, 256-px tiles, batch 16: 110-112 images/s with 1-2 workers
against 109 for ``tf.data``; ``benchmarks/bench_pipeline.py`` with ``--preset cpu``, two runs
each on a loaded machine: fit 101-104 images/s against 105-194, CPU 10-12 ms per image
against 9), and its parallel map was not deterministic.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path

import numpy as np

import microbead_io as mio
import microbead_metrics

log = logging.getLogger("microbead.train")


class TrainingError(Exception):
    """The data or the options cannot be trained on; ``str(err)`` names what is wrong.

    Raised by the training modules; only the entry point turns it into an exit status.
    """


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The augmentation constants (one table; every pipeline and benchmark reads it)."""

    #: Probability of each of the left-right and up-down flips.
    flip_probability: float = 0.5
    #: Quarter turns, drawn uniformly from 0 .. ``rot90_choices - 1``.
    rot90_choices: int = 4
    #: Default maximum free rotation in degrees (``--rotation``), uniform in +-this.
    rotation_deg: float = 15.0
    #: Gamma, log-uniform in this range.
    gamma: tuple[float, float] = (0.8, 1.25)
    #: Contrast factor about the image mean, uniform.
    contrast: tuple[float, float] = (0.8, 1.2)
    #: Brightness offset, uniform.
    brightness: tuple[float, float] = (-0.08, 0.08)
    #: Standard deviation of the gaussian noise, itself uniform in this range.
    noise_sd: tuple[float, float] = (0.0, 0.03)
    #: Added before the gamma so that 0 ** gamma stays finite in every dtype.
    gamma_eps: float = 1e-6
    #: Fallback guards: an augmented image with a standard deviation at most ``min_std``, or
    #: with at least ``max_saturated`` of its pixels clipped to 0 or 1, is replaced by the
    #: un-augmented image (an all-zero or blown-out image teaches the model nothing).
    min_std: float = 0.02
    max_saturated: float = 0.5
    #: Elastic warp: displacement SD in pixels on a coarse ``elastic_grid`` square grid.
    elastic_alpha: float = 6.0
    elastic_grid: int = 8
    #: Resampled masks are foreground above this.
    mask_threshold: float = 0.5


AUGMENTATION = Augmentation()


# ----------------------------------------------------------------------------- loading


def _fatal(message: str):
    raise TrainingError(message)


def fit_patch_size(patch_size: int, image_size: int, depth: int) -> int:
    """The largest multiple of ``2**depth`` that is <= both ``patch_size`` and ``image_size``.

    ``patch_size`` 0 (whole tile) and ``image_size`` 0 (not resolved yet) leave it unchanged.
    Returns 0 (train on whole tiles) when not even one pooling cell fits.
    """
    if not patch_size:
        return 0
    multiple = 2 ** depth
    limit = min(patch_size, image_size) if image_size else patch_size
    return limit - limit % multiple


def check_sizes(args, error, adapt: bool = False) -> None:
    """``image_size`` and ``patch_size`` fit the network's pooling grid (0 = resolved later).

    An explicit ``--patch_size`` that does not fit is an error. One from the defaults, a
    preset or a config file is left for the data loader, which calls this with ``adapt``
    once the input size is known: it is replaced by :func:`fit_patch_size` (logged), so
    e.g. ``--preset cpu`` (128-px patches) trains on 64-px tiles.
    """
    if args.image_size and args.image_size % (2 ** args.depth):
        error(f"--image_size {args.image_size} must be divisible by 2**depth "
              f"({2 ** args.depth})")
    p = args.patch_size
    if p and (p % (2 ** args.depth) or (args.image_size and p > args.image_size)):
        if getattr(args, "_patch_size_explicit", True):
            error(f"--patch_size {p} must be divisible by 2**depth ({2 ** args.depth}) and "
                  f"<= image_size ({args.image_size or 'the stored tile size'})")
        if adapt:
            args.patch_size = fit_patch_size(p, args.image_size, args.depth)
            log.info("patch size %s instead of %d (preset/default): the largest multiple of "
                     "2**depth = %d that fits the %d-px input", args.patch_size or
                     "0 (whole tiles)", p, 2 ** args.depth, args.image_size)


def resolve_image_size(args, stored_hw) -> tuple[int, str]:
    """Network input size and where it came from: the flag, or the stored tile size.

    The default (0) trains at the stored size: never upsampled, and not downsampled either,
    since the users' native 512-px tiles hold beads only ~7-9 px across.
    """
    stored = int(min(stored_hw))
    if args.image_size:
        if args.image_size > stored:
            log.warning("--image_size %d upsamples the %d-px stored tiles: beads gain no "
                        "detail, training costs %.1fx more", args.image_size, stored,
                        (args.image_size / stored) ** 2)
        return int(args.image_size), "--image_size"
    multiple = 2 ** args.depth
    size = stored - stored % multiple
    if size <= 0:
        raise TrainingError(f"stored tiles are {stored} px, smaller than the network's "
                         f"pooling grid ({multiple}); pass a smaller --depth")
    return size, f"stored tile size ({stored} px)" + (
        f", cropped to a multiple of {multiple}" if size != stored else "")


def flatfield_spec(masks: np.ndarray, images: np.ndarray) -> dict:
    """The run's flat-field normalisation: window from the bead size, dataset-level levels.

    ``masks`` ``(N, H, W)`` and raw ``images`` ``(N, H, W, C)`` at model scale. The window
    spans :data:`microbead_io.FLATFIELD_DIAMETERS` median bead diameters; ``low``/``high``
    are pooled percentiles of the background ratio over all tiles (one scale for the whole
    dataset, never per image, so tiles and frames normalise alike).
    """
    return mio.flatfield_spec(images, float(microbead_metrics.estimate_bead_area(list(masks))))


def dataset_dirs(data_dir) -> tuple[Path, Path]:
    data_dir = Path(data_dir)
    images_dir, masks_dir = data_dir / "images", data_dir / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            _fatal(f"{d}: folder not found (expected {data_dir}/images and {data_dir}/masks "
                   "with the same file names)")
    return images_dir, masks_dir


def image_names(data_dir) -> list[str]:
    images_dir = dataset_dirs(data_dir)[0]
    names = [p.name for p in mio.list_images(images_dir)]
    if not names:
        _fatal(f"no images in {images_dir} ({', '.join(mio.IMAGE_EXTENSIONS)})")
    return names


def check_data(args) -> None:
    """The checks that need no run folder: the dataset's folders, at least one image in
    images/, and a pixel scale. Raises TrainingError naming what is wrong."""
    resolve_pixel_scale(args.data_dir, args.pixel_scale, image_names(args.data_dir))


def load_training_data(args) -> dict:
    """Pair, read and preprocess the dataset; unpaired and unreadable files are listed.

    Resolves (and stores on ``args``) the input size when it was left at 0. With flat-field
    normalisation the tiles are read raw at model scale first, since the background window
    depends on the bead size measured on the masks.
    """
    data_dir = Path(args.data_dir)
    images_dir, masks_dir = dataset_dirs(data_dir)
    pairing = mio.pair_files(images_dir, masks_dir)
    skipped = ([f"{p}: image has no mask" for p in pairing.unpaired_images]
               + [f"{p}: mask has no image" for p in pairing.unpaired_masks]
               + [f"{p}: same stem as {used}, which is used" for p, used in pairing.ignored])
    for line in skipped:
        log.warning("skipped: %s", line)
    if not pairing.pairs:
        raise TrainingError(f"{data_dir}: no image/mask pairs found")
    stored = mio.read_image(pairing.pairs[0][0]).shape[:2]
    args.image_size, size_source = resolve_image_size(args, stored)
    check_sizes(args, _fatal, adapt=True)
    norm = mio.DEFAULT_NORMALIZATION if args.normalization == "percentile" else mio.RAW
    loaded = mio.load_pairs(
        pairing.pairs, image_size=args.image_size, channels=args.channels,
        normalization=norm, progress=True,
    )
    if loaded.failures:
        log.warning("%d pair(s) could not be used:\n  %s", len(loaded.failures),
                    "\n  ".join(loaded.failures))
    if len(loaded.files) < 2:
        raise TrainingError(f"{data_dir}: need at least 2 usable pairs, got "
                         f"{len(loaded.files)}")
    if args.normalization == "flatfield":
        norm = flatfield_spec(loaded.masks, loaded.images)
        log.info("flat-field normalisation: background window %d px, ratio %.3f -> 0, "
                 "%.3f -> 1 (pooled over all %d tiles)", norm["window"], norm["low"],
                 norm["high"], len(loaded.files))
        for i in range(len(loaded.images)):
            loaded.images[i] = mio.apply_normalization(loaded.images[i], norm)
    log.info("input size %d px (%s)", args.image_size, size_source)
    import label_quality

    # Found once, on the stored tiles: the label ceiling and the validation windows use them.
    overlaps = label_quality.grid_overlaps_from_files([i for i, _ in pairing.pairs])
    ceiling = label_ceiling(pairing.pairs, overlaps)
    if ceiling:
        log.info("label-consistency ceiling: masks of neighbouring tiles agree at pooled "
                 "Jaccard %.3f on their shared pixels (%d pairs): averaged over the dataset, "
                 "a model cannot be expected to agree with the masks much better (a few "
                 "easy validation frames can score above it)", ceiling["pooled_jaccard"],
                 ceiling["n_pairs"])
    # Shared strips in model pixels, indexed like ``files`` (pairs that failed to load are
    # not in ``files``); a strip is rounded up so that a partly shared pixel counts as shared.
    index = {Path(p[0]).name: i for i, p in enumerate(pairing.pairs)}
    where = {Path(f).name: i for i, f in enumerate(loaded.files)}
    names = {i: n for n, i in index.items()}
    factor = args.image_size / stored[0]
    model_overlaps = [
        (where[names[o.first]], where[names[o.second]], o.side,
         int(math.ceil(o.width * factor)))
        for o in overlaps if names[o.first] in where and names[o.second] in where]
    return {
        "label_ceiling": ceiling,
        "overlaps": model_overlaps,
        "normalization": dict(norm),
        "image_size_source": size_source,
        "groups": [mio.frame_group(f, args.group_pattern) for f in loaded.files],
        "images": loaded.images,
        "masks": loaded.masks,
        "files": loaded.files,
        "counts": np.array([microbead_metrics.count_components(m) for m in loaded.masks]),
        "stored_size": stored,
        "skipped": skipped + loaded.failures,
    }


def label_ceiling(pairs, overlaps=None) -> dict | None:
    """How well the masks agree with themselves where grid neighbours share pixels.

    ``label_quality.consistency_ceiling_from_files`` on the stored tiles (native
    resolution; ``overlaps`` from ``label_quality.grid_overlaps_from_files`` if the caller
    has them); None without ``_grid_rR_cC`` neighbours. No model can be expected to agree
    with the labels much better than this pooled Jaccard.
    """
    import label_quality

    res = label_quality.consistency_ceiling_from_files(
        [i for i, _ in pairs], [m for _, m in pairs], overlaps=overlaps)
    if not res:
        return None
    return {k: res[k] for k in ("pooled_jaccard", "median_pair_jaccard", "n_pairs")}


class ScaleError(TrainingError):
    """Nothing determines the pixel scale; the message names the flag to pass."""


def resolve_pixel_scale(data_dir, flag: float | None, files=()) -> tuple[float, str]:
    """Stored tile px per microscope-frame px, and where that number came from.

    In order: ``--pixel_scale``; ``pixel_scale`` in ``DATA_DIR/dataset.json``; 1.0 when the
    tiles are named ``..._grid_rR_cC`` (the users' layout: native-resolution crops of their
    frames). Anything else stops with :class:`ScaleError`: a guessed scale silently changes
    every count at prediction (a wrong 0.5 cost the users' real tiles 46 % of their beads).
    """
    if flag:
        return float(flag), "--pixel_scale"
    meta = Path(data_dir) / "dataset.json"
    if meta.is_file():
        try:
            value = json.loads(meta.read_text()).get("pixel_scale")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ScaleError(f"{meta}: unreadable ({exc}); fix it or pass "
                             "--pixel_scale") from None
        if value:
            return float(value), f"{meta}"
    names = [f for f in files if mio.grid_cell(f)]
    if files and len(names) == len(files):
        return 1.0, ("file names: '..._grid_rR_cC' tiles are native-resolution crops of "
                     "their microscope frames")
    raise ScaleError(
        f"{data_dir}: cannot tell the pixel scale (no --pixel_scale, no pixel_scale in "
        f"{meta.name}, and {len(files) - len(names)} of {len(files)} tiles are not named "
        "'..._grid_rR_cC'). Pass --pixel_scale: stored tile px per microscope-frame px, e.g. "
        "1.0 for native-resolution crops, 0.5 for tiles downscaled 2x.")



# ----------------------------------------------------------------------------- augmentation


def augment_pair(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, *,
                 patch_size: int = 0, rotation: float = AUGMENTATION.rotation_deg,
                 intensity: bool = True, elastic: bool = False,
                 table: Augmentation = AUGMENTATION) -> tuple[np.ndarray, np.ndarray]:
    """Augment one (image, mask) pair (NumPy / OpenCV).

    Geometric transforms (flips, 90-degree turns, +-``rotation`` degree rotation with
    reflect padding, optional elastic warp, random crop) act on image and mask stacked along
    channels, so the mask follows its image by construction; the mask is re-binarized at
    ``table.mask_threshold`` after bilinear resampling. Intensity transforms touch the image
    only (:func:`augment_intensity`).

    Parameters
    ----------
    image : float32 ``(H, W, C)`` in [0, 1]
    mask : float32 or uint8 ``(H, W, 1)`` or ``(H, W)`` in {0, 1}
    rng : numpy Generator (one per sample: reproducible and thread-safe)
    patch_size : random crop edge (0 = whole tile)
    table : the constants (:data:`AUGMENTATION`)

    Returns
    -------
    (image float32 ``(P, P, C)``, mask float32 ``(P, P, 1)`` in {0, 1}), P = patch_size or H.
    """
    import cv2

    image = np.asarray(image, np.float32)
    c = image.shape[-1]
    m = np.asarray(mask, np.float32).reshape(image.shape[:2] + (1,))
    x = np.concatenate([image, m], axis=-1)
    if rng.random() < table.flip_probability:
        x = x[:, ::-1]
    if rng.random() < table.flip_probability:
        x = x[::-1]
    x = np.ascontiguousarray(np.rot90(x, int(rng.integers(table.rot90_choices)), axes=(0, 1)))
    h, w = x.shape[:2]
    if rotation:
        angle = float(rng.uniform(-rotation, rotation))
        rot = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
        # BORDER_REFLECT (edge pixel repeated) is TensorFlow's REFLECT fill mode.
        x = cv2.warpAffine(x, rot, (w, h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT).reshape(h, w, c + 1)
    if elastic:
        x = augment_elastic(x, rng, table)
    if patch_size:
        top = int(rng.integers(h - patch_size + 1))
        left = int(rng.integers(w - patch_size + 1))
        x = x[top:top + patch_size, left:left + patch_size]
    img = np.ascontiguousarray(x[..., :c])
    msk = (x[..., c:] > table.mask_threshold).astype(np.float32)
    if intensity:
        img = augment_intensity(img, rng, table)
    return img, msk


def augment_intensity(img: np.ndarray, rng: np.random.Generator,
                      table: Augmentation = AUGMENTATION) -> np.ndarray:
    """Gamma, contrast, brightness and gaussian noise on a float32 ``(H, W, C)`` image.

    Returns the un-augmented (clipped) image instead when the result would be flat
    (SD <= ``table.min_std``) or mostly saturated (>= ``table.max_saturated`` clipped).
    """
    orig = np.clip(img, 0.0, 1.0)
    gamma = math.exp(rng.uniform(math.log(table.gamma[0]), math.log(table.gamma[1])))
    out = np.power(orig + table.gamma_eps, gamma)
    mean = float(out.mean())
    out = (out - mean) * rng.uniform(*table.contrast) + mean + rng.uniform(*table.brightness)
    out = out + rng.standard_normal(out.shape, dtype=np.float32) * rng.uniform(*table.noise_sd)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    saturated = float(np.mean((out <= 0.0) | (out >= 1.0)))
    return out if (out.std() > table.min_std and saturated < table.max_saturated) else orig


def augment_elastic(x: np.ndarray, rng: np.random.Generator,
                    table: Augmentation = AUGMENTATION) -> np.ndarray:
    """Smooth random displacement of all channels of ``x`` ``(H, W, C)``: a coarse
    ``elastic_grid`` grid of gaussian offsets (SD ``elastic_alpha`` px), bicubic upsampling,
    bilinear resampling with clamped borders."""
    import cv2

    h, w = x.shape[:2]
    grid = table.elastic_grid
    coarse = (rng.standard_normal((grid, grid, 2)) * table.elastic_alpha).astype(np.float32)
    flow = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    map_y = np.clip(yy + flow[..., 0], 0, h - 1)
    map_x = np.clip(xx + flow[..., 1], 0, w - 1)
    return cv2.remap(x, map_x, map_y, cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE).reshape(x.shape)


# ----------------------------------------------------------------------------- batching


def default_workers() -> int:
    """Loader threads: the CPUs this process may use (``runtime.usable_cpus``), at most 16."""
    import runtime

    return max(1, min(16, runtime.usable_cpus()))


def val_layout(n_val: int, batch_size: int, replicas: int = 1) -> tuple[int, int]:
    """``(batch, n_pad)`` for the validation dataset under ``replicas`` replicas.

    ``MirroredStrategy`` / ``MultiWorkerMirroredStrategy`` need every validation batch to
    split into equal per-replica shares: a last batch of 1 on 2 replicas, or of 3 split 2/1,
    fails inside ``fit`` (``AddN ... [2,H,W,1] != [1,H,W,1]``), and frame-grouped splits make
    odd validation sizes common. So the batch is a multiple of ``replicas`` and the set is
    padded with ``n_pad`` repeated images up to a multiple of it (logged; the mean per-image
    Jaccard then counts those images twice). One replica: ``(min(batch, n_val), 0)``.
    """
    if replicas <= 1:
        return max(1, min(batch_size, n_val)), 0
    n_pad = (-n_val) % replicas
    total = n_val + n_pad
    batch = max(replicas, min(batch_size, total) // replicas * replicas)
    return batch, n_pad


def validation_arrays(images, masks, val_idx, windows=None) -> tuple[np.ndarray, np.ndarray]:
    """Validation images ``(n, h, w, C)`` and float masks ``(n, h, w, 1)``: whole tiles, or
    each tile's window ``(y0, y1, x0, x1)`` from ``training_split.validation_windows``."""
    if not windows:
        return images[val_idx], masks[val_idx][..., None].astype(np.float32)
    xs = np.stack([images[i, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in zip(val_idx, windows)])
    ys = np.stack([masks[i, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in zip(val_idx, windows)])
    return xs, ys[..., None].astype(np.float32)


def colour_tiles(paths, image_size: int | None, windows=None) -> np.ndarray | None:
    """The validation tiles in RGB at model scale, cropped like :func:`validation_arrays`:
    the object filter's colour evidence (``bead_filter``), which the luminance network
    input no longer holds.

    Returns float32 ``(n, h, w, 3)`` in the stored value range (resized like the network
    input, area interpolation), or None when a file cannot be read. Grayscale files come
    back with three equal channels, which give no colour bound.
    """
    out = []
    for i, path in enumerate(paths):
        try:
            rgb = mio.read_image(path, 3)
        except mio.ImageReadError as exc:
            log.warning("no colour evidence for the object filter: %s", exc)
            return None
        if image_size:
            rgb = mio.resize_image(rgb, int(image_size))
        if windows:
            y0, y1, x0, x1 = windows[i]
            rgb = rgb[y0:y1, x0:x1]
        out.append(np.asarray(rgb, np.float32))
    return np.stack(out) if out else None


def augmented_batch(x, y, train_idx, index: int, *, batch_size: int, seed: int,
                    **augment) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``index`` of the endless training stream (a pure function of its arguments).

    The stream has the semantics of ``shuffle + repeat + batch(drop_remainder)``: a fresh
    seeded permutation of ``train_idx`` per pass, each sample augmented by
    :func:`augment_pair` with its own generator seeded by ``(seed, position)``.

    Returns float32 ``(B, P, P, C)`` images and ``(B, P, P, 1)`` masks.
    """
    xs, ys = [], []
    for pos in range(index * batch_size, (index + 1) * batch_size):
        n_pass, k = divmod(pos, len(train_idx))
        i = _permutation(seed, n_pass, tuple(train_idx))[k]
        img, msk = augment_pair(x[i], y[i], np.random.default_rng([seed, 1, pos]), **augment)
        xs.append(img)
        ys.append(msk)
    return np.stack(xs), np.stack(ys)


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, n_pass: int, train_idx: tuple) -> np.ndarray:
    return np.random.default_rng([seed, 0, n_pass]).permutation(np.asarray(train_idx))


def make_datasets(images, masks, train_idx, val_idx, args, seed: int, replicas: int = 1,
                  val_data=None, *, workers: int | None = None, first_batch: int = 0):
    """Training and validation ``keras.utils.PyDataset`` s (any Keras backend).

    Training: endless (``fit``'s ``steps_per_epoch`` ends an epoch), batch ``i`` is
    :func:`augmented_batch` ``first_batch + i``, produced by ``workers`` threads ahead of the
    model. Validation is never augmented and covers every validation image in order (last
    batch partial, or padded for ``replicas``: :func:`val_layout`), so it never has zero
    steps.

    Parameters
    ----------
    images : float32 ``(N, H, W, C)``;  masks : ``(N, H, W)`` in {0, 1}
    train_idx, val_idx : int arrays indexing ``images``
    args : namespace with ``batch_size, patch_size, rotation, intensity_aug, elastic``
    val_data : ``(images, masks)`` to validate on instead of ``images[val_idx]`` (windows
        cut from the tiles, :func:`validation_arrays`)
    workers : loader threads (default :func:`default_workers`)
    first_batch : index of the first training batch (a resumed run: epochs done x steps)

    Returns
    -------
    (train PyDataset, val PyDataset) yielding float32 ``(B, H, W, C)``, ``(B, H, W, 1)``.
    """
    import keras

    x = np.asarray(images, np.float32)
    y = np.asarray(masks, np.float32)[..., None]
    train_idx = np.asarray(train_idx)
    batch = int(args.batch_size)
    workers = int(workers or default_workers())
    augment = {"patch_size": int(args.patch_size or 0), "rotation": float(args.rotation),
               "intensity": bool(args.intensity_aug), "elastic": bool(args.elastic)}

    class AugmentedTiles(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=False,
                             max_queue_size=max(10, 2 * workers))

        @property
        def num_batches(self):
            return None  # endless, like .repeat(); fit's steps_per_epoch ends an epoch

        def __getitem__(self, index):
            return augmented_batch(x, y, train_idx, first_batch + index, batch_size=batch,
                                   seed=seed, **augment)

    val_batch, n_pad = val_layout(len(val_idx), batch, replicas)
    if n_pad:
        log.warning("validation: %d image(s) repeated so each of %d replicas gets an equal "
                    "share of every batch", n_pad, replicas)
    if val_data is None:
        xv, yv = x[np.asarray(val_idx)], y[np.asarray(val_idx)]
    else:
        xv, yv = np.asarray(val_data[0], np.float32), np.asarray(val_data[1], np.float32)
        yv = yv[..., None] if yv.ndim == 3 else yv
    if n_pad:
        pad = np.resize(np.arange(len(xv)), n_pad)
        xv, yv = np.concatenate([xv, xv[pad]]), np.concatenate([yv, yv[pad]])

    class ValidationTiles(keras.utils.PyDataset):
        def __len__(self):
            return math.ceil(len(xv) / val_batch)

        def __getitem__(self, index):
            return xv[index * val_batch:(index + 1) * val_batch], \
                yv[index * val_batch:(index + 1) * val_batch]

    return AugmentedTiles(), ValidationTiles()
