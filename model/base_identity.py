"""Which base weights an adapter was trained on. A run records its base's identity in every
checkpoint's trainer state (`base`); resuming the run, merging a checkpoint and evaluating its
adapter compare it with the base found now. A local base directory overwritten since (another
checkpoint of the same architecture) or a hub model whose branch moved would otherwise give a
resumed run that mixes two bases, or a merge that passes its own check (merged == base + adapter,
both on the new base) and is not the model that was trained.

A local directory is identified by its tensors (names, dtypes, shapes, wherever the shards put
them) and a sample of each one's bytes (4 KiB at its start, middle and end: an update of a weight
matrix, a merged adapter's or a fine-tune's, changes all three; a few MiB read for an 8B model, not
the model), other weight files (.bin) by all their bytes; a hub id by the commit of the cached
snapshot it loads from."""
from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Optional

_SAMPLE = 4096


def _tensors(path: str):
    """(name, dtype, shape, sampled bytes) of every tensor of a safetensors file."""
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, meta in header.items():
            begin, end = (8 + n + o for o in meta["data_offsets"])
            size = end - begin
            places, length = ((begin, begin + size // 2 - _SAMPLE // 2, end - _SAMPLE), _SAMPLE) if size > 3 * _SAMPLE else ((begin,), size)
            sample = b""
            for at in places:
                f.seek(at)
                sample += f.read(length)
            yield name, meta["dtype"], meta["shape"], sample


def identity(path: str, revision: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """{"weights": digest, "tensors": n} for a local directory (a .bin file counts as one tensor),
    {"commit": sha} for a cached hub model; None when neither can be read (nothing to compare)."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
        digest = hashlib.sha256()
        try:
            tensors = sorted((t for f in files if f.endswith(".safetensors") for t in _tensors(os.path.join(path, f))), key=lambda t: t[0])
            for name, dtype, shape, sample in tensors:
                digest.update(f"{name}:{dtype}:{shape};".encode() + sample)
            others = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]  # (no index of tensors to sample)
            for name in others:
                with open(os.path.join(path, name), "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
        except (OSError, ValueError, KeyError, TypeError):  # a damaged file: loading it says what is wrong
            return None
        count = len(tensors) + len(others)
        return {"weights": digest.hexdigest()[:20], "tensors": count} if count else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - not a hub id (a path that is gone: the loaders say so)
        return None
    return {"commit": os.path.basename(os.path.dirname(found))} if isinstance(found, str) else None


def changed(recorded: Optional[Dict[str, Any]], path: str, revision: Optional[str], what: str) -> Optional[str]:
    """One sentence when the base at `path` is not the one `recorded` (a checkpoint's trainer
    state `base`); None when they match or either is unknown (a checkpoint of before this record)."""
    if not recorded:
        return None
    now = identity(path, revision)
    if now is None or now == recorded:
        return None
    if "commit" in recorded or "commit" in now:
        how = f"hub commit {recorded.get('commit', '?')} then, {now.get('commit', 'a local directory')} now"
        pin = f"model.revision={recorded['commit']} loads the one trained on" if "commit" in recorded else "restore the trained-on weights there"
    else:
        how = (f"{recorded['tensors']} tensors then, {now['tensors']} now" if recorded["tensors"] != now["tensors"]
               else f"{now['tensors']} tensors then and now, with other names, shapes or values")
        pin = "put the trained-on weights back there"
    return (f"the base model {path} is not the one {what} was trained on ({how}): an adapter on other base weights is "
            f"another model; {pin}.")


def of_run(cfg, base_path: str) -> Optional[Dict[str, Any]]:
    """The identity an adapter run records for its base (None for a full fine-tune: its checkpoints
    hold every weight, the base is only where they started)."""
    if cfg.peft.method == "none":
        return None
    return identity(base_path, cfg.model.revision if base_path == cfg.model.name_or_path else None)


def checkpoint_problem(ckpt_dir: str, base_path: str, cfg) -> Optional[str]:
    """changed()'s sentence for checkpoint ckpt_dir (its trainer_state.json's `base`) against the
    base at base_path, with the run's model.revision; None for a full fine-tune or no record."""
    import json

    if cfg.peft.method == "none":
        return None
    try:
        with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
            recorded = json.load(f).get("base")
    except (OSError, ValueError):
        return None
    return changed(recorded, base_path, cfg.model.revision if base_path == cfg.model.name_or_path else None,
                   f"checkpoint {ckpt_dir}")
