"""Where a resume continues and what it refuses: another micro_batch_size continues at the same
example of the epoch's order; another number of ranks is refused in one sentence (the optimizer
state and the random state are per rank); checkpoint rotation after resuming an earlier
checkpoint keeps this run's newest; a fresh start sets an earlier run's results and checkpoints aside; a `latest` naming a missing checkpoint."""
import json

import pytest

from tests.conftest import read_metrics, train
from train.config import ConfigError


def _checkpoint(root, step, world, mb, pos, epoch=0, with_world=True, gas=1):
    d = root / f"step_{step:07d}"
    d.mkdir(parents=True)
    state = {"step": step, "epoch": epoch, "pos": pos, **({"world_size": world, "micro_batch_size": mb, "grad_accum": gas}
                                                          if with_world else {})}
    (d / "trainer_state.json").write_text(json.dumps(state))
    (d / "config.yaml").write_text(f"train:\n  micro_batch_size: {mb}\n  grad_accum: {gas}\n")
    for r in range(world):
        (d / f"rng_rank{r}.pt").write_bytes(b"")
    (root / "latest").write_text(d.name)
    return d.name


@pytest.mark.parametrize("with_world", [True, False])  # False: a checkpoint of before world_size was kept (rng files, config.yaml)
def test_resume_position_translates_the_micro_batch_and_refuses_other_ranks(tmp_path, with_world):
    from train.resume import resume_position

    tag = _checkpoint(tmp_path, 4, world=2, mb=2, pos=6, epoch=1, with_world=with_world)  # 6 x 2 x 2 = 24 items into epoch 1
    root = str(tmp_path)
    assert resume_position(root, tag, world=2, mb=2) is None
    assert resume_position(root, tag, world=2, mb=4) == (1, 3)
    assert resume_position(root, tag, world=2, mb=1, n_items=100) == (1, 12)
    with pytest.raises(ConfigError, match=r"stopped 24 items into epoch 1 \(micro_batch_size 2 x 2 rank\(s\)\), which "
                                          r"train.micro_batch_size=5 x 2 does not divide: resume with micro_batch_size 2 or 3 or 4 or 6\."):
        resume_position(root, tag, world=2, mb=5)
    with pytest.raises(ConfigError, match=r"was written by 2 rank\(s\), this run has 1: resume it with 2"):
        resume_position(root, tag, world=1, mb=2)
    # at the end of its epoch (6 micro-batches of 2 x 2 of 24 items): the next epoch, whatever the new size
    assert resume_position(root, tag, world=2, mb=5, n_items=24) == (2, 0)
    # a run measured in epochs: another number of items a step would change what its steps count
    with pytest.raises(ConfigError, match=r"trained 2 items per rank a step \(micro_batch_size 2 x grad_accum 1\), this run 4: "
                                          r"a run measured in train.epochs .* keep 2 \(micro_batch_size 2\), or set train.max_steps"):
        resume_position(root, tag, world=2, mb=4, gas=1, epochs=1)
    assert resume_position(root, tag, world=2, mb=1, gas=2, epochs=1) == (1, 12)  # 2 x 1 = 1 x 2: the same steps
    # the same items a step, but not the same steps: 2 epochs of 9 items are 4 steps of 2 x 3 (5 + 5 micro-batches, the
    # last of each filled up), 3 of 3 x 2 (3 + 3): the schedule would be another run's
    tag = _checkpoint(tmp_path / "nine", 1, world=1, mb=2, pos=3, gas=3)
    with pytest.raises(ConfigError, match=r"belongs to a run of 4 steps \(2 epoch\(s\) of 9 items in micro-batches of 2 x grad_accum 3\), "
                                          r"which micro_batch_size 3 x grad_accum 2 make 3: .* keep micro_batch_size 2 and grad_accum 3"):
        resume_position(str(tmp_path / "nine"), tag, world=1, mb=3, gas=2, n_items=9, epochs=2)


