"""Distributed training on existing engines: TF_CONFIG from a PBS node file, MirroredStrategy
over two logical CPUs, MultiWorkerMirroredStrategy with two local worker processes.

The strategies run in subprocesses: logical devices and collective ops can only be configured
before TensorFlow initialises, which other tests in this pytest process may already have done.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import hpc_tools

ROOT = Path(__file__).resolve().parents[1]
# 10 tiles from ~4 frames: a 30 % frame-grouped validation side holds >= 2 tiles, one per
# replica (the trainer refuses fewer, naming --val_fraction).
TINY_TRAIN = ["--models", "unet", "--epochs", "1", "--steps_per_epoch", "2", "--batch_size", "4",
              "--filters", "4", "--depth", "2", "--image_size", "64", "--verbose", "2",
              "--val_fraction", "0.3"]

# PBS Pro with mpiprocs lists a host once per process, Torque once per cpu (ppn): repeats,
# not always adjacent, plus a trailing blank line.
SAMPLE_NODEFILE = "r1i0n3\nr1i0n3\nr1i0n7\nr1i0n3\nr1i0n7\nr1i1n0\n\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import synthetic_dataset

    out = tmp_path_factory.mktemp("dist") / "data"
    synthetic_dataset.generate_dataset(out, n=10, size=64, seed=0, log_file=False,
                                            style="rings")
    return out


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PBS_") and k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    return env


# ----------------------------------------------------------------------------- TF_CONFIG


def test_read_nodefile_dedupes_preserving_order(tmp_path):
    f = tmp_path / "nodes"
    f.write_text(SAMPLE_NODEFILE)
    assert hpc_tools.read_nodefile(f) == ["r1i0n3", "r1i0n7", "r1i1n0"]


def test_tf_config_for_each_worker(tmp_path):
    f = tmp_path / "nodes"
    f.write_text(SAMPLE_NODEFILE)
    workers = ["r1i0n3:29500", "r1i0n7:29500", "r1i1n0:29500"]
    for index in range(3):
        cfg = hpc_tools.build_tf_config(hpc_tools.read_nodefile(f), index, 29500)
        assert cfg == {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def test_tf_config_cli_prints_json(tmp_path, capsys):
    f = tmp_path / "nodes"
    f.write_text(SAMPLE_NODEFILE)
    rc = hpc_tools.main(["tf-config", "--nodefile", str(f), "--index", "2", "--port", "4000",
                         "--port-step", "1"])
    assert rc == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["cluster"]["worker"] == ["r1i0n3:4000", "r1i0n7:4001", "r1i1n0:4002"]
    assert cfg["task"] == {"type": "worker", "index": 2}


def test_tf_config_errors_name_the_problem(tmp_path, caplog):
    empty = tmp_path / "empty_nodes"
    empty.write_text("\n# comment only\n")
    assert hpc_tools.main(["tf-config", "--nodefile", str(empty), "--index", "0"]) == 2
    assert f"{empty}: node file lists no host" in caplog.text
    f = tmp_path / "nodes"
    f.write_text(SAMPLE_NODEFILE)
    assert hpc_tools.main(["tf-config", "--nodefile", str(f), "--index", "3"]) == 2
    assert "index 3 out of range for 3 host(s)" in caplog.text
    missing = tmp_path / "no_such_file"
    assert hpc_tools.main(["hosts", "--nodefile", str(missing)]) == 2
    assert f"{missing}: cannot read node file" in caplog.text
    with pytest.raises(hpc_tools.HpcToolError, match="not valid TCP ports"):
        hpc_tools.build_tf_config(["a", "b"], 0, 65535, port_step=1)


# ----------------------------------------------------------------------------- strategies


def test_mirrored_strategy_two_logical_cpus(dataset, tmp_path):
    """The trainer's own code path (--strategy mirrored) with 2 replicas on one machine."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import train_microbead_optimized as t;"
            " sys.exit(t.main(sys.argv[2:]))")
    out = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), "--data_dir", str(dataset), "--output_dir",
         str(out), *TINY_TRAIN, "--strategy", "mirrored", "--logical_cpus", "2"],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = out.glob("microbead_training_*")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["environment"]["replicas"] == 2
    with open(run_dir / "training_summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["unet"]
    assert 0.0 <= float(rows[0]["best_val_jacard"]) <= 1.0
    assert (run_dir / "best_unet_model.hdf5").is_file()


def _free_port_pair() -> int:
    """A port P with P and P+1 both free on localhost (the two workers' ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as s1, socket.socket() as s2:
                s1.bind(("127.0.0.1", port))
                s2.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.slow
def test_multiworker_two_local_workers_via_job_script(dataset, tmp_path):
    """pbs_microbead_multinode.sh with LAUNCHER=local: TF_CONFIG from a node file naming two
    hosts of this machine, two trainer processes with MultiWorkerMirroredStrategy on free
    localhost ports. Only the chief writes a run folder."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _write_fake_tools(fake_bin)
    image = tmp_path / "image.sif"
    image.touch()
    nodefile = tmp_path / "nodefile"
    # Two distinct names for this machine, each repeated as PBS does.
    nodefile.write_text("localhost\nlocalhost\n127.0.0.1\n127.0.0.1\n")
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "runs"
    env = _env()
    env.update(
        PATH=f"{fake_bin}{os.pathsep}{env['PATH']}", PBS_O_WORKDIR=str(work),
        SCRIPT_DIR=str(ROOT), CONTAINER=str(image), DATA_DIR=str(dataset), OUTPUT_DIR=str(out),
        ALLOW_CPU="1", MODELS="unet", EPOCHS="1", STEPS_PER_EPOCH="2", BATCH_SIZE="4",
        FILTERS="4", TRAIN_ARGS="--depth 2 --image_size 64 --val_fraction 0.3",
        DATA_CHECK_ARGS="--image_size 64",
        NODEFILE=str(nodefile), LAUNCHER="local", MW_PORT=str(_free_port_pair()),
        MW_PORT_STEP="1",
    )
    proc = subprocess.run(["bash", str(ROOT / "pbs_microbead_multinode.sh")], env=env,
                          cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:]
    (run_dir,) = out.glob("microbead_training_*")  # the chief's only; worker 1 wrote scratch
    assert not list(out.glob(".staging_*")), "the non-chief scratch folder was not removed"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["environment"]["replicas"] == 2
    assert cfg["training"]["strategy"] == "multiworker"
    logs = run_dir / "multinode_logs"
    assert (logs / "hosts.txt").read_text().split() == ["localhost", "127.0.0.1"]
    for i in (0, 1):
        text = (logs / f"worker_{i}.log").read_text()
        assert "2 replica(s)" in text, text[-2000:]
    # Both workers trained the same synchronised model: identical logged validation score.
    worker1 = (logs / "worker_1.log").read_text()
    with open(run_dir / "unet_history.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert f"val_jacard {float(row['val_jacard_coef']):.4f}" in worker1
    assert (run_dir / "training_analysis" / "TRAINING_REPORT.md").is_file()
    assert (out / "microbead.run_dir").read_text().strip() == str(run_dir)


def _write_fake_tools(bin_dir: Path) -> None:
    from test_pbs import write_fake_tools

    write_fake_tools(bin_dir)


def test_max_minutes_stop_is_agreed_across_replicas():
    """Workers' clocks differ: one worker over --max_minutes must stop every worker (the
    others would hang in their next collective). Replicas stand in for workers here: a
    flag true on replica 1 only is true everywhere after the all-reduce."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(\n"
        "    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "import training_loop as t\n"
        "s = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])\n"
        "rid = lambda: tf.distribute.get_replica_context().replica_id_in_sync_group\n"
        "print(t.any_replica(s, lambda: tf.equal(rid(), 1)), t.any_replica(s, lambda: False),"
        " t.any_replica(None, lambda: True))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "True False True"
