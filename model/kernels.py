"""Training-speed levers: chunked linear + cross-entropy, a dequantising int8 linear, Liger
kernels, selective activation checkpointing and regional torch.compile (the fused LoRA branch:
model/fused_lora.py).

Each lever is a plain function the recipe calls when its config switch is on; each returns what
it did, so the caller can log it. The losses are the same sums `token_ce_sum`
computes (shifted next-token CE over target positions), so switching a lever on never changes
the loss normalisation.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("dialtune")

IGNORE = -100
# Rows per chunk: with a 128k vocabulary a chunk's temporaries (its logits in the compute dtype,
# in fp32, and the softmax) take ~1.3 GB, and a 1024-row product is large enough to run the
# head at full GEMM speed.
DEFAULT_CHUNK = 1024


# ---------------------------------------------------------------------------------------------
# Chunked linear + cross-entropy


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) over rows of h, chunk by chunk; each chunk's logits are
    recomputed in backward instead of stored, so memory stays O(chunk x vocab)."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size):
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], chunk_size):
            logits = (h[s:s + chunk_size] @ weight.t()).float()
            lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
            total += (lse[s:s + chunk_size] - picked).sum()
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        # accumulated in the weight's dtype, one rounding per chunk (as Liger does): an fp32
        # accumulator would add 4 bytes x vocab x hidden (2 GB for Llama-3-8B)
        grad_w = torch.zeros_like(weight) if need_w else None
        c = ctx.chunk_size
        for s in range(0, h.shape[0], c):
            hc = h[s:s + c]
            # d CE / d logits = softmax - onehot, in fp32, then scaled by the incoming gradient
            p = (hc @ weight.t()).float().sub_(lse[s:s + c, None]).exp_()
            p[torch.arange(p.shape[0], device=p.device), targets[s:s + c]] -= 1.0
            p = p.mul_(grad_total).to(weight.dtype)
            if need_h:
                grad_h[s:s + c] = p @ weight
            if need_w:
                grad_w.addmm_(p.t(), hc)
        return grad_h, grad_w, None, None


def chunked_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = IGNORE, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Summed next-token cross-entropy of logits = hidden @ weight.T without the [tokens, vocab]
    logits: hidden[:, t] predicts labels[:, t + 1], as `token_ce_sum` does.

    hidden [B, T, H] (the final hidden states, after the last norm), weight [V, H] (the output
    head), labels [B, T]. Only positions whose next label is a target are projected (in SFT most
    are not), in chunks of `chunk_size` rows, with fp32 log-softmax whatever the input dtype.
    Gradients reach `hidden` and, when it requires grad (lm_head in modules_to_save), `weight`.
    Returns an fp32 scalar; 0 (still part of the graph) when no position is a target.
    """
    B, T, H = hidden.shape
    keep = labels[:, 1:] != ignore_index
    b, t = keep.nonzero(as_tuple=True)
    rows = hidden.reshape(B * T, H).index_select(0, b * T + t)  # hidden[b, t] predicts labels[b, t + 1]
    targets = labels[:, 1:][keep]
    if rows.dtype != weight.dtype:  # what nn.Linear would need too
        rows = rows.to(weight.dtype)
    return _LinearCrossEntropySum.apply(rows, weight, targets, chunk_size)


# ---------------------------------------------------------------------------------------------
# Final hidden states + output head of a (PEFT-wrapped, DeepSpeed-wrapped) causal LM


