"""The run an export comes from: its directory, resolved config and tokenized eval set (the
held-out loss of each model an export compares); and the checks of what a merge reads before it
loads anything (the adapter's files, a local base), each failing in one sentence (ExportError)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch

from .export_io import ExportError

log = logging.getLogger("dialtune")



def find_run_dir(adapter_dir: str) -> Optional[str]:
    """<run_dir> for <run_dir>/checkpoints/step_N/adapter, when it holds a config.yaml."""
    run_dir = os.path.normpath(os.path.join(adapter_dir, "..", "..", ".."))
    return run_dir if os.path.isfile(os.path.join(run_dir, "config.yaml")) else None


def _load_run_cfg(run_dir: Optional[str]):
    if not run_dir or not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(os.path.join(run_dir, "config.yaml"))


def eval_set_path(run_dir: Optional[str]) -> Optional[str]:
    """The run's tokenized eval set: <run_dir>/data/eval, else the data cache it names in
    <run_dir>/data_stats.json (`cache.path`); None when the run has no eval set."""
    if not run_dir:
        return None
    path = os.path.join(run_dir, "data", "eval")
    if os.path.isdir(path):
        return path
    try:
        with open(os.path.join(run_dir, "data_stats.json")) as f:
            cache = (json.load(f).get("cache") or {}).get("path")
    except (OSError, ValueError, AttributeError):
        return None
    if cache and os.path.isdir(os.path.join(cache, "eval")):
        return os.path.join(cache, "eval")
    return None


def load_eval_batches(run_dir: Optional[str], pad_id: int, max_conversations: int, micro_batch_size: int = 4):
    """The first max_conversations rows of the run's tokenized eval set (columns input_ids and
    labels, -100 on non-targets) as padded micro-batches; None when there is none (or
    max_conversations is 0)."""
    path = eval_set_path(run_dir) if max_conversations > 0 else None
    if path is None:
        return None
    from datasets import load_from_disk

    from data_pipeline import batching

    ds = load_from_disk(path)
    n = min(len(ds), max_conversations)
    if n == 0:
        return None
    batches = [batching.collate(batching.fetch(ds, list(range(s, min(s + micro_batch_size, n)))), pad_id)
               for s in range(0, n, micro_batch_size)]
    return {"batches": batches, "path": path, "conversations": n,
            "target_tokens": sum(batching.target_tokens(b) for b in batches)}


@torch.no_grad()
def eval_loss(model, eval_set) -> float:
    """Token-weighted next-token cross-entropy over the target (assistant) tokens."""
    import torch.nn.functional as F

    from data_pipeline.chat import IGNORE

    total, count = 0.0, 0
    for b in eval_set["batches"]:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        labels = b["labels"][:, 1:]
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((labels != IGNORE).sum())
    return total / max(count, 1)


def run_base(cfg, run_dir: str) -> str:
    """The base a run trained on: model.name_or_path, or for the embedded tiny model <run_dir>/base,
    rebuilt when it is missing (a run directory copied without it; the build is deterministic from
    model.tiny and model.add_tokens)."""
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path
    base = os.path.abspath(os.path.join(run_dir, "base"))
    if not os.path.isfile(os.path.join(base, "config.json")):
        from .loader import tiny_base

        try:
            tiny_base(cfg.model, os.path.abspath(run_dir), build=True)
        except (OSError, ValueError) as e:
            raise ExportError(f"the run's tiny base {base} is missing and cannot be rebuilt there ({getattr(e, 'strerror', None) or e}); "
                              "copy the run directory with its base/ or make it writable.") from None
        log.warning("the run's tiny base %s was missing: rebuilt from its config (model.tiny, seed %s)", base, cfg.model.tiny.seed)
    return base


def check_adapter(adapter_dir: str) -> None:
    """ExportError (one sentence) for an adapter whose files cannot be read (a truncated copy, an
    interrupted save), before anything loads them."""
    config = os.path.join(adapter_dir, "adapter_config.json")
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    path = config
    try:
        with open(config) as f:
            json.load(f)
        if os.path.isfile(weights) or not os.path.isfile(os.path.join(adapter_dir, "adapter_model.bin")):
            from safetensors import safe_open

            path = weights
            with safe_open(weights, framework="pt") as f:
                f.keys()
    except Exception as e:  # noqa: BLE001 - missing, truncated, not JSON, not safetensors
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ExportError(f"{path} cannot be read ({reason}); is the checkpoint complete? Pass another with --checkpoint.") from None


def check_base(base_path: Optional[str]) -> None:
    """ExportError (one sentence) for a local base directory that is gone (a hub id is left to the hub)."""
    if base_path and (os.path.isabs(base_path) or base_path.startswith(".")) and not os.path.isdir(base_path):
        raise ExportError(f"the base model {base_path} does not exist; put it back where the run trained on it (model.name_or_path).")
