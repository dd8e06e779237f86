"""Merge an adapter into a full-precision copy of its base and write a servable checkpoint.

The base is reloaded unquantized (never merge into int8/nf4 weights), the adapter applied, and
before the adapter is folded in, the adapter model's logits on a held-out batch are kept; after
`merge_and_unload` the merged model's logits on the same batch must match within tolerance,
otherwise the export fails. The checkpoint has sharded safetensors, the tokenizer with its chat
template, and a generation_config whose eos_token_id includes the end-of-turn token.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional

import torch

from .loader import DTYPES


class ExportError(RuntimeError):
    pass


def _held_out_batch(tokenizer, texts: List[List[Dict[str, str]]], max_len: int = 256):
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in texts]
    return tokenizer(rendered, return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                     add_special_tokens=False)


def default_probe() -> List[List[Dict[str, str]]]:
    return [
        [{"role": "user", "content": "I need to cancel my order, can you help?"},
         {"role": "assistant", "content": "Of course. Could you tell me the order number?"}],
        [{"role": "user", "content": "Where is my refund?"}],
    ]


def merge(adapter_dir: str, out_dir: str, base_path: Optional[str] = None, dtype: str = "auto",
          max_shard_size: str = "2GB", tolerance: float = 1e-4, probe=None,
          end_of_turn_token: Optional[str] = None) -> Dict:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from data_pipeline.chat import end_of_turn_id

    peft_cfg = PeftConfig.from_pretrained(adapter_dir)
    base_path = base_path or peft_cfg.base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base_path)
    # Full precision on CPU: the merge itself is exact, the cast to the output dtype comes last.
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, low_cpu_mem_usage=True)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    batch = _held_out_batch(tokenizer, probe or default_probe())
    with torch.no_grad():
        ref = model(**batch).logits
        merged = model.merge_and_unload()
        got = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    max_diff = (ref - got).abs()[mask].max().item()
    if max_diff > tolerance:
        raise ExportError(f"merged logits differ from base+adapter by {max_diff:.3g} > export.verify_tolerance={tolerance}; the merged checkpoint was not written.")

    if dtype == "auto":
        dtype = _training_dtype(adapter_dir)
    merged.to(DTYPES[dtype])
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    eot = end_of_turn_id(tokenizer, end_of_turn_token)
    eos = sorted({i for i in (tokenizer.eos_token_id, eot) if i is not None})
    gen = GenerationConfig(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, do_sample=False)
    gen.save_pretrained(tmp)
    summary = {"base": base_path, "adapter": adapter_dir, "dtype": dtype, "verify_max_abs_logit_diff": max_diff,
               "verify_tolerance": tolerance, "eos_token_id": eos}
    with open(os.path.join(tmp, "export_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return summary


def _training_dtype(adapter_dir: str) -> str:
    """The precision the run trained in, from its resolved config next to the checkpoint."""
    run_cfg = os.path.join(adapter_dir, "..", "..", "..", "config.yaml")
    if os.path.isfile(run_cfg):
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run_cfg)
        if cfg.quant.mode == "none":
            return cfg.model.dtype
        return "bf16"
    return "fp32"
