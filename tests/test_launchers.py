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
