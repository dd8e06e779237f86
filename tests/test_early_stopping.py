"""Early stopping (eval.early_stopping_patience) on CPU with the embedded tiny model.

Trained on answers that say "yes" and evaluated on the same questions answered "no", the held-out
loss stops improving within a few steps. Checked: the run stops at the first evaluation that
completes `patience` evaluations in a row without an improvement larger than min_delta (computed
here from the logged held-out losses), ends as a finished run (end-of-training eval, checkpoint,
merge of the lowest-loss checkpoint with export.checkpoint=best), a requeued job finds it finished,
a job stopped before the early stop resumes to the same stop with the same losses (the count is in
the checkpoint), and a resume with the patience off trains on to train.max_steps.
"""
import json
from pathlib import Path

import pytest

from tests.conftest import read_metrics, train
from tests.data_helpers import conv, jsonl

pytestmark = pytest.mark.slow

PATIENCE, MIN_DELTA, MAX_STEPS = 2, 1e-3, 10


def expected_stop(evals, patience, min_delta):
    """The step early stopping should end at, from {step: held-out loss}; None: it never should."""
    best, bad = None, 0
    for step in sorted(evals):
        if best is None or evals[step] < best - min_delta:
            best, bad = evals[step], 0
        else:
            bad += 1
        if bad >= patience:
            return step
    return None


def _evals(run):
    return {r["step"]: r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r}


def _summary(run):
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    questions = [f"can I change order {i} to another address" for i in range(24)]
    yes = jsonl(root / "yes.jsonl", [conv(i, q, "yes " * 12) for i, q in enumerate(questions)])
    no = jsonl(root / "no.jsonl", [conv(100 + i, q, "no " * 12) for i, q in enumerate(questions[:8])])
    args = ["data=custom", f"data.train_files=[{yes}]", f"data.eval_files=[{no}]", f"train.max_steps={MAX_STEPS}",
            "train.save_every=2", "eval.every_n_steps=1", f"eval.early_stopping_patience={PATIENCE}",
            f"eval.early_stopping_min_delta={MIN_DELTA}", "export.checkpoint=best", "logger=none", "eval.at_end=[lm]",
            "export.eval_conversations=4", "train.micro_batch_size=4"]
    proc = train(args + ["run.name=whole"], root)
    return root, args, proc, _evals(root / "whole")  # (as early-stopped: a test below trains "whole" on)


def test_stops_at_the_first_evaluation_that_uses_up_the_patience(runs):
    root, _, proc, evals = runs
    run = root / "whole"
    stop = expected_stop(evals, PATIENCE, MIN_DELTA)
    assert stop is not None and stop < MAX_STEPS, evals  # the case this test is for
    assert max(evals) == stop, evals  # nothing evaluated (or trained) after the stop
    assert max(r["step"] for r in read_metrics(run)) == stop
    summary = _summary(run)
    assert summary["finished"] and summary["steps"] == stop and summary["early_stopped_step"] == stop
    assert summary["total_steps"] == MAX_STEPS
    # the end-of-training eval ran at the stop (the base comparison is only measured there)
    assert "eval_base/loss" in summary, sorted(summary)
    assert (run / "checkpoints" / f"step_{stop:07d}").is_dir()
    # export.checkpoint=best: the lowest loss measured at a checkpoint's step is merged
    saved = {s: loss for s, loss in evals.items() if s % 2 == 0 or s == stop}
    best = min(saved, key=saved.get)
    assert summary["best_checkpoint"] == summary["export_checkpoint"] == str(run / "checkpoints" / f"step_{best:07d}")
    assert Path(summary["merged"]).is_dir()
    assert f"training finished early, at step {stop} of {MAX_STEPS}" in proc.stdout


def test_a_requeued_job_finds_the_early_stopped_run_finished(runs):
    root, args, _, whole = runs
    run = root / "whole"
    before = _summary(run)
    n_records = len(read_metrics(run))
    proc = train(args + ["run.name=whole", "train.resume=auto"], root)
    after = _summary(run)
    assert after["steps"] == before["steps"] and after["finished"]
    assert len(read_metrics(run)) == n_records  # not one more step
    assert "nothing to train" in proc.stdout + proc.stderr


def test_a_job_stopped_before_the_early_stop_resumes_to_the_same_stop(runs):
    root, args, _, whole = runs
    stop = max(whole)
    train(args + ["run.name=split", f"train.stop_after_steps={stop - 1}"], root)
    assert not _summary(root / "split")["finished"]
    train(args + ["run.name=split", "train.resume=auto"], root)
    summary = _summary(root / "split")
    assert summary["finished"] and summary["early_stopped_step"] == stop
    assert _evals(root / "split") == {s: pytest.approx(v, abs=1e-6) for s, v in whole.items()}


def test_a_resume_with_the_patience_off_trains_on(runs):
    root, args, _, whole = runs
    train(args + ["run.name=whole", "train.resume=auto", "eval.early_stopping_patience=0"], root)
    summary = _summary(root / "whole")
    assert summary["finished"] and summary["steps"] == MAX_STEPS and summary["early_stopped_step"] is None
    assert max(_evals(root / "whole")) == MAX_STEPS


