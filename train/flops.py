"""Model FLOPs per token, peak GPU FLOP/s and MFU, for dense decoder-only transformers.

Convention (PaLM, Chowdhery et al. 2022, appendix B), training = forward + backward:

    flops_per_token = 6 * N_matmul  +  12 * n_layers * n_heads * head_dim * seq_len

- N_matmul: the weights that take part in a matrix product for every token — attention q/k/v/o
  (GQA-aware), the MLP (3 matrices when gated as in Llama/Qwen2/Mistral/Gemma/Phi-3, 2 for GPT-2)
  and the output head (counted even when tied to the embeddings: the product still happens).
  The embedding lookup is a gather, not a product, and is excluded; biases and norms are ignored.
- Attention: QK^T and AV cost 2 * 2 * seq_len * n_heads * head_dim per token and layer forward,
  x3 for forward + backward. seq_len is what a token attends over, counted non-causally (the
  convention does not halve for the causal mask). With packing or padding, a token attends only
  to its own conversation, so pass `effective_seq_len(conversation_lengths)`, the token-weighted
  mean conversation length, or use `flops_for_documents`.
- 6 x counts the weight-gradient products of full fine-tuning. A frozen LoRA base skips them but
  gradient checkpointing recomputes the forward; the convention ignores both, so LoRA runs are
  measured against the same yardstick as published full fine-tuning MFU figures.

MFU = achieved model FLOP/s / peak dense FLOP/s of the device (`peak_flops`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

# Decoder families whose MLP is up -> activation -> down (2 matrices); all others are gated
# (gate and up, or one fused gate_up, then down: 3 matrices of hidden x intermediate).
_PLAIN_MLP = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi", "starcoder2"}

# Peak dense (no 2:4 sparsity) bf16/fp16 tensor-core FLOP/s from NVIDIA's datasheets, matched as a
# lower-case substring of torch.cuda.get_device_name(); the first hit wins, so more specific names
# come first. "NVIDIA H100 80GB HBM3" is the SXM part.
PEAK_BF16_FLOPS = (
    ("gh200", 989e12),
    ("h200 nvl", 835e12),
    ("h200", 989e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10g", 70e12),  # AWS part; sources disagree (70-125): override if you know better
    ("a10", 125e12),
    ("rtx 6000 ada", 364e12),
    ("rtx 4090", 165e12),  # fp32 accumulate, as training uses
    ("rtx 3090", 71e12),
)
PEAK_ENV = "DIALTUNE_PEAK_TFLOPS"  # overrides the table, in TFLOP/s


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def shape(cfg) -> dict:
    """The numbers the count needs, from Llama/Qwen2/Mistral/Gemma/Phi-3 or GPT-2 field names."""
    for moe in ("num_local_experts", "num_experts", "n_routed_experts"):
        if _get(cfg, moe):
            raise ValueError(f"{type(cfg).__name__} is a mixture of experts ({moe}); flops_per_token counts dense decoders only.")
    hidden = _get(cfg, "hidden_size", "n_embd")
    heads = _get(cfg, "num_attention_heads", "n_head")
    return {
        "hidden": hidden,
        "layers": _get(cfg, "num_hidden_layers", "n_layer"),
        "heads": heads,
        "kv_heads": _get(cfg, "num_key_value_heads", default=heads),
        "head_dim": _get(cfg, "head_dim", default=hidden // heads),
        "intermediate": _get(cfg, "intermediate_size", "n_inner", default=4 * hidden),
        "vocab": cfg.vocab_size,
        "gated": getattr(cfg, "model_type", "") not in _PLAIN_MLP,
    }


def matmul_params(cfg) -> int:
    """Weights used in a matrix product per token: attention + MLP of every layer + output head."""
    s = shape(cfg)
    h, d = s["hidden"], s["head_dim"]
    attn = h * s["heads"] * d * 2 + h * s["kv_heads"] * d * 2  # q and o; k and v (GQA)
    mlp = (3 if s["gated"] else 2) * h * s["intermediate"]
    return s["layers"] * (attn + mlp) + s["vocab"] * h


def attention_flops_per_token(cfg, seq_len: float) -> float:
    s = shape(cfg)
    return 12.0 * s["layers"] * s["heads"] * s["head_dim"] * seq_len


def flops_per_token(cfg, seq_len: float) -> float:
    """Training FLOPs per token (forward + backward) at attended length seq_len (see module doc)."""
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def effective_seq_len(lengths: Sequence[int]) -> float:
    """Token-weighted mean length of the conversations (documents) the tokens belong to:
    sum(n^2) / sum(n). The seq_len to use when every token attends within its own conversation."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


def flops_for_documents(cfg, lengths: Sequence[int]) -> float:
    """Training FLOPs of a step over conversations of these token lengths (padding excluded); 0 for
    a model countable() turned down (cfg None)."""
    total = sum(lengths)
    return total * flops_per_token(cfg, effective_seq_len(lengths)) if cfg is not None else 0.0


def countable(cfg, log=None):
    """cfg when its FLOPs can be counted, else None, said once through log (a mixture of experts:
    its active parameters per token are not counted here, and a wrong MFU is worse than none)."""
    try:
        shape(cfg)
        return cfg
    except ValueError as e:
        if log is not None:
            log.info("perf/model_tflops_per_device and perf/mfu are not logged: %s", e)
        return None


def step_metrics(step_flops: float, elapsed: float, world: int, peak: Optional[float]) -> dict:
    """The step's FLOPs metrics ({} when they are not counted: step_flops 0)."""
    if not step_flops:
        return {}
    per_device = step_flops / elapsed / world
    return {"perf/model_tflops_per_device": per_device / 1e12, **({"perf/mfu": per_device / peak} if peak else {})}


def peak_flops(device=None, dtype: torch.dtype = torch.bfloat16, override: Optional[float] = None) -> Optional[float]:
    """Peak dense FLOP/s of a CUDA device for bf16/fp16 math; None on CPU, for other dtypes, or for
    an unknown GPU. `override` (FLOP/s) or $DIALTUNE_PEAK_TFLOPS (TFLOP/s) win over the table."""
    if override:
        return float(override)
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV]) * 1e12
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda" or not torch.cuda.is_available():
        return None
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation of one device; None when the peak is unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak
