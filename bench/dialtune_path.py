"""dialtune's training step, with its levers: the base loaded and adapted by model/loader.py (the
same BitsAndBytesConfig the recipe builds, LoRA r16/alpha 32/dropout 0.05 on the same 7
projections, no k-bit upcast), packed rows with block-diagonal attention (data_pipeline.packing),
and the levers applied by model/levers.py, the recipe's own code (its order, and its rules: fused
LoRA off under compile, the memory budget's plan). One process and a plain torch AdamW: the recipe's DeepSpeed
engine adds only its ZeRO bookkeeping around the same forward/backward.

Levers (spec["levers"]), each 1/0 unless noted:
  packing   rows of pack_len tokens, conversations kept apart (0: padded batches of batch_size
            conversations, as the hf path)
  varlen    1: kernels.packed_attention=auto (packed rows attended per document through cu_seqlens:
            the FlashAttention varlen kernel on CUDA in 16-bit, SDPA per document on CPU; the
            mask on CUDA fp32); 0: the 4D block-diagonal mask through SDPA; 2: varlen always
  fused_ce  chunked linear + cross-entropy on target positions only (0: full logits)
  fast_int8 int8 weights dequantised per layer into bf16 GEMMs (0: LLM.int8 matmul); int8 only
  fused_lora the LoRA branch as one autograd function keeping its input once (kernels.fused_lora;
            0, the default: PEFT's modules)
  liger     Liger RMSNorm/SwiGLU/RoPE when importable on CUDA
  ckpt      activation checkpointing on every k-th layer: 1 all, 0 none, k > 1 selective
  compile   torch.compile each decoder layer
  budget    GiB or auto (0: off): as many layers as fit keep their activations (kernels.memory_budget_gib,
            model/memory.py); with ckpt 1
"""
from __future__ import annotations

import contextlib
import time

from typing import Dict, List

import numpy as np
import torch

from bench.common import DTYPES, LORA_TARGETS, Meter, batch_counts, conversations, reset_peak, say, sync
from model.kernels import DEFAULT_CHUNK

LEVERS = {"packing": 1, "varlen": 1, "fused_ce": 1, "fast_int8": 1, "fused_lora": 0, "liger": 1, "ckpt": 1, "compile": 0, "budget": 0}


