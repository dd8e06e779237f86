"""Merge a LoRA / rsLoRA / DoRA adapter into its base one tensor at a time, never holding the model.

`merge_and_unload` needs the whole base in memory (an 8B model in fp32 is 32 GB). Here every
base safetensors shard is memory-mapped and each tensor is read, merged in fp32 if the adapter
touches it, cast and appended to the output shard being filled, which is written as soon as it
reaches `max_shard_size`. Peak memory is about one output shard plus the largest tensor in fp32
(Llama-3-8B, 2 GB shards: 3.4 GiB allocated, 9.75 GiB RSS with the mapped input shard, measured by
bench/merge_memory.py), whatever the model size.

The merge is PEFT's own arithmetic, per linear layer with weight W [out, in]:
    LoRA / rsLoRA:  W' = W + s * B @ A,    s = alpha / r  (rsLoRA: alpha / sqrt(r))
    DoRA:           W' = m / ||W + s * B @ A||_row * (W + s * B @ A)   (m: the learnt magnitude)
(fan_in_fan_out layers such as GPT-2's Conv1D store W transposed, so the delta is too; a LoRA'd
embedding stores lora_embedding_A [r, rows] and _B [dim, r], its delta is (s * B @ A).T, and PEFT
saves its weight, or the LoRA'd head's, beside it as <module>.base_layer.weight: the update goes into
that one, and on a tied base the head is written untied, as the adapter model computes it). Tensors
the adapter saves whole (modules_to_save, e.g. resized embeddings and lm_head; trained biases)
replace the base's. Every adapter tensor must be used exactly once, else the merge fails.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

import torch

PREFIX = "base_model.model."
# adapter tensor name endings -> their part of a LoRA layer (embeddings: lora_embedding_A/B, no .weight)
_PARTS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude_vector",
          "lora_embedding_A": "embedding_A", "lora_embedding_B": "embedding_B"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B\s*$", re.I)


class MergeError(RuntimeError):
    pass


def parse_size(text: str) -> int:
    m = _SIZE.match(str(text))
    if not m:
        raise MergeError(f"export.max_shard_size={text!r} is not a size like 2GB or 500MB.")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


def base_shards(base_path: str, revision: Optional[str] = None) -> Tuple[str, List[str]]:
    """(directory, safetensors files in order) of a local base or a hub id (from the local cache
    or downloaded, weights and json only)."""
    if not os.path.isdir(base_path):
        from huggingface_hub import snapshot_download

        base_path = snapshot_download(base_path, revision=revision, allow_patterns=["*.safetensors", "*.json"])
    index = os.path.join(base_path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(base_path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise MergeError(f"{base_path} has no safetensors weights (model.safetensors or an index); convert the base to safetensors first.")
    return base_path, [os.path.join(base_path, f) for f in files]


def _adapter(adapter_dir: str):
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter; only LoRA/rsLoRA/DoRA adapters merge here.")
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    whole: Dict[str, torch.Tensor] = {}
    wrapped: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for part, short in _PARTS.items():
            if name.endswith("." + part):
                lora.setdefault(name[: -len(part) - 1], {})[short] = t
                break
        else:
            if ".original_module." in name:  # the frozen copy PEFT saves beside a module trained in full (grown vocabulary)
                continue
            if ".modules_to_save." in name:  # the trained module once more, also as <module>.weight (grown vocabulary)
                wrapped[name.replace(".modules_to_save.", ".")] = t
                continue
            whole[name.replace(".base_layer.", ".")] = t  # (a trained bias of a LoRA layer: <module>.base_layer.bias)
    for name, t in wrapped.items():
        whole.setdefault(name, t)
    for module, parts in lora.items():
        if module + ".weight" in whole:  # <module>.base_layer.weight, saved with a LoRA'd embedding or head (grown
            parts["base"] = whole.pop(module + ".weight")  # vocabulary): the weight the update goes into, as PEFT loads it
        if "embedding_A" in parts:  # nn.Embedding: A [r, num_embeddings], B [dim, r], delta (B @ A).T
            parts.update(lora_A=parts.pop("embedding_A"), lora_B=parts.pop("embedding_B"), embedding=True)
    return cfg, lora, whole


def _scale(cfg: Dict, module: str) -> float:
    short = module.split(".")[-1]
    r = next((v for k, v in (cfg.get("rank_pattern") or {}).items() if module.endswith(k) or short == k), cfg["r"])
    alpha = next((v for k, v in (cfg.get("alpha_pattern") or {}).items() if module.endswith(k) or short == k), cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def merged_tensor(w: torch.Tensor, parts: Dict[str, torch.Tensor], scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """One layer's merged weight, in fp32."""
    w = w.float()
    delta = scale * (parts["lora_B"].float() @ parts["lora_A"].float())
    if fan_in_fan_out:
        delta = delta.t()
    w = w + delta
    if "lora_magnitude_vector" in parts:
        rows = w.t() if fan_in_fan_out else w
        rows = parts["lora_magnitude_vector"].float().view(-1, 1) / rows.norm(p=2, dim=1, keepdim=True) * rows
        w = rows.t() if fan_in_fan_out else rows
    return w


_INPUT_ROWS = ("embed_tokens.weight", "wte.weight", "embed_in.weight")
_HEAD = "lm_head.weight"
_VOCAB_ROWS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "lm_head.weight", "embed_out.weight")


