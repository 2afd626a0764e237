"""Writing a synthetic dataset in the users' layout: tiles, large frames, counts, manifest.

:func:`generate_dataset` is what ``make_synthetic_dataset.py`` runs (its docstring lists the
files) and what the demo, the benchmarks and the tests call. It plans the tiles
(:mod:`synthetic_scenes`), renders each scene, and writes images, exact masks, instance
labels, ``counts.csv``, ``large/samples.csv`` and ``dataset.json`` into a folder it first
checks (:func:`prepare_out_dir`: only a previous dataset of this generator is replaced).
Everything is a function of the seed.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import cv2
import numpy as np

import cli
import microbead_io as mio
import runtime
from synthetic_beads import (
    FRAME_SHAPE,
    NATIVE_TILE,
    REFERENCE_SCALE,
    BeadLayout,
    crop_truth,
    touching_count,
)
from synthetic_render import (
    MICRO_BEADS_AT_160X,
    MICRO_COL_STRIDE,
    MICRO_GRID_COLS,
    MICRO_GRID_ROWS,
    MICRO_RADIUS,
    MICRO_ROW_STARTS,
    micro_tile_origin,
    sample_appearance,
    sample_microscope_appearance,
)
from synthetic_scenes import (
    DATE,
    DILUTIONS,
    GRID_COLS,
    GRID_ROWS,
    MIN_BEADS,
    blank_frame,
    expected_beads,
    large_dilutions,
    make_scene,
    micro_frame,
    micro_scene,
    noisy_mask,
    plan_micro_windows,
    plan_tiles,
    time_stamp,
)

log = logging.getLogger("microbead.synthetic")

GENERATOR = "make_synthetic_dataset.py"  # dataset.json["generator"]: whose files to replace
STYLES = ("microscope", "rings")
LOG_NAME = "make_synthetic_dataset.log"
SAMPLE_SHEET = "samples.csv"  # large/: the assay's sample sheet (blanks marked)
SAMPLE_FIELDS = ("file", "concentration", "unit", "blank")
COUNT_FIELDS = (
    "file", "stem", "dilution", "n_beads", "requested_beads", "n_touching", "positive_ratio",
    "n_debris",
)


# --------------------------------------------------------------------------- output folder


class GenerationError(RuntimeError):
    """Writing the dataset failed part-way (an OSError); already logged, file named."""


def _dataset_paths(out: Path) -> list[Path]:
    return [out / "counts.csv", out / "dataset.json", out / "large" / "counts.csv",
            out / "large" / SAMPLE_SHEET] + [
        out / sub for sub in ("images", "masks", "labels", "large/images", "large/masks",
                              "large/labels")
    ]


def prepare_out_dir(out: Path, overwrite: bool = False) -> None:
    """Make sure writing a dataset into ``out`` cannot destroy anything.

    A missing or empty folder is fine. A non-empty one is refused unless ``overwrite``; then
    only the files listed in a previous ``dataset.json`` of this generator are deleted, and
    the call still refuses if any other file sits where the dataset goes.

    Raises
    ------
    FileExistsError
        One line naming the folder or the file in the way.
    """
    out = Path(out)
    try:
        cli.check_output_dir(out, overwrite=overwrite, log_name=LOG_NAME)
    except cli.OutputDirError as exc:
        raise FileExistsError(str(exc)) from None
    if not out.exists() or not any(out.iterdir()):
        return
    root = out.resolve()
    ours: set[Path] = set()
    manifest = out / "dataset.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError):
            meta = {}
        if isinstance(meta, dict) and meta.get("generator") == GENERATOR:
            for rel in list(meta.get("files", [])) + ["dataset.json"]:
                p = (out / rel).resolve()
                if root in p.parents and p.is_file():
                    ours.add(p)
    # Check everything before deleting anything, so a refusal leaves the folder as it was.
    for p in _dataset_paths(out):
        if p.is_file() and p.resolve() not in ours:
            raise FileExistsError(f"{p}: not written by {GENERATOR}; refusing to overwrite it")
        if p.is_dir():
            other = next((q for q in sorted(p.iterdir())
                          if q.is_file() and q.resolve() not in ours), None)
            if other is not None:
                raise FileExistsError(
                    f"{other}: not written by {GENERATOR}; refusing to mix it into a new "
                    "dataset (move it or choose an empty folder)"
                )
    for p in sorted(ours):
        p.unlink()


def _write_counts(path: Path, rows: list[dict]) -> None:
    """``counts.csv``: one row per tile or frame, the :data:`COUNT_FIELDS` (atomic)."""
    mio.atomic_write_csv(path, rows, COUNT_FIELDS)


def _progress(it, **kw):
    from tqdm import tqdm

    return tqdm(it, disable=None, leave=False, **kw)


# --------------------------------------------------------------------------- main API


def generate_dataset(
    out_dir,
    *,
    n: int = 73,
    size: int | None = None,
    seed: int = 0,
    large: int = 0,
    large_size=(3840, 2160),
    radius: float | None = None,
    beads_at_160x: float | None = None,
    tiff_every: int = 5,
    overwrite: bool = False,
    log_file: bool = True,
    style: str = "microscope",
    label_noise: bool = False,
    blank_frames: int = 0,
) -> dict:
    """Write a synthetic dataset in the users' layout and return its summary.

    Parameters
    ----------
    out_dir : path
        Output folder; must be missing or empty unless ``overwrite`` (see
        :func:`prepare_out_dir`: only a previous dataset of this generator is replaced).
    n : int
        Number of tiles (>= 1), spread over the dilution series (:func:`allocate_tiles`).
    size : int or None
        Tile edge in pixels; a tile always covers 512x512 native px, so
        ``pixel_scale = size / 512``. None: 512 (microscope) or 256 (rings).
    seed : int
        Everything is a function of the seed; tiles and large frames use separate
        streams, so adding ``large`` does not change the tiles.
    large : int
        Number of full frames (native scale, 8-bit PNG) to write under ``large/``.
    blank_frames : int
        Number of blank (0-bead) full frames to add under ``large/`` (:func:`blank_frame`;
        ``blank_...`` stems, dilution ``blank`` in ``counts.csv``, concentration 0 and
        ``blank`` true in ``large/samples.csv``), for an assay's limit of blank.
    large_size : (W, H)
        Size of those frames.
    radius : float or None
        Mean bead radius in px of a 256-px tile (0.5 px per native px); native radius =
        ``radius / 0.5``. None: 2.0 (microscope: 4 native px, beads 7-9 px across) or 4.7
        (rings).
    beads_at_160x : float or None
        Expected beads per 512x512 native tile at 160x; other dilutions scale as
        ``160 / dilution``. None: 1300 (microscope) or 270 (rings).
    tiff_every : int
        Every ``tiff_every``-th tile is a 16-bit TIFF (0 = none).
    log_file : bool
        Also log to ``out_dir/make_synthetic_dataset.log``.
    style : {"microscope", "rings"}
        ``microscope``: the users' real tiles (solid dark blue-purple beads on grey, RGB,
        native 512-px tiles cut from frame rows on the 8x4 grid with 37-px column overlaps,
        uneven light). ``rings``: the project's first style (grey ring beads, 256-px tiles).
    label_noise : bool
        Write training masks degraded like the users' (:func:`noisy_mask`: shrunk, touching
        beads merged, faint beads dropped, some tiles offset); ``labels/``, ``counts.csv``
        and the large frames stay exact.

    Returns
    -------
    dict
        The content of ``dataset.json``.

    Raises
    ------
    ValueError
        Bad parameters. FileExistsError: see :func:`prepare_out_dir`. GenerationError: a
        write failed part-way (logged, also to the dataset's log file).
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    micro = style == "microscope"
    size = int(size if size is not None else (NATIVE_TILE if micro else 256))
    radius = float(radius if radius is not None else
                   (MICRO_RADIUS * REFERENCE_SCALE if micro else 4.7))
    if beads_at_160x is None:
        beads_at_160x = MICRO_BEADS_AT_160X if micro else 270.0
    n, large, blank_frames = int(n), int(large), int(blank_frames)
    lw, lh = (int(v) for v in large_size)
    if n < 1 or size < 8 or large < 0 or blank_frames < 0 or lw < 16 or lh < 16:
        raise ValueError(
            f"need n >= 1, size >= 8, large >= 0, blank_frames >= 0, large_size >= 16x16; "
            f"got n={n}, size={size}, large={large}, blank_frames={blank_frames}, "
            f"large_size={lw}x{lh}"
        )
    if not (radius > 0 and beads_at_160x > 0):
        raise ValueError(f"radius and beads_at_160x must be > 0, got {radius}, {beads_at_160x}")
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)  # refuses a folder another live run holds
    out.mkdir(parents=True, exist_ok=True)
    try:
        notes = cli.lock_output_dir(out, GENERATOR)
    except cli.OutputDirError as exc:
        raise FileExistsError(str(exc)) from None
    handler = runtime.add_log_handler(out / LOG_NAME, mode="w") if log_file else None
    for note in notes:
        log.warning("%s", note)
    try:
        return _generate(out, n=n, size=size, seed=int(seed), large=large, large_wh=(lw, lh),
                         radius=float(radius), beads_at_160x=float(beads_at_160x),
                         tiff_every=int(tiff_every), log_file=log_file, style=style,
                         label_noise=bool(label_noise), blank_frames=blank_frames)
    except OSError as exc:
        log.error("%s: writing the dataset failed: %s", out, exc)  # into its log file too
        raise GenerationError(str(exc)) from exc
    finally:
        cli.unlock_output_dir(out)
        runtime.remove_log_handlers([handler])


