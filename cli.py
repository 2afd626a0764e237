"""The command-line contract every microbead script shares (CONVENTIONS.md "One CLI contract").

One place for what every script's ``parse_args``/``main`` does the same way:

* :func:`add_option` adds ``--name`` with its hyphenated alias (``--data_dir`` and
  ``--data-dir``) and any old spellings, all stored under ``dest=name``.
* :class:`HelpFormatter` shows each option's real default in ``--help`` (never
  ``(default: None)``: an option without a default says in its help what happens instead).
* :func:`ranged` is an argparse ``type=`` with a range check: bad values are usage errors
  at parse time (exit 2), before anything is created.
* :func:`claim_output_dir` is the one output-folder policy: a missing or empty folder is
  created; an existing non-empty one is refused unless ``overwrite``, which removes only the
  files the previous run's manifest (:data:`MANIFEST_NAME`) lists and leaves everything else
  alone. Refused as well: a folder that holds an input, files named like the script's
  outputs that no manifest of it lists, and a folder another live run holds (its lock,
  :data:`LOCK_NAME`, names the PID; a dead run's lock is taken over and its temporary files
  removed). :func:`prepare_output_dir` is the same policy without lock and manifest.
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
>>> _ = add_option(p, "output_dir", "--out", default="results", help="results folder")
>>> p.parse_args(["--out", "x"]).output_dir
'x'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
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


def ranged(kind=float, lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type=`` that parses ``kind`` and checks ``lo <= x <= hi``.

    ``lo_open`` / ``hi_open`` exclude the bound. A value out of range is a usage error at
    parse time (exit 2, ``argument --flag: ...``), before any folder is created.

    >>> ranged(int, 1)("3")
    3
    """
    if lo is not None and hi is not None:
        want = (f"{'>' if lo_open else '>='} {lo:g} and {'<' if hi_open else '<='} {hi:g}")
    elif lo is not None:
        want = f"{'>' if lo_open else '>='} {lo:g}"
    else:
        want = f"{'<' if hi_open else '<='} {hi:g}"

    def parse(text: str):
        try:
            x = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"invalid {kind.__name__} value: {text!r}") from None
        bad = ((lo is not None and (x <= lo if lo_open else x < lo))
               or (hi is not None and (x >= hi if hi_open else x > hi))
               or (kind is float and x != x))  # NaN
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {want}")
        return x

    parse.__name__ = kind.__name__
    return parse


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
    """Files (not folders) under ``out`` matching any of the relative glob ``patterns``;
    temporary files of ``microbead_io.atomic_write`` (:func:`is_temp_file`) are not."""
    out = Path(out)
    found: dict[Path, None] = {}
    for pattern in patterns:
        for p in sorted(out.glob(pattern)):
            if (p.is_file() or p.is_symlink()) and not is_temp_file(p):
                found[p] = None
    return list(found)


def check_output_dir(
    out: str | os.PathLike,
    *,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
    log_name: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> None:
    """The refusals of :func:`prepare_output_dir`, without changing anything.

    A folder another live run holds (:func:`lock_holder`) is refused first, naming its PID.

    For scripts that decide themselves which files are theirs (a manifest) before removing
    them. ``protected``: input folders ``out`` must not be, lie inside, or contain;
    ``inputs``: input files or folders ``out`` must not be or contain (a model's run folder
    may hold a predictions folder; the predictions folder must not hold the model). Raises
    :class:`OutputDirError`.
    """
    out = Path(out)
    check_not_locked(out)
    for folder in protected:
        if _inside(out, Path(folder)):
            raise OutputDirError(f"{out}: output folder is inside the input folder {folder}; "
                                 "choose another --output_dir (inputs are never written to)")
    for item in [*protected, *inputs]:
        if _inside(Path(item), out):
            raise OutputDirError(f"{out}: output folder contains the input {item}; "
                                 "choose another --output_dir (inputs are never written to)")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out}: exists and is not a folder")
    entries = [p.name for p in out.iterdir()] if out.is_dir() else []
    if any(not _is_ignorable(e, log_name) for e in entries) and not overwrite:
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
        Inputs (folders or files) ``out`` must not lie inside, be, or contain.
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
    _prune_empty(out, removed)
    out.mkdir(parents=True, exist_ok=True)
    return removed


# --------------------------------------------------------------------------- claiming a folder

#: Per-folder record of the files a run wrote (see :func:`claim_output_dir`).
MANIFEST_NAME = "output_manifest.json"
#: Lock file of the run writing into a folder: ``{"pid", "host", "script", "started"}``.
LOCK_NAME = ".microbead.lock"
# microbead_io.atomic_write's temporary files: ``.<stem>.<pid>.<12 hex><suffix>``.
_TEMP_RE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}(\.[^.]*)?$")


