"""Merge and export on CPU with the embedded tiny model.

Two-step runs with a large learning rate (optim.lr=5e-2, peft.dropout=0) so that the adapter
moves the logits by ~1 (the comparisons below would prove nothing if it left them alone):
- lora / dora / rslora: the merged checkpoint equals fp32 base + adapter (<= 1e-4);
- int8 / nf4 with export.base=dequantized: every dequantized layer reproduces its quantized
  original (a wrong dequantization is refused), the merged checkpoint equals fp32 dequantized
  base + adapter (<= 1e-4), lands within TINY_AS_TRAINED_BOUND (bf16 rounding outliers; the mean within 0.005) of the adapter on the quantized base as trained
  (this tiny model's bound; reported, not checked, by the export) and closer to it than the merge
  into the original base (`dialtune merge --base original`);
- `--hub-repo-id`: a push-ready directory (Hub metadata, no local paths, LFS attributes);
- export_summary.json holds the held-out losses, the model card names base and license.
(`dialtune chat` on the same runs: test_chat.py.)
"""
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import EXPORT_FAST as FAST
from tests.conftest import PEFTS, ROOT, run_env, sweep_runs, train

pytestmark = pytest.mark.slow

# max |logit difference| of the dequantized merge from the adapter on the quantized base, as
# measured on this tiny model (0.004-0.010 over seeds and methods; model/export.py's docstring) on
# one CPU, 0.094 (int8; mean 0.0017, 99th percentile 0.007) on another with AVX512-BF16, whose
# bf16 kernels round differently: the bound is on the outliers of bf16 rounding; the mean's
# bound and the comparison with the original-base merge are the tight checks
TINY_AS_TRAINED_BOUND = 0.15
TINY_AS_TRAINED_MEAN_BOUND = 0.005
QUANTS = ["int8", "nf4"]


@pytest.fixture(scope="module")
def quant_runs(tmp_path_factory):
    # export.dtype=fp32: the checkpoint on disk is the fp32 merge itself, not its bf16 rounding.
    root = tmp_path_factory.mktemp("export_quant")
    # unpacked, as TINY_AS_TRAINED_BOUND was measured (packed rows move this tiny model's logits
    # further in 2 steps at lr 5e-2; test_cli trains the recipes as shipped, packed)
    train(["-m", "recipe=lora_int8,qlora_nf4", "run.name=quant", "export.base=dequantized", "export.dtype=fp32",
           "data.packing=false"] + FAST, root)
    runs = sweep_runs(root, "quant", "quant.mode")
    assert sorted(runs) == sorted(QUANTS)
    return runs


def _batch(tok, n=4):
    lines = (ROOT / "data_pipeline" / "sample_data" / "eval.jsonl").read_text().splitlines()[:n]
    texts = [tok.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in lines]
    return tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=160, add_special_tokens=False)


def _adapter(run_dir):
    (adapter,) = (run_dir / "checkpoints").glob("step_*/adapter")
    return adapter


def _merged_logits(merged_dir, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not hasattr(model.config, "quantization_config")
    with torch.no_grad():
        return model(**batch).logits


def _summary(merged_dir):
    return json.loads((merged_dir / "export_summary.json").read_text())


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], env=run_env(), capture_output=True,
                          text=True, cwd=str(ROOT), timeout=timeout)


# ---- original merge: fp32 base + adapter ------------------------------------------------------

