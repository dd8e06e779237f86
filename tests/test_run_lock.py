"""One training at a time per run directory (train/run_lock.py): a second training started into a
directory another one is training in is refused in one sentence and leaves the first's files alone."""
import json
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, TRAIN_PY, read_metrics, run_env, train


def test_claim_is_per_process_and_released_for_a_sweeps_next_job(tmp_path):
    from train.run_lock import claim, held_elsewhere

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert claim(str(a)) is None and claim(str(a)) is None  # (again: still ours)
    probe = ("import sys; from train.run_lock import claim, held_elsewhere; "
             "print(held_elsewhere(sys.argv[1])); print(claim(sys.argv[1], wait_other_host_s=0))")
    out = subprocess.run([sys.executable, "-c", probe, str(a)], capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
    held, said = out.splitlines()
    assert held == "True" and said.startswith(f"{a} is in use by another training (pid ") and "another run.name" in said
    assert not held_elsewhere(str(a))  # (this process's own)
    in_use = ("import sys; from train.run_lock import in_use_problem; print(in_use_problem(sys.argv[1]))")
    said = subprocess.run([sys.executable, "-c", in_use, str(a)], capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
    assert said.startswith(f"{a} is in use by another training (pid ")  # (before Hydra writes into it)
    lock = a / ".dialtune-lock"
    mine = lock.read_text()
    lock.write_text("othernode 4242 2026-11-29 10:00:00\n")  # a holder on another host (a crashed node's NFS lock):
    said = subprocess.run([sys.executable, "-c", in_use, str(a)], capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
    assert said.strip() == "None"  # left to claim(), which waits for the lease before it refuses
    out = subprocess.run([sys.executable, "-c", probe, str(a)], capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
    assert out.splitlines()[1].startswith(f"{a} is in use by another training (pid 4242 on othernode, started 2026-11-29 10:00:00)")
    lock.write_text(mine)
    assert claim(str(b)) is None  # a sweep's next job: the first directory is released
    out = subprocess.run([sys.executable, "-c", probe, str(a)], capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
    assert out.splitlines() == ["False", "None"]


def test_a_second_training_into_a_busy_run_directory_is_refused(tmp_path):
    args = [f"run.root={tmp_path}", "run.name=busy", "recipe=demo", "logger=none", "train.max_steps=400", "eval.at_end=[]",
            "eval.every_n_steps=0", "export.merge_at_end=false", "train.progress_bar=false"]
    first = subprocess.Popen([sys.executable, str(TRAIN_PY), *args], env=run_env(1), cwd=str(ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "busy" / "metrics.jsonl").is_file() or not read_metrics(tmp_path / "busy"):
            assert first.poll() is None and time.time() < deadline, "the first training did not start"
            time.sleep(0.5)
        record = (tmp_path / "busy" / "hydra" / "overrides.yaml").read_text()
        second = train(["run.name=busy", "logger=none", "train.max_steps=2", "optim.lr=1e-3"], tmp_path, check=False)
        assert (tmp_path / "busy" / "hydra" / "overrides.yaml").read_text() == record  # (refused before Hydra wrote its own)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"dialtune: error: {tmp_path / 'busy'} is in use by another training (pid {first.pid} on " in second.stderr
        assert not [p for p in (tmp_path / "busy").iterdir() if p.name.startswith("earlier-")]  # nothing set aside
        assert (tmp_path / "busy" / "config.yaml").is_file() and "max_steps: 400" in (tmp_path / "busy" / "config.yaml").read_text()
    finally:
        first.send_signal(signal.SIGTERM)  # saves a checkpoint, exit 143
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 143, out[-3000:]
    assert json.loads((tmp_path / "busy" / "summary.json").read_text())["steps"] > 0


def test_a_refused_resume_leaves_the_runs_config_yaml(tmp_path):
    """config.yaml is written once the run is sure to start: a resume refused for a changed adapter
    left the refused settings there, and merge/eval of the run then used them."""
    args = ["recipe=demo", "logger=none", "run.name=kept", "eval.at_end=[]", "export.merge_at_end=false"]
    train(args + ["train.max_steps=4", "train.stop_after_steps=2"], tmp_path)
    before = (tmp_path / "kept" / "config.yaml").read_text()
    proc = train(args + ["train.max_steps=4", "train.resume=auto", "peft.r=4"], tmp_path, check=False)
    assert proc.returncode == 2 and "was trained with peft.r=16, this run has peft.r=4" in proc.stderr
    assert (tmp_path / "kept" / "config.yaml").read_text() == before
