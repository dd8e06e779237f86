"""Exact resume: a 2-process run of N steps equals N/2 steps, stop, resume to N — per-step
losses and gradient norms identical (≤ 1e-6), for ZeRO-2 (with kernels.fused_lora) and ZeRO-3, with
LoRA dropout on (so the RNG state must come back too). (The ZeRO-3 adapter save of whole tensors: test_e2e.)"""
import json

import pytest

from tests.conftest import read_metrics, train

pytestmark = pytest.mark.slow
COMMON = ["recipe=demo", "train.max_steps=6", "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0", "eval.at_end=[lm]",
          "data.eval_files=[]", "peft.dropout=0.1", "train.save_every=0",
          "kernels.fused_lora=true"]  # ZeRO-2: the fused LoRA branch, whose dropout replays a saved random state


def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Also across an epoch boundary (70 conversations in 9 global micro-batches of 4 x 2 ranks, the
    last filled up with 2 rows without targets; 2 a step: the resumed part runs from step 4 into the
    next epoch's shuffle in the middle of step 5's accumulation) and with a held-out eval every 2 steps."""
    from tests.conftest import ROOT

    small = tmp_path / "small.jsonl"
    small.write_text("".join((ROOT / "data_pipeline" / "sample_data" / "train.jsonl").read_text().splitlines(True)[:70]))
    # each launch is a Hydra multirun over the stages (job 0: ZeRO-2, job 1: ZeRO-3), 2 ranks
    stages = ["-m", "deepspeed=zero2,zero3"]
    common = COMMON + [f"data.train_files=[{small}]", f"data.eval_files=[{ROOT / 'data_pipeline' / 'sample_data' / 'eval.jsonl'}]", "eval.every_n_steps=2",
                       "eval.during_training=[lm]", "eval.base_comparison=false", "eval.lm_max_batches=2"]
    train(stages + common + ["run.name=full"], tmp_path, nproc=2, via="torchrun")
    train(stages + common + ["run.name=part", "train.stop_after_steps=3"], tmp_path, nproc=2, via="torchrun")
    for job in ("0", "1"):
        part_dir = tmp_path / "part-sweep" / job
        first = json.loads((part_dir / "summary.json").read_text())
        assert first["steps"] == 3 and not first["finished"]
        assert "eval/loss" not in first  # (step 2's eval is in metrics.jsonl; the summary's eval scalars are the last step's)
        assert (part_dir / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    proc = train(stages + common + ["run.name=part", "train.resume=auto"], tmp_path, nproc=2, via="torchrun")
    assert "the data this run reads differ" not in proc.stdout + proc.stderr  # the same data: nothing to warn about
    for job, stage in (("0", 2), ("1", 3)):
        full_dir, part_dir = tmp_path / "full-sweep" / job, tmp_path / "part-sweep" / job
        assert f"stage: {stage}" in (part_dir / "config.yaml").read_text()
        full, part = read_metrics(full_dir), read_metrics(part_dir)
        steps = [r["step"] for r in full if "train/loss" in r]
        assert [r["step"] for r in part if "train/loss" in r] == [1, 2, 3, 4, 5, 6] == steps, stage
        assert [r["train/epoch"] for r in full if "train/loss" in r] == pytest.approx([2 / 9, 4 / 9, 6 / 9, 8 / 9, 1 + 1 / 9, 1 + 3 / 9]), stage
        evals = [(r["step"], r["eval/loss"]) for r in full if "eval/loss" in r]
        assert [s for s, _ in evals] == [2, 4, 6], stage
        assert [(r["step"], pytest.approx(r["eval/loss"], abs=1e-6)) for r in part if "eval/loss" in r] == evals, stage
        for a, b in zip([r for r in full if "train/loss" in r], [r for r in part if "train/loss" in r]):
            assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6), stage
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], abs=1e-6), stage
            assert b["train/lr"] == a["train/lr"]
        summary = json.loads((part_dir / "summary.json").read_text())
        assert summary["finished"]
        assert summary["fused_lora_layers"] == (4 * 7 if stage == 2 else 0), stage  # 4 layers x 7 projections; PEFT's under ZeRO-3
        assert summary["fused_lora_parts"] == (["lora", "norms", "swiglu"] if stage == 2 else []), stage



def test_resume_takes_this_runs_lr_and_refuses_a_checkpoint_past_its_steps(tmp_path):
    """A resubmission with another optim.lr trains with it from the resumed step, as the resume
    warning says (loading the checkpoint restores the optimizer's and the scheduler's lr); another
    run's checkpoint beyond this run's train.max_steps is one sentence, not a run that 'stopped at
    step 4 of 2'."""
    args = ["recipe=demo", "train.max_steps=4", "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0",
            "eval.at_end=[]", "data.eval_files=[]", "optim.scheduler=constant", "optim.warmup_steps=0", "optim.lr=2e-4",
            "run.name=lr"]
    train(args + ["train.stop_after_steps=2"], tmp_path)
    proc = train(args + ["train.resume=auto", "optim.lr=1e-3"], tmp_path)
    assert "optim.lr 0.0002 -> 0.001" in proc.stdout + proc.stderr
    lrs = {r["step"]: r["train/lr"] for r in read_metrics(tmp_path / "lr") if "train/lr" in r}
    assert lrs == {1: pytest.approx(2e-4), 2: pytest.approx(2e-4), 3: pytest.approx(1e-3), 4: pytest.approx(1e-3)}
    proc = train(["recipe=demo", "logger=none", "train.max_steps=2", "run.name=other", f"train.resume={tmp_path / 'lr'}"],
                 tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "step_0000004 is at step 4, past this run's 2 steps (train.max_steps / train.epochs)" in errors[0]
    assert "run.name" not in proc.stdout + proc.stderr  # resuming another run's checkpoint by path: no change to warn about


def test_a_resume_on_changed_data_is_warned_and_keeps_the_skipped_count(tmp_path):
    """The checkpoint knows the data it was trained on (the data cache key: file contents,
    tokenizer, data settings): a resume on a training file whose contents changed (same path, same
    config) says the run can no longer be the uninterrupted one; a resume on the same data says
    nothing (test above). The count of skipped non-finite steps continues across the jobs."""
    from tests.conftest import ROOT

    data = tmp_path / "train.jsonl"
    lines = (ROOT / "data_pipeline" / "sample_data" / "train.jsonl").read_text().splitlines(True)
    data.write_text("".join(lines[:60]))
    args = ["recipe=demo", "train.max_steps=3", "logger=none", "export.merge_at_end=false", "eval.every_n_steps=0",
            "eval.at_end=[]", "data.eval_files=[]", f"data.train_files=[{data}]", "run.name=changed"]
    train(args + ["train.stop_after_steps=1"], tmp_path, extra_env={"DIALTUNE_INJECT_NAN": "1"})
    data.write_text("".join(lines[:60] + lines[100:110]))
    proc = train(args + ["train.resume=auto"], tmp_path)
    out = proc.stdout + proc.stderr
    assert "the data this run reads differ from those" in out and "which is not the run an uninterrupted job would have made" in out
    skipped = {r["step"]: r["train/skipped_steps"] for r in read_metrics(tmp_path / "changed") if "train/skipped_steps" in r}
    assert skipped == {1: 1, 2: 1, 3: 1}
    assert json.loads((tmp_path / "changed" / "summary.json").read_text())["skipped_steps"] == 1


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_lr_schedule_reaches_the_peak_once_and_ends_at_the_floor(scheduler):
    """Step k of 10 runs at lr_lambda(k - 1): warmup 1/3, 2/3, 1 (never 0), then strictly down from
    below the peak (the peak is not taken twice) to min_lr_ratio at the last step, as
    optim.min_lr_ratio ("final LR") says; without warmup the first step is at the peak (a 1-step
    run too)."""
    from omegaconf import OmegaConf

    from train.ds_config import lr_lambda

    optim = OmegaConf.create({"warmup_steps": 3, "warmup_ratio": 0.0, "min_lr_ratio": 0.1, "scheduler": scheduler})
    fn = lr_lambda(optim, 10)
    lrs = [fn(s) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] == pytest.approx(0.1)
    optim.warmup_steps = 0
    assert [lr_lambda(optim, 2)(s) for s in range(2)] == pytest.approx([1.0, 0.1])  # two steps: the peak, then the floor
    assert lr_lambda(optim, 1)(0) == 1.0
    lrs = [lr_lambda(optim, 10)(s) for s in range(10)]
    assert lrs[0] == 1.0 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0.1)
    optim.scheduler = "constant"
    assert [lr_lambda(optim, 5)(s) for s in range(5)] == [1.0] * 5
