"""Merge an adapter into a copy of its base and write a servable checkpoint.

Two merge bases (`export.base`, `dialtune merge --base`):

- ``original`` (default): the base is reloaded unquantized in fp32 on CPU, the adapter applied,
  and the adapter model's logits on a probe batch kept; after `merge_and_unload` the merged
  model's logits must match them within `export.verify_tolerance` (1e-4, fp32), otherwise the
  export fails.
- ``dequantized`` (quantized runs): the merge goes into the quantize->dequantize round trip of
  the base the run actually trained against. The base is loaded exactly as training loaded it
  (the run's `model.dtype` and `quant` section via BitsAndBytesConfig; int8 through
  `kernels.fast_int8`'s bf16 GEMMs of the dequantized weights when the run used it, the default),
  the adapter applied, and its logits on the probe batch kept (the "as trained" reference); then
  the adapter is taken off, every quantized linear is replaced in place by an fp32 `nn.Linear`
  holding its dequantized weight (int8: `CB * SCB / 127`; nf4:
  `bitsandbytes.functional.dequantize_4bit`, which is what the 4-bit forward multiplies with), the
  remaining (unquantized, run-dtype) parameters are cast to fp32, and the adapter is applied again
  and merged. Two checks, each of which fails the export:

  1. dequantization, layer by layer: each dequantized layer must reproduce its quantized
     original's output on a random input to `export.verify_dequantize_error` relative error
     (default DEQUANTIZE_ERROR = 5 %). Only the quantized kernel's own rounding separates them:
     measured 0.2-0.3 % for nf4 and fast_int8 (bf16 compute), 0.7-0.9 % for LLM.int8
     (`kernels.fast_int8=false`, which also rounds the activations to int8), on the tiny shapes
     and the Llama-3.2-1B shape alike; a wrong scale, block or layout gives tens of percent or more
     (a scale 8 % off is refused: tests/test_export.py).
  2. the merge arithmetic, exactly as for the original base: merged logits against the fp32
     dequantized base + adapter within `export.verify_tolerance` (1e-4).

  The distance to the "as trained" reference is reported, not checked: export_summary.json's
  `max/mean_abs_logit_diff_vs_quantized` for both merges, next to `quantized_logit_std`, plus
  every model's held-out loss. A fixed tolerance on it would not hold because the kernels'
  rounding compounds with depth and width: max 0.005-0.01 on the tiny models, but on the
  random-init Llama-3.2-1B shape (16 layers, CPU, bf16 compute, `bench/merge_tolerance.py`,
  bench/RESULTS.md) 0.18 (fast_int8), 0.15 (nf4) and 0.57 (LLM.int8) for the dequantized merge,
  against an adapter effect of 0.45-0.76 — while the original merge of the nf4 run was 3.4 away:
  the reason this merge exists. The merge arithmetic stayed at 1.7e-5 there. The held-out
  losses are the figures to read.

Loading is shard-by-shard (`low_cpu_mem_usage=True`) and in place: the dequantized weights
replace the quantized modules one at a time, and at most one model is alive at any moment.

Next to the merged checkpoint (sharded safetensors, tokenizer with chat template, a
generation_config whose eos_token_id includes the end-of-turn token) go `export_summary.json`
(verification, held-out losses of the adapter model and of each merge) and a model card
`README.md`.
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Dict, List, Optional

import torch

from .card import repo_id_problem
from .dequantize import dequantize_, fast_int8
from .export_io import ExportError, cast_, check_out_dir, export_tmp, write_export, write_generation_config
from .export_run import _load_run_cfg, check_adapter, check_base, eval_loss, eval_set_path, find_run_dir, load_eval_batches  # noqa: F401 - (their home was here)
from .loader import DTYPES, fit_embeddings

log = logging.getLogger("dialtune")
ORIGINAL, DEQUANTIZED = "original", "dequantized"
BASES = (ORIGINAL, DEQUANTIZED)
ORIGINAL_TOLERANCE = 1e-4
DEQUANTIZE_ERROR = 0.05  # largest relative output error of a dequantized layer, see the module docstring


def _held_out_batch(tokenizer, texts: List[List[Dict[str, str]]], max_len: int = 256):
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in texts]
    # a fast tokenizer keeps this call's truncation and padding as state that save_pretrained writes
    # into tokenizer.json (`tokenizers` would then cut every input at max_len): put them back
    backend = getattr(tokenizer, "_tokenizer", None)
    before = (backend.truncation, backend.padding) if backend is not None else None
    try:
        return tokenizer(rendered, return_tensors="pt", padding=True, truncation=True, max_length=max_len,
                         add_special_tokens=False)
    finally:
        if before is not None:
            backend.no_truncation() if before[0] is None else backend.enable_truncation(**before[0])
            backend.no_padding() if before[1] is None else backend.enable_padding(**before[1])


def default_probe() -> List[List[Dict[str, str]]]:
    return [
        [{"role": "user", "content": "I need to cancel my order, can you help?"},
         {"role": "assistant", "content": "Of course. Could you tell me the order number?"}],
        [{"role": "user", "content": "Where is my refund?"}],
    ]


# ---------------------------------------------------------------------------------------------
# Models

def load_fp32_base(base_path: str, tokenizer, cfg=None):
    """The full-precision base, fp32 on CPU, loaded shard by shard."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if cfg is not None:
        kwargs["trust_remote_code"] = cfg.model.trust_remote_code
        if base_path == cfg.model.name_or_path and cfg.model.revision:
            kwargs["revision"] = cfg.model.revision
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, low_cpu_mem_usage=True, **kwargs)
    return fit_embeddings(model, tokenizer).eval()


