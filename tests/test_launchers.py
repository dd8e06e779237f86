"""The multi-node launch paths, exercised on one node with 2 CPU ranks: the deepspeed launcher
with a hostfile and --no_ssh (what each node runs in a no-ssh multi-node job), and torchrun's
env rendezvous (what `dialtune slurm` starts on every node)."""
import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TRAIN_PY, read_metrics, run_env

pytestmark = pytest.mark.slow
ARGS = ["recipe=demo", "train.max_steps=2", "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0", "eval.at_end=[lm]",
        "data.eval_files=[]", "train.progress_bar=false"]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["deepspeed_hostfile_no_ssh", "torchrun"])
def test_launcher(tmp_path, launcher):
    port = str(_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", port, str(TRAIN_PY)]
    else:
        (tmp_path / "hosts").write_text("localhost slots=2\n")
        cmd = [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()", "--hostfile", str(tmp_path / "hosts"),
               "--no_ssh", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", port, str(TRAIN_PY)]
    p = subprocess.run(cmd + ARGS + [f"run.root={tmp_path}"], env=run_env(1), capture_output=True, text=True,
                       timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["world_size"] == 2
    assert [r["step"] for r in read_metrics(tmp_path / "demo")] == [1, 2]


def _two_nodes(tmp_path, node_args, timeout=300):
    """Two torchrun "nodes" of one rank each on this machine (env rendezvous, as on a cluster), each
    with its own extra overrides; returns their finished processes."""
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port, str(TRAIN_PY)]
                              + ARGS + extra, env=run_env(1), cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for n, extra in enumerate(node_args)]
    try:
        for p in procs:
            p.stdout_text, p.stderr_text = p.communicate(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    return procs


def test_a_problem_of_one_node_only_stops_every_node_with_its_sentence(tmp_path):
    """A start-up problem only one node has (its own data.cache_dir path, a node-local data file that
    fails to build) stops both nodes at once with one sentence naming the rank and host: rank 1's
    refusal was silent (rank 0 alone prints) and node 0 waited in a collective for 30 minutes. A
    refused run leaves no run directory on either node's (node-local) run.root."""
    (tmp_path / "afile").write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "hi"}]}\n')
    host = socket.gethostname()
    for roots, node1, said in [
        (["root0", "root1"], [f"data.cache_dir={tmp_path / 'afile' / 'sub'}"], "data.cache_dir="),  # validate() on node 1 only
        (["root", "root"], ["data=custom", f"data.train_files=[{bad}]"], f"{bad}:1:"),  # node 1's own data build fails
    ]:
        procs = _two_nodes(tmp_path, [[f"run.root={tmp_path / roots[0]}", f"data.cache_dir={tmp_path / 'cache'}"],
                                      [f"run.root={tmp_path / roots[1]}"] + node1])
        assert all(p.returncode == 1 for p in procs), procs[0].stderr_text[-2000:]  # (torchrun: 1 for a failed rank)
        head = f"dialtune: error: rank 1 on {host} (1 of 2 ranks): "
        lines = [ln for ln in procs[0].stderr_text.splitlines() if ln.startswith("dialtune: error:")]
        assert len(lines) == 1 and lines[0].startswith(head) and said in lines[0], procs[0].stderr_text[-3000:]
        # node 1's own log says it too (its first rank, LOCAL_RANK 0), once: not only "exits with code 2"
        assert [ln for ln in procs[1].stderr_text.splitlines() if ln.startswith("dialtune: error:")] == lines, \
            procs[1].stderr_text[-3000:]
        assert f'File "{ROOT}' not in procs[0].stderr_text + procs[1].stderr_text  # (torchrun prints its own ChildFailedError)
    assert not (tmp_path / "root0" / "demo").exists() and not (tmp_path / "root1" / "demo").exists()  # refused at start
