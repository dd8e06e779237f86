"""How many decoder layers can keep their activations (skip the recompute of gradient
checkpointing) within a GPU memory budget: `kernels.memory_budget_gib`.

The estimate is built from what one decoder layer saves for its backward pass per token — the
tensors, not a fitted constant — so it follows the model's shape, the LoRA dropout and whether
Liger's kernels run:

  layer input (RMSNorm)                         h
  q/k/v LoRA input: dropout(x) + mask, each     1.5 h  x3   (dropout 0: the normed x, once: h)
  attention q, k, v, out (varlen / maskless)   2 h + 2 kv   (with a mask, SDPA gets k and v
                                                            repeated to every head: 4 h)
  o LoRA input: dropout(out) + mask             1.5 h       (dropout 0: `out` itself: 0)
  post-attention RMSNorm input                  h
  gate/up LoRA input, each                      1.5 h  x2   (dropout 0: h, once)
  SwiGLU gate and up                            2 i
  down LoRA input: dropout(act) + mask          1.5 i       (dropout 0: act: i)
  without Liger: each HF RMSNorm keeps an fp32 copy of its input instead (+h each) and SiLU
  its output (+i)
  fused LoRA (kernels.fused_lora, model/fused_lora.py): the LoRA inputs are kept as with dropout 0,
  whatever the dropout (the masks are redrawn in backward); q/k/v's and gate/up's input, the
  norms' outputs, are recomputed from the norms' inputs, which the norms keep anyway (0 instead of
  h each); a gated-SiLU MLP keeps gate and up only: down_proj's input is recomputed from them (0
  instead of i; without Liger no SiLU output either). Llama-3-8B: 4 h + 2 kv + 2 i = 94 KB a token

in elements of the training dtype (h hidden, i intermediate, kv = key/value heads x head dim).
Measured on an H200 (Llama-3-8B shape, LoRA r16 dropout 0.05 on all 7 projections, Liger, bf16,
4,096 tokens): 16 un-checkpointed layers added 13.2 GiB to the peak for int8, nf4 and bf16 alike,
0.825 GiB a layer = 216 KB a token; the table above gives 211 KB (13 h + 2 kv + 3.5 i). A 5 %
margin is added. The rest of the peak: what is allocated when the plan is made (weights, adapter),
the optimizer's state for the trainable parameters (16 bytes each, not divided by ZeRO), each
layer's checkpointed input (h), the larger of two layers' activations (the one being recomputed
and its backward) and the cross-entropy's temporaries (they are not alive at once), and what the
caller reserves (the recipe: DeepSpeed's two gradient buckets, 0.37 GiB by default) — which puts
the all-checkpointed estimate for the measured bf16 run at 18.4 GiB (18.8 with the buckets)
against the 17.6 GiB measured without DeepSpeed (on the safe side), and the int8 one at 11.9
(12.3) against 11.1. Not covered (apply_budget says so and leaves every layer checkpointed):
DoRA, LLM.int8's matmul (kernels.fast_int8=false), ZeRO-3, CPU.

`kernels.memory_budget_gib=auto` fills the GPU: the budget is what PyTorch holds when the plan is
made (allocated, and cached for reuse) plus what the device has free then, less a headroom of
AUTO_HEADROOM of the card (at least AUTO_MIN_HEADROOM_GIB) for the CUDA context, the caching
allocator's fragmentation and what the estimate leaves out; the smallest over the ranks, so that
every rank keeps the same layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

GIB = 2**30
MARGIN = 1.05  # on the per-layer activations (the table undercounts the measurement by 2.5 %)
OPTIMIZER_BYTES = 16  # per trainable parameter: fp32 master, 16-bit gradient, Adam's two fp32 moments (and slack)
CE_BYTES = 10  # per chunk row per vocabulary entry: fp32 logits, their softmax and its gradient
AUTO = "auto"
AUTO_HEADROOM = 0.10  # of the card's memory, kept free by memory_budget_gib=auto
AUTO_MIN_HEADROOM_GIB = 4.0


def _dims(config):
    """(hidden, intermediate, key/value width, layers) of a decoder config; AttributeError when
    it has none of the names this knows."""
    if hasattr(config, "get_text_config"):  # multimodal configs keep the language model's in text_config
        config = config.get_text_config()
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not h or not layers:
        raise AttributeError(f"{type(config).__name__} names no hidden size or layer count this estimate knows")
    i = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return h, i, kv, layers


def layer_activation_bytes(config, tokens: int, *, lora_dropout: float, liger: bool, dtype_bytes: int = 2,
                           masked: bool = False, fused: frozenset = frozenset()) -> int:
    """Bytes one decoder layer keeps for its backward pass when it is not checkpointed (the table
    in the module docstring), times MARGIN. masked: attention through SDPA with a mask (padded
    batches, packed_attention=mask), which repeats k and v to every head. fused: what
    kernels.fused_lora changed in every layer (model/fused_lora.py fused_parts): "lora" (the LoRA
    inputs kept as with dropout 0), "norms" (q/k/v's and gate/up's input recomputed from the norm's
    input), "swiglu" (down_proj's input recomputed from gate and up, no SiLU output)."""
    h, i, kv, _ = _dims(config)
    drop = lora_dropout > 0 and "lora" not in fused
    norms, swiglu = "norms" in fused, "swiglu" in fused
    per_token = (h  # layer input (RMSNorm)
                 + (0 if norms else 4.5 * h if drop else h)  # q/k/v LoRA input
                 + 2 * h + 2 * kv  # attention q, k, v, out
                 + (1.5 * h if drop else 0)  # o LoRA input
                 + h  # post-attention RMSNorm input
                 + (0 if norms else 3 * h if drop else h)  # gate/up LoRA input
                 + 2 * i  # SwiGLU gate and up
                 + (0 if swiglu else 1.5 * i if drop else i))  # down LoRA input
    if not liger:
        per_token += 2 * h + (0 if swiglu else i)
        if norms and dtype_bytes < 4:  # HF's RMSNorm keeps an fp32 copy, not the 16-bit input the branches keep
            per_token += 2 * h
    if masked:
        per_token += 2 * (h - kv)
    return int(per_token * dtype_bytes * tokens * MARGIN)


@dataclass
class Plan:
    keep: int  # decoder layers that keep their activations (not recomputed)
    layers: int
    per_layer_gib: float
    peak_gib: float  # estimated peak with `keep` layers un-checkpointed
    floor_gib: float  # estimated peak with every layer checkpointed

    def describe(self, budget: str, tokens: int) -> str:
        """budget: the setting as the log names it ("24", "auto (70.3 GiB)")."""
        if self.keep == 0:
            return (f"kernels.memory_budget_gib={budget}: every decoder layer recomputes (estimated peak "
                    f"{self.floor_gib:.1f} GiB with all {self.layers} checkpointed; each layer kept would add "
                    f"{self.per_layer_gib:.2f} GiB at {tokens:,} tokens a micro-batch)")
        return (f"kernels.memory_budget_gib={budget}: {self.keep} of {self.layers} decoder layers keep their "
                f"activations ({self.per_layer_gib:.2f} GiB each at {tokens:,} tokens a micro-batch), "
                f"{self.layers - self.keep} recompute; estimated peak {self.peak_gib:.1f} GiB")


def plan(config, *, budget_bytes: float, allocated_bytes: int, trainable_params: int, tokens: int, lora_dropout: float,
         liger: bool, fused_ce: bool, ce_chunk_size: int, dtype_bytes: int = 2, reserved_bytes: int = 0,
         masked: bool = False, fused: frozenset = frozenset()) -> Plan:
    """The most decoder layers that can skip recomputation with the estimated peak (see the module
    docstring) within budget_bytes."""
    h, _, _, layers = _dims(config)
    per_layer = layer_activation_bytes(config, tokens, lora_dropout=lora_dropout, liger=liger, dtype_bytes=dtype_bytes,
                                       masked=masked, fused=fused)
    vocab = getattr(config, "vocab_size", 0)
    ce = (min(ce_chunk_size, tokens) if fused_ce else tokens) * vocab * CE_BYTES
    floor = (allocated_bytes + trainable_params * OPTIMIZER_BYTES + layers * tokens * h * dtype_bytes
             + max(2 * per_layer, ce) + reserved_bytes)
    keep = max(0, min(layers, math.floor((budget_bytes - floor) / per_layer))) if per_layer else layers
    return Plan(keep, layers, per_layer / GIB, (floor + keep * per_layer) / GIB, floor / GIB)


def is_auto(budget) -> bool:
    return isinstance(budget, str) and budget.strip().lower() == AUTO


def budget_problem(budget, checkpoint_every: int) -> Optional[str]:
    """One sentence for a kernels.memory_budget_gib that is not a GiB count >= 0 or auto, or that
    is combined with checkpoint_every > 1; None when it is fine."""
    if not is_auto(budget):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            return (f"kernels.memory_budget_gib={budget!r} is neither a number of GiB nor auto; use 0 (off), "
                    "the GiB each GPU may use, or auto (what the GPU has free).")
        if not math.isfinite(budget) or budget < 0:
            return f"kernels.memory_budget_gib={budget:g} is not a GiB count >= 0; use 0 (off), the GiB each GPU may use, or auto."
    if (is_auto(budget) or budget > 0) and checkpoint_every > 1:
        return ("kernels.memory_budget_gib and kernels.checkpoint_every both choose which layers recompute; "
                "set one of them (memory_budget_gib=0 or checkpoint_every=1).")
    return None


def auto_budget_bytes(free_bytes: int, total_bytes: int, reserved_bytes: int) -> float:
    """memory_budget_gib=auto: what PyTorch holds (reserved) + what the device has free, less
    max(AUTO_HEADROOM of the card, AUTO_MIN_HEADROOM_GIB)."""
    return reserved_bytes + free_bytes - max(AUTO_HEADROOM * total_bytes, AUTO_MIN_HEADROOM_GIB * GIB)


def _min_over_ranks(value: float, dev) -> float:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def full_finetune_state_bytes(params: int, *, weight_bytes: int, stage: int, world: int, offload_optimizer: bool,
                              offload_param: bool) -> float:
    """Per GPU, what full fine-tuning holds besides activations (a lower bound): the weights
    (partitioned by ZeRO-3, or in CPU memory with parameter offload), their gradients (partitioned
    from ZeRO-2; with optimizer offload ZeRO-2/3 keep them in CPU memory), and Adam's state: two
    fp32 moments, plus fp32 master weights when training in 16 bits (partitioned from ZeRO-1, or in
    CPU memory with optimizer offload)."""
    weights = 0.0 if offload_param else params * weight_bytes / (world if stage == 3 else 1)
    grads = 0.0 if offload_optimizer and stage >= 2 else params * weight_bytes / (world if stage >= 2 else 1)
    adam = 8 if weight_bytes == 4 else 12
    optimizer = 0.0 if offload_optimizer else params * adam / (world if stage >= 1 else 1)
    return weights + grads + optimizer


def full_finetune_problem(cfg, params: int, world: int, card_bytes: int) -> Optional[str]:
    """One sentence when a full fine-tune cannot fit on the GPU, else None: every rank loads the
    whole model before DeepSpeed partitions it, then holds its share of weights, gradients and
    optimizer states (the first step would run out of memory)."""
    from train.ds_config import mixed_precision

    ds = cfg.deepspeed
    weight_bytes = 4 if mixed_precision(cfg) == "fp32" else 2
    what = f"full fine-tuning (peft=none) of {params / 1e9:.2f} B parameters"
    if params * weight_bytes > 0.9 * card_bytes:
        return (f"{what}: its {params * weight_bytes / GIB:.0f} GiB of weights do not fit on this {card_bytes / GIB:.0f} GiB GPU, and "
                f"every rank loads the whole model before ZeRO partitions it; use GPUs that hold it, or an adapter on a quantized "
                f"base (recipe=lora_int8 or qlora_nf4)")
    need = full_finetune_state_bytes(params, weight_bytes=weight_bytes, stage=ds.stage, world=world,
                                     offload_optimizer=ds.offload_optimizer == "cpu", offload_param=ds.offload_param == "cpu")
    if need <= 0.9 * card_bytes:
        return None
    # (ZeRO-3 with both offloads keeps none of it on the GPU: the advice below is always a change)
    return (f"{what} needs ~{need / GIB:.0f} GiB per GPU for weights, gradients and Adam states under ZeRO-{ds.stage} on "
            f"{world} GPU(s), more than this {card_bytes / GIB:.0f} GiB GPU has; use recipe=full_zero3_offload (ZeRO-3, "
            f"states in CPU memory), more GPUs, or an adapter (peft=lora)")


def apply_budget(model, cfg, dev, liger: bool, masked: bool) -> Optional[str]:
    """kernels.memory_budget_gib for the recipe: plan and apply which decoder layers recompute;
    returns the sentence to log (None when the budget is off). Never raises: a model or setting
    the estimate does not cover keeps every layer checkpointed, and the sentence says why."""
    import torch

    from model import fused_lora, kernels
    from train.ds_config import mixed_precision

    budget = cfg.kernels.memory_budget_gib
    auto = is_auto(budget)
    if not auto and budget <= 0:
        return None
    head = f"kernels.memory_budget_gib={AUTO if auto else f'{budget:g}'}"
    if not cfg.model.gradient_checkpointing:
        return f"{head} has no effect: model.gradient_checkpointing is off, so no layer recomputes anyway"
    why_not = None
    if dev.type != "cuda":
        why_not = "it applies on CUDA only"
    elif cfg.deepspeed.stage == 3:
        why_not = "not under ZeRO-3 (parameters are partitioned after this point, so their memory is not known yet)"
    elif cfg.peft.method == "dora":
        why_not = "DoRA's saved tensors are not in the estimate"
    elif cfg.quant.mode == "int8" and not cfg.kernels.fast_int8:
        why_not = "LLM.int8's matmul (kernels.fast_int8=false) saves more than the estimate counts"
    if why_not is None:
        try:
            tokens = cfg.train.micro_batch_size * cfg.data.max_seq_len
            no_fused = kernels.fused_ce_unsupported(model) if cfg.kernels.fused_ce else "off"
            allocated = torch.cuda.memory_allocated(dev)
            if auto:
                free, total = torch.cuda.mem_get_info(dev)
                budget_bytes = _min_over_ranks(auto_budget_bytes(free, total, torch.cuda.memory_reserved(dev)), dev)
                label = f"{AUTO} ({budget_bytes / GIB:.1f} GiB of this {total / GIB:.0f} GiB GPU)"
            else:
                budget_bytes, label = budget * GIB, f"{budget:g}"
            p = plan(model.config, budget_bytes=budget_bytes, allocated_bytes=allocated,
                     trainable_params=sum(t.numel() for t in model.parameters() if t.requires_grad), tokens=tokens,
                     lora_dropout=cfg.peft.dropout if cfg.peft.method != "none" else 0.0,
                     liger=liger,
                     fused_ce=not no_fused, ce_chunk_size=cfg.kernels.ce_chunk_size,
                     dtype_bytes=4 if mixed_precision(cfg) == "fp32" else 2,
                     reserved_bytes=2 * cfg.deepspeed.reduce_bucket_size * 4, masked=masked,
                     fused=fused_lora.fused_parts(model))
            kernels.checkpoint_layers(model, p.keep)
            return p.describe(label, tokens)
        except (ValueError, AttributeError) as e:
            why_not = f"this model is not covered ({e})"
    return f"{head} not applied: {why_not}; every decoder layer recomputes"
