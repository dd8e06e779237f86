"""Non-finite losses, crashes during a checkpoint write, and batch-size bookkeeping."""
import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import ROOT, read_metrics, run_env, train

pytestmark = pytest.mark.slow
BASE = ["recipe=demo", "logger=none", "eval.every_n_steps=0", "eval.at_end=[lm]", "data.eval_files=[]", "export.merge_at_end=false"]


def _env(**kw):
    env = run_env(1)
    env.update(kw)
    return env


def _train_env(overrides, root, nproc, env, check=True, via="deepspeed"):
    from launch.cli import launch_command
    from tests.conftest import torchrun_command

    args = [f"run.root={root}", "train.progress_bar=false", *overrides]
    cmd = torchrun_command(args, nproc) if via == "torchrun" else launch_command(args, nproc)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_nonfinite_loss_on_one_rank_is_skipped_by_all(tmp_path):
    """NaN activations on rank 1 only (the injection poisons the input embeddings, so the backward
    carries NaNs too): both ranks agree, skip the update, count it, and carry on with finite
    weights. ZeRO-0, where no DeepSpeed overflow check stands in (ZeRO-1/2 drop non-finite
    gradients themselves): without zeroing the bad step's gradients, 0 x NaN reached the weights
    through AdamW even at lr=0 and every later loss was NaN."""
    _train_env(BASE + ["train.max_steps=5", "run.name=skip", "deepspeed=zero0"], tmp_path, 2,
               _env(DIALTUNE_INJECT_NAN="3,1"), via="torchrun")
    rows = {r["step"]: r for r in read_metrics(tmp_path / "skip")}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert "train/loss" not in rows[3] and rows[3]["train/skipped_steps"] == 1
    assert "train/grad_norm" not in rows[3] and all(rows[s]["train/grad_norm"] > 0 for s in (1, 2, 4, 5))  # (not the zeroed 0.0)
    assert all(rows[s]["train/loss"] == rows[s]["train/loss"] for s in (1, 2, 4, 5))  # finite
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["finished"]


def test_nonfinite_loss_stop_policy_saves_last_good_state(tmp_path):
    """The last good state is the one before the failed step, its random state too (the failed
    step's forward drew dropout masks): the same as a clean run's after step 2, so a resumed run
    continues as one that never failed."""
    import torch

    p = _train_env(BASE + ["train.max_steps=6", "train.nonfinite=stop", "run.name=stop", "peft.dropout=0.1"], tmp_path, 2,
                   _env(DIALTUNE_INJECT_NAN="3,1"), check=False)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "non-finite loss at step 3 (train.nonfinite=stop)" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text() == "step_0000002"
    assert [r["step"] for r in read_metrics(tmp_path / "stop")] == [1, 2]
    _train_env(BASE + ["train.max_steps=6", "train.stop_after_steps=2", "run.name=clean", "peft.dropout=0.1"], tmp_path, 2, _env())
    for rank in (0, 1):
        failed, clean = (torch.load(tmp_path / run / "checkpoints" / "step_0000002" / f"rng_rank{rank}.pt", weights_only=False)
                         for run in ("stop", "clean"))
        assert torch.equal(failed["torch"], clean["torch"]) and failed["python"] == clean["python"], rank


