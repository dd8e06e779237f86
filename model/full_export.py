"""Export a full fine-tune (`peft=none`): the trained weights of a DeepSpeed checkpoint as a
servable Hugging Face checkpoint, written like a merge (`model/export.py`): sharded safetensors,
the run's tokenizer with its chat template, a generation_config that stops at the end-of-turn
token, `export_summary.json` and a model card.

The weights come from the checkpoint's own files, so the export works after training, from any
step, and for every ZeRO stage: ZeRO-1/2/3 through DeepSpeed's `zero_to_fp32` (the fp32 master
weights, reassembled from every rank's partition), ZeRO-0 from the module state DeepSpeed saves
whole (in the training dtype: a bf16 run's weights are bf16 there, whatever `export.dtype` asks).
They are assigned to the base architecture built without weights (parameters on the meta device,
embeddings sized to the checkpoint's), so the export holds one copy of the model in fp32, and two
checks fail it:

1. the checkpoint must fill the architecture: every parameter found, nothing left over (a tied
   output layer may be missing: it is the embedding);
2. the directory as written, loaded back with `AutoModelForCausalLM.from_pretrained`, must give
   the logits of the trained weights cast to the written dtype (`export.verify_tolerance`).

The held-out loss of the written model goes into the summary, next to the one the training run
measured at its end (summary.json's `eval/loss`) when both read the same tokens
(`export.eval_conversations` covers the eval set, no `eval.lm_max_batches` cap): they agree to
float rounding (tests/test_full_finetune.py).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from typing import Dict, Optional

import torch

from .card import repo_id_problem
from .export import (ORIGINAL_TOLERANCE, _held_out_batch, _load_run_cfg, _logits, _max_diff, _training_dtype, default_probe,
                     eval_loss, load_eval_batches)
from .export_io import ExportError, cast_, check_out_dir, export_tmp, write_export, write_generation_config
from .export_run import check_base
from .loader import DTYPES

log = logging.getLogger("dialtune")
FULL = "full"


def trained_state_dict(ckpt_dir: str, zero_stage: int) -> Dict[str, torch.Tensor]:
    """The model's trained weights (fp32, CPU) from the DeepSpeed checkpoint <ckpt_root>/<tag>."""
    if zero_stage == 0:  # no partitions: DeepSpeed saved the module whole (next to the optimizer state: mmap)
        path = os.path.join(ckpt_dir, "mp_rank_00_model_states.pt")
        try:
            module = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["module"]
        except (OSError, RuntimeError, KeyError, EOFError) as e:
            raise ExportError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                              "is the checkpoint complete? Pass another with --checkpoint.") from None
        return {k: v.float() for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # it prints a line per phase
            return get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir))
    except Exception as e:  # noqa: BLE001 - missing or truncated partition files, another layout
        raise ExportError(f"the ZeRO-{zero_stage} partitions in {ckpt_dir} cannot be reassembled "
                          f"({(str(e).splitlines() or [type(e).__name__])[0]}); is the checkpoint complete? Pass another with --checkpoint.") from None
    finally:
        for line in out.getvalue().splitlines():
            log.debug("zero_to_fp32: %s", line)


def _input_embedding_key(model) -> Optional[str]:
    emb = model.get_input_embeddings()
    return next((n for n, p in model.named_parameters() if p is emb.weight), None) if emb is not None else None


