"""kernels.fused_lora: PEFT's LoRA branch, scaling * B(A(dropout(x))), as one autograd function
that keeps the layer input once (shared by q/k/v and by gate/up) and replays torch's dropout in
backward from the random state saved in forward, instead of keeping a dropped copy and a mask per
projection: the same masks, function, gradients and random state as PEFT's modules, a third less
activation memory per un-checkpointed decoder layer with dropout (model/memory.py counts fused
layers as dropout-free). fuse_lora() gives a PEFT model's plain LoRA linear layers this forward;
anything else (merged, disabled, several or biased adapters, DoRA, autocast, other devices or
dtypes) runs PEFT's own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import causal_lm


def _generator(device: torch.device) -> torch.Generator:
    """The default generator dropout draws from on this device."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _LoraBranch(torch.autograd.Function):
    """scaling * B(A(dropout(x))) that saves x (the very tensor the other projections of the same
    input save: one copy for q, k and v, one for gate and up), the rank-r product A(dropout(x))
    and the random generator's state before the dropout; backward sets that state again and
    replays the same dropout on the same x, which redraws the same mask. PEFT's modules save each
    projection's dropped input and its mask instead: three copies and three masks for q/k/v, two
    for gate/up. The dropout is torch's own (native_dropout, what nn.Dropout runs in training),
    drawn from the default generator at the same point of the forward: the masks, and so the
    function, its gradients and the random state after a step, are PEFT's (tests/test_fused_lora.py)."""

    @staticmethod
    def forward(ctx, x, a, b, p, scaling):
        state = None
        if p > 0:
            gen = _generator(x.device)
            state = gen.get_state()
            xd = torch.native_dropout(x, p, True)[0]
        else:
            xd = x
        h = xd @ a.t()
        del xd
        ctx.save_for_backward(x, a, b, h)
        ctx.p, ctx.scaling, ctx.state = p, scaling, state
        return (h @ b.t()) * scaling

    @staticmethod
    def backward(ctx, grad_out):
        x, a, b, h = ctx.saved_tensors
        p = ctx.p
        g = grad_out * ctx.scaling
        grad_b = g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[2] else None
        gh = g @ b  # d loss / d A(dropout(x))
        if p > 0:  # the forward's mask, redrawn from the forward's state; the generator is left as it was
            gen = _generator(x.device)
            now = gen.get_state()
            gen.set_state(ctx.state)
            try:
                xd, mask = torch.native_dropout(x, p, True)
            finally:
                gen.set_state(now)
        else:
            xd, mask = x, None
        grad_a = gh.reshape(-1, gh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1]) if ctx.needs_input_grad[1] else None
        del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gh @ a
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
        return grad_x, grad_a, grad_b, None, None


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, scaling: float) -> torch.Tensor:
    """scaling * (dropout_p(x) @ a.T) @ b.T with the memory of _LoraBranch. Activation
    checkpointing restores the random state before recomputing a layer, so the recompute draws the
    forward's masks, as it does for nn.Dropout."""
    return _LoraBranch.apply(x, a, b, p, scaling)


class _FusedLora:
    """Mixed into a PEFT LoRA linear layer's class by fuse_lora: the fused branch in the plain case
    (one active LoRA adapter, not merged, no DoRA or other variant, no bias on lora_B, the input in
    the adapter's dtype, no autocast, on a CPU or CUDA device); PEFT's own forward otherwise,
    decided per call (the base comparison disables the adapter, merge merges)."""

    def forward(self, x, *args, **kwargs):
        active = self.active_adapters
        if (self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None or len(active) != 1
                or not _plain_lora(self, active[0]) or x.device.type not in ("cpu", "cuda")
                or torch.is_autocast_enabled(x.device.type)):  # autocast: backward would run in other dtypes
            return super().forward(x, *args, **kwargs)
        name = active[0]
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if x.dtype != lora_a.weight.dtype or lora_b.weight.dtype != lora_a.weight.dtype:
            return super().forward(x, *args, **kwargs)  # a cast copy per projection would share nothing
        result = self.base_layer(x, *args, **kwargs)
        p = float(getattr(dropout, "p", 0.0)) if dropout.training else 0.0
        return result + lora_branch(x, lora_a.weight, lora_b.weight, p, float(self.scaling[name])).to(result.dtype)


def _plain_lora(layer, name: str) -> bool:
    """Whether adapter `name` of a PEFT LoRA layer is plain LoRA (two bias-free nn.Linear, no DoRA
    or other variant), which the fused branch computes."""
    a, b = layer.lora_A[name] if name in layer.lora_A else None, layer.lora_B[name] if name in layer.lora_B else None
    return (isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and a.bias is None and b.bias is None
            and name not in getattr(layer, "lora_variant", {}) and not getattr(layer, "use_dora", {}).get(name))


LORA_LINEAR_CLASSES = ("Linear", "Linear8bitLt", "Linear4bit")  # peft.tuners.lora's layer.Linear and bnb wrappers


def _fused_class(cls):
    """The fused subclass of a PEFT LoRA layer class, named Fused<name> and kept in this module
    (so a pickled model finds it: torch.save of the whole module)."""
    name = f"Fused{cls.__name__}"
    known = globals().get(name)
    if known is None or cls not in known.__bases__:
        if known is not None:  # another class of the same name (another PEFT module): a distinct name
            name = f"Fused{cls.__module__.replace('.', '_')}_{cls.__name__}"
        known = globals().get(name) or type(name, (_FusedLora, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = known
    return known


def fuse_lora(model) -> int:
    """Give every PEFT LoRA linear layer whose adapters are all plain LoRA the fused adapter branch
    (lora_branch); returns how many layers have it. Same function and same gradients as PEFT's path,
    drawing the same dropout masks; the activations a layer keeps for backward drop by a third with
    dropout (Llama-3-8B: 211 -> 139 KB a token, model/memory.py). Not for ZeRO-3, whose partitioned
    adapter weights are gathered by hooks on the lora_A/lora_B modules' own forwards."""
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
    return n


def lora_fused(model) -> bool:
    """Whether fuse_lora gave every LoRA layer of this model the fused branch (a model with some
    layers left to PEFT keeps their dropped copies: the memory budget must count those)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in causal_lm(model).modules() if isinstance(m, LoraLayer)]
    return bool(layers) and all(isinstance(m, _FusedLora) for m in layers)