def _config(spec: Dict, levers: Dict):
    """The fields of dialtune's config that model/loader.py, model/levers.py and model/memory.py
    read, with the levers as the recipe's kernels.* keys."""
    from omegaconf import OmegaConf

    quant, packed, ckpt = spec["quant"], levers["packing"], levers["ckpt"]
    return OmegaConf.create(dict(
        kernels=dict(memory_budget_gib=levers["budget"] if ckpt == 1 else 0, fused_ce=bool(levers["fused_ce"]),
                     ce_chunk_size=DEFAULT_CHUNK, fast_int8=bool(levers["fast_int8"]), liger=bool(levers["liger"]),
                     fused_lora=bool(levers["fused_lora"]), compile=bool(levers["compile"]),
                     checkpoint_every=max(ckpt, 1), packed_attention=("mask", "auto", "varlen")[levers["varlen"]]),
        deepspeed=dict(stage=0, reduce_bucket_size=0),  # no DeepSpeed here: no gradient buckets
        # a micro-batch: the step's packed rows, or batch_size padded conversations
        train=dict(micro_batch_size=max(1, spec["tokens_per_batch"] // spec["pack_len"]) if packed
                   else spec["batch_size"]),
        data=dict(max_seq_len=spec["pack_len"] if packed else spec["max_len"]),
        quant=dict(mode=quant if quant in ("int8", "nf4") else "none", compute_dtype="bf16",
                   double_quant=True, int8_threshold=6.0),
        model=dict(name_or_path=spec["model_dir"], dtype="fp32" if quant == "fp32" else "bf16",
                   attn_implementation="sdpa", trust_remote_code=False, revision=None,
                   gradient_checkpointing=ckpt > 0, add_tokens=[]),
        peft=dict(method="lora", r=16, alpha=32, dropout=0.05, target_modules=list(LORA_TARGETS), bias="none",
                  modules_to_save=[])))


def _batches(spec: Dict, levers: Dict, vocab: int, dtype, layout: str = "sdpa", window=None) -> List[Dict]:
    """Every step's micro-batch, collated up front (the recipe's loader overlaps this with compute)."""
    from data_pipeline.batching import collate
    from data_pipeline.packing import collate_packed, pack

    total = spec["warmup"] + spec["steps"]
    if not levers["packing"]:
        data = conversations(spec["lengths"], spec["max_len"], vocab, spec["batch_size"] * total, spec["seed"])
        return [collate(data[i * spec["batch_size"]:(i + 1) * spec["batch_size"]], pad_id=0) for i in range(total)]
    L = spec["pack_len"]
    rows_per_step = max(1, spec["tokens_per_batch"] // L)
    need = rows_per_step * total
    # the shortest prefix of the conversation stream (the one the hf path draws from) that packs
    # into enough rows; when it gives more, the emptiest extra rows are left out
    data = conversations(spec["lengths"], L, vocab, need * L // 64 + 16, spec["seed"])
    lengths = [len(d["input_ids"]) for d in data]
    k = int(np.searchsorted(np.cumsum(lengths), need * L * 0.9)) + 1
    while len(bins := pack(lengths[:k], L, spec["seed"])) < need:
        if k >= len(lengths):
            raise ValueError(f"{len(lengths)} conversations pack into only {len(bins)} rows of {L}; {need} needed")
        k += 1 + k // 50
    bins = sorted(bins, key=lambda b: -sum(lengths[i] for i in b))[:need]
    order = np.random.default_rng(spec["seed"]).permutation(need)
    rows = [[data[j] for j in bins[i]] for i in order]
    out = []
    for s in range(total):
        chunk = rows[s * rows_per_step:(s + 1) * rows_per_step]
        b = collate_packed(chunk, pad_id=0, attn_implementation=layout, dtype=dtype, sliding_window=window,
                           pad_to=L if levers["compile"] else None)
        b["lengths"] = [len(d["input_ids"]) for row in chunk for d in row]
        out.append(b)
    return out


def run(spec: Dict, peak) -> Dict:
    from model import kernels, levers as model_levers, loader

    device, quant, dtype = torch.device(spec["device"]), spec["quant"], DTYPES[spec["quant"]]
    levers = {**LEVERS, **spec["levers"]}
    notes = []
    cfg = _config(spec, levers)
    model = loader.load_base(cfg, spec["model_dir"], device)
    # the recipe's own lever order and rules (model/levers.py), so that the row measures what it runs
    packed = {"attn": "sdpa", "window": None, "path": "sdpa"} if levers["packing"] else None
    model, ran = model_levers.apply(model, cfg, device, dtype, packed, notes.append)
    if levers["liger"]:
        notes.insert(0, "liger" if ran["liger"] else "liger skipped")
    if levers["ckpt"] > 1:
        notes.append(f"ckpt {ran['checkpointed']}/{len(kernels.decoder_layers(model))} layers")
    if ran["fast_int8"]:
        notes.append(f"fast int8 x{ran['fast_int8']}")
    if levers["budget"] and levers["ckpt"] != 1:
        notes.append("budget not applied: it needs ckpt=1")
    if levers["compile"]:
        notes.append("compiled")
    fused = bool(levers["fused_ce"])
    why_not = kernels.fused_ce_unsupported(model) if fused else None
    if why_not:
        notes.append(f"fused CE off: {why_not}")
        fused = False
    layout, window = (packed["attn"], packed["window"]) if packed else ("sdpa", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the recipe's DeepSpeed bf16 engine trains the adapter in bf16 too
        p.data = p.data.to(dtype)
    opt = torch.optim.AdamW(trainable, lr=2e-4, fused=device.type == "cuda")
    batches = _batches(spec, levers, model.config.vocab_size, dtype, layout, window)
    meter = Meter(device, spec["warmup"], spec["steps"])
    losses = []
    model.train()
    reset_peak(device)
    say(f"dialtune {quant} {levers}: {len(batches)} steps")
    for step, b in enumerate(batches, 1):
        ce, counts = _step(model, opt, b, device, fused, layout)
        if step in (1, len(batches)):
            losses.append(ce.item() / max(counts["target"], 1))
        meter.step(step, counts)
    result = meter.result(model.config, peak)  # before the profiled step: its peak memory and time stay out
    if spec.get("profile"):  # the last batch once more, under the profiler
        with _profiler(device) as prof:
            t0 = time.perf_counter()
            _step(model, opt, batches[-1], device, fused, layout)
            sync(device)
            wall = time.perf_counter() - t0
        _write_profile(prof, spec, levers, device, wall)
    return {**result, "notes": ", ".join(notes), "loss_first": losses[0], "loss_last": losses[-1]}


def _step(model, opt, b, device, fused, layout):
    """One optimizer step on micro-batch b; returns (summed target CE, the batch's counts)."""
    from model import attention, kernels

    labels = b["labels"].to(device, non_blocking=True)
    inputs = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()
              if k not in ("labels", "lengths")}
    inputs["use_cache"] = False  # as data_pipeline.batching.model_inputs: no KV cache in training forwards
    with attention.packed_forward() if layout == "varlen" else contextlib.nullcontext():
        if fused:
            ce = kernels.fused_ce_sum(model, labels, **inputs)
        else:
            ce = kernels.token_ce_sum(model(**inputs).logits, labels)
    counts = batch_counts(b["input_ids"], b["labels"], b.get("attention_mask"), b.get("lengths"))
    (ce / max(counts["target"], 1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ce, counts


def _profiler(device):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def _write_profile(prof, spec, levers, device, wall: float):
    """The top kernels of the profiled step, appended to spec["profile"] under a header naming the
    row and the step's wall time under the profiler. (On the H200 the table's CUDA totals covered
    well under the step's GPU time, so they rank kernels but do not add up to the step.)"""
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=40, max_name_column_width=70)
    head = f"one step of {spec['tokens_per_batch']} tokens, {wall * 1e3:.0f} ms wall under the profiler"
    with open(spec["profile"], "a") as f:
        f.write(f"\n## {spec['label']} {spec['quant']} {levers}: {head}\n\n{table}\n")
