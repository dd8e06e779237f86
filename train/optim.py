"""Optimizers chosen by `optim=`: torch AdamW (fused on CUDA), bitsandbytes 8-bit and paged
8-bit AdamW, and DeepSpeed's CPU Adam for ZeRO-Offload."""
from __future__ import annotations

import contextlib
import types

import torch


def _settings(optim_cfg) -> dict:
    return dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)


def build(optim_cfg, params, device: torch.device):
    kw = _settings(optim_cfg)
    name = optim_cfg.name
    if name == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kw)
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, **kw)
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
    raise ValueError(f"unknown optimizer {name}")


class SkipSwitch:
    """While `on`, the optimizer's step() does nothing: a skipped non-finite step then leaves the
    weights, the Adam moments and the step count (bias correction) exactly as they were. DeepSpeed
    calls this step inside engine.step() (once per parameter group under ZeRO-1/2), after the
    gradients it was given (zeros, for a skipped step); run at lr 0 instead, AdamW would still decay
    both moments and advance its step. Install it before an LR scheduler wraps step()."""

    def __init__(self, optimizer):
        self.on = False
        step = optimizer.step

        def maybe_step(_optimizer, *args, **kwargs):
            return None if self.on else step(*args, **kwargs)

        optimizer.step = types.MethodType(maybe_step, optimizer)  # (a method: LR schedulers wrap step's __func__)


def reapply(scheduler, optim_cfg) -> None:
    """After a resume: this run's lr, betas, eps and weight decay, not the checkpoint's (loading
    restores the optimizer's param groups and the scheduler's base_lrs). The schedule's shape is
    this run's already (LambdaLR keeps its lambda), so the lr continues as this run's schedule
    gives it at the resumed step."""
    kw = _settings(optim_cfg)
    scheduler.base_lrs = [kw["lr"]] * len(scheduler.optimizer.param_groups)
    for group in scheduler.optimizer.param_groups:
        group.update(initial_lr=kw["lr"], **{k: v for k, v in kw.items() if k != "lr"})
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


@contextlib.contextmanager
def without_initial_step(optimizer, active: bool = True):
    """Around deepspeed.initialize: DeepSpeed's bf16/fp16 wrappers without ZeRO (FP16_Optimizer,
    FP16_UnfusedOptimizer) create the optimizer states with one step on zero gradients. Adam then
    counts a step that never happened (its bias correction makes the first real update 0.74x) and
    AdamW decays the weights once. lr and weight decay are held at 0 for that step (the weights stay
    as they are), and its step count is set back to 0 (its moments are zeros: zero gradients); the
    states stay allocated (dropping them would leak bitsandbytes' paged buffers)."""
    if not active:
        yield
        return
    held = [(g["lr"], g.get("weight_decay")) for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        if "weight_decay" in g:
            g["weight_decay"] = 0.0
    try:
        yield
    finally:
        for g, (lr, wd) in zip(optimizer.param_groups, held):
            g["lr"] = lr
            if wd is not None:
                g["weight_decay"] = wd
        for st in optimizer.state.values():
            if "step" in st:
                st["step"] = st["step"] * 0  # (a tensor in torch's AdamW, an int in bitsandbytes')
