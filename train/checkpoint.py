"""Checkpoints: DeepSpeed engine state (trainable parameters only) + the PEFT adapter + loop state.

Layout: <run_dir>/checkpoints/step_0000040/{adapter/, trainer_state.json, <deepspeed files>}
and <run_dir>/checkpoints/latest (written by DeepSpeed after every rank saved).
"""
from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from . import distributed


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model, out_dir: str, is_main: bool, zero_stage: int, tokenizer=None) -> None:
    """Write the adapter with PEFT's save_pretrained; under ZeRO-3 gather the shards first
    (on every rank), else the saved tensors would be empty partitions."""
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    ctx = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if zero_stage == 3 else _null()
    with ctx:
        if is_main:
            model.save_pretrained(out_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(out_dir)
    distributed.barrier()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def save(engine, ckpt_root: str, step: int, state: Dict[str, Any], is_main: bool, zero_stage: int, tokenizer) -> str:
    tag = tag_for(step)
    client_state = {"trainer": state, "rng": rng_state()}
    engine.save_checkpoint(ckpt_root, tag=tag, client_state=client_state, exclude_frozen_parameters=True)
    path = os.path.join(ckpt_root, tag)
    if hasattr(engine.module, "peft_config"):
        save_adapter(engine.module, os.path.join(path, "adapter"), is_main, zero_stage, tokenizer)
    if is_main:
        with open(os.path.join(path, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
    distributed.barrier()
    return path


def find_resume(resume: str, ckpt_root: str) -> Optional[Tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = os.path.join(ckpt_root, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return ckpt_root, f.read().strip()
    path = os.path.normpath(resume)
    return os.path.dirname(path), os.path.basename(path)


def load(engine, root: str, tag: str) -> Dict[str, Any]:
    _, client = engine.load_checkpoint(root, tag=tag, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise FileNotFoundError(f"{os.path.join(root, tag)} is not a complete checkpoint")
    set_rng_state(client["rng"])
    return client["trainer"]
