"""Full fine-tuning (peft=none) end to end, 2 ranks: every weight trains under ZeRO-3 (partitioned),
ZeRO-2 and ZeRO-0; a run stopped at step 2 and resumed reproduces the uninterrupted one; the end of
training writes merged/ from the final checkpoint's weights (ZeRO-3: reassembled from both
ranks' partitions), which loads with from_pretrained and scores the held-out loss the training
run measured; `dialtune merge` redoes it; `dialtune eval` of the run directory reads merged/."""
import json

import pytest
import torch

from tests.conftest import read_metrics, train

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Two launches of a 6-job multirun (ZeRO-3 / 2 / 0 x uninterrupted / stopped after step 2):
    the first trains, the second resumes the stopped jobs (and finds the others finished)."""
    from omegaconf import OmegaConf

    root = tmp_path_factory.mktemp("full")
    sweep = ["-m", "recipe=demo", "peft=none", f"train.max_steps={STEPS}", "logger=none", "eval.every_n_steps=0",
             "eval.at_end=[lm]", "train.save_every=0", "export.eval_conversations=1000", "eval.lm_max_batches=0", "deepspeed=zero3,zero2,zero0",
             "deepspeed.stage3_param_persistence_threshold=0", "train.stop_after_steps=0,2", "run.name=full"]
    # an earlier run's base comparison in job 0's directory (ZeRO-3, uninterrupted): a fresh start
    # measures its own (test_resumed_... checks it against the base model)
    stale = root / "full-sweep" / "0" / "eval" / "base_lm.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps([{"model": "base", "source": "all", "loss": 99.0, "ppl": 1.0, "target_tokens": 1}]))
    train(sweep, root, nproc=2, via="torchrun")
    stopped = {}
    for job in sorted(p for p in (root / "full-sweep").iterdir() if p.is_dir()):
        s = json.loads((job / "summary.json").read_text())
        stopped[job.name] = not s["finished"]
        assert s["steps"] == (2 if stopped[job.name] else STEPS) and s["adapter"] is None
        assert (job / "merged").is_dir() != stopped[job.name]  # finished runs export; stopped ones wait
    train(sweep + ["train.resume=auto"], root, nproc=2, via="torchrun")
    jobs = {}
    for job in sorted(p for p in (root / "full-sweep").iterdir() if p.is_dir()):
        jobs[(OmegaConf.load(job / "config.yaml").deepspeed.stage, stopped[job.name])] = job
    assert sorted(jobs) == [(stage, stopped) for stage in (0, 2, 3) for stopped in (False, True)]
    return jobs


def _weights(merged):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(merged.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_resumed_full_finetune_reproduces_the_uninterrupted_run(full_runs):
    for stage in (0, 2, 3):
        whole, resumed = (read_metrics(full_runs[(stage, s)]) for s in (False, True))
        steps = [r for r in whole if "train/loss" in r]
        assert [r["step"] for r in steps] == [r["step"] for r in resumed if "train/loss" in r] == list(range(1, STEPS + 1))
        for a, b in zip(steps, [r for r in resumed if "train/loss" in r]):
            assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-6), stage
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], abs=1e-6), stage
        assert steps[-1]["train/loss"] < steps[0]["train/loss"]
        a, b = (_weights(full_runs[(stage, s)] / "merged") for s in (False, True))
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6, stage
    # the base comparison of a full fine-tune: measured before step 1 (the resumed job reads it back)
    from transformers import AutoModelForCausalLM

    from model.export import eval_loss, load_eval_batches

    for stage in (0, 2, 3):
        whole, resumed = (json.loads((full_runs[(stage, s)] / "summary.json").read_text()) for s in (False, True))
        assert resumed["eval_base/loss"] == pytest.approx(whole["eval_base/loss"], abs=1e-6)
        assert whole["eval_base/loss"] > whole["eval/loss"], stage
    run_dir = full_runs[(3, False)]
    assert run_dir.name == "0"  # the job whose directory held a stale base_lm.json
    base = AutoModelForCausalLM.from_pretrained(str(run_dir / "base")).eval()
    assert eval_loss(base, load_eval_batches(str(run_dir), base.config.pad_token_id, 1000)) == pytest.approx(
        whole["eval_base/loss"], rel=1e-5)
    # ZeRO-0, 2 and 3 (the same math, another reduction order) train the same model
    for stage in (2, 3):
        for a, b in zip(read_metrics(full_runs[(0, False)]), read_metrics(full_runs[(stage, False)])):
            if "train/loss" in a:
                assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), stage


def test_the_export_holds_every_trained_weight_and_scores_the_training_runs_loss(full_runs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for (stage, _), run_dir in sorted(full_runs.items()):
        merged = run_dir / "merged"
        summary = json.loads((merged / "export_summary.json").read_text())
        assert summary["merge_base"] == "full" and summary["verify_max_abs_logit_diff"] <= 1e-4
        assert summary["checkpoint"] == str(run_dir / "checkpoints" / f"step_{STEPS:07d}")
        # the written model's held-out loss is the one the engine measured at the last step
        assert summary["eval_loss"]["full"] == pytest.approx(summary["eval_loss"]["training"], rel=1e-5), stage
        trained, base = _weights(merged), _weights(run_dir / "base")
        assert trained.keys() == base.keys()
        assert all(trained[k].shape == base[k].shape for k in base)  # whole tensors, not ZeRO-3 partitions
        moved = [k for k in base if not torch.equal(trained[k], base[k])]
        assert len(moved) == len(base), set(base) - set(moved)  # every weight trained (norms included)
        model = AutoModelForCausalLM.from_pretrained(str(merged))
        assert not any("lora" in n for n, _ in model.named_parameters())
        card = (merged / "README.md").read_text()
        assert "full fine-tuning (`peft=none`)" in card and "| the fine-tuned model as written |" in card
        # it stops where the base stops and at the end of a turn (as an adapter's merge: test_export_fixes.py)
        from data_pipeline.chat import end_of_turn_id
        from model.export_io import base_eos_ids

        tok, stops = AutoTokenizer.from_pretrained(str(merged)), json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
        assert stops == summary["eos_token_id"] and {*base_eos_ids(str(run_dir / "base")), end_of_turn_id(tok)} <= set(stops)
        saved = json.loads((merged / "tokenizer.json").read_text())  # no truncation left by the export's check
        assert saved["truncation"] is None and saved["padding"] is None
        assert (run_dir / "checkpoints" / f"step_{STEPS:07d}" / "tokenizer" / "tokenizer_config.json").is_file()


def test_merge_and_eval_commands_take_a_full_finetune(full_runs, tmp_path):
    """`dialtune merge` of the last checkpoint writes what training wrote; of step 2 (its tokenizer/
    removed, as checkpoints written before dialtune kept it: rebuilt as training builds it) the
    weights of step 2, without the training run's loss (measured at step 4)."""
    import shutil

    from launch.cli import main
    from launch.evaluate import resolve

    run_dir = full_runs[(3, False)]
    assert main(["merge", str(run_dir), "--out", str(run_dir / "checkpoints")]) == 2  # would delete them: refused
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert main(["merge", str(run_dir), "--checkpoint", f"step_{STEPS:07d}", "--out", str(tmp_path / "again")]) == 0
    a, b = _weights(run_dir / "merged"), _weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = full_runs[(3, True)]
    shutil.rmtree(resumed / "checkpoints" / "step_0000002" / "tokenizer")
    assert main(["merge", str(resumed), "--checkpoint", "step_0000002", "--out", str(tmp_path / "step2")]) == 0
    early = _weights(tmp_path / "step2")
    assert not all(torch.equal(a[k], early[k]) for k in a)
    summary = json.loads((tmp_path / "step2" / "export_summary.json").read_text())
    assert set(summary["eval_loss"]) == {"full"} and summary["eval_loss"]["full"] > json.loads(
        (run_dir / "merged" / "export_summary.json").read_text())["eval_loss"]["full"]
    for name in ("tokenizer_config.json", "tokenizer.json"):
        assert (tmp_path / "step2" / name).read_text() == (run_dir / "merged" / name).read_text()
    cfg, kind, model_dir, adapter, _, _ = resolve(str(run_dir), [])
    assert (kind, model_dir, adapter) == ("merged", run_dir / "merged", None)
    assert cfg.peft.method == "none"
    # `dialtune eval` of the run: the written model's held-out loss next to the base's, which
    # training measured before its first step (the same tokens: the run's cap over its 2 ranks)
    trained = json.loads((run_dir / "summary.json").read_text())
    assert main(["eval", str(run_dir), "--parts", "lm", "--out", str(tmp_path / "ev"), "--device", "cpu"]) == 0
    rows = {(r["model"], r["source"]): r for r in json.loads((tmp_path / "ev" / "results.json").read_text())["lm"]["rows"]}
    assert rows[("base", "all")]["loss"] == pytest.approx(trained["eval_base/loss"], rel=1e-6)
    assert rows[("fine-tuned", "all")]["loss"] == pytest.approx(trained["eval/loss"], rel=1e-4)
    assert rows[("base", "all")]["target_tokens"] == rows[("fine-tuned", "all")]["target_tokens"]
    # another cap reads other tokens: no base row then
    assert main(["eval", str(run_dir), "--parts", "lm", "--out", str(tmp_path / "ev1"), "--device", "cpu",
                 "eval.lm_max_batches=1"]) == 0
    assert {r["model"] for r in json.loads((tmp_path / "ev1" / "results.json").read_text())["lm"]["rows"]} == {"fine-tuned"}


