"""The command-line contract every microbead script shares (CONVENTIONS.md "One CLI contract").

One place for what every script's ``parse_args``/``main`` does the same way:

* :func:`add_option` adds ``--name`` with its hyphenated alias (``--data_dir`` and
  ``--data-dir``) and any old spellings, all stored under ``dest=name``.
* :class:`HelpFormatter` shows each option's real default in ``--help`` (never
  ``(default: None)``: an option without a default says in its help what happens instead).
* :func:`prepare_output_dir` is the one output-folder policy: a missing or empty folder is
  created; an existing non-empty one is refused unless ``overwrite``, which removes only the
  files the script itself writes (given as glob patterns) and leaves everything else alone.
* :func:`fatal` logs the message (to stderr and, once a script has attached it, to the run's
  log file) and returns :data:`EXIT_FATAL`.

Exit codes: :data:`EXIT_OK` 0, :data:`EXIT_PARTIAL` 1 (some inputs failed, each named),
:data:`EXIT_FATAL` 2 (usage error or nothing could be done). argparse's own usage errors
also exit 2.

Standard library only, so ``--help`` stays instant.

Example
-------
>>> import argparse
>>> p = argparse.ArgumentParser(formatter_class=HelpFormatter)
>>> add_option(p, "output_dir", "--out", default="results", help="results folder")
>>> p.parse_args(["--out", "x"]).output_dir
'x'
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_FATAL = 2

OVERWRITE_HELP = ("allow an existing non-empty output folder; removes only the files this "
                  "script writes there, nothing else")


class OutputDirError(Exception):
    """The output folder cannot be used; ``str(err)`` is one line naming the folder."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option that has a default.

    Skipped for on/off flags (their default is "off"), for options whose default is None
    (their help says what happens instead) and for help texts that already state a default.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is None or action.default is argparse.SUPPRESS
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or "default" in text.lower()):
            return text
        return super()._get_help_string(action)


def option_flags(name: str, *aliases: str) -> list[str]:
    """``--name``, its hyphenated spelling when ``name`` has an underscore, then ``aliases``."""
    flags = [f"--{name}"]
    if "_" in name:
        flags.append(f"--{name.replace('_', '-')}")
    return flags + [a for a in aliases if a not in flags]


def add_option(parser, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """Add option ``--name`` (+ hyphenated alias + ``aliases``) stored as ``dest=name``.

    ``parser`` is an ``ArgumentParser`` or an argument group / sub-parser; ``kwargs`` go to
    ``add_argument`` unchanged.
    """
    return parser.add_argument(*option_flags(name, *aliases), dest=name, **kwargs)


def add_overwrite(parser, help: str = OVERWRITE_HELP) -> argparse.Action:
    """The ``--overwrite`` flag with the shared wording (a script may say more)."""
    return parser.add_argument("--overwrite", action="store_true", help=help)


def fatal(logger: logging.Logger, message: str, *args) -> int:
    """Log ``message % args`` as an error and return :data:`EXIT_FATAL`.

    The order every script follows: usage checks (argparse, input paths that must exist),
    then the output-folder policy, then the log file is attached, then the work. Once the
    log file is attached every fatal message lands in it too; before that nothing has been
    written (a typo creates no folder) and the message goes to stderr alone.
    """
    logger.error(message, *args, stacklevel=2)
    return EXIT_FATAL


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.resolve(), folder.resolve()
    return p == f or f in p.parents


def own_files(out: str | os.PathLike, patterns: Iterable[str]) -> list[Path]:
    """Files (not folders) under ``out`` matching any of the relative glob ``patterns``."""
    out = Path(out)
    found: dict[Path, None] = {}
    for pattern in patterns:
        for p in sorted(out.glob(pattern)):
            if p.is_file() or p.is_symlink():
                found[p] = None
    return list(found)


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
    log_name: str | None = None,
) -> None:
    """The refusals of :func:`prepare_output_dir`, without changing anything.

    For scripts that decide themselves which files are theirs (a manifest) before removing
    them. Raises :class:`OutputDirError`.
    """
    out = Path(out)
    for folder in protected:
        if _inside(out, Path(folder)):
            raise OutputDirError(f"{out}: output folder is inside the input folder {folder}; "
                                 "choose another --output_dir (inputs are never written to)")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a folder")
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if entries and entries != [log_name] and not overwrite:
        raise OutputDirError(
            f"{out}: output folder exists and is not empty; choose another --output_dir or "
            "pass --overwrite (which replaces only this script's files)")


def prepare_output_dir(
    out: str | os.PathLike,
    own: Sequence[str],
    *,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
    log_name: str | None = None,
) -> list[Path]:
    """Apply the output-folder policy to ``out``; create it; return the files removed.

    Parameters
    ----------
    out
        The output folder.
    own
        Glob patterns, relative to ``out``, of every file the script writes there
        (``"summary.json"``, ``"masks/*.png"``). ``overwrite`` removes these and nothing else;
        sub-folders emptied by that are removed too.
    overwrite
        The ``--overwrite`` flag. Without it an existing non-empty folder is refused.
    protected
        Input folders ``out`` must not lie inside (or be).
    log_name
        The script's log file. A folder holding nothing but it (a run that failed before
        writing anything else) counts as empty, so fixing a typo needs no ``--overwrite``.

    Raises
    ------
    OutputDirError
        One line naming the folder: not a folder, inside an input folder, or not empty
        without ``overwrite``. Nothing has been changed when it is raised.
    """
    out = Path(out)
    check_output_dir(out, overwrite=overwrite, protected=protected, log_name=log_name)
    removed = own_files(out, own) if out.is_dir() else []
    for p in removed:
        p.unlink()
    for d in sorted({p.parent for p in removed}, key=lambda q: len(q.parts), reverse=True):
        while d != out and out in d.parents and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
    out.mkdir(parents=True, exist_ok=True)
    return removed
