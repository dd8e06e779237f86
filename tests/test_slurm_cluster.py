"""`dialtune slurm` jobs on a real one-node SLURM cluster brought up by .ci/setup_slurm.sh: a tiny
training job, SIGUSR1 -> checkpoint -> exit 85 -> requeue -> resume, and a preempted job that
resumes from its saved step. (The rendered script and the node launcher: test_slurm.py.)"""
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from launch.slurm import render
from tests.conftest import ROOT, read_metrics
from tests.test_slurm import WORKER  # the stand-in rank: the node-launcher tests use it too


@pytest.fixture(scope="module")
def slurm():
    """Bring up the cluster with .ci/setup_slurm.sh; skip (saying why) when that fails."""
    try:
        proc = subprocess.run(["bash", str(ROOT / ".ci" / "setup_slurm.sh")], capture_output=True, text=True,
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("no SLURM cluster: .ci/setup_slurm.sh did not finish within 300 s")
    if proc.returncode != 0:
        reason = [l for l in proc.stderr.splitlines() if "error:" in l] or proc.stderr.strip().splitlines()[-1:]
        pytest.skip(f"no SLURM cluster: {reason[-1] if reason else 'setup_slurm.sh failed'}")
    conf = next(l.split("=", 1)[1] for l in proc.stdout.splitlines() if l.startswith("export SLURM_CONF="))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _job_state(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _job_ids(name: str) -> list:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout
    return out.split()


class Guard:
    """Cancel jobs that outlive the test, and fail fast on a job that can never start."""

    def __init__(self, timeout):
        self.deadline = time.time() + timeout
        self.jobs = set()

    def check(self, job_id):
        self.jobs.add(job_id)
        st = _job_state(job_id)
        if st.get("JobState") == "PENDING" and st.get("Reason") in ("PartitionConfig", "BadConstraints",
                                                                     "ReqNodeNotAvail", "PartitionNodeLimit"):
            raise AssertionError(f"job {job_id} can never start on this cluster: Reason={st['Reason']}")
        if time.time() > self.deadline:
            raise AssertionError(f"job {job_id} still {st.get('JobState')} (Reason={st.get('Reason')}) at the timeout")
        return st

    def cancel(self):
        for j in self.jobs:
            subprocess.run(["scancel", j], capture_output=True)


def _signal_and_wait(guard, job):
    """SIGUSR1 to the job step (what --signal=USR1@N does), then wait for the job to end."""
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    while True:
        st = guard.check(job)
        if st.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return st
        time.sleep(0.5)


def _submit_and_wait_for_steps(tmp_path, run_name, overrides, steps=3, **env):
    """`dialtune slurm` a tiny training job (run.root=tmp_path, log dir tmp_path/logs) and wait until
    it has logged `steps` steps; (job id, its Guard: cancel it when done)."""
    name = f"dt-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **env)
    out = subprocess.run([sys.executable, "-m", "launch.cli", "slurm", "--nodes", "1", "--nproc-per-node", "1", "--job-name", name,
                          "--log-dir", str(tmp_path / "logs"), f"run.root={tmp_path}", f"run.name={run_name}", "recipe=demo",
                          "export.merge_at_end=false", "eval.every_n_steps=0", "data.eval_files=[]", "train.micro_batch_size=2",
                          *overrides], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=60)
    assert out.returncode == 0, out.stderr
    job = _job_ids(name)[0]
    guard = Guard(timeout=300)
    metrics = tmp_path / run_name / "metrics.jsonl"
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
            guard.check(job)
            time.sleep(0.3)
    except BaseException:
        guard.cancel()
        raise
    return job, guard


@pytest.mark.slow
def test_real_cluster_tiny_training_job(slurm, tmp_path):
    name = f"dt-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-m", "launch.cli", "slurm", "--wait", "--nodes", "1",
                          "--nproc-per-node", "1", "--job-name", name, f"run.root={tmp_path}", "train.max_steps=3",
                          "train.micro_batch_size=2", "logger=none", "export.merge_at_end=false",
                          "train.progress_bar=false"], cwd=str(ROOT), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    guard = Guard(timeout=150)
    try:
        while p.poll() is None:
            for j in _job_ids(name):
                guard.check(j)
            if time.time() > guard.deadline:
                raise AssertionError("dialtune slurm --wait did not return in time")
            time.sleep(1)
        out = p.stdout.read()
    finally:
        if p.poll() is None:
            guard.cancel()
            p.kill()
    logs = list((tmp_path / "slurm-logs").glob(f"{name}-*.out"))
    log = logs[0].read_text() if logs else "(no log)"
    assert p.returncode == 0, f"{out}\n--- job log ---\n{log[-6000:]}"
    assert len(logs) == 1 and (tmp_path / "slurm-logs" / f"{name}.sbatch").is_file()
    assert "dialtune: training finished" in log and "(restart 0)" in log
    runs = list(tmp_path.glob("tiny-lora-none-*"))  # the run name pinned at submit time
    assert len(runs) == 1 and re.fullmatch(r"tiny-lora-none-\d{8}-\d{6}-\d+", runs[0].name), runs
    run_dir = runs[0]
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2, 3]
    assert "resume: auto" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_real_cluster_usr1_checkpoint_exit_85_requeues(slurm, tmp_path):
    """The whole contract on the real scheduler: SIGUSR1 to the job step reaches the rank through
    the per-node launcher, the rank exits 85, the batch script requeues the job, and the job
    runs again (same id, SLURM_RESTART_COUNT=1) and completes."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    script = tmp_path / "job.sbatch"
    script.write_text(render([f"out={tmp_path}", "run.name=$(touch /tmp/dialtune-pwned-slurm)"],
                             nproc_per_node=1, job_name=f"dt-{uuid.uuid4().hex[:8]}", log_dir=str(tmp_path),
                             train_script=str(worker), workdir=str(tmp_path)))
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=30)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip().split(";")[0]
    guard = Guard(timeout=90)
    guard.jobs.add(job)
    try:
        while not (tmp_path / "ready").exists():
            assert guard.check(job).get("JobState") in ("PENDING", "CONFIGURING", "RUNNING"), _job_state(job)
            time.sleep(0.2)
        st = _signal_and_wait(guard, job)
    finally:
        guard.cancel()
    log = next(tmp_path.glob("*.out")).read_text()
    assert st["JobState"] == "COMPLETED" and st["Restarts"] == "1" and st["ExitCode"] == "0:0", (st, log)
    assert "(restart 0)" in log and "(restart 1)" in log and "asked to be requeued" in log, log
    assert (tmp_path / "signalled").read_text() in ("1", "2")
    for restart in ("0", "1"):
        rec = json.loads((tmp_path / f"argv-{restart}.json").read_text())
        assert rec["argv"] == [f"out={tmp_path}", "run.name=$(touch /tmp/dialtune-pwned-slurm)", "train.resume=auto", "train.progress_bar=false"]
    assert not Path("/tmp/dialtune-pwned-slurm").exists()


@pytest.mark.slow
def test_real_cluster_preempted_training_resumes_from_saved_step(slurm, tmp_path):
    """Real training under the real scheduler: SIGUSR1 to the job step -> the ranks save and exit
    85 -> the script requeues -> the job comes back (same id) with train.resume=auto and continues
    from the saved step to the end."""
    job, guard = _submit_and_wait_for_steps(tmp_path, "pre", ["train.max_steps=30", "logger=none", "eval.at_end=[lm]",
                                                              "train.progress_bar=false", "train.grad_accum=1"])
    try:
        st = _signal_and_wait(guard, job)
    finally:
        guard.cancel()
    log = next((tmp_path / "logs").glob("*.out")).read_text()
    assert st["JobState"] == "COMPLETED" and st["Restarts"] == "1", (st, log[-4000:])
    assert "asking to be requeued" in log and "training finished" in log, log[-4000:]
    summary = json.loads((tmp_path / "pre" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 30
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == list(range(1, 31))


@pytest.mark.slow
def test_real_cluster_sigterm_to_the_batch_shell_saves_with_wandb_on(slurm, tmp_path):
    """SIGTERM to the batch shell (`scancel --batch`, a preemption's grace signal): it goes on to the
    step's tasks through SLURM (srun, given SIGTERM itself, kills the step at once: exit 137, no
    checkpoint), every process of the step gets it, W&B's service too, and the job still saves and
    exits 143 without a traceback (W&B off, said once)."""
    job, guard = _submit_and_wait_for_steps(tmp_path, "term", ["train.max_steps=60", "logger=wandb", "logger.mode=offline",
                                                               "eval.at_end=[]"], WANDB_MODE="offline")
    try:
        subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True, timeout=30)
        while (st := guard.check(job)).get("JobState") in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING"):
            time.sleep(0.5)
    finally:
        guard.cancel()
    log = next((tmp_path / "logs").glob("*.out")).read_text()
    assert st["ExitCode"] == "143:0" and st["Restarts"] == "0", (st, log[-4000:])
    assert "stopped by SIGTERM after step" in log and "Traceback" not in log and "forcing job termination" not in log, log[-4000:]
    stopped = json.loads((tmp_path / "term" / "summary.json").read_text())["steps"]
    assert (tmp_path / "term" / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:07d}"


def test_real_cluster_wait_says_when_sbatch_refused_the_job(slurm, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "slurm", "--wait", "--partition", "nosuch", "--log-dir",
                           str(tmp_path / "logs"), f"run.root={tmp_path}", "recipe=demo"], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60)
    assert proc.returncode != 0 and "dialtune: error: sbatch failed with exit code" in proc.stderr, proc.stderr
    assert "finished with exit code" not in proc.stderr
