"""benchmarks/run_all.py: every step's command line parses with its script's own parser.

A full run takes an hour (it trains the three models on the 73-tile set), far too long for
a test; what rots unnoticed is a renamed or removed flag in one of the scripts it calls,
so each command from :func:`run_all.commands` goes through that script's ``parse_args``.
``bench_predict.py`` builds its parser inside ``main`` (no ``parse_args`` to call), so only
its path is checked.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--help"])
    assert exc.value.code == 0 and "--reuse" in capsys.readouterr().out


def test_every_step_command_parses_with_its_script(tmp_path):
    cmds = run_all.commands(tmp_path, best_run=str(tmp_path / "runs" / "run_1"))
    assert list(cmds) == ["generate", "bench_train", "bench_pipeline", "predict", "evaluate",
                          "bench_predict"]
    for step, (script, *argv) in cmds.items():
        path = Path(script) if Path(script).is_absolute() else run_all.ROOT / script
        assert path.is_file(), f"{step}: {path} not found"
        if step == "bench_predict":
            continue  # no parse_args (see the module docstring)
        module = importlib.import_module(path.stem)
        args = module.parse_args(argv)
        assert args is not None, step
    # The flags that matter downstream reach the scripts as run_all means them.
    import make_synthetic_dataset as syn

    gen = syn.parse_args(cmds["generate"][1:])
    assert (gen.n, gen.large, gen.seed) == (73, 7, 0)
    import bench_train

    tr = bench_train.parse_args(cmds["bench_train"][1:])
    assert tr.out == str(tmp_path / "bench_train.json")
    assert tr.output_dir == str(tmp_path / "runs")
