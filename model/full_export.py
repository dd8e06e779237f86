"""Export a full fine-tune (`peft=none`): the trained weights of a DeepSpeed checkpoint as a
servable Hugging Face checkpoint, written like a merge (`model/export.py`): sharded safetensors,
the run's tokenizer with its chat template, a generation_config that stops at the end-of-turn
token, `export_summary.json` and a model card.

The weights come from the checkpoint's own files, so the export works after training, from any
step, and for every ZeRO stage: ZeRO-1/2/3 through DeepSpeed's `zero_to_fp32` (the fp32 master
weights, reassembled from every rank's partition), ZeRO-0 from the module state DeepSpeed saves
whole. They go into the base architecture (the run's base directory or hub id, embeddings sized
to the run's tokenizer), and two checks fail the export:

1. the checkpoint must fill the architecture: every parameter found, nothing left over (a tied
   output layer may be missing: it is the embedding);
2. the directory as written, loaded back with `AutoModelForCausalLM.from_pretrained`, must give
   the logits of the trained weights cast to the written dtype (`export.verify_tolerance`).

The held-out loss of the written model goes into the summary, next to the one the training run
measured at its end (summary.json's `eval/loss`) when both read the same tokens
(`export.eval_conversations` covers the eval set): the two must agree.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
from typing import Dict, Optional

import torch

from .card import GITATTRIBUTES, model_card, public_summary, repo_id_problem
from .export import (ORIGINAL_TOLERANCE, ExportError, _held_out_batch, _load_run_cfg, _logits, _max_diff, _sha256,
                     _training_dtype, _write_generation_config, default_probe, eval_loss, load_eval_batches,
                     load_fp32_base)
from .loader import DTYPES

log = logging.getLogger("dialtune")
FULL = "full"


def trained_state_dict(ckpt_dir: str, zero_stage: int) -> Dict[str, torch.Tensor]:
    """The model's trained weights (fp32, CPU) from the DeepSpeed checkpoint <ckpt_root>/<tag>."""
    if zero_stage == 0:  # no partitions: DeepSpeed saved the module whole
        path = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
        if not os.path.isfile(path):
            raise ExportError(f"{ckpt_dir} has no {os.path.basename(path)}; it is not a complete DeepSpeed checkpoint.")
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # it prints a line per phase
            return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir))
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"the ZeRO-{zero_stage} partitions in {ckpt_dir} cannot be reassembled ({str(e).splitlines()[0]}).") from None
    finally:
        for line in out.getvalue().splitlines():
            log.debug("zero_to_fp32: %s", line)


def load_trained(base_path: str, tokenizer, cfg, state: Dict[str, torch.Tensor], ckpt_dir: str):
    """The base architecture holding the trained weights (fp32, CPU)."""
    model = load_fp32_base(base_path, tokenizer, cfg)  # embeddings sized to the tokenizer, as training resized them
    in_key = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    if in_key in state and state[in_key].shape[0] != model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(state[in_key].shape[0])
    tied = model.config.get_text_config().tie_word_embeddings if hasattr(model.config, "get_text_config") else False
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    out_key = next((n for n, p in model.named_parameters() if p is model.get_output_embeddings().weight), None) \
        if model.get_output_embeddings() is not None else None
    missing = [k for k in missing if not (tied and k == out_key)]
    if missing or unexpected:
        raise ExportError(f"the checkpoint {ckpt_dir} does not fit the architecture of {base_path}: "
                          + "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                                      for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
                          + "; export it against the base the run trained (model.name_or_path in its config.yaml).")
    if tied:
        model.tie_weights()  # assign=True replaced the embedding: point the output layer at it again
    return model.eval()


