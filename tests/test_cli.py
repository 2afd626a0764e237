"""The one CLI contract (CONVENTIONS.md): every script, the same flags, folder policy and exits.

For each script: ``--help`` shows every real default (never ``(default: None)``), every
underscore flag has its hyphenated alias, an existing non-empty output folder is refused with
exit 2 and a message naming it, and ``--overwrite`` keeps files the script did not write.
The shared pieces live in ``cli.py``; their own behaviour is tested at the end.
"""

from __future__ import annotations

import argparse
import importlib

import pytest

import cli

# script -> the smallest argv parse_args accepts (output folder and inputs as placeholders).
SCRIPTS = {
    "analyze_microbead_dataset": [],
    "train_microbead_optimized": [],
    "predict_microscope": ["--model", "m", "--input_dir", "i", "--output_dir", "o"],
    "evaluate_predictions": ["--pred_dir", "p", "--gt_dir", "g", "--output_dir", "o"],
    "plot_training_curves": ["run"],
    "make_synthetic_dataset": ["--output_dir", "o"],
    "quantify_assay": ["--predictions", "p", "--output_dir", "o"],
    "export_model": ["--model", "m", "--output_dir", "o"],
    "hpc_tools": ["merge-summaries", "--output_dir", "o"],
    "demo": [],
}