def causal_lm(model) -> nn.Module:
    """The transformers *ForCausalLM inside a DeepSpeed engine and/or a PeftModel."""
    if type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def fused_ce_unsupported(model) -> Optional[str]:
    """Why `fused_ce_sum` cannot stand in for logits + CE on this model, or None when it can."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        return f"{type(lm).__name__} has no output head (get_output_embeddings)"
    if getattr(head, "bias", None) is not None:
        return "the output head has a bias"
    if hasattr(head, "base_layer"):  # a PEFT tuner layer (LoRA on lm_head): its weight is the base's alone
        return "the output head carries an adapter (lm_head among peft.target_modules)"
    cfg = lm.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return f"the model transforms its logits ({name}={getattr(cfg, name)})"
    w = head.weight
    if hasattr(w, "ds_id") or w.numel() == 0:
        return "the output head is partitioned by ZeRO-3"
    return None


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def hidden_states_as_logits(model) -> Iterator[torch.Tensor]:
    """Inside the block, `model(**inputs).logits` holds the final hidden states (after the last
    norm) instead of logits; yields the output head's weight to pair them with.

    The forward still goes through the outermost wrapper (DeepSpeed engine, PeftModel, the HF
    model), so everything those do per forward (DeepSpeed's backward hooks on the outputs, PEFT's
    forward arguments, masks built from attention_mask/position_ids) happens as usual; only the
    head's product is skipped, by shadowing its `forward` on the instance. Tied heads and PEFT
    modules_to_save heads give their active weight. Check `fused_ce_unsupported` first.
    """
    head = causal_lm(model).get_output_embeddings()
    shadowed = head.__dict__.get("forward")  # an accelerate hook may already sit there
    head.forward = _passthrough
    try:
        yield head.weight
    finally:
        if shadowed is None:
            del head.forward
        else:
            head.forward = shadowed


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over target positions (labels != IGNORE): logits[:, t]
    predicts labels[:, t + 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def fused_ce_sum(model, labels: torch.Tensor, chunk_size: int = DEFAULT_CHUNK, **inputs) -> torch.Tensor:
    """`token_ce_sum(model(**inputs).logits, labels)` without the logits (see chunked_linear_ce_sum)."""
    with hidden_states_as_logits(model) as weight:
        hidden = model(**inputs).logits
    return chunked_linear_ce_sum(hidden, weight, labels, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# Fast int8: dequantise bitsandbytes int8 weights per layer into plain GEMMs


class _Int8Matmul(torch.autograd.Function):
    """x @ dequantize(CB, SCB)^T; backward dequantises again rather than keeping the 16-bit weight
    alive between forward and backward (that would hold a 16-bit copy of every layer)."""

    @staticmethod
    def forward(ctx, x, cb, scb):
        ctx.save_for_backward(cb, scb)
        return F.linear(x, dequantize(cb, scb, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        cb, scb = ctx.saved_tensors
        return grad_out @ dequantize(cb, scb, grad_out.dtype), None, None


def dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = CB * SCB / 127 (bitsandbytes' row-wise absmax int8) in `dtype`.

    One elementwise kernel: int8 x a `dtype` row scale promotes to `dtype`, computed in fp32 and
    rounded once (the product of an integer below 128 and a 16-bit scale is exact in fp32, so this
    equals converting first and multiplying in `dtype`), reading 1 byte and writing 2 per weight
    instead of the 7 of a conversion followed by an in-place multiply."""
    return cb * (scb.float() / 127.0).to(dtype)[:, None]


class Int8DequantLinear(nn.Module):
    """Stands in for a bitsandbytes Linear8bitLt with the same storage: the int8 weight (CB, the
    Int8Params itself) and its per-row absmax (SCB). Forward dequantises W = CB * SCB / 127 into the
    activation dtype and runs one ordinary GEMM: no activation quantisation and no outlier
    decomposition (LLM.int8), so the int8 base trains at bf16 GEMM speed with int8 weight memory
    plus one layer's 16-bit weight at a time. Frozen: it never produces a weight gradient."""

    def __init__(self, lin8: nn.Module):
        super().__init__()
        self.in_features, self.out_features = lin8.in_features, lin8.out_features
        w = lin8.weight
        if w.dtype != torch.int8:
            raise ValueError("Linear8bitLt is not quantized yet (move it to its device first)")
        # bitsandbytes moves CB/SCB from the parameter into `state` on its first forward
        scb = w.SCB if getattr(w, "SCB", None) is not None else lin8.state.SCB
        # same state-dict keys as Linear8bitLt (weight, SCB, bias): checkpoints load either way
        self.weight = w  # int8 data == CB
        # a layer quantized on one device and moved with Module.to/.cuda keeps SCB where it was
        # quantized (torch swaps the parameter's data, not its SCB attribute); as a buffer here it
        # follows the module from now on
        self.register_buffer("SCB", scb.to(w.device))
        self.bias = lin8.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
        # .data: the plain int8 tensor; Int8Params' own .to() costs ~20 us a call on the CPU side
        out = _Int8Matmul.apply(x, self.weight.data, self.SCB)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def dequantize_int8_linears(model: nn.Module) -> int:
    """Replace every bitsandbytes Linear8bitLt in the model (also those PEFT wraps as base_layer)
    by an Int8DequantLinear over the same int8 storage; returns how many were replaced. Call it
    after the adapter is attached: PEFT recognises Linear8bitLt, not this class."""
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear8bitLt)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8DequantLinear(m))
    return len(targets)


