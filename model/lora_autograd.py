"""The autograd functions behind kernels.fused_lora (model/fused_lora.py says what they save and
puts them into a PEFT model): LoraA and lora_branch (a LoRA branch's rank-r half, its input kept
once, its dropout replayed in backward; a marked RMSNorm's output recomputed from the norm's
input: mark_normed, norm_of), SwiGLULora (a gated-SiLU MLP's SwiGLU with down_proj's rank-r half)
and add_lora (B's product, the scaling and the addition to the base output as one GEMM).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dropout_generator(device: torch.device) -> torch.Generator:
    """The default generator dropout draws from on this device."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class LoraA(torch.autograd.Function):
    """A(dropout(x)), the rank-r half of PEFT's LoRA branch, saving x (the very tensor the other
    projections of the same input save: one copy for q, k and v, one for gate and up) and the
    random generator's state before the dropout; backward sets that state again and replays the
    same dropout on the same x, which redraws the same mask. PEFT's modules save each projection's
    dropped input and its mask instead: three copies and three masks for q/k/v, two for gate/up.
    The dropout is torch's own (native_dropout, what nn.Dropout runs in training), drawn from the
    default generator at the same point of the forward: the masks, and so the function, its
    gradients and the random state after a step, are PEFT's (tests/test_fused_lora.py). When
    x = norm(norm_in), it saves norm_in instead (which the norm keeps itself) and runs the norm
    again in backward."""

    @staticmethod
    def forward(ctx, x, a, p, norm=None, norm_in=None):
        xd, state = dropout_noting_state(x, p)
        ctx.save_for_backward(x if norm is None else norm_in, a)
        ctx.p, ctx.state, ctx.norm = p, state, norm
        return xd @ a.t()

    @staticmethod
    def backward(ctx, grad_r):
        x, a = ctx.saved_tensors
        p = ctx.p
        grad_a, mask = None, None
        if ctx.needs_input_grad[1] or p > 0:  # (a frozen A without dropout needs no x)
            if ctx.norm is not None:  # the same kernel on the same input: the forward's x, bit for bit
                x = ctx.norm.forward(x)
            # the forward's mask, redrawn from the forward's state; the generator is left as it was
            xd, mask = replayed_dropout(x, p, ctx.state) if p > 0 else (x, None)
            del x
            grad_a = _wgrad(grad_r, xd) if ctx.needs_input_grad[1] else None
            del xd
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_r @ a
            if mask is not None:
                grad_x = torch.ops.aten.native_dropout_backward(grad_x, mask, 1.0 / (1.0 - p))
        return grad_x, grad_a, None, None, None


