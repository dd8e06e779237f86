"""Optimizers chosen by `optim=`: torch AdamW (fused on CUDA), bitsandbytes 8-bit and paged
8-bit AdamW, and DeepSpeed's CPU Adam for ZeRO-Offload."""
from __future__ import annotations

import torch


def build(optim_cfg, params, device: torch.device):
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay)
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
