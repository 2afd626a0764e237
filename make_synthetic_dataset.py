"""Synthetic brightfield microbead dataset in the users' layout (the project's default data).

Mimics the users' data: 256x256 grid tiles cut from 3840x2160 brightfield frames of a bead
dilution series and downscaled 2x (a tile covers 512x512 native pixels). Beads are rings (dark
rim, brighter core) of radius ~9.4 native px (~4.7 px, ~69 px area at tile scale), 3-270 per
tile depending on the dilution in the file name, with touching pairs and small clusters,
unlabelled debris (dark blobs, specks, fibres), uneven illumination, defocus and shot noise.

Geometry comes first (bead centres and radii in native pixels), then the image is rendered at
native scale and area-downscaled to the tile size, while masks and instance labels are drawn
directly at output scale from the same geometry (filled discs, exactly binary, never resampled).

This script is the command line only. The work is in importable modules:
:mod:`synthetic_beads` (bead and debris geometry, exact masks), :mod:`synthetic_render`
(the two image styles), :mod:`synthetic_scenes` (the plan over the dilution series, scenes,
blank frames) and :mod:`synthetic_dataset` (:func:`~synthetic_dataset.generate_dataset`:
writing the folder).

Inputs
------
Only the command line (seed, number of tiles, tile size, bead radius, density).

Outputs (``DIR`` = ``--output_dir``, old spelling ``--out``)
------------------------------------------------------------
* ``DIR/images/<stem>.png`` (8-bit) or ``.tif`` (16-bit, every ``--tiff_every``-th tile)
* ``DIR/masks/<stem>.png``      filled bead discs, 0/255
* ``DIR/labels/<stem>.tif``     uint16 instance ids 1..N
* ``DIR/counts.csv``            file, stem, dilution, n_beads, requested_beads, n_touching,
  positive_ratio, n_debris
* ``DIR/dataset.json``          parameters, pixel scale, summary numbers, list of files written
* ``DIR/make_synthetic_dataset.log``
* with ``--large N``: ``DIR/large/{images,masks,labels}/<stem>.png|tif`` full frames at native
  scale (``--large_size``, default 3840x2160), ``DIR/large/counts.csv`` and
  ``DIR/large/samples.csv`` (the assay's sample sheet); ``--blank_frames N`` adds N blank
  frames there (``blank_...``, no bead; concentration 0, ``blank`` true in the sheet).

Stems look like ``640x_2025-05-16_00-59-00_002_grid_r1_c1`` (tiles) and
``640x_2025-05-16_01-02-03_101`` (large frames).

Example
-------
    python make_synthetic_dataset.py --output_dir data/synthetic --n 73 --size 256 --seed 0 \\
        --large 2
"""

from __future__ import annotations

import argparse
import logging
import sys

import cli
import runtime
from synthetic_dataset import STYLES, GenerationError, generate_dataset

log = logging.getLogger("microbead.synthetic")


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Write a synthetic brightfield microbead dataset (images, masks, labels, "
        "counts) in the users' layout.",
        formatter_class=cli.HelpFormatter,
    )
    cli.add_option(p, "output_dir", "--out", "--out_dir", "--out-dir", required=True,
                   help="output folder (missing or empty; --out is the old spelling)")
    p.add_argument("--n", type=int, default=73, help="number of tiles")
    p.add_argument("--style", choices=STYLES, default="microscope",
                   help="microscope: the users' real tiles (solid dark blue-purple beads, RGB, "
                        "native 512-px grid tiles with 37-px column overlaps, uneven light); "
                        "rings: the first synthetic style (ring beads, 256-px tiles)")
    p.add_argument("--size", type=int, default=None,
                   help="tile edge in px, covering 512 native px (default: 512 microscope, "
                        "256 rings)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--large", type=int, default=0, help="also write N full frames")
    p.add_argument("--blank_frames", "--blank-frames", type=int, default=0,
                   help="also write N blank (0-bead) full frames with debris (microscope "
                        "style: and faint smudges, specks, mottle) as large/blank_*, "
                        "concentration 0 in large/samples.csv")
    p.add_argument("--large_size", "--large-size", type=int, nargs=2, default=[3840, 2160],
                   metavar=("W", "H"), help="size of the full frames")
    p.add_argument("--radius", type=float, default=None,
                   help="mean bead radius in px of a 256-px tile, native radius = 2x "
                        "(default: 2.0 microscope, 4.7 rings)")
    p.add_argument("--beads_at_160x", "--beads-at-160x", type=float, default=None,
                   help="expected beads per 512x512 native px at 160x dilution (default: "
                        "1300 microscope, 270 rings)")
    p.add_argument("--tiff_every", "--tiff-every", type=int, default=5,
                   help="every N-th tile is a 16-bit TIFF (0: none)")
    p.add_argument("--label_noise", "--label-noise", action="store_true",
                   help="degrade the training masks like the users' blob-detector masks "
                        "(shrunk, merged, some dropped, some tiles offset); labels/ stay exact")
    cli.add_overwrite(p, help="replace a dataset this generator wrote in --output_dir before "
                               "(only the files its dataset.json lists; anything else is kept, "
                               "and a foreign file where the dataset goes is refused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = runtime.add_log_handler()
    runtime.configure_threads()
    try:
        generate_dataset(
            args.output_dir, n=args.n, size=args.size, seed=args.seed, large=args.large,
            large_size=tuple(args.large_size), radius=args.radius,
            beads_at_160x=args.beads_at_160x, tiff_every=args.tiff_every,
            overwrite=args.overwrite, style=args.style, label_noise=args.label_noise,
            blank_frames=args.blank_frames,
        )
    except GenerationError:
        return cli.EXIT_FATAL  # logged, to the dataset's log file too
    except (FileExistsError, ValueError, OSError) as exc:
        return cli.fatal(log, "%s", str(exc).splitlines()[0] if str(exc) else
                         type(exc).__name__)
    finally:
        runtime.remove_log_handlers([handler])
    return 0


if __name__ == "__main__":
    sys.exit(main())