def load_trained_base(cfg, base_path: str, tokenizer):
    """The base as the run trained against it: model.dtype, quantized per the run's quant section."""
    from .loader import load_base

    return fit_embeddings(load_base(cfg, base_path, torch.device("cpu")), tokenizer).eval()


def _max_diff(a, b, mask) -> float:
    return (a.float() - b.float()).abs()[mask].max().item()


def _mean_diff(a, b, mask) -> float:
    return (a.float() - b.float()).abs()[mask].mean().item()


@torch.no_grad()
def _logits(model, batch):
    return model(**batch, use_cache=False).logits.float()


# ---------------------------------------------------------------------------------------------
# Merge

def merge(adapter_dir: str, out_dir: str, base_path: Optional[str] = None, dtype: str = "auto",
          max_shard_size: str = "2GB", tolerance: Optional[float] = None, probe=None,
          end_of_turn_token: Optional[str] = None, base: str = ORIGINAL, run_dir: Optional[str] = None,
          eval_conversations: int = 64, dequantize_error: float = DEQUANTIZE_ERROR,
          stream_above_gb: float = 12.0, hub_repo_id: Optional[str] = None, license: Optional[str] = None) -> Dict:
    """Merge adapter_dir into its base (`base`: original | dequantized), verify, write out_dir.

    tolerance: largest max |logit difference| between the merged model and the fp32 base (original
    or dequantized) + adapter (None: ORIGINAL_TOLERANCE). dequantize_error: largest relative
    output error of a dequantized layer against its quantized original.
    run_dir: the run the adapter comes from (default: found from adapter_dir); its config.yaml
    says how the base was trained (dtype, quantization) and its data/eval gives the held-out
    losses (first `eval_conversations`; 0 skips them) in export_summary.json and the model card.
    stream_above_gb: a base larger than this in fp32 is merged tensor by tensor
    (model/stream_merge.py, memory ~ one shard) into the original base, without the in-memory
    logits check (which would hold the fp32 model) and without held-out losses.
    hub_repo_id: write out_dir push-ready for that Hugging Face repo (model/card.py); license: the
    card's license id. Returns the summary as written to export_summary.json.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoTokenizer

    if base not in BASES:
        raise ExportError(f"export.base={base!r} is not one of {', '.join(BASES)}.")
    check_out_dir(out_dir)
    if hub_repo_id and (problem := repo_id_problem(hub_repo_id)):
        raise ExportError(f"export.hub_repo_id={hub_repo_id!r}: {problem}.")
    run_dir = run_dir or find_run_dir(adapter_dir)
    run_dir = os.path.abspath(run_dir) if run_dir else None  # export_summary.json names it for `dialtune chat` anywhere
    cfg = _load_run_cfg(run_dir)
    quant = cfg.quant.mode if cfg is not None else "none"
    note = None
    if base == DEQUANTIZED and quant == "none":
        note = ("export.base=dequantized asked for, but the run trained a full-precision base"
                + (" (or its config.yaml was not found)" if cfg is None else "") + ": merged into the original base.")
        log.warning(note)
        base = ORIGINAL
    if tolerance is None:
        tolerance = ORIGINAL_TOLERANCE

    check_adapter(adapter_dir)
    peft_cfg = PeftConfig.from_pretrained(adapter_dir)
    base_path = base_path or peft_cfg.base_model_name_or_path
    check_base(base_path)
    from .stream_merge import MergeError, fp32_bytes, merge_to_dir

    revision = cfg.model.revision if cfg is not None and base_path == cfg.model.name_or_path else None
    try:
        size_gb = fp32_bytes(base_path, revision) / 1e9
    except Exception:  # noqa: BLE001 - no safetensors or no local copy: the in-memory merge loads it as usual
        size_gb = 0.0
    stream = size_gb > stream_above_gb
    if stream and base == DEQUANTIZED:
        raise ExportError(f"export.base=dequantized rebuilds the {size_gb:.0f} GB fp32 base in memory, above export.stream_above_gb="
                          f"{stream_above_gb}; use export.base=original (merged tensor by tensor) or raise export.stream_above_gb on a machine with the memory.")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json")) else base_path)
    batch = _held_out_batch(tokenizer, probe or default_probe())
    mask = batch["attention_mask"].bool()
    eval_set = load_eval_batches(run_dir, tokenizer.pad_token_id, eval_conversations) if cfg is not None and not stream else None
    if dtype == "auto":
        dtype = _training_dtype(adapter_dir, cfg)
    out_dtype = DTYPES[dtype]
    losses: Dict[str, float] = {}
    vs_quantized: Dict[str, float] = {}
    vs_quantized_mean: Dict[str, float] = {}
    verified = dequantized = None

    def finish(merged, name: str, diff: float, ref_name: str, ref):
        """Check the chosen merge, cast it, write it to tmp (others: only their loss)."""
        nonlocal verified
        if name == base:
            if diff > tolerance:
                raise ExportError(f"{name} merge: merged logits differ from {ref_name} by {diff:.3g} > export.verify_tolerance={tolerance}; "
                                  f"the merged checkpoint was not written (re-run `dialtune merge <run_dir> --tolerance X` to accept it).")
            verified = {"reference": ref_name, "max_abs_logit_diff": diff}
        cast_(merged, out_dtype)
        if name == base and out_dtype != torch.float32:  # what the cast to the written dtype costs, measured
            verified["as_written"] = {"dtype": dtype, "max_abs_logit_diff": _max_diff(ref, _logits(merged, batch), mask)}
        if eval_set is not None:
            losses[f"merged_{name}"] = eval_loss(merged, eval_set)
        if name == base:
            log.info("merge: %s merge verified (max |logit diff| %.2g against %s); writing it in %s", name, diff, ref_name, dtype)
            merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)

    with export_tmp(out_dir) as tmp:  # (finish writes there too)
        if stream:  # too large to hold: tensor by tensor, no logits check
            log.info("merge: the %.0f GB fp32 base is merged tensor by tensor into %s", size_gb, tmp)
            try:
                streamed = merge_to_dir(adapter_dir, base_path, tmp, out_dtype, max_shard_size, rows=len(tokenizer))
            except MergeError as e:
                raise ExportError(str(e)) from None
            verified = {"reference": f"none: the {size_gb:.0f} GB fp32 base is above export.stream_above_gb={stream_above_gb}, "
                                     f"merged tensor by tensor ({streamed['merged_layers']} layers)", "max_abs_logit_diff": None}
        # 1. the adapter on the base as trained (quantized if the run was): reference + loss
        q_ref = None
        if not stream and cfg is not None and (quant != "none" or eval_set is not None):
            log.info("merge: the adapter on the base as trained (%s): reference logits%s", quant if quant != "none" else cfg.model.dtype,
                     f" and the loss on {eval_set['conversations']} held-out conversations" if eval_set is not None else "")
            model = PeftModel.from_pretrained(load_trained_base(cfg, base_path, tokenizer), adapter_dir).eval()
            if fast_int8(cfg):  # the run trained through bf16 GEMMs of the dequantized int8 weights
                from .kernels import dequantize_int8_linears

                dequantize_int8_linears(model)
            if quant != "none":
                q_ref = _logits(model, batch)
                logit_std = q_ref[mask].std(dim=-1).mean().item()
            if eval_set is not None:
                losses["adapter"] = eval_loss(model, eval_set)
            # 2. merge into the dequantized round trip of that very base
            if quant != "none" and (base == DEQUANTIZED or eval_set is not None):
                log.info("merge: into the dequantized %s base", quant)
                deq = model.unload()
                dequantized = dequantize_(deq)
                if base == DEQUANTIZED and dequantized["max_rel_error"] > dequantize_error:
                    raise ExportError(f"dequantized merge: layer {dequantized['worst_layer']} dequantized reproduces its {quant} original's output only to "
                                      f"{dequantized['max_rel_error']:.1%} relative error > export.verify_dequantize_error={dequantize_error:g}; "
                                      f"the merged checkpoint was not written (use --base original, or re-run `dialtune merge <run_dir> --base dequantized --dequantize-error X`).")
                model = PeftModel.from_pretrained(deq, adapter_dir).eval()
                d_ref = _logits(model, batch)
                merged = model.merge_and_unload()
                got = _logits(merged, batch)
                vs_quantized[DEQUANTIZED] = _max_diff(q_ref, got, mask)
                vs_quantized_mean[DEQUANTIZED] = _mean_diff(q_ref, got, mask)
                finish(merged, DEQUANTIZED, _max_diff(d_ref, got, mask), f"fp32 dequantized {quant} base + adapter", d_ref)
                del merged, deq, got, d_ref
            del model
            gc.collect()

        # 3. merge into the original full-precision base
        if not stream and (base == ORIGINAL or eval_set is not None):
            log.info("merge: into the original base %s (fp32)", base_path)
            model = PeftModel.from_pretrained(load_fp32_base(base_path, tokenizer, cfg), adapter_dir).eval()
            ref = _logits(model, batch)
            merged = model.merge_and_unload()
            got = _logits(merged, batch)
            if q_ref is not None:
                vs_quantized[ORIGINAL] = _max_diff(q_ref, got, mask)
                vs_quantized_mean[ORIGINAL] = _mean_diff(q_ref, got, mask)
            finish(merged, ORIGINAL, _max_diff(ref, got, mask), "fp32 base + adapter", ref)
            del merged, model
            gc.collect()

        tokenizer.save_pretrained(tmp)
        eos = write_generation_config(tmp, tokenizer, end_of_turn_token, base_path, revision)
        summary = {"base": base_path, "adapter": os.path.abspath(adapter_dir),
                   "checkpoint": os.path.dirname(os.path.abspath(adapter_dir)), "run_dir": os.path.abspath(run_dir) if run_dir else None, "merge_base": base, "quant": quant,
                   "dtype": dtype, "verify_reference": verified["reference"],
                   "verify_max_abs_logit_diff": verified["max_abs_logit_diff"], "verify_tolerance": tolerance,
                   "eos_token_id": eos}
        if verified and verified.get("as_written"):
            summary["as_written"] = verified["as_written"]
        if dequantized is not None:
            summary["dequantize_check"] = {**dequantized, "limit": dequantize_error}
        if quant != "none":
            summary["as_trained_kernel"] = ("int8 weights dequantized into bf16 GEMMs (kernels.fast_int8)" if fast_int8(cfg) else
                                            "LLM.int8 (int8 activations, outlier decomposition)" if quant == "int8" else
                                            f"bitsandbytes 4-bit ({cfg.quant.compute_dtype} compute)")
        if vs_quantized:
            summary["max_abs_logit_diff_vs_quantized"] = vs_quantized
            summary["mean_abs_logit_diff_vs_quantized"] = vs_quantized_mean
            summary["quantized_logit_std"] = logit_std
        summary = write_export(tmp, out_dir, summary, cfg, peft_cfg, run_dir, eval_set, losses, note, hub_repo_id, license)
    return summary


def export_checkpoint(cfg, ckpt_dir: str, out_dir: str, base_path: str, run_dir: str, **overrides) -> Dict:
    """The run's export of one checkpoint (<run_dir>/checkpoints/step_N) with its `export`
    settings (overrides that are not None win): its adapter merged into the base, or for a full
    fine-tune (peft=none) its trained weights (model/full_export.py)."""
    from .base_identity import checkpoint_problem

    if problem := checkpoint_problem(ckpt_dir, base_path, cfg):
        raise ExportError(problem)
    opts = merge_options(cfg.export)
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if cfg.peft.method == "none":
        from .full_export import export_full

        return export_full(ckpt_dir, out_dir, base_path=base_path, run_dir=run_dir,
                           end_of_turn_token=cfg.model.end_of_turn_token, **opts)
    return merge(os.path.join(ckpt_dir, "adapter"), out_dir, base_path=base_path, run_dir=run_dir,
                 end_of_turn_token=cfg.model.end_of_turn_token, **opts)


def merge_options(export_cfg) -> Dict:
    """merge() keyword arguments from a run's `export` config section."""
    get = lambda key, default: export_cfg.get(key, default) if hasattr(export_cfg, "get") else getattr(export_cfg, key, default)  # noqa: E731
    return dict(dtype=get("dtype", "auto"), max_shard_size=get("max_shard_size", "2GB"), base=get("base", ORIGINAL),
                tolerance=get("verify_tolerance", ORIGINAL_TOLERANCE),
                dequantize_error=get("verify_dequantize_error", DEQUANTIZE_ERROR),
                eval_conversations=get("eval_conversations", 64), stream_above_gb=get("stream_above_gb", 12.0),
                hub_repo_id=get("hub_repo_id", None), license=get("license", None))


def _training_dtype(adapter_dir: str, cfg=None) -> str:
    """The precision the run trained in, from its resolved config next to the checkpoint."""
    if cfg is None:
        cfg = _load_run_cfg(find_run_dir(adapter_dir))
    if cfg is not None:
        if cfg.quant.mode == "none":
            return cfg.model.dtype
        return "bf16"
    return "fp32"
