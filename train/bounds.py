"""The range of every numeric config key, and the one sentence for a value outside it
(train/validate.py asks; `dialtune prepare` and `dialtune eval` ask for their sections)."""
from __future__ import annotations

from typing import Optional

from omegaconf import OmegaConf

# numeric keys: (lowest, lowest excluded, highest or None, highest excluded, what an edge means)
_AT_LEAST_0, _AT_LEAST_1, _ABOVE_0 = (0, False, None, False, ""), (1, False, None, False, ""), (0, True, None, False, "")
_BOUNDS = {
    **{f"model.tiny.{k}": _AT_LEAST_1 for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                                "num_key_value_heads", "max_position_embeddings")},
    "peft.r": _AT_LEAST_1,
    "peft.alpha": (0, True, None, False, " (the adapter's output is scaled by alpha / r: 0 would train nothing)"),
    "peft.dropout": (0, False, 1, True, ""),
    "quant.int8_threshold": _AT_LEAST_0,
    "deepspeed.reduce_bucket_size": _AT_LEAST_1,
    "deepspeed.stage3_param_persistence_threshold": _AT_LEAST_0,
    "deepspeed.timeout_minutes": _AT_LEAST_1,
    "optim.lr": _ABOVE_0,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.eps": _ABOVE_0,
    "optim.warmup_steps": (0, False, None, False, " (0: optim.warmup_ratio decides)"),
    "optim.warmup_ratio": (0, False, 1, True, ""),
    "optim.min_lr_ratio": (0, False, 1, False, " (a share of the peak lr)"),
    "optim.grad_clip": (0, False, None, False, " (0: no clipping)"),
    "train.micro_batch_size": _AT_LEAST_1,
    "train.grad_accum": _AT_LEAST_1,
    "train.global_batch_size": (0, False, None, False, " (0: micro_batch_size x grad_accum x ranks)"),
    "train.save_every": (0, False, None, False, " (0: only at the end)"),
    "train.log_every": _AT_LEAST_1,
    "train.stop_after_steps": (0, False, None, False, " (0: run to the end)"),
    "train.max_nonfinite_in_row": _AT_LEAST_0,
    "train.keep_checkpoints": (0, False, None, False, " (0 keeps every checkpoint)"),
    "kernels.ce_chunk_size": _AT_LEAST_1,
    "kernels.checkpoint_every": _AT_LEAST_1,
    "kernels.peak_tflops": (0, False, None, False, " (0: looked up from the GPU name)"),
    "data.max_seq_len": (16, False, None, False, " (shorter cannot hold a conversation)"),
    "data.eval_fraction": (0, False, 1, True, ""),
    "data.max_message_chars": _AT_LEAST_1,
    "data.max_errors_shown": _AT_LEAST_1,
    "data.num_proc": _AT_LEAST_1,
    "eval.every_n_steps": (0, False, None, False, " (0: only at the end)"),
    "eval.early_stopping_patience": (0, False, None, False, " (0: off)"),
    "eval.early_stopping_min_delta": _AT_LEAST_0,
    "eval.batch_size": _AT_LEAST_1,
    "eval.max_new_tokens": _AT_LEAST_1,
    "eval.lm_max_batches": (0, False, None, False, " (0: the whole eval set)"),
    "eval.intent_max_examples": (0, False, None, False, " (0: all)"),
    "eval.response_conversations": (0, False, None, False, " (0: skip)"),
    "eval.samples": _AT_LEAST_0,
    "export.verify_tolerance": _AT_LEAST_0,
    "export.verify_dequantize_error": _AT_LEAST_0,
    "export.eval_conversations": (0, False, None, False, " (0 skips)"),
    "export.stream_above_gb": _AT_LEAST_0,
}


def bounds_problem(node, prefix: str = "", skip: tuple = ()) -> Optional[str]:
    """The first numeric key (of _BOUNDS, under `prefix` when `node` is that section, none under a
    prefix in `skip`) outside its range, as one sentence; None when all are in range."""
    for key in _BOUNDS:
        if key.startswith(prefix) and not key.startswith(skip):
            if problem := value_problem(key, OmegaConf.select(node, key[len(prefix):])):
                return problem
    return None


def value_problem(key: str, value) -> Optional[str]:
    """One sentence when `value` is outside the range of numeric config key `key` (a command-line
    flag that stands for it: `dialtune merge --tolerance`); None when it is inside."""
    lo, lo_open, hi, hi_open, note = _BOUNDS[key]
    if (value > lo if lo_open else value >= lo) and (hi is None or (value < hi if hi_open else value <= hi)):
        return None
    where = (f"above {lo}" if lo_open else f"at least {lo}") if hi is None else \
        f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return f"{key}={value} must be {where}{note}."
