"""Preemption with real signals on a 2-process run: SIGUSR1 sets a flag, both ranks stop at the
same step boundary, save, and exit with the requeue code; resume continues from that step."""
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from launch import slurm
from tests.conftest import ROOT, read_metrics, run_env, train
from train.signals import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow


def test_requeue_code_is_shared_with_the_slurm_script():
    assert slurm.REQUEUE_EXIT_CODE == REQUEUE_EXIT_CODE == 85


def test_sigusr1_saves_and_exits_85_then_resume_continues(tmp_path):
    from launch.cli import launch_command

    args = [f"run.root={tmp_path}", "train.progress_bar=false", "recipe=demo", "train.max_steps=200", "logger=none",
            "eval.every_n_steps=0", "eval.at_end=[lm]", "data.eval_files=[]", "export.merge_at_end=false", "run.name=pre"]
    proc = subprocess.Popen(launch_command(args, 2), env=run_env(1), cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "pre" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if any(a.startswith("--local_rank=") for a in p.cmdline())]
    assert len(ranks) == 2
    for p in ranks:  # what SLURM does: every process of the step gets the signal
        os.kill(p.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-3000:]
    assert "asking to be requeued" in out
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] and 2 <= stopped < 200
    assert (tmp_path / "pre" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == list(range(1, stopped + 1))
    train(args[2:] + ["train.resume=auto", "train.stop_after_steps=1"], tmp_path, nproc=2)
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == list(range(1, stopped + 2))
