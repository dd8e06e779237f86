"""Launch environments: CUDA_VISIBLE_DEVICES on a machine without GPUs, CPU affinity, the node a
node launcher names outside SLURM, a run directory that cannot be created, and launcher variables
that are missing or ranks that never meet (one sentence each, not a traceback after the timeout)."""
import os
import subprocess
import sys

import pytest

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


RANKS = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")


def test_an_incomplete_launcher_environment_is_one_sentence():
    """RANK/WORLD_SIZE without LOCAL_RANK or MASTER_*: DeepSpeed tried MPI discovery ("No module
    named 'mpi4py'"); a RANK not below WORLD_SIZE waited for the timeout."""
    from train.distributed import launcher_env_problem

    assert launcher_env_problem({}) is None and launcher_env_problem({"WORLD_SIZE": "1"}) is None
    assert launcher_env_problem(RANKS) is None and launcher_env_problem({"OMPI_COMM_WORLD_RANK": "0", "RANK": "0"}) is None
    no_local = {k: v for k, v in RANKS.items() if k != "LOCAL_RANK"}
    assert launcher_env_problem(no_local) == (
        "RANK=0, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1, MASTER_PORT=29555 are set, but LOCAL_RANK is not: a run of several "
        "processes needs all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, which launchers such as torchrun and "
        "deepspeed set; start it with one of them (or `dialtune train --nproc N`), or unset RANK and WORLD_SIZE to run one process.")
    assert launcher_env_problem({"RANK": "1"}).startswith("RANK=1 is set, but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not")
    assert launcher_env_problem(dict(RANKS, RANK="2")).startswith("RANK=2 is not below WORLD_SIZE=2")
    assert launcher_env_problem(dict(RANKS, LOCAL_RANK="x")).startswith("LOCAL_RANK=x is not a whole number")
    assert launcher_env_problem(dict(RANKS, MASTER_PORT="70000")).startswith("MASTER_PORT=70000 is not a port number")
    # launch/train.py says it before Hydra (no run directory), on rank 0
    p = subprocess.run([sys.executable, str(TRAIN_PY), "logger=none", "run.root=/nonexistent/never-made"],
                       env={**run_env(1), **no_local}, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    assert p.returncode == 2 and p.stderr.strip() == "dialtune: error: " + launcher_env_problem(no_local), p.stderr[-3000:]


def test_rendezvous_timeouts_are_one_sentence():
    """The exceptions torch.distributed raises when the ranks do not meet (rank 0 waiting for the
    others, another rank that cannot reach rank 0), or rank 0 cannot listen, become one sentence."""
    from torch.distributed import DistNetworkError, DistStoreError

    from train.distributed import rendezvous_problem

    waited = rendezvous_problem(DistStoreError("Timed out after 61 seconds waiting for clients. 1/2 clients joined."), RANKS, 1)
    assert waited == ("rank 0 of 2 could not meet the other ranks at 127.0.0.1:29555 within 1 minute(s) "
                      "(deepspeed.timeout_minutes): start all 2 ranks (each with its own RANK, the same WORLD_SIZE, MASTER_ADDR "
                      "and MASTER_PORT), and check that the other hosts can reach rank 0's host at that address and port.")
    client = DistNetworkError("The client socket has timed out after 60000ms while trying to connect to (127.0.0.1, 29555).\n"
                              "Exception raised from throwTimeoutError at socket.cpp:1030 (most recent call first):\nframe #0: ...")
    assert rendezvous_problem(client, dict(RANKS, RANK="1", LOCAL_RANK="1"), 30).startswith("rank 1 of 2 could not meet")
    in_use = DistNetworkError("The server socket has failed to listen on any local network address. port: 29555, useIpv6: "
                              "false, code: -98, name: EADDRINUSE, message: address already in use")
    assert rendezvous_problem(in_use, RANKS, 1).startswith("rank 0 cannot listen on MASTER_PORT=29555: the port is in use")
    assert rendezvous_problem(RuntimeError("something else"), RANKS, 1) is None


def test_ranks_that_never_meet_stop_with_one_sentence_and_no_run_directory(tmp_path):
    """One rank of two started (RANK=1 WORLD_SIZE=2; rank 0 alone: DistStoreError, its translation
    is tested above): a traceback after deepspeed.timeout_minutes; now the sentence, exit 2, and Hydra's run directory is dropped. The
    timeout (whole minutes in the config) is cut to 3 s here by calling init with 0.05 minutes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = ("import runpy, sys; import train.distributed as d; init = d.init; d.init = lambda minutes=30: init(0.05); "
              f"sys.argv = [{str(TRAIN_PY)!r}, 'logger=none', 'run.root={tmp_path}']; "
              f"runpy.run_path({str(TRAIN_PY)!r}, run_name='__main__')")
    # rank 1 alone (neither rank 0 nor a node's first rank, which say other errors): it says it, and drops it too
    env = {**run_env(1), **RANKS, "RANK": "1", "LOCAL_RANK": "1", "MASTER_PORT": port}
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180, cwd=str(ROOT))
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        f"dialtune: error: rank 1 of 2 could not meet the other ranks at 127.0.0.1:{port} within 0.05 minute(s)"), p.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank,local_rank,said", [("0", "0", True), ("1", "0", True), ("3", "1", False), ("0", None, True),
                                                  ("1", None, True)])
def test_each_nodes_first_rank_says_why_it_stopped(monkeypatch, capsys, rank, local_rank, said):
    """fail() said its sentence on rank 0 only: a node of a multi-node run (deepspeed --no_ssh,
    torchrun, `dialtune slurm`) logged only its ranks' exit code 2. Each node's first rank says it."""
    from launch.train import fail

    monkeypatch.setenv("RANK", rank)
    if local_rank is None:  # (an environment without LOCAL_RANK: refused with a sentence someone must say)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as stop:
        fail("a sentence.")
    assert stop.value.code == 2 and (capsys.readouterr().err == "dialtune: error: a sentence.\n") == said
    with pytest.raises(SystemExit):
        fail("ranks did not meet.", every_rank=True)
    assert capsys.readouterr().err == "dialtune: error: ranks did not meet.\n"