def test_rotation_after_resuming_an_earlier_checkpoint_keeps_this_runs_newest(tmp_path):
    from train.checkpoint import rotate

    for step in (2, 4, 6, 8):  # this run's, before it resumed step_2 (train.resume=<run_dir>/checkpoints/step_0000002)
        (tmp_path / f"step_{step:07d}").mkdir()
    (tmp_path / "step_0000002").mkdir(exist_ok=True)  # the first save after that resume
    rotate(str(tmp_path), "step_0000002", keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000006", "step_0000008"]
    (tmp_path / "step_0000004").mkdir()
    rotate(str(tmp_path), "step_0000004", keep=3, best="step_0000008")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000004", "step_0000008"]
    (tmp_path / "step_0000006").mkdir()
    rotate(str(tmp_path), "step_0000006", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000006"]


def test_a_fresh_run_sets_an_earlier_runs_results_aside(tmp_path):
    """Rerunning a run name afresh (train.resume=none, the default) and stopping early: its summary,
    report and chat must not read the earlier run's summary.json and merged/ as this run's."""
    args = ["recipe=demo", "logger=none", "eval.every_n_steps=0", "eval.at_end=[]", "run.name=again"]
    train(args + ["train.max_steps=2"], tmp_path)
    run = tmp_path / "again"
    assert json.loads((run / "summary.json").read_text())["finished"] and (run / "merged").is_dir()
    proc = train(args + ["train.max_steps=4", "train.stop_after_steps=1", "optim.lr=1e-3"], tmp_path)
    earlier = [p for p in run.iterdir() if p.name.startswith("earlier-")]
    assert len(earlier) == 1 and f"moved to {earlier[0]}" in proc.stdout + proc.stderr
    assert json.loads((earlier[0] / "summary.json").read_text())["steps"] == 2 and (earlier[0] / "merged" / "config.json").is_file()
    assert "max_steps: 2" in (earlier[0] / "config.yaml").read_text() and "max_steps: 4" in (run / "config.yaml").read_text()
    assert [r["step"] for r in read_metrics(earlier[0]) if "train/loss" in r] == [1, 2]
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1] and not (run / "merged").exists()
    assert not json.loads((run / "summary.json").read_text()).get("finished")
    # its checkpoints too: this run's step 2 would have replaced the earlier run's, and a crash
    # before this run's first save would have left resume=auto to continue the earlier run
    assert sorted(p.name for p in (earlier[0] / "checkpoints").glob("[ls]*")) == ["latest", "step_0000002"]
    assert sorted(p.name for p in (run / "checkpoints").glob("[ls]*")) == ["latest", "step_0000001"]
    assert f"train.resume={earlier[0] / 'checkpoints'} starts a run from its latest checkpoint (step_0000002)" in proc.stdout + proc.stderr
    quick = args + ["export.merge_at_end=false"]  # (from here on nothing reads a merge)
    _killed_in_first_save(quick + ["train.max_steps=3", "train.save_every=1"], tmp_path)
    assert not (run / "checkpoints" / "latest").exists() and not (run / "summary.json").exists()
    proc = train(quick + ["train.max_steps=3", "train.resume=auto"], tmp_path)
    said = proc.stdout + proc.stderr
    assert "no finished checkpoint" in said and "resumed from" not in said and "moved to" in said
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3]
    # starting from another run's checkpoint (train.resume=<run>) in a directory an earlier run used is
    # a new run there too: the earlier results are set aside, not continued with the other run's steps
    copy = tmp_path / "copy"
    train(quick + ["run.name=copy", "train.max_steps=3"], tmp_path)
    proc = train(quick + ["run.name=copy", "train.max_steps=4", f"train.resume={run}"], tmp_path)
    earlier = [p for p in copy.iterdir() if p.name.startswith("earlier-")]
    assert len(earlier) == 1 and f"moved to {earlier[0]}" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(earlier[0]) if "train/loss" in r] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(copy) if "train/loss" in r] == [4]  # (from the third run at step 3)


