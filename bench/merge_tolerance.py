"""How far the dequantized merge (`export.base=dequantized`) lands from the adapter on the
quantized base, on a model of a real shape, and how closely each dequantized layer reproduces
its quantized original: the measurements behind `export.verify_dequantize_error` and the
reported-not-checked logit distance (model/export.py's docstring).

    python bench/merge_tolerance.py --shape llama3-1b --quant int8,llm-int8,nf4 [--device cpu|cuda]

A random-init base of the shape (bench/common.py, cached on disk) gets a random LoRA adapter
(r16, all 7 linear layers, B drawn so that the adapter moves the logits by about as much as a
short fine-tune does); then, exactly as `model.export.merge` does, per quantization:
the adapter on the quantized base (bf16 compute) gives the reference logits; the base is
dequantized in place (`model.dequantize.dequantize_`), the adapter applied again and merged in fp32;
the merged logits are compared with the reference over every real token of the probe batch. The
merge into the original fp32 base is compared too. One JSON line per quantization: max/mean
|difference|, the reference logits' scale (largest |logit|, mean per-position std), the
adapter's own effect, and the worst layer's relative output error in `dequantize_`'s check.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import LORA_TARGETS, TINY_TOKENIZER, prepare_model_dir, quiet, say  # noqa: E402


def probe_batch(tokenizer, n: int):
    from model.export import _held_out_batch, default_probe

    sample = Path(__file__).resolve().parent.parent / "data_pipeline" / "sample_data" / "eval.jsonl"
    convs = [json.loads(line)["messages"] for line in sample.read_text().splitlines()[:n]]
    return _held_out_batch(tokenizer, default_probe() + convs, max_len=128)


def make_adapter(base_dir: str, out: str, rank: int, b_std: float, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, low_cpu_mem_usage=True)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    peft.save_pretrained(out)


def measure(base_dir: str, adapter: str, quant: str, batch, device: torch.device) -> dict:
    from omegaconf import OmegaConf
    from peft import PeftModel

    from model.dequantize import dequantize_
    from model.export import _logits, load_fp32_base
    from model.loader import load_base
    from train.config import DialtuneConfig

    cfg = OmegaConf.structured(DialtuneConfig)
    cfg.model.dtype, cfg.quant.mode, cfg.model.attn_implementation = "bf16", quant.replace("llm-", ""), "sdpa"
    mask = batch["attention_mask"].bool()
    batch = {k: v.to(device) for k, v in batch.items()}
    t = time.time()
    model = PeftModel.from_pretrained(load_base(cfg, base_dir, device).eval(), adapter).eval()
    if quant == "int8":  # the recipe's default, kernels.fast_int8; llm-int8: bitsandbytes' LLM.int8 kernel
        from model.kernels import dequantize_int8_linears

        dequantize_int8_linears(model)
    ref = _logits(model, batch).cpu()
    with model.disable_adapter():
        plain = _logits(model, batch).cpu()
    deq = model.unload()
    check = dequantize_(deq)
    model = PeftModel.from_pretrained(deq, adapter).eval()
    unmerged = _logits(model, batch).cpu()
    got = _logits(model.merge_and_unload(), batch).cpu()
    del model, deq
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fp32 = PeftModel.from_pretrained(load_fp32_base(base_dir, _Vocab()), adapter).eval().to(device)
    orig = _logits(fp32.merge_and_unload(), batch).cpu()
    del fp32
    gc.collect()
    r = ref[mask]
    std = r.std(dim=-1).mean().item()
    d_deq, d_orig = (got - ref).abs()[mask], (orig - ref).abs()[mask]
    return {"quant": quant, "device": device.type, "positions": int(mask.sum()), "vocab": ref.shape[-1],
            "max_abs_diff_dequantized": d_deq.max().item(), "mean_abs_diff_dequantized": d_deq.mean().item(),
            "max_abs_diff_original": d_orig.max().item(), "mean_abs_diff_original": d_orig.mean().item(),
            "ref_max_abs_logit": r.abs().max().item(), "ref_logit_std": std,
            "adapter_effect_max": (ref - plain).abs()[mask].max().item(),
            "adapter_effect_mean": (ref - plain).abs()[mask].mean().item(),
            "dequantized_max_over_std": d_deq.max().item() / std,
            "merge_arithmetic_max_abs_diff": (got - unmerged).abs()[mask].max().item(),
            "dequantize_max_rel_error": check["max_rel_error"], "dequantize_worst_layer": check["worst_layer"],
            "seconds": round(time.time() - t, 1)}


class _Vocab:
    """load_fp32_base() resizes embeddings to a tokenizer's length; the shape's vocab is larger."""

    def __len__(self):
        return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-1b")
    p.add_argument("--quant", default="int8,llm-int8,nf4", help="int8 (through kernels.fast_int8, the recipe default), llm-int8, nf4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--b-std", type=float, default=2e-3, help="std of the adapter's B matrices (A: PEFT's init)")
    p.add_argument("--conversations", type=int, default=6, help="eval conversations in the probe batch (plus 2 short ones)")
    p.add_argument("--model-cache", default=os.path.join(tempfile.gettempdir(), "dialtune-bench"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quiet()
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    base_dir = prepare_model_dir(args.shape, args.model_cache, device)
    adapter = os.path.join(args.model_cache, f"adapter-{os.path.basename(base_dir)}-r{args.rank}-b{args.b_std:g}-s{args.seed}")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        make_adapter(base_dir, adapter, args.rank, args.b_std, args.seed)
    batch = probe_batch(AutoTokenizer.from_pretrained(str(TINY_TOKENIZER)), args.conversations)
    for quant in args.quant.split(","):
        row = {"shape": args.shape, **measure(base_dir, adapter, quant, batch, device)}
        say(f"{args.shape} {quant}: dequantized merge max |diff| {row['max_abs_diff_dequantized']:.4g} "
            f"({row['dequantized_max_over_std']:.3g} x the logits' std {row['ref_logit_std']:.3g}), original "
            f"{row['max_abs_diff_original']:.4g}; adapter effect {row['adapter_effect_max']:.3g}; worst dequantized layer "
            f"{row['dequantize_max_rel_error']:.2%} ({row['dequantize_worst_layer']})")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