def _grow(t: torch.Tensor, rows: Optional[int]) -> torch.Tensor:
    """A vocabulary matrix grown to `rows` with its mean row, as training's loader.fit_embeddings did."""
    if not rows or t.dim() != 2 or t.shape[0] >= rows:
        return t
    return torch.cat([t, t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)])


def merge_to_dir(adapter_dir: str, base_path: str, out_dir: str, dtype: torch.dtype, max_shard_size: str = "2GB",
                 revision: Optional[str] = None, rows: Optional[int] = None) -> Dict:
    """Write the merged weights (sharded safetensors + index) and config.json into out_dir. rows:
    the tokenizer's size; embeddings and output head the adapter does not carry grow to it with
    mean rows, as training's loader.fit_embeddings grew them (an added pad token)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg, lora, whole = _adapter(adapter_dir)
    limit = parse_size(max_shard_size)
    base_dir, files = base_shards(base_path, revision)
    fan = bool(cfg.get("fan_in_fan_out"))
    os.makedirs(out_dir, exist_ok=True)
    used_lora, used_whole = set(), set()
    weight_map: Dict[str, str] = {}
    shard: Dict[str, torch.Tensor] = {}
    written: List[str] = []
    size = total = 0
    shapes: Dict[str, List[int]] = {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"part-{len(written):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            written.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    from transformers import AutoConfig

    def lora_merged(w: torch.Tensor, module: str) -> torch.Tensor:
        parts = lora[module]
        w = parts.get("base", w)
        if rows and (module + ".weight").endswith(_VOCAB_ROWS):
            w = _grow(w, rows)
        used_lora.add(module)
        return merged_tensor(w, parts, _scale(cfg, module), fan or bool(parts.get("embedding")))

    tied = bool(getattr(AutoConfig.from_pretrained(base_dir), "tie_word_embeddings", False))
    trained = list(whole) + [m + ".weight" for m in lora]
    untie = tied and any(k.endswith(_INPUT_ROWS) or k == _HEAD for k in trained)  # (the trained side no longer shares)
    kept_input = None  # the base's input embedding, which the untied output layer keeps (as the in-memory merge does)
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                module = key[: -len(".weight")] if key.endswith(".weight") else None
                if untie and key.endswith(_INPUT_ROWS):
                    kept_input = lora[module]["base"] if "base" in lora.get(module, {}) else f.get_tensor(key)
                if key in whole:
                    t = whole[key]
                    used_whole.add(key)
                elif module in lora:
                    t = lora_merged(f.get_tensor(key), module)
                else:
                    t = f.get_tensor(key)
                    if rows and key.endswith(_VOCAB_ROWS):
                        t = _grow(t, rows)
                t = t.to(dtype) if t.is_floating_point() else t
                shapes[key] = list(t.shape)
                nbytes = t.numel() * t.element_size()
                if size and size + nbytes > limit:
                    flush()
                shard[key] = t.contiguous()
                size += nbytes
                total += nbytes
                del t
    if untie and _HEAD not in shapes:  # a tied base stores no output layer: write it, untied
        head = whole[_HEAD] if _HEAD in whole else kept_input
        used_whole.add(_HEAD) if _HEAD in whole else None
        if head is not None:
            want = rows or max((v[0] for k, v in shapes.items() if k.endswith(_INPUT_ROWS)), default=0)  # (the trained rows)
            head = _grow(head, want)
            if "lm_head" in lora:  # LoRA on the output layer of a tied base: it goes into the head alone
                head = lora_merged(head, "lm_head")
            shard[_HEAD] = head.to(dtype).contiguous()
            shapes[_HEAD] = list(head.shape)
            total += head.numel() * shard[_HEAD].element_size()
    flush()
    missing = sorted(set(lora) - used_lora) + sorted(set(whole) - used_whole)
    if missing:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise MergeError(f"the adapter has tensors for {len(missing)} weights the base lacks (first: {missing[0]}); "
                         f"is {base_path} the base it was trained on?")
    if len(written) == 1:
        os.replace(os.path.join(out_dir, written[0]), os.path.join(out_dir, "model.safetensors"))
    else:
        n = len(written)
        final = {w: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, w in enumerate(written)}
        for w, name in final.items():
            os.replace(os.path.join(out_dir, w), os.path.join(out_dir, name))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}, f, indent=2)
    with open(os.path.join(base_dir, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    config["dtype"] = str(dtype).replace("torch.", "")
    config.pop("torch_dtype", None)
    if untie:
        config["tie_word_embeddings"] = False
    emb = next((shapes[k] for k in shapes if k.endswith("embed_tokens.weight") or k.endswith("wte.weight")), None)
    if emb and config.get("vocab_size") and emb[0] != config["vocab_size"]:
        config["vocab_size"] = emb[0]  # added tokens: the adapter carries the resized embeddings
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"merged_layers": len(used_lora), "replaced_tensors": len(used_whole), "shards": max(1, len(written)),
            "bytes": total}


def fp32_bytes(base_path: str, revision: Optional[str] = None) -> int:
    """Size of the base in fp32, from its safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    _, files = base_shards(base_path, revision)
    n = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                n += math.prod(f.get_slice(key).get_shape())
    return 4 * n