def is_temp_file(path: str | os.PathLike) -> bool:
    """True for a hidden temporary file of ``microbead_io.atomic_write`` (any PID)."""
    return bool(_TEMP_RE.match(Path(path).name))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a PID owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lock_holder(out: str | os.PathLike) -> dict | None:
    """The live run holding ``out``'s lock, as its lock record, or None.

    None when there is no lock or it is stale: its PID is dead on this host. A lock from
    another host cannot be checked and counts as held. An unreadable lock (a run killed
    while writing it) counts as stale.
    """
    rec = _read_json(Path(out) / LOCK_NAME)
    if rec is None:
        return None
    if rec.get("host") not in (None, socket.gethostname()):
        return rec
    try:
        pid = int(rec.get("pid"))
    except (TypeError, ValueError):
        return None
    return rec if pid_alive(pid) else None


def check_not_locked(out: str | os.PathLike) -> None:
    """Raise :class:`OutputDirError` naming the holder when a live run holds ``out``."""
    holder = lock_holder(out) if Path(out).is_dir() else None
    if holder is not None:
        raise OutputDirError(_holder_text(Path(out), holder))


def _holder_text(out: Path, rec: dict) -> str:
    return (f"{out}: in use by another run: {rec.get('script', '?')}, PID {rec.get('pid')} "
            f"on {rec.get('host', '?')}, started {rec.get('started', '?')} "
            f"({out / LOCK_NAME}); wait for it or choose another --output_dir")


def _is_ignorable(name: str, log_name: str | None) -> bool:
    """Entries that do not make a folder 'not empty': the script's log, the manifest, a
    lock and temporary files (the next run removes or rewrites them)."""
    return name in (log_name, MANIFEST_NAME, LOCK_NAME) or bool(_TEMP_RE.match(name))


def _rel_list(out: Path, files: Iterable[Path]) -> list[str]:
    return sorted({p.relative_to(out).as_posix() for p in files})