@pytest.mark.parametrize("method", PEFTS)
def test_merged_equals_base_plus_adapter(peft_runs, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = peft_runs[method]
    merged_dir = run_dir / "merged"
    tok = AutoTokenizer.from_pretrained(merged_dir)
    batch = _batch(tok)
    mask = batch["attention_mask"].bool()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, _adapter(run_dir)).eval()
    assert model.peft_config["default"].use_dora == (method == "dora")
    assert model.peft_config["default"].use_rslora == (method == "rslora")
    with torch.no_grad():
        want = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
    got = _merged_logits(merged_dir, batch)
    assert (want - got).abs()[mask].max().item() <= 1e-4
    # the adapter moved the logits measurably: the equality above is not base == base
    assert (want - plain).abs()[mask].max().item() > 0.1
    summary = _summary(merged_dir)
    assert summary["merge_base"] == "original" and summary["verify_max_abs_logit_diff"] <= 1e-4
    assert set(summary["eval_loss"]) == {"adapter", "merged_original"}
    # the tokenizer as trained: no truncation/padding state left in tokenizer.json by the export's check
    saved = json.loads((merged_dir / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    modes = {p.name: p.stat().st_mode & 0o777 for p in merged_dir.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # the weights too (safetensors writes 0600): readable as the rest


def test_merge_refuses_a_logit_mismatch_and_writes_nothing(peft_runs, tmp_path):
    from model.export import ExportError, merge

    run_dir = peft_runs["lora"]
    out = tmp_path / "never"
    with pytest.raises(ExportError, match="tolerance"):
        merge(str(_adapter(run_dir)), str(out), base_path=str(run_dir / "base"), tolerance=1e-12, eval_conversations=0)
    assert not out.exists() and not (tmp_path / "never.tmp").exists()



def test_a_bf16_export_reports_what_the_written_checkpoint_does(peft_runs, tmp_path):
    """The logits check runs in fp32 before the cast; the summary also gives the distance of the
    checkpoint as written (bf16) to the same reference, and the files on disk reproduce it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.export import _held_out_batch, default_probe, merge

    run_dir = peft_runs["lora"]
    out = tmp_path / "bf16"
    summary = merge(str(_adapter(run_dir)), str(out), base_path=str(run_dir / "base"), dtype="bf16", eval_conversations=0)
    written = summary["as_written"]
    assert written["dtype"] == "bf16" and summary["verify_max_abs_logit_diff"] <= 1e-4
    assert 0 < written["max_abs_logit_diff"] < 0.5  # bf16 rounding of a tiny model's weights: visible, small
    batch = _held_out_batch(AutoTokenizer.from_pretrained(out), default_probe())
    mask = batch["attention_mask"].bool()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.float32),
                                      _adapter(run_dir)).eval()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        want = model(**batch).logits.float()
        got = loaded(**batch).logits.float()
    assert (want - got).abs()[mask].max().item() == pytest.approx(written["max_abs_logit_diff"], rel=1e-5)
    assert "| as written (bf16) |" in (out / "README.md").read_text()
    assert "as_written" not in _summary(run_dir / "merged")  # fp32 exports: nothing cast

def test_dequantized_on_a_full_precision_run_is_the_original_merge(peft_runs, tmp_path):
    from model.export import merge

    run_dir = peft_runs["lora"]
    summary = merge(str(_adapter(run_dir)), str(tmp_path / "m"), base_path=str(run_dir / "base"), base="dequantized",
                    dtype="fp32", eval_conversations=0)
    assert summary["merge_base"] == "original" and "full-precision" in summary["note"]
    assert summary["verify_max_abs_logit_diff"] <= 1e-4


# ---- dequantized merge: the quantized base the run trained against -----------------------------

@pytest.mark.parametrize("quant", QUANTS)
def test_dequantized_merge_matches_the_quantized_base(quant_runs, quant, tmp_path):
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from model.export import DEQUANTIZE_ERROR
    from model.loader import portable_cpu_4bit

    run_dir = quant_runs[quant]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    q = cfg.quant
    if quant == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold)
    else:
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[q.compute_dtype]
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=q.double_quant,
                                 bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    batch = _batch(tok)
    mask = batch["attention_mask"].bool()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base", dtype=torch.bfloat16, quantization_config=bnb,
                                                device_map={"": "cpu"})
    portable_cpu_4bit(base)  # as loader.load_base does
    model = PeftModel.from_pretrained(base, _adapter(run_dir)).eval()
    if quant == "int8":  # the recipe trains int8 through bf16 GEMMs of the dequantized weights
        from model.kernels import dequantize_int8_linears

        assert cfg.kernels.fast_int8 and dequantize_int8_linears(model) == 7 * base.config.num_hidden_layers
    with torch.no_grad():
        want = model(**batch).logits.float()
        with model.disable_adapter():
            plain = model(**batch).logits.float()
    assert (want - plain).abs()[mask].max().item() > 0.1  # the adapter matters
    n_layers = base.config.num_hidden_layers
    del model, base

    deq = _merged_logits(run_dir / "merged", batch)
    summary = _summary(run_dir / "merged")
    assert summary["merge_base"] == "dequantized" and summary["quant"] == quant
    # checked: the merge arithmetic against fp32 dequantized base + adapter, and every layer's dequantization
    assert summary["verify_tolerance"] == 1e-4 and summary["verify_max_abs_logit_diff"] <= 1e-4
    assert summary["verify_reference"] == f"fp32 dequantized {quant} base + adapter"
    check = summary["dequantize_check"]
    assert check["layers"] == 7 * n_layers and check["limit"] == DEQUANTIZE_ERROR  # every linear; the default
    assert check["max_rel_error"] < 0.005, check  # bf16 rounding only (LLM.int8, which also rounds activations: ~1 %)
    assert ("fast_int8" if quant == "int8" else "4-bit") in summary["as_trained_kernel"]
    proc = _cli("merge", run_dir, "--base", "original", "--dtype", "fp32", "--eval-conversations", "0",
                "--out", tmp_path / "original")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(tmp_path / "original")["verify_max_abs_logit_diff"] <= 1e-4
    orig = _merged_logits(tmp_path / "original", batch)

    d_deq, d_orig = (want - deq).abs()[mask], (want - orig).abs()[mask]
    assert d_deq.max().item() <= TINY_AS_TRAINED_BOUND and d_deq.mean().item() <= TINY_AS_TRAINED_MEAN_BOUND
    assert d_deq.mean().item() < d_orig.mean().item(), (d_deq.mean().item(), d_orig.mean().item())
    vs = summary["max_abs_logit_diff_vs_quantized"]  # reported
    assert vs["dequantized"] <= TINY_AS_TRAINED_BOUND and summary["quantized_logit_std"] > 0
    mean = summary["mean_abs_logit_diff_vs_quantized"]  # the mean: int8's gap is small, the max is noisier
    assert mean["dequantized"] < mean["original"]


# ---- export summary and model card -------------------------------------------------------------

def test_a_wrong_dequantization_is_refused(quant_runs, tmp_path, monkeypatch):
    """A dequantization 5 % off in scale (as a wrong absmax, block or layout would be, only
    milder) fails the layer check with one sentence; nothing is written."""
    from bitsandbytes import functional as bf

    from model.export import ExportError, merge

    run_dir = quant_runs["int8"]
    real = bf.int8_vectorwise_dequant
    monkeypatch.setattr(bf, "int8_vectorwise_dequant", lambda cb, scb: real(cb, scb) * 1.08)
    with pytest.raises(ExportError, match=r"layer model\.layers\.\d+\..* relative error > export.verify_dequantize_error=0.05") as e:
        merge(str(_adapter(run_dir)), str(tmp_path / "never"), base_path=str(run_dir / "base"), base="dequantized",
              eval_conversations=0)
    assert "\n" not in str(e.value) and not (tmp_path / "never").exists()
    assert not (tmp_path / "never.tmp").exists()  # the half-built export is removed (export_io.export_tmp)


def test_export_summary_has_the_three_losses(quant_runs):
    for quant, run_dir in quant_runs.items():
        summary = _summary(run_dir / "merged")
        losses = summary["eval_loss"]
        assert set(losses) == {"adapter", "merged_original", "merged_dequantized"}, quant
        assert all(math.isfinite(v) and 0 < v < 20 for v in losses.values())
        assert summary["eval"]["conversations"] == 8 and summary["eval"]["target_tokens"] > 0
        # the dequantized merge is the adapter model up to kernel precision; losses agree closely
        assert abs(losses["merged_dequantized"] - losses["adapter"]) < 0.02, losses


def test_model_card(quant_runs, peft_runs):
    run_dir = quant_runs["nf4"]
    card = (run_dir / "merged" / "README.md").read_text()
    assert "embedded tiny random Llama" in card and str(run_dir / "base") in card
    assert "lora, rank 16" in card and "`q_proj`" in card and "nf4" in card
    assert "train.jsonl" in card and "CDLA-Sharing-1.0" in card and "Keep this file and `LICENSES/`" in card
    assert hashlib.sha256((run_dir / "config.yaml").read_bytes()).hexdigest() in card
    assert "merged into the dequantized base" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert "dora, rank 16" in (peft_runs["dora"] / "merged" / "README.md").read_text()


def test_push_ready_layout(peft_runs, tmp_path):
    """`--hub-repo-id`: card metadata the Hub reads, the card loads by the repo id, LFS for the
    weights, and no path of this machine in any file that would be uploaded."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    run_dir = peft_runs["lora"]
    out = tmp_path / "push"
    proc = _cli("merge", run_dir, "--out", out, "--hub-repo-id", "acme/support-tiny", "--license", "apache-2.0",
                "--eval-conversations", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"hf upload acme/support-tiny {out} ." in proc.stdout
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation" and {"dialtune", "lora"} <= set(meta["tags"])
    assert "base_model" not in meta  # the embedded tiny base is no Hub model
    assert "path = 'acme/support-tiny'" in card.text and "`apache-2.0`" in card.text
    assert "*.safetensors filter=lfs" in (out / ".gitattributes").read_text()
    summary = _summary(out)
    assert summary["hub_repo_id"] == "acme/support-tiny" and summary["base"] == "base" and summary["eval"]["set"]
    local = [str(tmp_path), str(run_dir.parent), str(ROOT)]
    for f in out.rglob("*"):
        if f.is_file() and f.suffix != ".safetensors":
            text = f.read_text()
            assert not [p for p in local if p in text], (f.name, [p for p in local if p in text])
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    # the same merge without a repo id keeps the local paths (for the user, not for upload)
    assert str(run_dir) in (run_dir / "merged" / "README.md").read_text()


def test_push_ready_card_names_a_hub_base():
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from huggingface_hub import ModelCard

    from model.card import model_card
    from train.config import DialtuneConfig, SourceConfig

    cfg = OmegaConf.structured(DialtuneConfig)
    cfg.model.name_or_path = "meta-llama/Llama-3.2-1B"
    cfg.data.train_files = ["/home/someone/data/support.jsonl"]
    cfg.data.sources = [SourceConfig(path="/home/someone/data/faq.jsonl", weight=2.0),
                        SourceConfig(path="/home/someone/data/dev.jsonl", split="eval")]
    summary = {"base": "meta-llama/Llama-3.2-1B", "quant": "nf4", "merge_base": "original", "dtype": "bf16",
               "verify_max_abs_logit_diff": 3e-5, "verify_reference": "fp32 base + adapter", "verify_tolerance": 1e-4}
    peft_cfg = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    text = model_card(summary, cfg, peft_cfg, "/home/someone/runs/x/merged", hub_repo_id="acme/llama-support")
    meta = ModelCard(text).data.to_dict()
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["base_model_relation"] == "finetune"
    assert "nf4-trained" in meta["tags"] and "license" not in meta
    assert "/home/someone" not in text and "- `support.jsonl`\n- `faq.jsonl`" in text and "Held out: `dev.jsonl`" in text
    assert "No license id was set" in text


def test_summary_json_names_the_merged_checkpoint(peft_runs):
    """The end of training merges after the recipe wrote summary.json: the file names merged/ too."""
    run = peft_runs["lora"]
    assert Path(json.loads((run / "summary.json").read_text())["merged"]).resolve() == (run / "merged").resolve()


def test_export_checkpoint_best_merges_the_lowest_eval_loss_and_rotation_keeps_it(tmp_path):
    """export.checkpoint=best: trained on answers that say "yes" and evaluated on the same questions
    answered "no", the held-out loss rises as training goes on; the checkpoint with the lowest loss
    measured at its step is merged, kept by a rotation that keeps one checkpoint, recorded in
    summary.json, and what `dialtune merge --checkpoint best` picks too."""
    from tests.conftest import read_metrics, train
    from tests.data_helpers import conv, jsonl

    questions = [f"can I change order {i} to another address" for i in range(24)]
    yes = jsonl(tmp_path / "yes.jsonl", [conv(i, q, "yes " * 12) for i, q in enumerate(questions)])
    no = jsonl(tmp_path / "no.jsonl", [conv(100 + i, q, "no " * 12) for i, q in enumerate(questions[:8])])
    train(["data=custom", f"data.train_files=[{yes}]", f"data.eval_files=[{no}]", "train.max_steps=6", "train.save_every=2",
           "eval.every_n_steps=2", "train.keep_checkpoints=1", "export.checkpoint=best", "logger=none", "run.name=best",
           "eval.at_end=[lm]", "export.eval_conversations=4", "train.micro_batch_size=4"], tmp_path)
    run = tmp_path / "best"
    evals = {r["step"]: r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r}
    assert sorted(evals) == [2, 4, 6]
    best = min(evals, key=evals.get)
    assert best != 6, evals  # the case this test is for: the last checkpoint is not the best
    best_dir = run / "checkpoints" / f"step_{best:07d}"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == sorted({best_dir.name, "step_0000006"})
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"] == summary["export_checkpoint"] == str(best_dir)
    assert summary["best_eval_loss"] == pytest.approx(evals[best])
    assert Path(_summary(run / "merged")["checkpoint"]).resolve() == best_dir.resolve()
    proc = _cli("merge", run, "--checkpoint", "best", "--out", tmp_path / "again", "--eval-conversations", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dialtune: best: {best_dir.name} (held-out loss {evals[best]:.4f}" in proc.stderr
    assert Path(_summary(tmp_path / "again")["checkpoint"]).resolve() == best_dir.resolve()


def test_merge_takes_a_checkpoint_directory(peft_runs, tmp_path):
    """`dialtune merge <run>/checkpoints/step_N` is `dialtune merge <run> --checkpoint step_N` (what
    `dialtune chat` suggests for a checkpoint); a --checkpoint that names another step is refused."""
    ckpt = sorted((peft_runs["lora"] / "checkpoints").glob("step_*"))[0]
    proc = _cli("merge", ckpt, "--out", tmp_path / "m", "--eval-conversations", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _summary(tmp_path / "m")["checkpoint"] == str(ckpt.resolve())
    proc = _cli("merge", ckpt, "--checkpoint", "step_9999999", "--out", tmp_path / "n", timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "--checkpoint says step_9999999" in errors[0], proc.stderr
    assert not (tmp_path / "n").exists()


def test_bad_hub_repo_id_is_one_sentence(peft_runs, tmp_path):
    from model.export import ExportError, merge

    proc = _cli("merge", peft_runs["lora"], "--out", tmp_path / "x", "--hub-repo-id", "acme/support bot", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("dialtune: error:")]
    assert len(errors) == 1 and "--hub-repo-id 'acme/support bot'" in errors[0], proc.stderr
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="export.hub_repo_id='a/b/c': Repo id must be in the form"):  # a run's config
        merge(str(_adapter(peft_runs["lora"])), str(tmp_path / "y"), hub_repo_id="a/b/c")
    assert not (tmp_path / "y").exists()


def test_eval_of_an_int8_run_uses_the_kernel_it_trained_with(quant_runs):
    """`dialtune eval` of an int8 run measures the model as trained (kernels.fast_int8: bf16 GEMMs of
    the dequantized int8 weights), as the export's reference does, not LLM.int8's matmul."""
    import torch

    from launch.evaluate import load_model, resolve

    cfg, kind, model_dir, _, base, _ = resolve(str(quant_runs["int8"]), [])
    model, _ = load_model(cfg, kind, model_dir, base, torch.device("cpu"))
    from bitsandbytes.nn import Linear8bitLt  # (PEFT's int8 LoRA layer has the same class name: not this one)

    assert sum(type(m).__name__ == "Int8DequantLinear" for m in model.modules()) == 7 * model.config.num_hidden_layers
    assert not any(isinstance(m, Linear8bitLt) for m in model.modules())
