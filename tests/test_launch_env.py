"""Launch environments: CUDA_VISIBLE_DEVICES on a machine without GPUs, CPU affinity, the node a
node launcher names outside SLURM, a run directory that cannot be created, and launcher variables
that are missing or ranks that never meet (one sentence each, not a traceback after the timeout)."""
import os
import subprocess
import sys

from tests.conftest import ROOT, TRAIN_PY, run_env


def test_cuda_visible_devices_is_ignored_without_gpus(monkeypatch, capsys):
    """On CPU, CUDA_VISIBLE_DEVICES=0 (a leftover export) refused --nproc 2, and =0,1 became
    --include localhost:0,1, which DeepSpeed's CPU launcher ends in a traceback: --num_gpus N there."""
    from launch.cli import launch_command

    monkeypatch.setattr("launch.cli._cuda_count", lambda: 0)
    for visible in ("0", "0,1", "3"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        cmd = launch_command(["a=1"], 2)
        assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd


def test_cpu_threads_follow_the_cpu_affinity(monkeypatch):
    """OMP_NUM_THREADS per rank counts the CPUs this process may use (taskset, a SLURM cpuset), not
    the machine's."""
    from launch import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli, "_cuda_count", lambda: 0)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert cli.launch_env(2)["OMP_NUM_THREADS"] == "2"
    monkeypatch.delattr(os, "sched_getaffinity")  # (macOS): the machine's count
    assert cli.launch_env(2)["OMP_NUM_THREADS"] == "32"


def test_node_launcher_names_its_node_outside_slurm():
    """Outside SLURM every node called itself "node 0" in its lines (it read SLURM_NODEID only):
    torchrun's own --node_rank names it."""
    from launch.node_launcher import node_rank

    tail = ["--nproc_per_node", "2", str(TRAIN_PY), "recipe=demo"]
    assert node_rank(["--nnodes", "2", "--node_rank", "1", *tail], {}) == "1"
    assert node_rank(["--nnodes=2", "--node_rank=3", *tail], {}) == "3"
    assert node_rank(["--node-rank", "2", *tail], {}) == "2"
    assert node_rank(["--nnodes", "1", *tail], {}) == "0"  # torchrun's default
    assert node_rank(["--node_rank", "1", *tail], {"SLURM_NODEID": "4"}) == "4"  # a SLURM step: SLURM's own


def test_a_run_directory_that_cannot_be_created_is_one_sentence(tmp_path):
    """<run.root>/<run.name> a file: Hydra's FileExistsError traceback (exit 1, once per rank),
    before dialtune's checks ran; now one sentence, exit 2."""
    from launch.prepare import override_problem

    (tmp_path / "afile").write_text("")
    (tmp_path / "afile-sweep").write_text("")
    p = subprocess.run([sys.executable, str(TRAIN_PY), "logger=none", f"run.root={tmp_path}", "run.name=afile"],
                       env=run_env(1), capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines() == [
        f"dialtune: error: run.name='afile': the run directory <run.root>/<run.name>, '{tmp_path / 'afile'}', exists and "
        "is not a directory; choose another run.name (or run.root), or move it away."]
    sweep = override_problem(["-m", f"run.root={tmp_path}", "run.name=afile", "optim.lr=1e-4,2e-4"], root=True)
    assert "<run.name>-sweep" in sweep and "exists and is not a directory" in sweep
    assert override_problem([f"run.root={tmp_path}", "run.name=afile/sub"], root=True).endswith(
        "cannot be created (Not a directory); choose another run.name (or run.root).")
    # a run directory Hydra is told elsewhere: run.root/run.name are not used
    assert override_problem([f"run.root={tmp_path}", "run.name=afile", f"hydra.run.dir={tmp_path}/elsewhere"], root=True) is None
    assert override_problem([f"run.root={tmp_path}", "run.name=fine"], root=True) is None and (tmp_path / "fine").is_dir()
