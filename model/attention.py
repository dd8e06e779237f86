"""Varlen attention for packed rows: each document attends only to itself, no mask materialised.

`kernels.packed_attention` picks how packed rows keep their documents apart:

- `mask`: a 4D block-diagonal causal mask (data_pipeline.packing) through transformers' SDPA.
  Exact everywhere, but SDPA then computes every row's full L x L scores (and on CUDA the mask
  forbids the flash backend), so a 4,096-token row of ~350-token documents does ~12x the
  attention work it needs.
- `varlen`: the model runs attention implementation `dialtune_varlen` (registered here with
  transformers' AttentionInterface). Packed batches carry `cu_seq_lens_q/k` and `max_length_q/k`
  (the names transformers' FlashAttention kwargs use; models pass them through to their attention
  functions) and the rows are attended segment by segment: on CUDA in 16-bit with torch's
  FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, causal window), elsewhere
  with causal SDPA per document (exact, for tests and CPU runs). Calls without those kwargs
  (evaluation, generation, padded batches) are plain SDPA with transformers' own masks.
- `auto` (default): varlen, except on a GPU without the kernel (fp32) where it is the mask.
  On CPU the per-document SDPA is also the faster path: 2.7x the mask's step at 4,096-token
  rows of ~350-token conversations, 1.6x at 2,048, parity at 512 (tiny Llama, 1 thread).

Safety: while a packed varlen forward runs (`packed_forward()`), an attention call that did not
receive `cu_seq_lens_q` raises instead of silently attending across documents, so an architecture
that drops the kwargs cannot train on a leaky layout.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

NAME = "dialtune_varlen"
MODES = ("auto", "varlen", "mask")
_packed_forward = False
_registered = False


class PackedAttentionError(ValueError):
    """The requested packed attention cannot run for this model/config (one sentence)."""


@functools.lru_cache(maxsize=None)
def _varlen_kernel():
    """(torch's varlen_attn or None, the names of its parameters). Its signature moved between
    torch versions (is_causal -> window_size, enable_gqa added), so calls are built from it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def _kernel_call(params, Hq: int, Hkv: int, D: int, scaling, window):
    """Keyword arguments for varlen_attn expressing causal (windowed) attention with this scale
    and GQA, plus whether k/v heads must be repeated; None when this torch's kernel cannot."""
    kw = {}
    if "window_size" in params:
        kw["window_size"] = (window - 1 if window else -1, 0)
    elif "is_causal" in params and not window:
        kw["is_causal"] = True
    else:
        return None
    if "scale" in params:
        kw["scale"] = scaling
    elif scaling is not None and abs(scaling - D ** -0.5) > 1e-12:
        return None
    repeat = Hq != Hkv and "enable_gqa" not in params
    if Hq != Hkv and not repeat:
        kw["enable_gqa"] = True
    return kw, repeat


def kernel_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_kernel()[0] is not None


@contextlib.contextmanager
def packed_forward():
    """Marks a forward whose batch is packed for varlen: attention without cu_seq_lens raises,
    and transformers builds no (unused) 4D mask from the restarting position ids."""
    global _packed_forward
    before, _packed_forward = _packed_forward, True
    try:
        yield
    finally:
        _packed_forward = before


def _per_document(q, k, v, cu, scale, window):
    """Reference path: causal SDPA on each segment. q/k/v: (tokens, heads, dim)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        n = e - s
        if window is not None and window < n:
            i = torch.arange(n, device=q.device)
            allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale)
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


# Not traced by torch.compile (kernels.compile compiles each decoder layer): the segments change
# from batch to batch (how many, max_length as a Python int, the per-document loop's .tolist()),
# so a traced attention recompiles on every new batch until dynamo's recompile limit and then
# runs eager anyway (measured: 8 recompiles in 3 CPU steps, 6 minutes). Left out, the layer's
# other ops compile once for the fixed packed-row shape, and attention is one kernel call.
@torch.compiler.disable
def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                             softcap: Optional[float] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                             cu_seq_lens_k: Optional[torch.Tensor] = None, max_length_q: Optional[int] = None,
                             max_length_k: Optional[int] = None, **kwargs):
    """transformers attention function. query (B, Hq, L, D), key/value (B, Hkv, L, D);
    returns (B, L, Hq, D), None."""
    if cu_seq_lens_q is None:
        if _packed_forward:
            model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
            raise RuntimeError(f"the {model_type} model did not pass cu_seq_lens_q down to {type(module).__name__}, so packed "
                               f"documents would attend to each other; use kernels.packed_attention=mask for this model.")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      softcap=softcap, **kwargs)
    if softcap:
        raise RuntimeError("attention logit softcapping is not supported by kernels.packed_attention=varlen; use mask")
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None or kwargs.get("is_causal") is False:
        raise RuntimeError("attention sinks, position biases and non-causal attention are not supported by "
                           "kernels.packed_attention=varlen; use mask")
    if dropout and module.training:
        raise RuntimeError("attention dropout is not supported by kernels.packed_attention=varlen; use mask")
    B, Hq, L, D = query.shape
    if key.shape[2] != L or (cu_seq_lens_k is not None and cu_seq_lens_k.shape != cu_seq_lens_q.shape):
        raise RuntimeError("varlen attention runs self-attention over the packed segments only (no cache)")
    # (the segments are collate_packed's, covering B x L tokens; not re-checked here: on CUDA that
    # would be a host sync in every layer)
    q, k, v = (t.transpose(1, 2).reshape(B * L, t.shape[1], D) for t in (query, key, value))
    window = sliding_window if sliding_window and sliding_window < (max_length_q or L) else None
    kernel, params = _varlen_kernel()
    call = _kernel_call(params, Hq, k.shape[1], D, scaling, window) if kernel_available(q.device, q.dtype) else None
    if call is not None:
        kw, repeat = call
        if repeat:  # a torch without enable_gqa: share the key/value heads by copying them
            k, v = (t.repeat_interleave(Hq // t.shape[1], 1) for t in (k, v))
        out = kernel(q, k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_q, int(max_length_q), int(max_length_q),
                     **kw)
    else:
        out = _per_document(q, k, v, cu_seq_lens_q, scaling, window)
    return out.view(B, L, Hq, D), None


def _mask(*args, **kwargs):
    """transformers' SDPA mask, except inside a packed varlen forward (no mask is needed)."""
    if _packed_forward:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _mask)
    _registered = True