def test_trained_weights_fill_a_tied_architecture_and_a_mismatch_is_one_sentence(tmp_path):
    """A tied output layer takes the trained embedding (zero_to_fp32 lists it as a shared
    parameter, or not at all); weights of another architecture are refused by name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from model.export import ExportError
    from model.full_export import load_trained
    from tests.conftest import TOKENIZER_DIR

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "base"))
    trained = AutoModelForCausalLM.from_config(cfg)  # other random weights: "the trained ones"
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    for with_head in (True, False):
        sd = dict(state) if with_head else {k: v for k, v in state.items() if k != "lm_head.weight"}
        model = load_trained(str(tmp_path / "base"), tok, None, sd, "ckpt")
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])
        assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    # a run that added tokens trained larger embeddings: the architecture takes their size
    grown = {**state, "model.embed_tokens.weight": torch.randn(len(tok) + 2, 32)}
    grown["lm_head.weight"] = grown["model.embed_tokens.weight"]
    model = load_trained(str(tmp_path / "base"), tok, None, grown, "ckpt")
    assert model.lm_head.weight.shape[0] == len(tok) + 2 and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, grown["model.embed_tokens.weight"])
    del state["model.norm.weight"]
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(ExportError, match="does not fit the architecture of .*missing model.norm.weight; unexpected model.extra.weight"):
        load_trained(str(tmp_path / "base"), tok, None, state, "ckpt")


def test_which_checkpoint_an_export_holds(tmp_path):
    """A rerun of a finished run keeps merged/ only when it is the export of the final checkpoint
    (`dialtune merge --checkpoint <earlier step>` may have replaced it)."""
    from model.export_io import exported_from, is_export_of

    ckpts = tmp_path / "run" / "checkpoints"
    for step in ("step_0000002", "step_0000004"):
        (ckpts / step / "adapter").mkdir(parents=True)
    out = tmp_path / "run" / "merged"
    assert exported_from(str(out)) is None and not is_export_of(str(out), str(ckpts / "step_0000004"))
    out.mkdir()
    for summary, final in (({"checkpoint": str(ckpts / "step_0000004"), "adapter": None}, True),  # full fine-tune
                           ({"adapter": str(ckpts / "step_0000004" / "adapter")}, True),  # adapter merge
                           ({"adapter": str(ckpts / "step_0000002" / "adapter")}, False),
                           ({"checkpoint": "step_0000002", "adapter": None}, False),  # push-ready: names only
                           ({"checkpoint": "step_0000004", "adapter": None}, True),
                           ({"adapter": "adapter"}, True)):  # push-ready merge: cannot tell, keep it
        (out / "export_summary.json").write_text(json.dumps(summary))
        assert is_export_of(str(out), str(ckpts / "step_0000004")) == final, summary


def test_an_export_replaces_an_earlier_one_whole_and_refuses_other_directories(tmp_path):
    from model.export_io import ExportError, write_export

    out = tmp_path / "merged"
    out.mkdir()
    (out / "export_summary.json").write_text("{}")
    (out / "model.safetensors").write_text("old")
    tmp = tmp_path / "merged.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    summary = write_export(str(tmp), str(out), {"merge_base": "full", "checkpoint": "step_0000004", "base": "b", "quant": "none",
                                                "dtype": "fp32", "verify_reference": "r", "verify_max_abs_logit_diff": 0.0,
                                                "verify_tolerance": 1e-4},
                           None, None, None, None, {}, None, None, None)
    assert (out / "model.safetensors").read_text() == "new" and json.loads((out / "export_summary.json").read_text()) == summary
    assert not tmp.exists() and not (tmp_path / "merged.old").exists() and (out / "README.md").is_file()
    other = tmp_path / "results"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    tmp.mkdir()
    with pytest.raises(ExportError, match="holds other files than an export"):
        write_export(str(tmp), str(other), dict(summary), None, None, None, None, {}, None, None, None)
    assert (other / "keep.txt").read_text() == "mine"
