"""kernels.fused_lora: PEFT's LoRA branch, scaling * B(A(dropout(x))), as autograd functions that
keep less for backward than PEFT's modules, with the same masks, function, gradients and random
state (tests/test_fused_lora.py):

- each branch keeps its input once (shared by q/k/v and by gate/up) and replays torch's dropout in
  backward from the random state saved in forward, instead of a dropped copy and a mask per
  projection;
- q/k/v's and gate/up's input is a decoder layer's RMSNorm output: the branches keep the norm's
  input (which the norm keeps itself) and run the norm again in backward;
- in a gated-SiLU MLP the SwiGLU and down_proj's branch are one function that keeps gate and up
  (what the SwiGLU keeps anyway) and recomputes down_proj's input from them.

Llama-3-8B, LoRA on all 7 projections with dropout: 211 -> 94 KB a token per un-checkpointed
decoder layer (model/memory.py), so kernels.memory_budget_gib keeps twice the layers. fuse_lora()
gives a PEFT model's plain LoRA linear layers and its Llama-family MLPs these forwards; anything
else (merged, disabled, several or biased adapters, DoRA, autocast, other devices or dtypes) runs
PEFT's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import causal_lm, decoder_layers


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
    def forward(ctx, x, a, b, p, scaling, norm=None, norm_in=None):
        state = None
        if p > 0:
            gen = _generator(x.device)
            state = gen.get_state()
            xd = torch.native_dropout(x, p, True)[0]
        else:
            xd = x
        h = xd @ a.t()
        del xd
        # x = norm(norm_in): keep the norm's input, which the norm keeps itself, and recompute x
        ctx.save_for_backward(x if norm is None else norm_in, a, b, h)
        ctx.p, ctx.scaling, ctx.state, ctx.norm = p, scaling, state, norm
        return (h @ b.t()) * scaling

    @staticmethod
    def backward(ctx, grad_out):
        x, a, b, h = ctx.saved_tensors
        if ctx.norm is not None:  # the same kernel on the same input: the forward's x, bit for bit
            x = ctx.norm.forward(x)
        p = ctx.p
        g = grad_out * ctx.scaling
        grad_b = g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[2] else None
        gh = g @ b  # d loss / d A(dropout(x))
        # the forward's mask, redrawn from the forward's state; the generator is left as it was
        xd, mask = _replayed_dropout(x, p, ctx.state) if p > 0 else (x, None)
        del x
        grad_a = gh.reshape(-1, gh.shape[-1]).t() @ xd.reshape(-1, xd.shape[-1]) if ctx.needs_input_grad[1] else None
        del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gh @ a
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
        return grad_x, grad_a, grad_b, None, None, None, None


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float, scaling: float) -> torch.Tensor:
    """scaling * (dropout_p(x) @ a.T) @ b.T with the memory of _LoraBranch. Activation
    checkpointing restores the random state before recomputing a layer, so the recompute draws the
    forward's masks, as it does for nn.Dropout. When x is the output of a decoder layer's RMSNorm
    that fuse_lora marked (NORMS), the branch keeps the norm's input instead of x (the norm keeps
    that input itself: x costs nothing) and runs the norm again in backward."""
    normed = getattr(x, NORMED, None)
    if normed is not None:
        return _LoraBranch.apply(x, a, b, p, scaling, *normed)
    return _LoraBranch.apply(x, a, b, p, scaling)


# decoder-layer norms whose output feeds LoRA projections (q/k/v; gate/up) in the Llama family
NORMS = ("input_layernorm", "post_attention_layernorm")
NORMED = "_dialtune_normed"  # attribute of a marked norm's output: (norm module, its input)


def _mark_normed(module, args, output):
    """Forward hook on a NORMS module: tag its output with (module, input) for lora_branch."""
    if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():
        setattr(output, NORMED, (module, args[0]))


def _replayed_dropout(x, p, state):
    """(dropped x, mask) as native_dropout drew them from generator state `state`; the generator
    is left as it was."""
    gen = _generator(x.device)
    now = gen.get_state()
    gen.set_state(state)
    try:
        return torch.native_dropout(x, p, True)
    finally:
        gen.set_state(now)


def _silu_mul(g, u):
    return F.silu(g) * u  # what LlamaMLP computes: act_fn(gate) * up, bit for bit


def _silu_mul_backward(g, u, dh):
    """(d/d gate, d/d up) of silu(gate) * up, in fp32 whatever the dtype (as Liger's kernel)."""
    gf = g.float()
    sig = torch.sigmoid(gf)
    silu = gf * sig
    dh = dh.float()
    return (dh * u.float() * (silu * (1 - sig) + sig)).to(g.dtype), (dh * silu).to(u.dtype)


def _swiglu_kernels(device: torch.device, liger: bool):
    """(forward, backward) of silu(gate) * up: Liger's Triton kernels on CUDA when the recipe
    applied Liger (one read of gate and up each way; its backward writes the gradients into gate's
    and up's storage, which only this function still holds), torch's elementwise ops otherwise."""
    if liger and device.type == "cuda":
        try:
            from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
        except Exception:  # noqa: BLE001 - any import failure: the torch ops
            pass
        else:
            return (lambda g, u: swiglu_forward(g.contiguous(), u.contiguous())[2],
                    lambda g, u, dh: swiglu_backward(g.contiguous(), u.contiguous(), dh.contiguous()))
    return _silu_mul, _silu_mul_backward


class _SwiGLULora(torch.autograd.Function):
    """h = silu(gate) * up and down_proj's LoRA branch on it, scaling * B(A(dropout(h))), in one
    function that keeps only gate and up (what the SwiGLU's own backward needs anyway) and
    recomputes h (one elementwise kernel) and its dropout in backward. PEFT's modules keep h, or
    its dropped copy and the mask, for lora_A's gradient on top: the largest activation of a
    decoder layer (intermediate size), a fifth of what a Llama layer keeps. Returns (h, branch):
    the caller runs the frozen base projection on h, which keeps nothing of it."""

    @staticmethod
    def forward(ctx, g, u, a, b, p, scaling, liger):
        fwd, _ = _swiglu_kernels(g.device, liger)
        h = fwd(g, u)
        state = None
        if p > 0:
            state = _generator(h.device).get_state()
            hd = torch.native_dropout(h, p, True)[0]
        else:
            hd = h
        r = hd @ a.t()
        del hd
        ctx.save_for_backward(g, u, a, b, r)
        ctx.p, ctx.scaling, ctx.state, ctx.liger = p, scaling, state, liger
        return h, (r @ b.t()) * scaling

    @staticmethod
    def backward(ctx, grad_h, grad_out):
        g, u, a, b, r = ctx.saved_tensors
        fwd, bwd = _swiglu_kernels(g.device, ctx.liger)
        p = ctx.p
        go = grad_out * ctx.scaling
        grad_b = go.reshape(-1, go.shape[-1]).t() @ r.reshape(-1, r.shape[-1]) if ctx.needs_input_grad[3] else None
        gr = go @ b
        h = fwd(g, u)
        hd, mask = _replayed_dropout(h, p, ctx.state) if p > 0 else (h, None)
        del h
        grad_a = gr.reshape(-1, gr.shape[-1]).t() @ hd.reshape(-1, hd.shape[-1]) if ctx.needs_input_grad[2] else None
        del hd
        dh = gr @ a
        if mask is not None:
            dh = torch.ops.aten.native_dropout_backward(dh, mask, 1.0 / (1.0 - p))
        if grad_h is not None:
            dh = dh.add_(grad_h)
        grad_g, grad_u = bwd(g, u, dh) if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else (None, None)
        return grad_g, grad_u, grad_a, grad_b, None, None, None


class _FusedLora:
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
        result = self.base_layer(x, *args, **kwargs)
        return result + lora_branch(x, *branch).to(result.dtype)


SWIGLU_MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")  # down_proj(act_fn(gate_proj(x)) * up_proj(x))


class _FusedSwiGLU:
    """Mixed into a gated-SiLU MLP (SWIGLU_MLP_CLASSES) whose down_proj has the fused branch, by
    fuse_lora: the SwiGLU and down_proj's LoRA branch run as _SwiGLULora, which recomputes
    down_proj's input from gate and up in backward instead of keeping it (with Liger's kernels
    when the recipe applied Liger). Same function and masks as the MLP's own forward; that forward
    (with HF's activation) whenever down_proj would hand the call to PEFT."""

    _dialtune_liger = False

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        down = self.down_proj
        branch = down._branch_args(g) if isinstance(down, _FusedLora) and g.dtype == u.dtype else None
        if branch is None:
            return down(self.act_fn(g) * u)
        h, lora = _SwiGLULora.apply(g, u, *branch, self._dialtune_liger)
        result = down.base_layer(h)
        return result + lora.to(result.dtype)


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
    Fused<name> and kept in this module (so a pickled model finds it: torch.save of the whole
    module)."""
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
    (lora_branch), and every gated-SiLU MLP whose down_proj got it the fused SwiGLU (_SwiGLULora;
    liger: with Liger's SwiGLU kernels on CUDA); returns how many linear layers have the branch.
    Same function and same gradients as PEFT's path, drawing the same dropout masks; a decoder
    layer keeps a third less for backward with dropout, a fifth less without (Llama-3-8B: 211 ->
    111 KB a token, model/memory.py). Not for ZeRO-3, whose partitioned adapter weights are
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
        if ((isinstance(m, _FusedSwiGLU) or type(m).__name__ in SWIGLU_MLP_CLASSES)
                and isinstance(getattr(m, "down_proj", None), _FusedLora) and _silu(getattr(m, "act_fn", None))):
            for bound in ("forward", "_get_name"):  # Liger binds its SwiGLU forward (and name) to the instance
                m.__dict__.pop(bound, None)
            if not isinstance(m, _FusedSwiGLU):
                m.__class__ = _fused_class(type(m), _FusedSwiGLU)
            m._dialtune_liger = bool(liger)
    for layer in _layers(model):
        for name in NORMS:  # only where the branches keep the input: elsewhere a tag would keep it alive for nothing
            norm = getattr(layer, name, None)
            if isinstance(norm, nn.Module) and _consumers_fused(layer, name) and not norm.__dict__.get(HOOKED):
                norm.register_forward_hook(_mark_normed)
                norm.__dict__[HOOKED] = True
    return n


HOOKED = "_dialtune_marks_output"
NORM_CONSUMERS = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
                  "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}


def _consumers_fused(layer, norm: str) -> bool:
    """Whether every projection that reads this decoder layer's `norm` has the fused branch."""
    block, projections = NORM_CONSUMERS[norm]
    block = getattr(layer, block, None)
    return all(isinstance(getattr(block, proj, None), _FusedLora) for proj in projections)


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
    if all(isinstance(getattr(layer, "mlp", None), _FusedSwiGLU) for layer in layers):
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
