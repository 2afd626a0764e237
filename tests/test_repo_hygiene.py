"""The repository never takes in the users' images or a step's outputs by accident."""

from __future__ import annotations

import ast
import functools
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The README's "Using it on your data" folders and every step's default output.
USER_PATHS = ("dataset_microscope/images/160x_a_grid_r0_c0.png",
              "dataset_microscope/masks/160x_a_grid_r0_c0.png",
              "new_frames/frame.tif", "truth/masks/frame.png",
              "dataset_analysis/summary.json", "microbead_training_20260101_120000/x.hdf5",
              "predictions/masks/a_mask.png", "evaluation/per_image_metrics.csv",
              "assay/assay_results.json")


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a checkout")
def test_user_data_and_outputs_are_git_ignored():
    proc = subprocess.run(["git", "check-ignore", "--no-index", *USER_PATHS], cwd=ROOT,
                          capture_output=True, text=True)
    ignored = set(proc.stdout.split())
    assert ignored == set(USER_PATHS), sorted(set(USER_PATHS) - ignored)


# --------------------------------------------------------------------------- structure
# Guards for the layout issue 26 sets up: scripts are entry points over shared modules, a
# benchmark uses the modules' parameters rather than patching them, files stay readable and
# importing a module changes nothing.

HEAVY = {"tensorflow", "keras", "jax", "torch"}
MAX_LINES, MAX_LONG_FILES = 1000, 2


def _top_level_files() -> list[Path]:
    return sorted(ROOT.glob("*.py"))


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _is_script(tree: ast.Module) -> bool:
    """A module with an ``if __name__ == "__main__":`` block."""
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            test = node.test
            names = [test.left, *test.comparators]
            if (any(isinstance(n, ast.Name) and n.id == "__name__" for n in names)
                    and any(isinstance(n, ast.Constant) and n.value == "__main__"
                            for n in names)):
                return True
    return False


def _imported(tree: ast.AST) -> set[str]:
    """Top-level package names imported anywhere in ``tree`` (functions included)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def _scripts() -> dict[str, ast.Module]:
    trees = {p.stem: _tree(p) for p in _top_level_files()}
    return {name: t for name, t in trees.items() if _is_script(t)}


def test_the_structure_checks_see_the_scripts():
    scripts = _scripts()
    assert {"train_microbead_optimized", "predict_microscope", "demo"} <= set(scripts)
    assert "microbead_io" not in scripts and "cli" not in scripts


def test_no_module_imports_a_script():
    """Scripts are entry points: no top-level module imports a top-level script (imports
    inside functions included). demo.py runs the scripts and may import them."""
    scripts = set(_scripts())
    bad = []
    for path in _top_level_files():
        if path.stem == "demo":
            continue
        hits = sorted((_imported(_tree(path)) & scripts) - {path.stem})
        if hits:
            bad.append(f"{path.name} imports {', '.join(h + '.py' for h in hits)}")
    assert not bad, "top-level modules importing scripts: " + "; ".join(bad)


def test_demo_uses_only_the_main_of_scripts():
    """demo.py imports scripts only to call their ``main`` (and to name the files they
    write: their UPPER_CASE constants); whatever else it needs from them belongs in a
    shared module."""
    scripts = set(_scripts()) - {"demo"}
    tree = _tree(ROOT / "demo.py")
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in scripts:
                    bound[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in scripts:
            bad = [a.name for a in node.names if a.name != "main"]
            assert not bad, f"demo.py: from {node.module} import {', '.join(bad)}"
    uses = sorted({f"{bound[n.value.id]}.{n.attr}" for n in ast.walk(tree)
                   if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                   and n.value.id in bound and n.attr != "main" and not n.attr.isupper()})
    assert not uses, "demo.py uses more than main of scripts: " + ", ".join(uses)


def _assignments_into_modules(path: Path) -> list[str]:
    """``<imported name>.<attr> = ...`` (also augmented, annotated, nested targets and
    ``setattr(<imported name>, ...)``) anywhere in ``path``."""
    tree = _tree(path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names |= {a.asname or a.name for a in node.names}

    def root(node):
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    hits = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("setattr", "delattr") and node.args
              and root(node.args[0]) in names):
            hits.append(node.lineno)
        for target in targets:
            if any(isinstance(e, ast.Attribute) and isinstance(e.ctx, ast.Store)
                   and root(e) in names for e in ast.walk(target)):
                hits.append(node.lineno)
                break
    return [f"{_rel(path)}:{line}" for line in sorted(set(hits))]


def test_the_patch_finder_finds_patches(tmp_path):
    bench = tmp_path / "bench_probe.py"
    bench.write_text("import os\nimport train_microbead_optimized as tmo\n"
                     "from pathlib import Path\n\n"
                     "def f(fake):\n    tmo.make_datasets, x = fake, 1\n"
                     "    setattr(tmo, 'setup_tensorflow', fake)\n"
                     "    Path.home = fake\n    os.environ['A'] = '1'\n"
                     "    args = fake\n    args.x = 1\n    tmo.cfg.depth += 1\n")
    assert _assignments_into_modules(bench) == [f"bench_probe.py:{n}" for n in (6, 7, 8, 12)]


def test_no_benchmark_assigns_into_another_module():
    """A benchmark that needs another code path uses a parameter the module offers; it never
    swaps a module's functions at run time (that broke a benchmark unnoticed before)."""
    bad = [h for p in sorted((ROOT / "benchmarks").glob("*.py"))
           for h in _assignments_into_modules(p)]
    assert not bad, "benchmarks assigning into imported modules: " + ", ".join(bad)


