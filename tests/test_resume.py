"""Exact resume: a 2-process run of N steps equals N/2 steps, stop, resume to N — per-step
losses and gradient norms identical (≤ 1e-6), for ZeRO-2 and ZeRO-3, with LoRA dropout on (so
the RNG state must come back too)."""
import json

import pytest

from tests.conftest import read_metrics, train

pytestmark = pytest.mark.slow
COMMON = ["recipe=demo", "train.max_steps=6", "logger=none", "export.merge_at_end=false", "train.eval_every=0",
          "data.eval_files=[]", "peft.dropout=0.1", "train.save_every=0"]


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_and_resume_reproduces_the_uninterrupted_run(tmp_path, stage):
    ds = [f"deepspeed=zero{stage}"]
    train(COMMON + ds + ["run.name=full"], tmp_path, nproc=2)
    train(COMMON + ds + ["run.name=part", "train.stop_after_steps=3"], tmp_path, nproc=2)
    first = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert first["steps"] == 3 and not first["finished"]
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    train(COMMON + ds + ["run.name=part", "train.resume=auto"], tmp_path, nproc=2)
    full, part = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "part")
    assert [r["step"] for r in part] == [1, 2, 3, 4, 5, 6] == [r["step"] for r in full]
    for a, b in zip(full, part):
        assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], abs=1e-6)
        assert b["train/lr"] == a["train/lr"]
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["finished"]