def uniform_sliding_window(config, max_len: int) -> Optional[int]:
    """The sliding window a packed 4D mask must apply (every layer slides by the same window and
    documents can be longer than it), else None. Raises PackedAttentionError when only some
    layers slide (a single mask cannot express that)."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= max_len:
        return None
    types = set(getattr(config, "layer_types", None) or ["sliding_attention"])
    if types != {"sliding_attention"}:
        raise PackedAttentionError(f"the model mixes sliding-window ({window}) and full-attention layers, which one packed mask "
                                   f"cannot express; use kernels.packed_attention=varlen or data.max_seq_len <= {window}")
    return window


_DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attn_dropout", "attention_probs_dropout_prob")
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


def non_attention_layers(config) -> Optional[str]:
    """Layers other than (sliding) attention - linear attention, SSM - carry state along a row, so
    no packed layout keeps documents apart in them; their names, or None."""
    kinds = set(getattr(config, "layer_types", None) or []) | set(getattr(config, "layers_block_type", None) or [])
    return ", ".join(sorted(kinds - _ATTENTION_LAYERS)) or None


def incompatibility(model) -> Optional[str]:
    """Why this model cannot use the varlen path, or None."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None):
        return "its attention logits are softcapped"
    for key in _DROPOUT_KEYS:
        if float(getattr(config, key, 0.0) or 0.0) > 0:
            return f"{key} is {getattr(config, key)} (the varlen kernel has no attention dropout)"
    if non_attention_layers(config):
        return f"it has {non_attention_layers(config)} layers, which packing cannot keep per document"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", NAME):
        return f"attn_implementation is {config._attn_implementation}"
    if not getattr(model, "_supports_sdpa", True):
        return f"{type(model).__name__} does not support SDPA (used for its unpacked calls)"
    for m in model.modules():
        if hasattr(m, "sinks") or hasattr(m, "position_bias"):
            return f"{type(m).__name__} uses attention sinks or a position bias"
    return None


def _kernel_expresses(model, params) -> bool:
    """Whether varlen_attn (with these parameters) can run every attention layer of the model:
    its window and scale."""
    window = getattr(model.config, "sliding_window", None)
    for m in model.modules():
        scaling, head_dim = getattr(m, "scaling", None), getattr(m, "head_dim", None)
        if isinstance(scaling, float) and isinstance(head_dim, int):
            if _kernel_call(params, 1, 1, head_dim, scaling, window) is None:
                return False
    return window is None or _kernel_call(params, 1, 1, 64, None, window) is not None