def test_at_most_two_source_files_over_1000_lines():
    files = _top_level_files() + sorted((ROOT / "benchmarks").glob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert len(long) <= MAX_LONG_FILES, (
        f"{len(long)} source files over {MAX_LINES} lines (at most {MAX_LONG_FILES}): "
        + ", ".join(f"{k} ({v})" for k, v in sorted(long.items(), key=lambda kv: -kv[1])))


def test_doctests_pass():
    """The examples in the shared modules' docstrings run as written."""
    import doctest

    import cli
    import reporting
    import runtime

    for module in (cli, reporting, runtime):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0, f"{module.__file__}: no doctest examples"
        assert result.failed == 0, f"{module.__file__}: {result.failed} doctest(s) failed"


def _heavy_modules() -> set[str]:
    """Top-level modules whose import loads a deep-learning framework (module-level imports
    only, followed through other top-level modules)."""
    local = {p.stem for p in _top_level_files()}
    deps = {}
    for p in _top_level_files():
        mods: set[str] = set()
        stack: list[ast.AST] = list(_tree(p).body)
        while stack:  # what runs at import: not function bodies (class bodies do run)
            node = stack.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(node, ast.Import):
                mods |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
            stack.extend(ast.iter_child_nodes(node))
        deps[p.stem] = mods
    heavy = {m for m, d in deps.items() if d & HEAVY}
    changed = True
    while changed:
        new = {m for m, d in deps.items() if d & heavy & local} - heavy
        heavy |= new
        changed = bool(new)
    return heavy


_IMPORT_PROBE = r"""
import importlib, json, logging, os, sys
sys.path.insert(0, sys.argv[1])
import cv2
sentinel = (os.cpu_count() or 1) + 3  # neither OpenCV's default nor usable_cpus()
cv2.setNumThreads(sentinel)
root, pkg = logging.getLogger(), logging.getLogger("microbead")
def state():
    return (cv2.getNumThreads(), [id(h) for h in root.handlers], root.level,
            [id(h) for h in pkg.handlers])
changed = {}
for name in sys.argv[2:]:
    before = state()
    try:
        importlib.import_module(name)
    except Exception as exc:
        changed[name] = f"import failed: {type(exc).__name__}: {exc}"
        continue
    after = state()
    what = [w for w, b, a in zip(("cv2 threads", "root handlers", "root level",
                                  "microbead handlers"), before, after) if b != a]
    if what:
        changed[name] = ", ".join(what)
print(json.dumps(changed))
"""


def test_importing_a_module_changes_nothing():
    """Importing any top-level module leaves OpenCV's thread pool and the logging handlers
    as they were (runtime.py: entry points set them, explicitly, in ``main``).

    Each module is imported in turn in one fresh interpreter and the state compared after
    each import, so a change is blamed on the module whose import made it. Modules that load
    TensorFlow at import are left out (that import alone takes tens of seconds on 2 cores);
    the rest take a few seconds together.
    """
    import json
    import os
    import sys

    heavy = _heavy_modules()
    names = [p.stem for p in _top_level_files() if p.stem not in heavy]
    assert len(names) >= 10, names
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, str(ROOT), *names], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not changed, "importing changes the process: " + "; ".join(
        f"{k}.py ({v})" for k, v in changed.items())
