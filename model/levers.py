"""The adapter and the speed levers (README "Speed levers") on a loaded base, in the order they
need: Liger before PEFT wraps the modules, the fast int8 path and fused LoRA once the adapter is
on, the packed-attention path for the finished model, then selective checkpointing, the memory
budget (which counts what all of the above keep for backward) and torch.compile over all of it."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from . import attention, dequantize, fused_lora, kernels, loader, memory


class LeverError(ValueError):
    """A lever that cannot run on this model (one sentence)."""


def apply(model, cfg, dev, dtype, layout: Optional[Dict[str, Any]], info: Callable[[str], None]) -> Tuple[Any, Dict[str, Any]]:
    """(the model with its adapter, what ran: quantized/fast-int8/fused/checkpointed layer counts,
    liger). layout: a packed run's {"path", "attn", "window"}, filled in here; info: a log line
    (rank 0's)."""
    kc = cfg.kernels
    ran = {"quantized": sum(1 for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))}
    ran["liger"] = liger = bool(kc.liger and kernels.apply_liger(model))
    model = loader.attach_adapter(model, cfg)
    ran["fast_int8"] = kernels.dequantize_int8_linears(model) if dequantize.fast_int8(cfg) else 0
    why_not_fused = ("off under ZeRO-3 (PEFT's modules gather the partitioned adapter)" if cfg.deepspeed.stage == 3 else
                     "off with kernels.compile (saving the random state breaks the compiled graph at every LoRA call)"
                     if kc.compile else None)
    ran["fused_lora"] = fused_lora.fuse_lora(model, liger=liger) if kc.fused_lora and not why_not_fused else 0
    if kc.fused_lora and cfg.peft.method != "none":
        info("fused LoRA: " + (why_not_fused or f"{ran['fused_lora']} layers ({fused_lora.describe(model)})"))
    if layout is not None:
        try:
            layout["path"], why, layout["attn"], layout["window"] = attention.packed_layout(
                kc.packed_attention, model, dev, dtype, cfg.data.max_seq_len)
        except attention.PackedAttentionError as e:
            raise LeverError(f"{e}.") from None
        info(f"packed attention: {layout['path']} ({why})")
    if cfg.model.gradient_checkpointing and kc.checkpoint_every > 1:
        kernels.selective_checkpointing(model, kc.checkpoint_every)
    masked = layout is None or layout["path"] != "varlen"
    if budget_plan := memory.apply_budget(model, cfg, dev, liger, masked=masked):
        info(budget_plan)
    ran["checkpointed"] = kernels.checkpointed_count(model) if cfg.model.gradient_checkpointing else 0
    if kc.compile:
        kernels.compile_decoder_layers(model)
    return model, ran