def _parsers(monkeypatch, name: str, argv: list[str]) -> list[argparse.ArgumentParser]:
    """Every parser ``name.parse_args(argv)`` builds (sub-command parsers included)."""
    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def spy(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", spy)
    importlib.import_module(name).parse_args(argv)
    monkeypatch.undo()
    parsers = [seen[0]]
    for action in seen[0]._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return parsers


def _help(capsys, name: str, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(name).parse_args(argv + ["--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # unwrap argparse's line breaks


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_shows_every_real_default(name, capsys, monkeypatch):
    argv = SCRIPTS[name]
    sub = argv[:1] if name == "hpc_tools" else []
    text = _help(capsys, name, sub)
    assert "(default: None)" not in text
    parser = [p for p in _parsers(monkeypatch, name, argv)
              if not sub or p.prog.endswith(sub[0])][-1]
    for action in parser._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS
                or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            continue
        shown = f"default: {action.default}"
        assert shown in text, f"{name} {action.option_strings[0]}: {shown!r} not in --help"


def test_train_help_shows_resolved_defaults_and_presets(capsys):
    text = _help(capsys, "train_microbead_optimized", [])
    assert "(default: 100; --preset cpu: 8)" in text  # --epochs
    assert "(default: 64; --preset cpu: 8)" in text  # --filters
    assert "--overwrite does not apply" in text  # a new run folder every time


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_underscore_flag_has_its_hyphen_alias(name, monkeypatch):
    for parser in _parsers(monkeypatch, name, SCRIPTS[name]):
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and "_" in flag:
                    assert flag.replace("_", "-") in action.option_strings, (name, flag)


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"train_microbead_optimized"}))
def test_output_dir_and_its_hyphen_alias(name):
    mod = importlib.import_module(name)
    argv = [a.replace("--output_dir", "--output-dir") for a in SCRIPTS[name]]
    if "--output-dir" not in argv:
        argv += ["--output-dir", "o"]
    assert str(mod.parse_args(argv).output_dir) == "o"


@pytest.mark.parametrize("name,old", [("make_synthetic_dataset", "--out"),
                                      ("make_synthetic_dataset", "--out_dir"),
                                      ("demo", "--out")])
def test_old_output_spellings_stay_aliases(name, old):
    args = importlib.import_module(name).parse_args([old, "x"])
    assert str(args.output_dir) == "x"


def _busy_argv(name: str, tmp_path, busy) -> list[str]:
    """argv that gets ``name`` past its input checks to the output-folder policy."""
    (tmp_path / "in").mkdir()
    if name == "evaluate_predictions":
        (tmp_path / "gt").mkdir()
        return ["--pred_dir", str(tmp_path / "in"), "--gt_dir", str(tmp_path / "gt"),
                "--output_dir", str(busy)]
    if name == "quantify_assay":
        (tmp_path / "in" / "prediction_summary.csv").write_text("file,status,beads\n")
        return ["--predictions", str(tmp_path / "in"), "--output_dir", str(busy)]
    if name == "analyze_microbead_dataset":
        return ["--data_dir", str(tmp_path / "in"), "--output_dir", str(busy)]
    if name == "plot_training_curves":
        return [str(tmp_path / "in"), "--output_dir", str(busy)]
    if name == "hpc_tools":
        return ["merge-summaries", "--output_dir", str(busy)]
    if name in ("predict_microscope", "export_model"):
        extra = ["--input_dir", str(tmp_path / "in")] if name == "predict_microscope" else []
        return ["--model", str(tmp_path / "in"), *extra, "--output_dir", str(busy)]
    if name == "make_synthetic_dataset":
        return ["--output_dir", str(busy), "--n", "2", "--size", "32"]
    if name == "demo":
        return ["--output_dir", str(busy)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(set(SCRIPTS) - {"train_microbead_optimized"}))
def test_existing_output_folder_refused_with_exit_2(name, tmp_path, caplog):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("user file")
    argv = _busy_argv(name, tmp_path, busy)
    assert importlib.import_module(name).main(argv) == 2
    assert f"{busy}: output folder exists and is not empty" in caplog.text
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


def test_plot_overwrite_keeps_a_foreign_file(tmp_path):
    import plot_training_curves as ptc

    run = tmp_path / "run"
    run.mkdir()
    (run / "unet_history.csv").write_text(
        "epoch,loss,jacard_coef,val_loss,val_jacard_coef\n1,0.9,0.1,0.9,0.1\n2,0.8,0.2,0.8,0.3\n")
    out = tmp_path / "curves"
    assert ptc.main([str(run), "--output_dir", str(out), "--dpi", "30"]) == 0
    (out / "notes.txt").write_text("keep")
    (out / ptc.REPORT).write_text("stale")  # the previous run's file, edited since
    assert ptc.main([str(run), "--output_dir", str(out), "--dpi", "30"]) == 2
    assert ptc.main([str(run), "--output-dir", str(out), "--dpi", "30", "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "keep"
    assert (out / ptc.REPORT).read_text() != "stale"


# --------------------------------------------------------------------------- cli.py itself


def test_add_option_adds_hyphen_alias_and_old_spellings():
    p = argparse.ArgumentParser()
    cli.add_option(p, "output_dir", "--out", default="x")
    cli.add_option(p, "n", type=int, default=1)
    assert p.parse_args(["--output-dir", "a"]).output_dir == "a"
    assert p.parse_args(["--out", "b"]).output_dir == "b"
    assert p.parse_args(["--n", "3"]).n == 3
    assert cli.option_flags("n") == ["--n"]


def test_prepare_output_dir_removes_only_own_files(tmp_path):
    out = tmp_path / "out"
    (out / "masks" / "deep").mkdir(parents=True)
    (out / "summary.json").write_text("old")
    (out / "masks" / "a.png").write_text("old")
    (out / "masks" / "deep" / "b.png").write_text("old")
    (out / "masks" / "mine.txt").write_text("user")
    (out / "notes.txt").write_text("user")
    with pytest.raises(cli.OutputDirError, match=f"{out}: output folder exists and is not "):
        cli.prepare_output_dir(out, ["summary.json", "masks/**/*.png"], overwrite=False)
    assert (out / "summary.json").read_text() == "old"  # a refusal changes nothing
    removed = cli.prepare_output_dir(out, ["summary.json", "masks/**/*.png", "absent.csv"],
                                     overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in removed) == [
        "masks/a.png", "masks/deep/b.png", "summary.json"]
    assert not (out / "masks" / "deep").exists()  # emptied by the removal
    assert (out / "masks" / "mine.txt").read_text() == "user"
    assert (out / "notes.txt").read_text() == "user"


def test_prepare_output_dir_refusals_and_the_log_only_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(cli.OutputDirError, match="inside the input folder"):
        cli.prepare_output_dir(data / "out", [], overwrite=True, protected=[data])
    assert not (data / "out").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(cli.OutputDirError, match="not a folder"):
        cli.prepare_output_dir(afile, [], overwrite=True)
    # A folder holding only this script's log (a run that failed) counts as empty.
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "run.log").write_text("error: ...")
    assert cli.prepare_output_dir(failed, ["run.log"], overwrite=False, log_name="run.log")
    created = cli.prepare_output_dir(tmp_path / "new" / "sub", ["x"], overwrite=False)
    assert created == [] and (tmp_path / "new" / "sub").is_dir()


def test_fatal_logs_and_returns_2(caplog):
    import logging

    assert cli.fatal(logging.getLogger("microbead.test"), "%s: broken", "f.png") == 2
    assert "f.png: broken" in caplog.text