def choose(mode: str, model, device: torch.device, dtype: torch.dtype) -> Tuple[str, str]:
    """Resolve kernels.packed_attention for this model and set the model's attention to match.
    Returns (path, why): path is 'varlen' or 'mask'. Raises PackedAttentionError when varlen is
    asked for and cannot run."""
    if mode not in MODES:
        raise PackedAttentionError(f"kernels.packed_attention={mode!r}: use one of {', '.join(MODES)}")
    model = _unwrapped(model)
    config = model.config
    if mode == "mask":
        return "mask", "kernels.packed_attention=mask"
    why_not = incompatibility(model)
    if mode == "auto":
        if why_not:
            return "mask", f"varlen unsupported: {why_not}"
        if device.type == "cuda" and not kernel_available(device, dtype):
            return "mask", f"no varlen kernel for cuda {str(dtype).replace('torch.', '')}"
        if device.type == "cuda" and not _kernel_expresses(model, _varlen_kernel()[1]):
            return "mask", "this torch's varlen kernel cannot express the model's attention window or scale"
    elif why_not:
        raise PackedAttentionError(f"kernels.packed_attention=varlen cannot run: {why_not}; use kernels.packed_attention=mask")
    register()
    before = config._attn_implementation
    try:
        model.set_attn_implementation(NAME)
        failure = None if config._attn_implementation == NAME else "it kept its attention implementation"
    except Exception as e:  # transformers versions differ in what they accept here
        failure = f"{type(e).__name__}: {e}"
    if failure:
        if mode == "varlen":
            raise PackedAttentionError(f"kernels.packed_attention=varlen: {type(model).__name__} cannot switch to it ({failure}); "
                                       f"use kernels.packed_attention=mask")
        return "mask", f"{type(model).__name__} cannot switch its attention implementation ({failure})"
    if before != NAME:
        model._dialtune_attn_before = before  # what standard() switches back to
    how = "FlashAttention varlen kernel" if kernel_available(device, dtype) else "causal SDPA per document"
    return "varlen", how


def packed_layout(mode: str, model, device: torch.device, dtype: torch.dtype, max_len: int) -> Tuple[str, str, str, Optional[int]]:
    """Everything packed training needs from this module, for a model about to train on packed
    rows of max_len tokens: (path, why, the collate_packed layout, the sliding window its mask must
    apply). transformers' flash_attention_2 keeps its own kernels, given the varlen layout's cu_seqlens.
    Raises PackedAttentionError (one sentence) where packing cannot keep documents apart."""
    config = _unwrapped(model).config
    if non_attention_layers(config):
        raise PackedAttentionError(f"data.packing=true cannot keep conversations apart in this model's "
                                   f"{non_attention_layers(config)} layers (they carry state along a row); set data.packing=false")
    implementation = config._attn_implementation
    if implementation == "flash_attention_2":
        return implementation, "flash-attn's varlen kernels, given each document's cu_seqlens", implementation, None
    try:
        path, why = choose(mode, model, device, dtype)
        if path == "varlen":
            return path, why, "varlen", None
        return path, why, implementation, uniform_sliding_window(config, max_len)
    except PackedAttentionError:
        neither = incompatibility(_unwrapped(model))  # (mixed windows need varlen; is varlen possible?)
        window = getattr(config, "sliding_window", None)
        mixed = bool(window) and window < max_len and set(getattr(config, "layer_types", None) or ["sliding_attention"]) != {"sliding_attention"}
        if neither and mixed:
            raise PackedAttentionError(
                f"data.packing=true cannot keep conversations apart in this model: one packed mask cannot express its mix of "
                f"sliding-window ({config.sliding_window}) and full-attention layers, and the varlen path cannot run ({neither}); "
                f"set data.packing=false, or data.max_seq_len <= {config.sliding_window}") from None
        raise


def _unwrapped(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def standard(model):
    """Run a block (evaluation, generation) on the attention implementation the model had before
    choose() switched it to varlen, then switch back."""
    base = _unwrapped(model)
    if getattr(base.config, "_attn_implementation", None) != NAME:
        yield
        return
    base.set_attn_implementation(getattr(base, "_dialtune_attn_before", "sdpa"))
    try:
        yield
    finally:
        base.set_attn_implementation(NAME)