def export_full(ckpt_dir: str, out_dir: str, base_path: str, run_dir: Optional[str] = None, dtype: str = "auto",
                max_shard_size: str = "2GB", tolerance: Optional[float] = None, end_of_turn_token: Optional[str] = None,
                eval_conversations: int = 64, hub_repo_id: Optional[str] = None, license: Optional[str] = None,
                probe=None, **merge_only) -> Dict:
    """Write the full fine-tune saved in ckpt_dir (<run_dir>/checkpoints/step_N) to out_dir; returns
    the summary as written to export_summary.json. merge_only: merge() options without meaning here
    (base, dequantize_error, stream_above_gb)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if hub_repo_id and (problem := repo_id_problem(hub_repo_id)):
        raise ExportError(f"export.hub_repo_id={hub_repo_id!r}: {problem}.")
    run_dir = os.path.abspath(run_dir or os.path.join(ckpt_dir, "..", ".."))
    cfg = _load_run_cfg(run_dir)
    if cfg is None:
        raise ExportError(f"{run_dir} has no config.yaml; a full fine-tune is exported from its run directory.")
    tolerance = ORIGINAL_TOLERANCE if tolerance is None else tolerance
    note = ("export.base=dequantized has no meaning for a full fine-tune (no quantized base): its trained weights are written."
            if merge_only.get("base") == "dequantized" else None)
    tok_dir = os.path.join(ckpt_dir, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir if os.path.isdir(tok_dir) else base_path)
    if dtype == "auto":
        dtype = _training_dtype(ckpt_dir, cfg)
    out_dtype = DTYPES[dtype]
    batch = _held_out_batch(tokenizer, probe or default_probe())
    mask = batch["attention_mask"].bool()
    eval_set = load_eval_batches(run_dir, tokenizer.pad_token_id, eval_conversations)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        log.info("export: the trained weights of %s (ZeRO-%d checkpoint)", ckpt_dir, cfg.deepspeed.stage)
        model = load_trained(base_path, tokenizer, cfg, trained_state_dict(ckpt_dir, cfg.deepspeed.stage), ckpt_dir)
        ref = _logits(model, batch)
        for param in model.parameters():  # not .to(): buffers (RoPE's inv_freq) stay fp32, as from_pretrained keeps them
            param.data = param.data.to(out_dtype)
        cast = _logits(model, batch)
        losses = {FULL: eval_loss(model, eval_set)} if eval_set is not None else {}
        log.info("export: writing it in %s to %s", dtype, tmp)
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        del model
        tokenizer.save_pretrained(tmp)
        eos = _write_generation_config(tmp, tokenizer, end_of_turn_token)
        log.info("export: loading it back to check its logits")
        written = AutoModelForCausalLM.from_pretrained(tmp, dtype=out_dtype, low_cpu_mem_usage=True).eval()
        diff = _max_diff(cast, _logits(written, batch), mask)
        del written
        if diff > tolerance:
            raise ExportError(f"the written checkpoint's logits differ from the trained weights' by {diff:.3g} > export.verify_tolerance={tolerance}; "
                              f"it was not written (re-run `dialtune merge {run_dir} --tolerance X` to accept it).")
        summary = {"base": base_path, "checkpoint": os.path.abspath(ckpt_dir), "adapter": None, "run_dir": run_dir,
                   "merge_base": FULL, "quant": "none", "dtype": dtype,
                   "verify_reference": f"the trained weights (from the checkpoint) cast to {dtype}, in memory",
                   "verify_max_abs_logit_diff": diff, "verify_tolerance": tolerance, "eos_token_id": eos,
                   "as_written": {"dtype": dtype, "max_abs_logit_diff": _max_diff(ref, cast, mask)}}
        if eval_set is not None:
            try:
                with open(os.path.join(run_dir, "summary.json")) as f:
                    trained = json.load(f)
                # the run's final eval, when it read the very tokens measured here
                if (trained.get("eval/target_tokens") == eval_set["target_tokens"] and "eval/loss" in trained
                        and trained.get("checkpoint") and os.path.samefile(trained["checkpoint"], ckpt_dir)):
                    losses["training"] = trained["eval/loss"]
            except (OSError, ValueError):
                pass
            summary["eval"] = {"set": eval_set["path"], "conversations": eval_set["conversations"],
                               "target_tokens": eval_set["target_tokens"]}
            summary["eval_loss"] = losses
            summary["eval_ppl"] = {k: math.exp(min(v, 50)) for k, v in losses.items()}
        summary["config_sha256"] = _sha256(os.path.join(run_dir, "config.yaml"))
        if note:
            summary["note"] = note
        if hub_repo_id:
            summary = public_summary({**summary, "hub_repo_id": hub_repo_id})
            with open(os.path.join(tmp, ".gitattributes"), "w") as f:
                f.write(GITATTRIBUTES)
        with open(os.path.join(tmp, "export_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(summary, cfg, None, out_dir, hub_repo_id=hub_repo_id, license=license))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