def _quantize(img: np.ndarray, bits: int) -> np.ndarray:
    top = 65535 if bits == 16 else 255
    dtype = np.uint16 if bits == 16 else np.uint8
    return np.round(np.clip(img, 0.0, 1.0) * top).astype(dtype)


def _write_truth(out: Path, sub: str, stem: str, name: str, image: np.ndarray, bits: int,
                 mask: np.ndarray, labels: np.ndarray) -> list[str]:
    """Image, exact mask and instance labels of one tile or frame; returns relative paths."""
    base = out / sub if sub else out
    mio.write_image(base / "images" / name, _quantize(image, bits))
    mio.write_mask(base / "masks" / f"{stem}.png", mask)
    mio.write_labels(base / "labels" / f"{stem}.tif", labels)
    pre = f"{sub}/" if sub else ""
    return [f"{pre}images/{name}", f"{pre}masks/{stem}.png", f"{pre}labels/{stem}.tif"]


def _count_row(name, stem, dilution, n_beads, requested, labels, mask, n_debris) -> dict:
    return {
        "file": name, "stem": stem, "dilution": dilution, "n_beads": int(n_beads),
        "requested_beads": round(float(requested), 6), "n_touching": touching_count(labels),
        "positive_ratio": round(float(mask.mean()), 6), "n_debris": int(n_debris),
    }