def test_skip_policy_stops_after_k_in_a_row(tmp_path):
    import torch

    p = _train_env(BASE + ["train.max_steps=8", "train.max_nonfinite_in_row=1", "run.name=k", "train.micro_batch_size=2",
                           "train.grad_accum=1", "train.save_every=1"], tmp_path, 1, _env(DIALTUNE_INJECT_NAN="3-8"), check=False)
    assert p.returncode == 3 and "non-finite loss at step 4" in p.stderr, p.stderr[-2000:]
    # a skipped step changes nothing: not the weights, and not the optimizer's moments or step count (AdamW run at
    # lr 0, as before, decayed both moments and advanced the bias correction)
    good, skipped = (torch.load(tmp_path / "k" / "checkpoints" / f"step_000000{s}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                weights_only=False)["optimizer_state_dict"] for s in (2, 4))
    for key in ("step", "exp_avg", "exp_avg_sq"):
        for a, b in zip(good["base_optimizer_state"]["state"].values(), skipped["base_optimizer_state"]["state"].values()):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    assert all(torch.equal(a, b) for a, b in zip(good["single_partition_of_fp32_groups"], skipped["single_partition_of_fp32_groups"]))
    # step 4 is skipped like step 3 (no parameter change), saved, and then the run stops: a resume with a larger
    # train.max_nonfinite_in_row goes on from step 5 as an uninterrupted run with it would
    assert (tmp_path / "k" / "checkpoints" / "latest").read_text() == "step_0000004"
    ckpt = tmp_path / "k" / "checkpoints" / "step_0000004"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["step"], state["skipped_steps"], state["bad_in_row"]) == (4, 2, 2) and state["code_version"]["git_commit"]
    assert not json.loads((tmp_path / "k" / "summary.json").read_text())["finished"]
    assert "name: k" in (ckpt / "config.yaml").read_text()
    # the count in a row goes on in a resumed job: stopped at step 3 (1 in a row), it stops at step 4 as above
    stopped = _train_env(BASE + ["train.max_steps=8", "train.max_nonfinite_in_row=1", "run.name=k2", "train.micro_batch_size=2",
                                 "train.grad_accum=1", "train.stop_after_steps=3"], tmp_path, 1, _env(DIALTUNE_INJECT_NAN="3-8"))
    assert "training stopped at step 3 of 8" in stopped.stdout
    p = _train_env(BASE + ["train.max_steps=8", "train.max_nonfinite_in_row=1", "run.name=k2", "train.micro_batch_size=2",
                           "train.grad_accum=1", "train.resume=auto"], tmp_path, 1, _env(DIALTUNE_INJECT_NAN="3-8"), check=False)
    assert p.returncode == 3 and ("non-finite loss at step 4 (the 2 in a row are more than train.max_nonfinite_in_row=1 "
                                  "allows; train.nonfinite=skip)") in p.stderr, p.stderr[-2000:]


def test_kill_9_during_checkpoint_write_resumes_from_previous_complete_one(tmp_path):
    from tests.conftest import torchrun_command

    args = [f"run.root={tmp_path}", "train.progress_bar=false"] + BASE + ["train.max_steps=6", "train.save_every=2", "run.name=crash"]
    env = _env(DIALTUNE_CKPT_PAUSE="4", DIALTUNE_CKPT_PAUSE_MARKER=str(tmp_path))
    proc = subprocess.Popen(torchrun_command(args, 2), env=env, cwd=str(ROOT), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "ckpt_paused").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    # the launcher and both ranks, mid-checkpoint: torchrun starts each rank in its own session,
    # so the launcher's process group alone would leave the ranks running on as orphans
    import psutil

    ranks = psutil.Process(proc.pid).children(recursive=True)
    assert len(ranks) >= 2
    os.killpg(proc.pid, signal.SIGKILL)
    for rank in ranks:
        rank.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(ranks, timeout=60)
    assert not [r for r in ranks if r.is_running() and r.status() != psutil.STATUS_ZOMBIE]
    ckpts = tmp_path / "crash" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000002"
    assert (ckpts / "step_0000004.tmp").is_dir() and not (ckpts / "step_0000004").exists()
    train(BASE + ["train.max_steps=6", "train.save_every=2", "run.name=crash", "train.resume=auto"], tmp_path, nproc=2, via="torchrun")
    assert [r["step"] for r in read_metrics(tmp_path / "crash")] == [1, 2, 3, 4, 5, 6]
    assert not (ckpts / "step_0000004.tmp").exists()
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004", "step_0000006"]


def test_keep_last_k_checkpoints(tmp_path):
    train(BASE + ["train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=2", "run.name=k",
                  "train.micro_batch_size=2", "train.grad_accum=1"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000004"]


def test_global_batch_size_not_a_multiple_of_the_micro_batch_is_one_sentence(tmp_path):
    """(How train.global_batch_size derives the accumulation: test_e2e's token-weighted loss test.)"""
    p = train(BASE + ["train.max_steps=1", "train.micro_batch_size=3", "train.global_batch_size=8", "run.name=h"],
              tmp_path, check=False)
    assert p.returncode == 2 and "not a multiple of micro_batch_size 3" in p.stderr and "Traceback" not in p.stderr


def test_a_run_directory_not_shared_by_all_ranks_is_refused(tmp_path):
    """Ranks on nodes without a shared run.root would each keep their own checkpoints (only rank 0
    writes `latest`), and a resume would start ranks at different steps: stopped at start with one
    sentence. Simulated with a run.root that differs per rank."""
    root = "'" + str(tmp_path) + "/${oc.env:LOCAL_RANK}'"
    p = _train_env(BASE + ["train.max_steps=2", "run.name=split"], root, 2, _env(), check=False, via="torchrun")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]  # (plain torchrun adds its own ChildFailedError report)
    assert "1 of 2 ranks cannot see what rank 0 writes in" in out and "filesystem that every node mounts" in out, out[-3000:]
    assert not list(tmp_path.glob("*/split/checkpoints/*"))


def test_a_failing_end_of_training_eval_costs_no_weights(tmp_path):
    """The end-of-training parts that generate (intent, response: slow, and where a GPU runs out of
    memory) run after the final checkpoint is saved, with the held-out loss measured before it: a
    failure there leaves the trained weights and the loss on disk, and the rerun finishes the run
    (summary and merge, replacing an earlier job's summary) without training again."""
    args = BASE[:3] + ["eval.at_end=[lm,response]", "eval.response_conversations=2", "data.eval_files=[]",
                       "data.eval_fraction=0.05", "train.max_steps=2", "run.name=late"]
    train(args + ["train.stop_after_steps=1"], tmp_path)  # an earlier job: its summary.json (step 1, unfinished) stays behind
    proc = train(args + ["train.resume=auto"], tmp_path, check=False, extra_env={"DIALTUNE_INJECT_EVAL_ERROR": "response"})
    assert proc.returncode != 0 and "injected failure of the response evaluation" in proc.stderr
    run = tmp_path / "late"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert (run / "checkpoints" / "step_0000002" / "adapter" / "adapter_model.safetensors").is_file()
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["step"] == 2 and "lm" in results and "response" not in results
    proc = train(args + ["train.resume=auto"], tmp_path)
    assert "its end-of-training evaluation did not finish" in proc.stdout + proc.stderr
    summary = json.loads((run / "summary.json").read_text())  # this run's, not the earlier job's
    assert summary["finished"] and summary["steps"] == 2 and summary["merged"]
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2]  # nothing trained again
    # the held-out loss the failed job measured at step 2, before its final save, is the summary's (it was left out)
    last = {k: v for r in read_metrics(run) if r["step"] == 2 for k, v in r.items() if k.startswith("eval")}
    assert last["eval/loss"] == results["lm"]["rows"][0]["loss"] and {k: summary[k] for k in last} == last
    # a line a killed job left half-written in metrics.jsonl is dropped on resume, not a traceback
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "time": 17')
    proc = train(args + ["train.resume=auto", "train.max_steps=3"], tmp_path)
    assert "1 unreadable line(s) (a job killed while writing) left out" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(run) if "train/loss" in r] == [1, 2, 3]