def _wgrad(grad: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """grad^T @ inp over every token: a linear layer's weight gradient."""
    return grad.reshape(-1, grad.shape[-1]).t() @ inp.reshape(-1, inp.shape[-1])


def add_lora(result: torch.Tensor, r: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """result + scaling * r @ b.T as one GEMM that takes the base projection's output as its C
    (torch.addmm, alpha = scaling; a new output: C is copied in first), where PEFT's lora_B,
    `* scaling` and `+` each pass over an output-sized tensor: two such passes fewer forward, one
    backward (grad * scaling). Autograd keeps r and b (rank-sized), applies alpha on rank-sized
    tensors and hands the gradient to `result` as is. (r and b share a dtype: fuse_lora's calls.)"""
    if result.dtype != r.dtype:
        return result + ((r @ b.t()) * scaling).to(result.dtype)
    n = result.shape[-1]
    return torch.addmm(result.reshape(-1, n), r.reshape(-1, r.shape[-1]), b.t(), alpha=scaling).view(result.shape)


def lora_branch(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, p: float,
                scaling: float) -> torch.Tensor:
    """result + scaling * (dropout_p(x) @ a.T) @ b.T (result: the base projection of x) with the
    memory of LoraA. Activation checkpointing restores the random state before recomputing a
    layer, so the recompute draws the forward's masks, as it does for nn.Dropout. When x is the
    output of a decoder layer's RMSNorm that fuse_lora marked (NORMS), the branch keeps the norm's
    input instead of x (the norm keeps that input itself: x costs nothing) and runs the norm again
    in backward."""
    return add_lora(result, LoraA.apply(x, a, p, *norm_of(x)), b, scaling)


NORMED = "_dialtune_normed"  # attribute of a marked norm's output: (norm module, its input, output version)


def mark_normed(module, args, output):
    """Forward hook on a NORMS module: tag its output with (module, input, the output's version)
    for lora_branch (a changed version, an in-place change since, voids the tag)."""
    if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor) and torch.is_grad_enabled():
        setattr(output, NORMED, (module, args[0], output._version))


def norm_of(x: torch.Tensor):
    """(norm, norm input) when x is a marked norm's output, unchanged since; else ()."""
    tag = getattr(x, NORMED, None)
    return tag[:2] if tag is not None and tag[2] == x._version else ()


def dropout_noting_state(x, p):
    """(dropout_p(x) as nn.Dropout draws it in training, the generator's state before the draw);
    (x, None) at p = 0."""
    if p <= 0:
        return x, None
    state = dropout_generator(x.device).get_state()
    return torch.native_dropout(x, p, True)[0], state


def replayed_dropout(x, p, state):
    """(dropped x, mask) as native_dropout drew them from generator state `state`; the generator
    is left as it was."""
    gen = dropout_generator(x.device)
    now = gen.get_state()
    gen.set_state(state)
    try:
        return torch.native_dropout(x, p, True)
    finally:
        gen.set_state(now)


def _silu_mul(g, u):
    return F.silu(g) * u  # what LlamaMLP computes: act_fn(gate) * up, bit for bit


def _silu_mul_backward(g, u, dh):
    """(d/d gate, d/d up) of silu(gate) * up: the kernels autograd runs for LlamaMLP's act_fn(gate)
    * up (the same gradients, bit for bit, and no fp32 temporaries)."""
    return torch.ops.aten.silu_backward(dh * u, g), dh * F.silu(g)


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


class SwiGLULora(torch.autograd.Function):
    """h = silu(gate) * up and the rank-r half of down_proj's LoRA branch on it, A(dropout(h)), in
    one function that keeps only gate and up (what the SwiGLU's own backward needs anyway) and
    recomputes h (one elementwise kernel) and its dropout in backward. PEFT's modules keep h, or
    its dropped copy and the mask, for lora_A's gradient on top: the largest activation of a
    decoder layer (intermediate size), a fifth of what a Llama layer keeps. Returns (h, A(dropout(h)));
    the caller runs the frozen base projection on h, which keeps nothing of it, and add_lora."""

    @staticmethod
    def forward(ctx, g, u, a, p, liger):
        fwd, _ = _swiglu_kernels(g.device, liger)
        h = fwd(g, u)
        hd, state = dropout_noting_state(h, p)
        r = hd @ a.t()
        del hd
        ctx.save_for_backward(g, u, a)
        ctx.p, ctx.state, ctx.liger = p, state, liger
        return h, r

    @staticmethod
    def backward(ctx, grad_h, grad_r):
        g, u, a = ctx.saved_tensors
        fwd, bwd = _swiglu_kernels(g.device, ctx.liger)
        if bwd is not _silu_mul_backward:  # Liger's backward writes into gate's and up's storage
            if getattr(ctx, "spent", False):
                raise RuntimeError("the fused SwiGLU with Liger's kernels supports one backward pass per forward "
                                   "(retain_graph: set kernels.fused_lora=false)")
            ctx.spent = True
        p = ctx.p
        h = fwd(g, u)
        hd, mask = replayed_dropout(h, p, ctx.state) if p > 0 else (h, None)
        del h
        grad_a = _wgrad(grad_r, hd) if ctx.needs_input_grad[2] else None
        del hd
        dh = grad_r @ a
        if mask is not None:
            dh = torch.ops.aten.native_dropout_backward(dh, mask, 1.0 / (1.0 - p))
        if grad_h is not None:
            dh = dh.add_(grad_h)
        grad_g, grad_u = bwd(g, u, dh) if ctx.needs_input_grad[0] or ctx.needs_input_grad[1] else (None, None)
        return grad_g, grad_u, grad_a, None, None