def _inside_areas(beads: BeadLayout, labels: np.ndarray, native: float) -> np.ndarray:
    """Mask areas of the beads lying wholly inside the tile (for the median bead area)."""
    inside = ((beads.y - beads.r >= 0) & (beads.x - beads.r >= 0)
              & (beads.y + beads.r <= native) & (beads.x + beads.r <= native))
    area = np.bincount(labels.ravel(), minlength=len(beads) + 1)[1:]
    return area[inside]


def _label_noise_record(stem: str, info: dict) -> dict:
    return {"stem": stem, "dy": int(info["dy"]), "dx": int(info["dx"]),
            "n_dropped": int(info["n_dropped"]), "n_merged": int(info["n_merged"]),
            "shrink_px": int(info["shrink_px"])}


def _micro_tiles(out: Path, *, n, size, seed, radius_native, beads_at_160x, tiff_every,
                 label_noise=False, noise_log=None):
    """Microscope style: render each planned frame row window once, cut its grid tiles."""
    windows = plan_micro_windows(np.random.default_rng([seed, 0]), n, beads_at_160x)
    frames: dict[int, dict] = {}
    rows, areas, files = [], [], []
    i = 0
    for wi, win in enumerate(_progress(windows, desc="frame rows", unit="row")):
        fid = win["frame"]
        if fid not in frames:
            frames[fid] = sample_microscope_appearance(np.random.default_rng([seed, 1, fid]))
        rng = np.random.default_rng([seed, 2, wi])
        y0, x0 = micro_tile_origin(win["row"], win["cols"][0])
        shape = (NATIVE_TILE, (len(win["cols"]) - 1) * MICRO_COL_STRIDE + NATIVE_TILE)
        want = win["requested"] * shape[0] * shape[1] / NATIVE_TILE**2
        n_beads = max(MIN_BEADS, int(rng.poisson(want)))
        img, beads, n_debris = micro_scene(rng, frames[fid], shape, (y0, x0), n_beads,
                                            radius=radius_native, beads_at_160x=beads_at_160x)
        for col in win["cols"]:
            tx = (col - win["cols"][0]) * MICRO_COL_STRIDE
            tile = img[:, tx : tx + NATIVE_TILE]
            if size != NATIVE_TILE:
                tile = np.clip(mio.resize_image(tile, (size, size)), 0.0, 1.0)
            mask, labels, local = crop_truth(beads, 0.0, float(tx), NATIVE_TILE, size)
            stem = f"{win['prefix']}_grid_r{win['row']}_c{col}"
            exact = mask
            if label_noise:
                mask, info = noisy_mask(labels, tile, np.random.default_rng([seed, 4, i]),
                                        size / NATIVE_TILE)
                noise_log.append(_label_noise_record(stem, info))
            tiff = tiff_every > 0 and i % tiff_every == tiff_every // 2
            name = stem + (".tif" if tiff else ".png")
            files += _write_truth(out, "", stem, name, tile, 16 if tiff else 8, mask, labels)
            areas.append(_inside_areas(local, labels, NATIVE_TILE))
            share = n_debris * NATIVE_TILE / shape[1]
            rows.append(_count_row(name, stem, win["dilution"], len(local), win["requested"],
                                   labels, exact, round(share)))
            i += 1
    return rows, areas, files


