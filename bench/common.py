"""What both benchmarked paths share: model shapes, the random base on disk, the synthetic
conversations, and the throughput/memory meter.

Importable with torch + transformers (+ peft, + bitsandbytes for int8/nf4) alone: no deepspeed,
datasets, hydra or omegaconf, which the lent GPU machine does not have unless carried.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data_pipeline" / "sample_data" / "train.jsonl"
TINY_TOKENIZER = ROOT / "model" / "tiny" / "tokenizer"
IGNORE = -100
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Published configs (no download), with the fields that shape compute and memory.
SHAPES = {
    "llama3-8b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)),
    "tiny": ("LlamaConfig", dict(vocab_size=4096, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
DTYPES = {"int8": torch.bfloat16, "nf4": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def quiet() -> None:
    """No per-file progress bars from transformers/huggingface_hub in the bench log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def shape_config(shape: str, layers: Optional[int] = None):
    """The shape's config; layers: that many decoder layers instead of the shape's (a shallow model
    of the same width: per-layer costs, measured in seconds)."""
    import transformers

    cls, kw = SHAPES[shape]
    if layers:
        kw = {**kw, "num_hidden_layers": layers}
    return getattr(transformers, cls)(**kw, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---- the random base model, saved once per shape ----------------------------------------------


def prepare_model_dir(shape: str, cache_root: str, device: torch.device, layers: Optional[int] = None) -> str:
    """A random-init model of the shape as safetensors under cache_root (reused when present):
    built in bf16 directly on the GPU (seconds for 8B; fp32 on CPU), then saved, so that every
    run loads the same weights with `from_pretrained` and int8/nf4 quantize on load, as in real use.
    For 8B: ~16 GB written once; each later load reads it from the page cache."""
    from transformers import AutoModelForCausalLM

    cfg = shape_config(shape, layers)
    key = hashlib.sha256(cfg.to_json_string().encode()).hexdigest()[:10]
    path = os.path.join(cache_root, f"{shape}-{key}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    say(f"random {shape} base written to {path} in {time.time() - t:.0f} s")
    return path


# ---- synthetic conversations ----------------------------------------------------------------


def _bundled_templates(max_len: int):
    """(length, target mask) of each bundled training conversation, tokenized with the committed
    tiny tokenizer and its chat template: realistic lengths and assistant-token share."""
    from transformers import AutoTokenizer

    from data_pipeline.chat import encode, end_of_turn_id

    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    eot = end_of_turn_id(tok)
    out = []
    with open(SAMPLE) as f:
        for line in f:
            ids, labels, _ = encode(tok, json.loads(line)["messages"], eot, max_len)
            if ids:
                out.append(np.asarray(labels) != IGNORE)
    return out


def _lognormal_templates(max_len: int, seed: int, n: int = 2000):
    """Fallback: log-normal lengths around 350 tokens, the last 57% of each one a target."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(np.log(350), 0.6, n)), 16, max_len).astype(int)
    return [np.arange(n_) >= round(0.43 * n_) for n_ in lengths]


def conversations(lengths: str, max_len: int, vocab: int, count: int, seed: int) -> List[Dict]:
    """The first `count` conversations ({input_ids, labels}) of a seeded stream, the same prefix
    whatever the count, so that both paths draw the same data: shapes (length and which tokens
    are targets) from the bundled data ('bundled', falling back to 'lognormal' when it is
    missing) or from 'lognormal', cycled in seeded random order; random token ids."""
    templates = None
    if lengths == "bundled":
        try:
            templates = _bundled_templates(max_len)
        except (OSError, ImportError) as e:
            say(f"bundled conversations unavailable ({e}); using log-normal lengths")
    if not templates:
        templates = _lognormal_templates(max_len, seed)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(templates)) for _ in range(-(-count // len(templates)))])[:count]
    out = []
    for k, i in enumerate(order):
        mask = templates[i]
        ids = np.random.default_rng([seed, k]).integers(3, vocab, size=len(mask))
        out.append({"input_ids": ids.tolist(), "labels": np.where(mask, ids, IGNORE).tolist()})
    return out


# ---- measuring -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Tokens and wall time of the steps after warm-up (>= 1 step, so that one-off costs such as
    allocator growth and compilation stay out): call `step(i, counts)` at the end of step i
    (1-based) with that step's counts {real, target, padded, lengths}."""

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.device, self.warmup, self.last = device, warmup, warmup + steps
        self.t0: Optional[float] = None
        self.t1: Optional[float] = None
        self.real = self.target = self.padded = 0
        self.lengths: List[int] = []

    def step(self, i: int, counts: Dict) -> None:
        if i == self.warmup or i == self.last:
            sync(self.device)
            now = time.perf_counter()
            if i == self.warmup:
                self.t0 = now
            else:
                self.t1 = now
        if self.warmup < i <= self.last:
            self.real += counts["real"]
            self.target += counts["target"]
            self.padded += counts["padded"]
            self.lengths += counts["lengths"]

    def result(self, hf_config, peak: Optional[float]) -> Dict:
        from train.flops import effective_seq_len, flops_per_token, mfu

        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the measured steps did not run to the end")
        dt = self.t1 - self.t0
        seq = effective_seq_len(self.lengths)
        fpt = flops_per_token(hf_config, seq)
        real_s = self.real / dt
        return {"seconds": dt, "real_tok_s": real_s, "target_tok_s": self.target / dt, "padded_tok_s": self.padded / dt,
                "effective_seq_len": seq, "flops_per_token": fpt, "mfu": mfu(real_s, fpt, peak),
                "peak_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def batch_counts(input_ids, labels, attention_mask=None, lengths=None) -> Dict:
    """Counts of one micro-batch: non-pad tokens, targets (shifted, as the loss sees them), all
    positions, and the conversation lengths (for the attention FLOPs)."""
    if lengths is None:
        lengths = attention_mask.sum(1).tolist()
    return {"real": int(sum(lengths)), "target": int((labels[:, 1:] != IGNORE).sum()),
            "padded": int(input_ids.numel()), "lengths": [int(n) for n in lengths]}
