"""kernels.fused_lora: PEFT's LoRA branch, scaling * B(A(dropout(x))), as autograd functions that
keep less for backward than PEFT's modules, with the same masks, function, gradients and random
state (model/lora_autograd.py; this module puts them into a PEFT model; tests/test_fused_lora.py):

- each branch keeps its input once (shared by q/k/v and by gate/up) and replays torch's dropout in
  backward from the random state saved in forward, instead of a dropped copy and a mask per
  projection;
- q/k/v's and gate/up's input is a decoder layer's RMSNorm output: the branches keep the norm's
  input (which the norm keeps itself) and run the norm again in backward;
- in a gated-SiLU MLP the SwiGLU and down_proj's branch are one function that keeps gate and up
  (what the SwiGLU keeps anyway) and recomputes down_proj's input from them;
- B's product, the scaling and the addition to the base projection's output are one GEMM
  (add_lora), where PEFT runs three kernels over an output-sized tensor (and one more backward).

Llama-3-8B, LoRA on all 7 projections with dropout: 211 -> 94 KB a token per un-checkpointed
decoder layer (model/memory.py), so kernels.memory_budget_gib keeps twice the layers. fuse_lora()
gives a PEFT model's plain LoRA linear layers and its Llama-family MLPs these forwards; anything
else (merged, disabled, several or biased adapters, DoRA, autocast, other devices or dtypes) runs
PEFT's own forward.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from .kernels import causal_lm, decoder_layers
from .lora_autograd import SwiGLULora, add_lora, lora_branch, mark_normed


class _Fused:
    """Pickles (torch.save of a whole model, deepcopy) as its base class and mixin, so that any
    process rebuilds the Fused<name> class (it exists only once fuse_lora made it)."""

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        if globals().get(type(self).__name__) is not type(self):  # a subclass of a fused class: pickled as usual
            return reduced
        mixin, base = type(self).__bases__[:2]
        return (_new_fused, (base, mixin.__name__)) + tuple(reduced[2:])


def _new_fused(base, mixin: str):
    cls = _fused_class(base, {"_FusedLora": _FusedLora, "_FusedSwiGLU": _FusedSwiGLU}[mixin])
    return cls.__new__(cls)


class _FusedLora(_Fused):
    """Mixed into a PEFT LoRA linear layer's class by fuse_lora: the fused branch in the plain case
    (one active LoRA adapter, not merged, no DoRA or other variant, no bias on lora_B, the input in
    the adapter's dtype, no autocast, on a CPU or CUDA device); PEFT's own forward otherwise,
    decided per call (the base comparison disables the adapter, merge merges)."""

    def _branch_args(self, x):
        """(lora_A weight, lora_B weight, dropout p, scaling) when the fused branch computes this
        call on input x; None when PEFT's own forward must (decided per call: the base comparison
        disables the adapter, merge merges)."""
        active = self.active_adapters
        if (self.disable_adapters or self.merged or len(active) != 1 or not _plain_lora(self, active[0])
                or x.device.type not in ("cpu", "cuda")
                or torch.is_autocast_enabled(x.device.type)):  # autocast: backward would run in other dtypes
            return None
        name = active[0]
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if x.dtype != lora_a.weight.dtype or lora_b.weight.dtype != lora_a.weight.dtype:
            return None  # a cast copy per projection would share nothing
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        return lora_a.weight, lora_b.weight, p, float(self.scaling[name])

    def forward(self, x, *args, **kwargs):
        branch = self._branch_args(x) if kwargs.get("adapter_names") is None else None
        if branch is None:
            return super().forward(x, *args, **kwargs)
        return lora_branch(self.base_layer(x, *args, **kwargs), x, *branch)


SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down_proj(act_fn(gate_proj(x)) * up_proj(x))


class _FusedSwiGLU(_Fused):
    """Mixed into a gated-SiLU MLP (SWIGLU_MLP_CLASSES) whose down_proj has the fused branch, by
    fuse_lora: the SwiGLU and down_proj's LoRA branch run as SwiGLULora, which recomputes
    down_proj's input from gate and up in backward instead of keeping it (with Liger's kernels
    when the recipe applied Liger). Same function and masks as the MLP's own forward; that forward
    (with HF's activation) whenever down_proj would hand the call to PEFT."""

    _dialtune_liger = False

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        branch = (down._branch_args(g) if isinstance(down, _FusedLora) and g.dtype == u.dtype and not _hooked(down)
                  else None)  # hooks on down_proj (PEFT's adapter_names, ...) need its own call
        if branch is None:
            return down(self.act_fn(g) * u)
        a, b, p, scaling = branch
        h, r = SwiGLULora.apply(g, u, a, p, self._dialtune_liger)
        return add_lora(down.base_layer(h), r, b, scaling)


def _hooked(module: nn.Module) -> bool:
    """Whether a module has hooks of its own (PEFT's adapter_names is a forward pre-hook that lives
    for one call), which only a call of the module runs. Global hooks (profilers, FLOP counters)
    are not asked: they see the fused MLP's call instead."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _liger_forward(module: nn.Module, bound) -> bool:
    """Whether a forward bound to this MLP instance is Liger's SwiGLU (liger_kernel's
    LigerSwiGLUMLP.forward bound as a method, not a wrapper around it)."""
    func = getattr(bound, "__func__", None)
    return (isinstance(bound, types.MethodType) and bound.__self__ is module and not hasattr(bound, "__wrapped__")
            and getattr(func, "__module__", "").startswith("liger_kernel")
            and getattr(func, "__qualname__", "").startswith("Liger"))


def _silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _plain_lora(layer, name: str) -> bool:
    """Whether adapter `name` of a PEFT LoRA layer is plain LoRA (two bias-free nn.Linear, no DoRA
    or other variant), which the fused branch computes."""
    a, b = layer.lora_A[name] if name in layer.lora_A else None, layer.lora_B[name] if name in layer.lora_B else None
    return (isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.bias is None and b.bias is None
            and name not in getattr(layer, "lora_variant", {}) and not getattr(layer, "use_dora", {}).get(name))


LORA_LINEAR_CLASSES = ("Linear", "Linear8bitLt", "Linear4bit")  # peft.tuners.lora's layer.Linear and bnb wrappers


def _fused_class(cls, mixin=_FusedLora):
    """The fused subclass (mixin first) of a PEFT LoRA layer class or an MLP class, named
    Fused<name> and kept in this module, made once per class (a pickled model rebuilds it through
    _Fused.__reduce_ex__)."""
    name = f"Fused{cls.__name__}"
    known = globals().get(name)
    if known is None or cls not in known.__bases__:
        if known is not None:  # another class of the same name (another PEFT module): a distinct name
            name = f"Fused{cls.__module__.replace('.', '_')}_{cls.__name__}"
        known = globals().get(name) or type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = known
    return known


def fuse_lora(model, liger: bool = False) -> int:
    """Give every PEFT LoRA linear layer whose adapters are all plain LoRA the fused adapter branch
    (lora_branch), and every gated-SiLU MLP whose down_proj got it the fused SwiGLU (SwiGLULora;
    liger: with Liger's SwiGLU kernels on CUDA); returns how many linear layers have the branch.
    Same function and same gradients as PEFT's path, drawing the same dropout masks; a decoder
    layer keeps less than half for backward (Llama-3-8B with dropout: 211 -> 94 KB a token,
    model/memory.py). Not for ZeRO-3, whose partitioned adapter weights are
    gathered by hooks on the lora_A/lora_B modules' own forwards."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        cls = type(m)
        if isinstance(m, _FusedLora):
            n += 1
        elif (isinstance(m, LoraLayer) and isinstance(m, nn.Module) and cls.__name__ in LORA_LINEAR_CLASSES
              and isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and len(m.lora_A) > 0
              and all(_plain_lora(m, name) for name in m.lora_A)):
            m.__class__ = _fused_class(cls)
            n += 1
    for m in model.modules():
        bound = m.__dict__.get("forward")  # Liger binds its SwiGLU forward (and name) to the instance
        if ((isinstance(m, _FusedSwiGLU) or type(m).__name__ in SWIGLU_MLP_CLASSES)
                and isinstance(getattr(m, "down_proj", None), _FusedLora) and _silu(getattr(m, "act_fn", None))
                and (bound is None or _liger_forward(m, bound))):  # another bound forward: left as it is
            for name in ("forward", "_get_name"):
                m.__dict__.pop(name, None)
            if not isinstance(m, _FusedSwiGLU):
                m.__class__ = _fused_class(type(m), _FusedSwiGLU)
            m._dialtune_liger = bool(liger)
    for layer in _layers(model):
        if type(layer).__name__ not in NORM_LAYER_CLASSES:  # e.g. Gemma's MLP reads another norm
            continue
        for name in NORMS:  # only where the branches keep the input: elsewhere a tag would keep it alive for nothing
            norm = getattr(layer, name, None)
            if isinstance(norm, nn.Module) and _consumers_fused(layer, name) and not norm.__dict__.get(HOOKED):
                norm.register_forward_hook(mark_normed)
                norm.__dict__[HOOKED] = True
    return n


# decoder-layer norms whose output feeds LoRA projections (q/k/v; gate/up) in the Llama family
NORMS = ("input_layernorm", "post_attention_layernorm")
NORM_LAYER_CLASSES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
HOOKED = "_dialtune_marks_output"
NORM_CONSUMERS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
                  "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}


def _consumers_fused(layer, norm: str) -> bool:
    """Whether the projections that read this decoder layer's `norm` are there, some with the fused
    branch and none with PEFT's (a frozen projection without an adapter keeps nothing of its input:
    LoRA on q and v only gets the saving too)."""
    block, projections = NORM_CONSUMERS[norm]
    mods = [getattr(getattr(layer, block, None), proj, None) for proj in projections]
    return (all(isinstance(m, nn.Module) and (isinstance(m, _FusedLora) or not hasattr(m, "lora_A")) for m in mods)
            and any(isinstance(m, _FusedLora) for m in mods))


def _layers(model):
    try:
        return list(decoder_layers(model))
    except ValueError:
        return []


ALL_PARTS = frozenset({"lora", "norms", "swiglu"})


def fused_parts(model) -> frozenset:
    """What fuse_lora changed in every decoder layer, for the memory estimate: "lora" (every LoRA
    layer fused: inputs kept once, masks redrawn), "norms" (q/k/v and gate/up fused and fed by
    marked norms: the norms' outputs are recomputed, not kept) and "swiglu" (down_proj's input
    recomputed from gate and up)."""
    layers = _layers(model)
    if not layers or not lora_fused(model):
        return frozenset()
    parts = {"lora"}
    if all(isinstance(getattr(layer, "mlp", None), _FusedSwiGLU) and "forward" not in layer.mlp.__dict__
           and not _hooked(layer.mlp.down_proj) for layer in layers):
        parts.add("swiglu")

    if all(getattr(getattr(layer, norm, None), "__dict__", {}).get(HOOKED) and _consumers_fused(layer, norm)
           for layer in layers for norm in NORMS):
        parts.add("norms")
    return frozenset(parts)


def describe(model) -> str:
    """What fused_parts found, for the log."""
    parts = fused_parts(model)
    said = [what for part, what in (("lora", "every LoRA input kept once"),
                                    ("norms", "q/k/v's and gate/up's input recomputed from the norms'"),
                                    ("swiglu", "down_proj's input recomputed from gate and up")) if part in parts]
    return "; ".join(said) or "some LoRA layers left to PEFT"


def lora_fused(model) -> bool:
    """Whether fuse_lora gave every LoRA layer of this model the fused branch (a model with some
    layers left to PEFT keeps their dropped copies: the memory budget must count those)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in causal_lm(model).modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(isinstance(m, _FusedLora) for m in layers)