def _ring_tiles(out: Path, rows: list, areas: list, *, n, size, seed, radius_native,
                beads_at_160x, tiff_every, label_noise=False, noise_log=None) -> list[str]:
    """Rings style: each tile rendered on its own 512x512 native window, then downscaled."""
    tiles = plan_tiles(np.random.default_rng([seed, 0]), n, beads_at_160x)
    frames: dict[int, dict] = {}
    files: list[str] = []
    for i, tile in enumerate(_progress(tiles, desc="tiles", unit="tile")):
        fid = tile["frame"]
        if fid not in frames:
            frames[fid] = sample_appearance(np.random.default_rng([seed, 1, fid]))
        rng = np.random.default_rng([seed, 2, i])
        n_beads = max(MIN_BEADS, int(rng.poisson(tile["requested"])))
        origin = (tile["row"] * NATIVE_TILE, tile["col"] * NATIVE_TILE)
        scene = make_scene(rng, (NATIVE_TILE, NATIVE_TILE), (size, size), n_beads,
                           appearance=frames[fid], origin=origin, radius_native=radius_native)
        tiff = tiff_every > 0 and i % tiff_every == tiff_every // 2
        name = tile["stem"] + (".tif" if tiff else ".png")
        mask = scene["mask"]
        if label_noise:
            mask, info = noisy_mask(scene["labels"], scene["image"],
                                    np.random.default_rng([seed, 4, i]), size / NATIVE_TILE)
            noise_log.append(_label_noise_record(tile["stem"], info))
        files += _write_truth(out, "", tile["stem"], name, scene["image"], 16 if tiff else 8,
                              mask, scene["labels"])
        areas.append(_inside_areas(scene["beads"], scene["labels"], NATIVE_TILE))
        rows.append(_count_row(name, tile["stem"], tile["dilution"], len(scene["beads"]),
                               tile["requested"], scene["labels"], scene["mask"],
                               scene["n_debris"]))
    return files


def _write_tiles(out: Path, *, style, n, size, seed, radius_native, beads_at_160x,
                 tiff_every, label_noise) -> dict:
    """Every training tile of ``style``: ``rows`` (counts.csv), ``areas`` (bead areas of
    wholly inside beads), ``files`` written, ``noise_log`` (``--label_noise`` per tile)."""
    noise_log: list[dict] = []
    kw = dict(n=n, size=size, seed=seed, radius_native=radius_native,
              beads_at_160x=beads_at_160x, tiff_every=tiff_every, label_noise=label_noise,
              noise_log=noise_log)
    if style == "microscope":
        rows, areas, files = _micro_tiles(out, **kw)
    else:
        rows, areas = [], []
        files = _ring_tiles(out, rows, areas, **kw)
    return {"rows": rows, "areas": areas, "files": files, "noise_log": noise_log}