def test_without_a_held_out_set_it_is_one_sentence(runs):
    root, _, _, _ = runs
    proc = train(["data=custom", f"data.train_files=[{root / 'yes.jsonl'}]", "eval.every_n_steps=1",
                  "eval.early_stopping_patience=2", "logger=none", "run.name=no_eval"], root, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("dialtune: error: eval.early_stopping_patience watches the held-out loss, and this run has no held-out set: "
            "set data.eval_fraction or data.eval_files") in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = train(["data=custom", f"data.train_files=[{root / 'yes.jsonl'}]", "eval.every_n_steps=1", "train.save_every=1",
                  "export.checkpoint=best", "logger=none", "run.name=no_eval"], root, check=False)
    assert proc.returncode == 2 and ("dialtune: error: export.checkpoint watches the held-out loss, and this run has no "
                                     "held-out set") in proc.stderr, proc.stderr[-3000:]  # (it trained, then exported the last)


def test_a_preemption_at_an_evaluation_step_keeps_the_count(runs):
    """SIGUSR1 (SLURM's notice before the time limit) at an evaluation step: the job saves and asks
    to be requeued without the slow evals, but still measures the held-out loss early stopping
    counts (the resumed job starts at the next step and would never measure it): the requeued job
    stops where the uninterrupted run did, with the same losses."""
    from train.signals import REQUEUE_EXIT_CODE

    root, args, _, whole = runs
    stop = max(whole)
    proc = train(args + ["run.name=signalled"], root, check=False, extra_env={"DIALTUNE_INJECT_SIGNAL": str(stop - 1)})
    assert proc.returncode == REQUEUE_EXIT_CODE, proc.stderr[-3000:]
    assert _summary(root / "signalled")["steps"] == stop - 1
    train(args + ["run.name=signalled", "train.resume=auto"], root)
    summary = _summary(root / "signalled")
    assert summary["finished"] and summary["early_stopped_step"] == stop
    assert _evals(root / "signalled") == {s: pytest.approx(v, abs=1e-6) for s, v in whole.items()}


def test_the_rotation_keeps_the_lowest_loss_checkpoint(runs):
    """With early stopping the lowest-loss checkpoint is `patience` evaluations old when the run
    stops: a rotation that keeps one checkpoint keeps it too (else summary.json and the last line
    would name a deleted directory), also with export.checkpoint=last."""
    root, args, _, whole = runs
    train(args + ["run.name=rotated", "export.checkpoint=last", "train.keep_checkpoints=1", "train.save_every=1",
                  "export.merge_at_end=false"], root)
    summary = _summary(root / "rotated")
    assert Path(summary["best_checkpoint"]).is_dir() and Path(summary["checkpoint"]).is_dir()
    assert summary["best_checkpoint"] != summary["checkpoint"]
    assert len(list((root / "rotated" / "checkpoints").glob("step_*"))) == 2


def test_a_stopped_and_a_signalled_job_pick_the_best_checkpoint_of_one_uninterrupted_job(runs):
    """export.checkpoint=best without early stopping: a job's extra checkpoint at
    train.stop_after_steps, off the train.save_every grid, is no candidate for the best (an
    uninterrupted run has no checkpoint there), and a job signalled at an eval step still measures
    the held-out loss there (the best checkpoint rests on it; a resumed job would never measure it)."""
    from train.signals import REQUEUE_EXIT_CODE

    root, args, _, _ = runs
    args = args + ["eval.early_stopping_patience=0", "train.max_steps=6"]
    train(args + ["run.name=nostop"], root)
    train(args + ["run.name=cut", "train.stop_after_steps=1"], root)  # (the held-out loss rises from step 1 on: the lowest)
    first = _summary(root / "cut")
    assert first["steps"] == 1 and first["best_checkpoint"] is None, first  # step 1 measured and saved, but no candidate
    proc = train(args + ["run.name=cut", "train.resume=auto"], root, check=False, extra_env={"DIALTUNE_INJECT_SIGNAL": "4"})
    assert proc.returncode == REQUEUE_EXIT_CODE and _summary(root / "cut")["steps"] == 4, proc.stderr[-3000:]
    train(args + ["run.name=cut", "train.resume=auto"], root)
    whole, cut = _evals(root / "nostop"), _evals(root / "cut")
    assert sorted(cut) == sorted(whole) == [1, 2, 3, 4, 5, 6] and cut == {s: pytest.approx(v, abs=1e-6) for s, v in whole.items()}
    a, b = _summary(root / "nostop"), _summary(root / "cut")
    assert (Path(b["best_checkpoint"]).name, Path(b["export_checkpoint"]).name) == \
        (Path(a["best_checkpoint"]).name, Path(a["export_checkpoint"]).name)
    assert Path(a["best_checkpoint"]).name in ("step_0000002", "step_0000004", "step_0000006")  # the save_every grid