class OutputClaim:
    """An output folder held by this run: its lock and its manifest.

    Made by :func:`claim_output_dir`. :meth:`release` (also on leaving a ``with`` block)
    writes :data:`MANIFEST_NAME`, listing the files of ``own`` that are now in the folder
    (none when the run wrote nothing but its log: the folder then holds the log alone),
    and removes the lock. Attributes: ``out``, ``removed`` (files of the previous run
    removed by ``--overwrite``), ``notes`` (warnings for the run's log: a stale lock taken
    over, temporary files removed).
    """

    def __init__(self, out: Path, script: str, own: Sequence[str], log_name: str | None,
                 removed: list[Path], notes: list[str]):
        self.out, self.script, self.own, self.log_name = out, script, tuple(own), log_name
        self.removed, self.notes = removed, notes
        self._held = True

    def report(self, logger: logging.Logger) -> None:
        """Log :attr:`notes` as warnings (call once the run's log file is attached)."""
        for note in self.notes:
            logger.warning("%s", note)

    def files(self) -> list[str]:
        """Relative paths of this script's files now in the folder (the log included)."""
        found = own_files(self.out, self.own) if self.out.is_dir() else []
        if self.log_name and (self.out / self.log_name).is_file():
            found.append(self.out / self.log_name)
        return [r for r in _rel_list(self.out, found) if r not in (MANIFEST_NAME, LOCK_NAME)]

    def write_manifest(self, *, complete: bool = True) -> None:
        """Record the files of this run now in the folder (atomically)."""
        import microbead_io as mio  # numpy / OpenCV: not needed for --help

        mio.atomic_write_json(self.out / MANIFEST_NAME, {
            "format_version": 1, "script": self.script, "complete": complete,
            "patterns": list(self.own), "files": self.files() if complete else []})

    def release(self) -> None:
        """Write the manifest and remove the lock (once; later calls do nothing)."""
        if not self._held:
            return
        self._held = False
        try:
            if self.out.is_dir() and any(f != self.log_name for f in self.files()):
                self.write_manifest(complete=True)
            else:  # a failed run left its log alone: the folder still counts as empty
                (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        finally:
            rec = _read_json(self.out / LOCK_NAME)
            if rec is not None and rec.get("pid") == os.getpid() \
                    and rec.get("host") == socket.gethostname():
                (self.out / LOCK_NAME).unlink(missing_ok=True)

    def __enter__(self) -> OutputClaim:
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _previous_files(out: Path, script: str, own: Sequence[str]) -> list[Path]:
    """Files of ``out`` its previous run of ``script`` wrote, per its manifest.

    A complete manifest lists them. An incomplete one (the run was killed) lists none; every
    file matching ``own`` counts as that run's then, because the folder held no file of
    those names that was not the script's when that run started (see claim_output_dir).
    """
    man = out / MANIFEST_NAME
    rec = _read_json(man) if man.exists() else None
    if man.exists() and rec is None:
        raise OutputDirError(f"{man}: unreadable manifest; remove it or choose another "
                             "--output_dir")
    if rec is None:
        return []
    if rec.get("script") != script:
        raise OutputDirError(
            f"{out}: holds the outputs of {rec.get('script', 'another script')} ({man}); "
            f"{script} does not write into another script's folder: choose another "
            "--output_dir")
    if not rec.get("complete"):
        return own_files(out, own)
    root = out.resolve()
    files = []
    for rel in rec.get("files", []):
        p = out / str(rel)
        if root in p.resolve().parents and (p.is_file() or p.is_symlink()):
            files.append(p)
    return files


def _write_lock(out: Path, script: str) -> None:
    """Create ``out``'s lock (O_EXCL); a stale one is replaced. Raises OutputDirError."""
    import time

    lock = out / LOCK_NAME
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "script": script,
           "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    for _ in range(3):
        try:
            fd = os.open(lock, flags, 0o666)
        except FileExistsError:
            holder = lock_holder(out)
            if holder is not None:
                raise OutputDirError(_holder_text(out, holder)) from None
            lock.unlink(missing_ok=True)  # stale: its run is dead
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(rec, fh)
        return
    raise OutputDirError(f"{lock}: could not take the lock")  # pragma: no cover - a race


def lock_output_dir(out: str | os.PathLike, script: str) -> list[str]:
    """Take ``out``'s lock for this process (the folder must exist); return notes.

    For scripts that keep their own manifest (``make_synthetic_dataset``'s dataset.json).
    A live holder is refused (:class:`OutputDirError` naming its PID); a stale lock is taken
    over and said so in the notes; temporary files left by a killed run are removed. Release
    with :func:`unlock_output_dir`.
    """
    out = Path(out)
    notes = []
    stale = _read_json(out / LOCK_NAME) if (out / LOCK_NAME).exists() else None
    _write_lock(out, script)
    if stale is not None:
        notes.append(f"{out}: took over the lock of a run that is no longer running "
                     f"({stale.get('script', '?')}, PID {stale.get('pid')}, started "
                     f"{stale.get('started', '?')})")
    temps = [p for p in sorted(out.rglob(".*")) if p.is_file() and is_temp_file(p)]
    for p in temps:
        p.unlink(missing_ok=True)
    if temps:
        notes.append(f"{out}: removed {len(temps)} temporary file(s) of an interrupted run "
                     f"({', '.join(p.relative_to(out).as_posix() for p in temps[:3])}"
                     f"{' ...' if len(temps) > 3 else ''})")
    return notes


def unlock_output_dir(out: str | os.PathLike) -> None:
    """Remove ``out``'s lock if this process holds it."""
    lock = Path(out) / LOCK_NAME
    rec = _read_json(lock)
    if rec is not None and rec.get("pid") == os.getpid() \
            and rec.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def claim_output_dir(
    out: str | os.PathLike,
    own: Sequence[str],
    *,
    script: str,
    overwrite: bool,
    protected: Sequence[str | os.PathLike] = (),
    log_name: str | None = None,
    inputs: Sequence[str | os.PathLike] = (),
) -> OutputClaim:
    """The output-folder policy with a lock and a manifest; create the folder.

    Refused (:class:`OutputDirError`, one line, nothing changed): everything
    :func:`check_output_dir` refuses (an input inside the folder included); a folder another
    live run holds (its lock names the PID and host); a folder holding another script's
    manifest; and, with ``overwrite``, a folder holding files named like this script's
    outputs (``own``) that no manifest of this script lists: someone else's files, which a
    rerun would overwrite. Then the lock is taken (a stale lock, whose PID is dead, is
    taken over), temporary files a killed run left are removed, the files the previous
    run's manifest lists are removed (``overwrite``) and an incomplete manifest is written,
    so that files of a run killed before :meth:`OutputClaim.release` still count as its own.

    ``own`` are glob patterns relative to ``out`` of every file the script writes there;
    ``protected`` and ``inputs`` as in :func:`check_output_dir`.
    Release the claim with :meth:`OutputClaim.release` (or use it in a ``with`` block).
    """
    out = Path(out)
    check_output_dir(out, overwrite=overwrite, protected=protected, log_name=log_name,
                     inputs=inputs)
    previous = _previous_files(out, script, own) if out.is_dir() else []
    keep = {p.resolve() for p in previous}
    foreign = [p for p in (own_files(out, own) if out.is_dir() else [])
               if p.resolve() not in keep and p.name != log_name
               and p.name not in (MANIFEST_NAME, LOCK_NAME)]
    if foreign:
        names = ", ".join(str(p) for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise OutputDirError(
            f"{out}: holds {len(foreign)} file(s) named like {script}'s outputs that no "
            f"{MANIFEST_NAME} of {script} lists ({names}); they are not this script's to "
            "replace: move them or choose another --output_dir")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        notes = lock_output_dir(out, script)
    except OutputDirError:
        if created:
            out.rmdir()
        raise
    for p in previous:
        p.unlink(missing_ok=True)
    _prune_empty(out, previous)
    claim = OutputClaim(out, script, own, log_name, previous, notes)
    claim.write_manifest(complete=False)
    return claim


def _prune_empty(out: Path, removed: Iterable[Path]) -> None:
    """Remove the sub-folders of ``out`` emptied by removing ``removed``."""
    for d in sorted({p.parent for p in removed}, key=lambda q: len(q.parts), reverse=True):
        while d != out and out in d.parents and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