def _write_large_frames(out: Path, *, style, large, large_wh, seed, radius_native,
                        beads_at_160x, blank_frames=0) -> tuple[list[dict], list[str]]:
    """``large`` full frames at native scale under ``large/``, one dilution each, then
    ``blank_frames`` blank ones (dilution ``blank``); returns their counts.csv rows and the
    files written (with ``large/samples.csv``, the assay's sample sheet)."""
    rows: list[dict] = []
    files: list[str] = []
    t = 3600 + 2 * 60 + 3
    lw, lh = large_wh
    frame_shape = (lh, lw)
    for j, dil in enumerate(_progress(large_dilutions(large), desc="frames", unit="frame")):
        rng = np.random.default_rng([seed, 3, j])
        if style == "microscope":
            scene = micro_frame(rng, frame_shape, dil, radius_native, beads_at_160x)
        else:
            ap = sample_appearance(rng, frame_shape)
            requested = expected_beads(dil, beads_at_160x) * lh * lw / NATIVE_TILE**2
            n_beads = max(MIN_BEADS, int(rng.poisson(requested)))
            scene = make_scene(rng, frame_shape, frame_shape, n_beads, appearance=ap,
                               radius_native=radius_native)
            scene["requested"] = requested
        stem = f"{dil}x_{DATE}_{time_stamp(t)}_{101 + j:03d}"
        t += int(rng.integers(60, 240))
        files += _write_truth(out, "large", stem, f"{stem}.png", scene["image"], 8,
                              scene["mask"], scene["labels"])
        rows.append(_count_row(f"{stem}.png", stem, dil, len(scene["beads"]),
                               scene["requested"], scene["labels"], scene["mask"],
                               scene["n_debris"]))
        log.info("large frame %s: %d beads (%dx%d)", stem, len(scene["beads"]), lw, lh)
    for j in range(int(blank_frames)):
        scene = blank_frame(seed, j, frame_shape, radius_native=radius_native, style=style)
        stem = f"blank_{DATE}_{time_stamp(t)}_{201 + j:03d}"
        t += 120
        files += _write_truth(out, "large", stem, f"{stem}.png", scene["image"], 8,
                              scene["mask"], scene["labels"])
        rows.append(_count_row(f"{stem}.png", stem, "blank", 0, 0.0, scene["labels"],
                               scene["mask"], scene["n_debris"]))
        log.info("blank frame %s: %d debris, smudges and specks (%dx%d)", stem,
                 scene["n_debris"], lw, lh)
    _write_counts(out / "large" / "counts.csv", rows)
    _write_sample_sheet(out / "large" / SAMPLE_SHEET, rows)
    return rows, files + ["large/counts.csv", f"large/{SAMPLE_SHEET}"]


def _write_sample_sheet(path: Path, rows: list[dict]) -> None:
    """The large frames' concentrations for ``quantify_assay.py --samples``: 1/dilution,
    and 0 with ``blank`` true for blank frames (their LoB comes from these)."""
    sheet = []
    for r in rows:
        blank = r["dilution"] == "blank"
        sheet.append({"file": r["file"],
                      "concentration": 0 if blank else repr(1.0 / r["dilution"]),
                      "unit": "" if blank else "1/dilution",
                      "blank": "true" if blank else "false"})
    mio.atomic_write_csv(path, sheet, SAMPLE_FIELDS)


def _grid_layout(style: str) -> dict:
    """The frame grid the tiles are cut on (``dataset.json["grid"]``)."""
    if style == "microscope":
        return {"cols": MICRO_GRID_COLS, "rows": MICRO_GRID_ROWS,
                "col_stride_px": MICRO_COL_STRIDE, "row_starts_px": list(MICRO_ROW_STARTS),
                "column_overlap_px": NATIVE_TILE - MICRO_COL_STRIDE}
    return {"cols": GRID_COLS, "rows": GRID_ROWS, "col_stride_px": NATIVE_TILE,
            "row_starts_px": [r * NATIVE_TILE for r in range(GRID_ROWS)],
            "column_overlap_px": 0}