def load_trained(base_path: str, tokenizer, cfg, state: Dict[str, torch.Tensor], ckpt_dir: str):
    """The base architecture holding the trained weights (fp32, CPU); no base weights are read."""
    from .loader import empty_model, model_config

    config = model_config(cfg, base_path)
    model = empty_model(cfg, config)
    key = _input_embedding_key(model)
    rows = state[key].shape[0] if key in state else None
    if rows is not None and rows != model.get_input_embeddings().num_embeddings:  # training resized them (new tokens)
        config.get_text_config().vocab_size = rows
        model = empty_model(cfg, config)
    if rows is not None and len(tokenizer) > rows:
        raise ExportError(f"the run's tokenizer has {len(tokenizer)} tokens but the checkpoint {ckpt_dir} embeds {rows}: "
                          "it belongs to another run or tokenizer.")
    tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()  # the output layer is the (assigned) embedding
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]  # not filled
    if missing or unexpected:
        raise ExportError(f"the checkpoint {ckpt_dir} does not fit the architecture of {base_path}: "
                          + "; ".join(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                                      for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
                          + "; was the base changed since training? (model.revision pins a hub model's version)")
    return model.eval()


def _run_tokenizer(ckpt_dir: str, base_path: str, cfg):
    """The tokenizer as the run trained with it: saved in the checkpoint, or (checkpoints written
    before dialtune saved it there) rebuilt as training builds it."""
    from transformers import AutoTokenizer

    from data_pipeline.chat import apply_named_template

    from .loader import load_tokenizer

    tok_dir = os.path.join(ckpt_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        return AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(cfg.model, base_path if cfg.model.name_or_path == "tiny" else None)
    apply_named_template(tokenizer, cfg.data.chat_template)
    return tokenizer


def export_full(ckpt_dir: str, out_dir: str, base_path: str, run_dir: Optional[str] = None, dtype: str = "auto",
                max_shard_size: str = "2GB", tolerance: Optional[float] = None, end_of_turn_token: Optional[str] = None,
                eval_conversations: int = 64, hub_repo_id: Optional[str] = None, license: Optional[str] = None,
                probe=None, **merge_only) -> Dict:
    """Write the full fine-tune saved in ckpt_dir (<run_dir>/checkpoints/step_N) to out_dir; returns
    the summary as written to export_summary.json. merge_only: merge() options without meaning here
    (base, dequantize_error, stream_above_gb)."""
    from transformers import AutoModelForCausalLM

    if hub_repo_id and (problem := repo_id_problem(hub_repo_id)):
        raise ExportError(f"export.hub_repo_id={hub_repo_id!r}: {problem}.")
    check_out_dir(out_dir)
    check_base(base_path)
    run_dir = os.path.abspath(run_dir or os.path.join(ckpt_dir, "..", ".."))
    cfg = _load_run_cfg(run_dir)
    if cfg is None:
        raise ExportError(f"{run_dir} has no config.yaml; a full fine-tune is exported from its run directory.")
    tolerance = ORIGINAL_TOLERANCE if tolerance is None else tolerance
    note = ("export.base=dequantized has no meaning for a full fine-tune (no quantized base): its trained weights are written."
            if merge_only.get("base") == "dequantized" else None)
    if note:
        log.warning(note)
    tokenizer = _run_tokenizer(ckpt_dir, base_path, cfg)
    if dtype == "auto":
        dtype = _training_dtype(ckpt_dir, cfg)
    out_dtype = DTYPES[dtype]
    batch = _held_out_batch(tokenizer, probe or default_probe())
    mask = batch["attention_mask"].bool()
    eval_set = load_eval_batches(run_dir, tokenizer.pad_token_id, eval_conversations)
    with export_tmp(out_dir) as tmp:
        log.info("export: the trained weights of %s (ZeRO-%d checkpoint)", ckpt_dir, cfg.deepspeed.stage)
        model = load_trained(base_path, tokenizer, cfg, trained_state_dict(ckpt_dir, cfg.deepspeed.stage), ckpt_dir)
        ref = _logits(model, batch) if out_dtype != torch.float32 else None
        cast_(model, out_dtype)
        cast = _logits(model, batch)
        losses = {FULL: eval_loss(model, eval_set)} if eval_set is not None else {}
        log.info("export: writing it in %s to %s", dtype, tmp)
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        del model
        tokenizer.save_pretrained(tmp)
        eos = write_generation_config(tmp, tokenizer, end_of_turn_token, base_path,
                                      cfg.model.revision if base_path == cfg.model.name_or_path else None)
        log.info("export: loading it back to check its logits")
        written = AutoModelForCausalLM.from_pretrained(tmp, dtype=out_dtype, low_cpu_mem_usage=True,
                                                       trust_remote_code=cfg.model.trust_remote_code).eval()
        diff = _max_diff(cast, _logits(written, batch), mask)
        del written
        if diff > tolerance:
            raise ExportError(f"the written checkpoint's logits differ from the trained weights' by {diff:.3g} > export.verify_tolerance={tolerance}; "
                              f"it was not written (re-run `dialtune merge {run_dir} --tolerance X` to accept it).")
        summary = {"base": base_path, "checkpoint": os.path.abspath(ckpt_dir), "adapter": None, "run_dir": run_dir,
                   "merge_base": FULL, "quant": "none", "dtype": dtype,
                   "verify_reference": f"the trained weights (from the checkpoint) cast to {dtype}, in memory",
                   "verify_max_abs_logit_diff": diff, "verify_tolerance": tolerance, "eos_token_id": eos}
        if ref is not None:  # what the cast to the written dtype costs, measured
            summary["as_written"] = {"dtype": dtype, "max_abs_logit_diff": _max_diff(ref, cast, mask)}
        if eval_set is not None and (trained := _training_eval_loss(run_dir, ckpt_dir, eval_set)) is not None:
            losses["training"] = trained
        return write_export(tmp, out_dir, summary, cfg, None, run_dir, eval_set, losses, note, hub_repo_id, license)


def _training_eval_loss(run_dir: str, ckpt_dir: str, eval_set) -> Optional[float]:
    """The run's final held-out loss (summary.json), when it was measured on ckpt_dir's weights
    and on the very tokens eval_set holds; else None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            trained = json.load(f)
        if (trained.get("eval/target_tokens") == eval_set["target_tokens"] and "eval/loss" in trained
                and trained.get("checkpoint") and os.path.samefile(trained["checkpoint"], ckpt_dir)):
            return float(trained["eval/loss"])
    except (OSError, ValueError, TypeError):
        pass
    return None
