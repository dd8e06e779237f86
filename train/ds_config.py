"""Render the DeepSpeed config (a dict) from the Hydra config."""
from __future__ import annotations

import math
from typing import Optional

from omegaconf import OmegaConf


def mixed_precision(cfg) -> str:
    """Dtype DeepSpeed trains in: the base's, or the compute dtype of a quantized base."""
    if cfg.quant.mode != "none":
        return "bf16" if cfg.quant.compute_dtype == "fp32" else cfg.quant.compute_dtype
    return cfg.model.dtype


def render(cfg, world_size: int) -> dict:
    ds, t = cfg.deepspeed, cfg.train
    zero = {
        "stage": ds.stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.reduce_bucket_size,
    }
    if ds.stage == 3:
        zero.update(stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=True)
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": True}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": True}
    precision = mixed_precision(cfg)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_optimization": zero,
        # We pass our own torch optimizer (or DeepSpeedCPUAdam for offload).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    extra = OmegaConf.to_container(ds.extra, resolve=True) if ds.extra else {}
    _deep_update(config, extra)
    return config


# DeepSpeed keys dialtune sets from its own config: deepspeed.extra may not override them (they would
# disagree with what the loop, the LR schedule or the checkpoint believe), and says which key to set
_OWNED = {"train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_accumulation_steps": "train.grad_accum",
          "train_batch_size": "train.global_batch_size", "gradient_clipping": "optim.grad_clip",
          "bf16": "model.dtype (quant.compute_dtype with quant=int8/nf4)", "fp16": "model.dtype (quant.compute_dtype with quant=int8/nf4)",
          "optimizer": "optim.name (dialtune builds the optimizer)", "scheduler": "optim.scheduler (dialtune drives the LR)",
          "zero_optimization.stage": "deepspeed=zero0|zero1|zero2|zero3 (deepspeed.stage)",
          "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer", "zero_optimization.offload_param": "deepspeed.offload_param",
          "zero_optimization.reduce_bucket_size": "deepspeed.reduce_bucket_size", "zero_optimization.overlap_comm": "deepspeed.overlap_comm",
          "zero_optimization.stage3_param_persistence_threshold": "deepspeed.stage3_param_persistence_threshold"}


def extra_problem(ds) -> Optional[str]:
    """One sentence when deepspeed.extra sets a key dialtune sets itself."""
    extra = OmegaConf.to_container(ds.extra, resolve=True) if ds.extra else {}
    for key, instead in _OWNED.items():
        head, _, tail = key.partition(".")
        if head in extra and (not tail or isinstance(extra[head], dict) and tail in extra[head]):
            return f"deepspeed.extra.{key} is set by dialtune from {instead}: set that instead (and drop it from deepspeed.extra)."
    return None


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def lr_lambda(optim_cfg, total_steps: int):
    """Multiplier of the peak LR for the optimizer step after `s` steps (step k = s + 1 of
    total_steps): a linear warmup that reaches the peak at step `warmup` (no step at lr 0), then
    the schedule from the peak (at step `warmup`, or step 1 without warmup) down to min_lr_ratio at
    the last step — the peak is taken once, and a 1-step run trains at the peak. (A warmup as long
    as the run never reaches the peak.)"""
    warmup = optim_cfg.warmup_steps or math.ceil(optim_cfg.warmup_ratio * total_steps)
    floor = optim_cfg.min_lr_ratio
    peak_at = max(warmup, 1)

    def fn(s: int) -> float:
        k = s + 1
        if k < warmup:
            return k / warmup
        if optim_cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (k - peak_at) / max(1, total_steps - peak_at))
        if optim_cfg.scheduler == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