# ---------------------------------------------------------------------------------------------
# Liger kernels (RMSNorm, SwiGLU, RoPE)

LIGER_MODEL_TYPES = ("llama", "qwen2", "mistral")


def _on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


def apply_liger(model) -> bool:
    """Patch Liger's Triton RMSNorm, SwiGLU MLP and RoPE into a Llama/Qwen2/Mistral model that
    lives on CUDA (plain, PEFT- or DeepSpeed-wrapped; before or after the adapter). Liger's cross
    entropy is left off (see fused_ce_sum). Returns False, logging why, when it does not apply.

    Note: Liger patches the transformers modeling module too (classes and apply_rotary_pos_emb),
    so models built later in the same process get its kernels as well.
    """
    lm = causal_lm(model)
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in LIGER_MODEL_TYPES:
        log.info("liger: not applied: model type %r is not one of %s", model_type, ", ".join(LIGER_MODEL_TYPES))
        return False
    if not _on_cuda(lm):
        log.info("liger: not applied: the model is not on a CUDA device (Liger's kernels are Triton, GPU only)")
        return False
    try:
        import liger_kernel.transformers as liger
    except Exception as e:  # ImportError, or an import-time failure against this transformers
        log.info("liger: not applied: liger_kernel cannot be imported (%s: %s)", type(e).__name__, e)
        return False
    patch = getattr(liger, f"apply_liger_kernel_to_{model_type}")
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=lm)
    log.info("liger: RMSNorm, SwiGLU and RoPE kernels applied (%s)", model_type)
    return True


# ---------------------------------------------------------------------------------------------
# Selective activation checkpointing, regional compilation


def decoder_layers(model) -> nn.ModuleList:
    backbone = causal_lm(model).get_decoder()
    for name in ("layers", "h"):  # Llama/Qwen2/Mistral/Gemma/Phi-3, GPT-2
        if isinstance(getattr(backbone, name, None), nn.ModuleList):
            return getattr(backbone, name)
    raise ValueError(f"no decoder layer list found in {type(backbone).__name__}")


def _recompute(model, flags) -> int:
    """Set each decoder layer's gradient checkpointing from flags(n) (n booleans; the others
    store their activations); returns the checkpointed count. Needs gradient checkpointing
    enabled first (model.gradient_checkpointing_enable())."""
    layers = decoder_layers(model)
    if not all(hasattr(layer, "_gradient_checkpointing_func") for layer in layers):
        raise ValueError("gradient checkpointing is not enabled on this model (model.gradient_checkpointing_enable())")
    for layer, flag in zip(layers, flags(len(layers))):
        layer.gradient_checkpointing = flag
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def selective_checkpointing(model, every: int) -> int:
    """Keep activation checkpointing on every `every`-th decoder layer only (1: all layers, as
    gradient_checkpointing_enable does); the others store their activations, trading memory for
    less recomputation. Returns the checkpointed count."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return _recompute(model, lambda n: [i % every == 0 for i in range(n)])


def checkpoint_layers(model, keep: int) -> int:
    """Leave `keep` decoder layers un-checkpointed, spread evenly over the depth; the others
    recompute. Returns the checkpointed count."""
    def flags(n):
        k = max(0, min(n, keep))
        # layer j is kept when the running share of kept layers steps up at j (Bresenham spacing)
        return [(j + 1) * k // n == j * k // n for j in range(n)]

    return _recompute(model, flags)


def checkpointed_count(model) -> Optional[int]:
    """Decoder layers that recompute their activations (None: no decoder layer list found)."""
    try:
        return sum(1 for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False))
    except ValueError:
        return None


def compile_decoder_layers(model, **compile_kwargs) -> int:
    """torch.compile each decoder layer in place (regional compilation: one layer's graph is
    compiled once and reused by all, so compile time stays short); returns the layer count."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def eager(enabled: bool = True):
    """A context in which torch.compile'd code runs eagerly (evaluation and generation with
    kernels.compile): their padded batches of varying length and generate's growing KV cache would
    each compile new graphs of the layers (hitting dynamo's recompile limit) for a few forwards."""
    return torch.compiler.set_stance("force_eager") if enabled else nullcontext()