def _killed_in_first_save(overrides, root):
    """A fresh one-rank run killed (SIGKILL) while it writes its first checkpoint."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, TRAIN_PY, run_env

    env = {**run_env(2), "DIALTUNE_CKPT_PAUSE": "1", "DIALTUNE_CKPT_PAUSE_MARKER": str(root)}
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY), f"run.root={root}", "train.progress_bar=false", *overrides],
                            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (root / "ckpt_paused").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=60)
    os.remove(root / "ckpt_paused")


def test_latest_naming_a_missing_checkpoint_is_one_sentence(tmp_path):
    from train.resume import resume_path

    _checkpoint(tmp_path, 2, world=1, mb=2, pos=2)
    (tmp_path / "latest").write_text("step_0000004")
    with pytest.raises(ValueError, match=r"names step_0000004, which is not a complete checkpoint there .*train.resume=.*step_0000002 "
                                         r"continues from one that is kept, train.resume=none starts afresh"):
        resume_path(str(tmp_path))


@pytest.mark.slow
def test_a_resume_with_another_micro_batch_trains_the_next_examples_and_other_ranks_are_refused(tmp_path):
    """Steps 1-4 at micro_batch_size 2 read examples 0-7 of the epoch's order; resumed at 4, one step
    reads 8-11: the two steps 5 and 6 of an uninterrupted run at size 2 (same target tokens), not
    16-19 as the position counted in old-size micro-batches would say. Two ranks on a one-rank
    checkpoint: refused in one sentence (exit 2), before DeepSpeed's own error."""
    args = ["recipe=demo", "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0", "eval.at_end=[]",
            "data.eval_files=[]", "train.micro_batch_size=2", "train.grad_accum=1", "data.packing=false"]
    train(args + ["train.max_steps=6", "run.name=ref"], tmp_path)
    train(args + ["train.max_steps=6", "run.name=mb", "train.stop_after_steps=4"], tmp_path)
    proc = train(args + ["train.max_steps=6", "run.name=mb", "train.resume=auto"], tmp_path, nproc=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert proc.returncode == 2 and errors and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "step_0000004 was written by 1 rank(s), this run has 2: resume it with 1" in errors[0]
    proc = train(args + ["train.max_steps=5", "run.name=mb", "train.resume=auto", "train.micro_batch_size=4"], tmp_path)
    assert "micro-batch 4 of epoch 0 at the old size is 2 of epoch 0 at the new one" in proc.stdout + proc.stderr
    ref = {r["step"]: r for r in read_metrics(tmp_path / "ref") if "perf/target_tokens" in r}
    mb = {r["step"]: r for r in read_metrics(tmp_path / "mb") if "perf/target_tokens" in r}
    assert [mb[s]["perf/target_tokens"] for s in (1, 2, 3, 4)] == [ref[s]["perf/target_tokens"] for s in (1, 2, 3, 4)]
    assert mb[5]["perf/target_tokens"] == ref[5]["perf/target_tokens"] + ref[6]["perf/target_tokens"]
    assert mb[5]["train/epoch"] == pytest.approx(ref[6]["train/epoch"], abs=0.02)


def test_a_requeued_slurm_job_continues_from_its_own_checkpoint(tmp_path, monkeypatch):
    """train.resume=<another run> (or none) starts the first job; a requeue of that job continues
    from what it saved itself, not from the start again (it would redo every step at every requeue)."""
    from train.resume import find_resume

    other = tmp_path / "other"
    _checkpoint(other, 10, world=1, mb=2, pos=10)
    own = tmp_path / "run" / "checkpoints"
    tag = _checkpoint(own, 17, world=1, mb=2, pos=17)
    state = json.loads((own / tag / "trainer_state.json").read_text())
    (own / tag / "trainer_state.json").write_text(json.dumps({**state, "slurm_job_id": "77"}))
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    assert find_resume(str(other), str(own)) == (str(other), "step_0000010")  # not a SLURM job
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert find_resume(str(other), str(own)) == (str(other), "step_0000010")  # the job's first start
    assert find_resume("none", str(own)) is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert find_resume(str(other), str(own)) == find_resume("none", str(own)) == (str(own), "step_0000017")
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job's checkpoint in this run directory: not this job's to take
    assert find_resume(str(other), str(own)) == (str(other), "step_0000010")