def _dataset_summary(*, style, seed, n, size, pixel_scale, radius_native, beads_at_160x,
                     tiff_every, tiles: dict, large: int, large_wh, large_rows: list[dict],
                     label_noise: bool, timings: dict, files: list[str]) -> dict:
    """The content of ``dataset.json``: parameters, summary numbers, versions, files."""
    rows, noise_log = tiles["rows"], tiles["noise_log"]
    all_areas = np.concatenate(tiles["areas"]) if tiles["areas"] else np.zeros(0)
    return {
        "generator": GENERATOR,
        "style": style,
        # Training masks degraded like the users' (labels/ and large/ stay exact).
        "label_noise": ({"enabled": True, "tiles": noise_log,
                         "n_offset": sum(1 for r in noise_log if r["dy"] or r["dx"])}
                        if label_noise else {"enabled": False}),
        "seed": seed,
        "n": n,
        "size": size,
        "pixel_scale": pixel_scale,
        "native_tile_px": NATIVE_TILE,
        "frame_size": list(FRAME_SHAPE[::-1]),
        "grid": _grid_layout(style),
        "bead_radius_px": radius_native * pixel_scale,
        "bead_radius_native_px": radius_native,
        "median_bead_area_px": float(np.median(all_areas)) if all_areas.size else None,
        "beads_at_160x": beads_at_160x,
        "dilutions": list(DILUTIONS),
        "tiles_per_dilution": {str(d): sum(1 for r in rows if r["dilution"] == d)
                               for d in DILUTIONS},
        "requested_mean_beads": float(np.mean([r["requested_beads"] for r in rows])),
        "mean_beads": float(np.mean([r["n_beads"] for r in rows])),
        "min_beads": int(min(r["n_beads"] for r in rows)),
        "max_beads": int(max(r["n_beads"] for r in rows)),
        "mean_positive_ratio": float(np.mean([r["positive_ratio"] for r in rows])),
        "touching_fraction": float(sum(r["n_touching"] for r in rows)
                                   / max(1, sum(r["n_beads"] for r in rows))),
        "n_tiff16": sum(1 for r in rows if r["file"].endswith(".tif")),
        "tiff_every": tiff_every,
        "large": {
            "n": large, "n_blank": sum(1 for r in large_rows if r["dilution"] == "blank"),
            "size": list(large_wh), "pixel_scale": 1.0,
            "dilutions": [r["dilution"] for r in large_rows],
            "n_beads": [r["n_beads"] for r in large_rows],
        },
        # Wall clock, and CPU time of this process (meaningful on a shared machine).
        "timings_s": timings,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "opencv": cv2.__version__},
        "files": sorted(files + ["dataset.json"]),
    }


def _generate(out: Path, *, n, size, seed, large, large_wh, radius, beads_at_160x, tiff_every,
              log_file, style="microscope", label_noise=False, blank_frames=0) -> dict:
    t_start, c_start = time.perf_counter(), time.process_time()
    pixel_scale = size / NATIVE_TILE
    radius_native = radius / REFERENCE_SCALE
    files: list[str] = [LOG_NAME] if log_file else []
    log.info("writing %d tiles of %dx%d px (pixel_scale %.4g, bead radius %.3g px) to %s",
             n, size, size, pixel_scale, radius_native * pixel_scale, out)
    if radius_native * pixel_scale < 0.75:
        # A disc of radius < 1/sqrt(2) px can miss every pixel centre and vanish.
        log.warning("beads are %.2f px in radius at --size %d: some cover no pixel and are "
                    "dropped from masks and counts; use a larger --size",
                    radius_native * pixel_scale, size)

    t0 = time.perf_counter()
    tiles = _write_tiles(out, style=style, n=n, size=size, seed=seed,
                         radius_native=radius_native, beads_at_160x=beads_at_160x,
                         tiff_every=tiff_every, label_noise=label_noise)
    t_tiles = time.perf_counter() - t0
    _write_counts(out / "counts.csv", tiles["rows"])
    files += tiles["files"] + ["counts.csv"]

    large_rows: list[dict] = []
    t0 = time.perf_counter()
    if large or blank_frames:
        large_rows, large_files = _write_large_frames(
            out, style=style, large=large, large_wh=large_wh, seed=seed,
            radius_native=radius_native, beads_at_160x=beads_at_160x,
            blank_frames=blank_frames)
        files += large_files
    t_large = time.perf_counter() - t0

    timings = {"tiles": round(t_tiles, 3), "large": round(t_large, 3),
               "total": round(time.perf_counter() - t_start, 3),
               "cpu_total": round(time.process_time() - c_start, 3)}
    summary = _dataset_summary(
        style=style, seed=seed, n=n, size=size, pixel_scale=pixel_scale,
        radius_native=radius_native, beads_at_160x=beads_at_160x, tiff_every=tiff_every,
        tiles=tiles, large=large, large_wh=large_wh, large_rows=large_rows,
        label_noise=label_noise, timings=timings, files=files)
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "%d tiles in %.2f s: requested mean %.1f beads/tile, realised %.1f (%d-%d), "
        "positive ratio %.2f %%, median bead area %.1f px, %d 16-bit TIFFs",
        n, t_tiles, summary["requested_mean_beads"], summary["mean_beads"],
        summary["min_beads"], summary["max_beads"], 100 * summary["mean_positive_ratio"],
        summary["median_bead_area_px"] or 0.0, summary["n_tiff16"],
    )
    if large or blank_frames:
        log.info("%d large frames (%d blank) in %.2f s (%.2f s/frame)", large + blank_frames,
                 blank_frames, t_large, t_large / (large + blank_frames))
    return summary
