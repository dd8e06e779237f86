"""Checkpoints: DeepSpeed engine state (trainable parameters only) + the PEFT adapter + loop state.

Layout: <run_dir>/checkpoints/step_0000040/{adapter/ (full fine-tunes: tokenizer/), trainer_state.json (+ code version),
config.yaml, rng_rank<N>.pt, <deepspeed files>}
and <run_dir>/checkpoints/latest (the newest complete one; replaced atomically after every rank saved).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from . import distributed

log = logging.getLogger("dialtune")


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
    (on every rank), else the saved tensors would be empty partitions: the trainable ones, the
    frozen base weight of an embedding or output layer that LoRA targets, and the frozen original
    of a module trained in full (modules_to_save; PEFT saves both whole when the vocabulary grew)."""
    import deepspeed
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    saved = [p for n, p in model.named_parameters() if p.requires_grad or ".original_module." in n
             or any(f"{e}.base_layer." in n for e in EMBEDDING_LAYER_NAMES)]
    ctx = deepspeed.zero.GatheredParameters(saved, modifier_rank=None) if zero_stage == 3 else _null()
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


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def code_version() -> Dict[str, Any]:
    """dialtune's version and, in a git checkout, the commit (and whether it had local changes)."""
    import subprocess
    from importlib import metadata

    out: Dict[str, Any] = {}
    try:
        out["dialtune"] = metadata.version("dialtune")
    except metadata.PackageNotFoundError:
        out["dialtune"] = "not installed"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out["git_commit"] = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True,
                                               text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def note_eval(state: Dict[str, Any], step: int, eval_loss: Optional[float]) -> None:
    """Before saving step's checkpoint: keep (step, held-out loss) in the trainer state as "best"
    when the loss measured at this step is the lowest of the run's checkpoints so far (the state
    travels in every checkpoint, so a resumed run knows it)."""
    best = state.get("best")
    if eval_loss is not None and math.isfinite(eval_loss) and (best is None or eval_loss < best["eval_loss"]):
        state["best"] = {"step": step, "eval_loss": float(eval_loss)}


def note_patience(state: Dict[str, Any], eval_loss: Optional[float], patience: int, min_delta: float) -> bool:
    """After an in-training evaluation: count it as no improvement unless its held-out loss is below
    the lowest so far by more than min_delta (a non-finite loss never improves). The count lives in
    the trainer state, so a resumed run continues it. True when `patience` evaluations in a row
    did not improve: early stopping (patience 0: off)."""
    if not patience or eval_loss is None:
        return False
    es = state.setdefault("early_stopping", {"best_loss": None, "bad_evals": 0})
    if math.isfinite(eval_loss) and (es["best_loss"] is None or eval_loss < es["best_loss"] - min_delta):
        es.update(best_loss=float(eval_loss), bad_evals=0)
    else:
        es["bad_evals"] += 1
    return early_stopped(state, patience)


def early_stopped(state: Dict[str, Any], patience: int) -> bool:
    """Whether the state's run of evaluations without improvement has used up `patience` (0: off):
    a resumed early-stopped run is finished, unless this run's patience is larger or off."""
    return bool(patience) and state.get("early_stopping", {}).get("bad_evals", 0) >= patience


def best_tag(state: Dict[str, Any]) -> Optional[str]:
    """The tag of the lowest-held-out-loss checkpoint note_eval recorded, or None."""
    return tag_for(state["best"]["step"]) if state.get("best") else None


def save(engine, ckpt_root: str, step: int, state: Dict[str, Any], is_main: bool, zero_stage: int, tokenizer,
         keep: int = 0, config_yaml: str = "", keep_best: bool = False, rng: Optional[Dict[str, Any]] = None) -> str:
    """A checkpoint is a transaction: every rank writes into <tag>.tmp, rank 0 fsyncs it, renames
    it to <tag> and only then replaces `latest` (atomically) — after all ranks finished. A crash
    at any point leaves `latest` on the previous complete checkpoint; resume never reads *.tmp.
    keep: the newest N complete checkpoints stay (and with keep_best the state's best one, however old).
    rng: the random state to resume with (default: now; a step that failed saves the one it began with)."""
    tag = tag_for(step)
    tmp_tag = tag + ".tmp"
    final, tmp = os.path.join(ckpt_root, tag), os.path.join(ckpt_root, tmp_tag)
    rng = rng or rng_state()  # per rank: ranks see different shapes, so dropout advances their RNGs differently
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    engine.save_checkpoint(ckpt_root, tag=tmp_tag, client_state={"trainer": state}, save_latest=False,
                           exclude_frozen_parameters=True)
    torch.save(rng, os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    if hasattr(engine.module, "peft_config"):
        save_adapter(engine.module, os.path.join(tmp, "adapter"), is_main, zero_stage, tokenizer)
    elif is_main and tokenizer is not None:  # a full fine-tune: the weights are DeepSpeed's; the export needs the tokenizer as trained
        tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
    if is_main:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**state, "code_version": code_version()}, f, indent=2)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
    distributed.barrier()  # every rank's files are in place
    _pause_for_tests(step)
    if is_main:
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(ckpt_root, "latest.tmp"), "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.path.join(ckpt_root, "latest.tmp"), os.path.join(ckpt_root, "latest"))
        _fsync_dir(ckpt_root)
        if keep:
            rotate(ckpt_root, tag, keep, best_tag(state) if keep_best else None)
    distributed.barrier()
    return final


def rotate(ckpt_root: str, tag: str, keep: int, best: Optional[str] = None) -> None:
    """After checkpoint `tag`: remove all but the newest `keep` complete checkpoints (and `best`).
    Those past `tag` are from where this run left off before it resumed an earlier checkpoint
    of its own (train.resume=<run_dir>/checkpoints/step_N): the first to go, never `tag`."""
    complete = sorted(p for p in os.listdir(ckpt_root) if p.startswith("step_") and not p.endswith(".tmp"))
    complete = [p for p in complete if p > tag] + [p for p in complete if p <= tag]
    for old in complete[:-keep]:
        if old != best:
            shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)


def _pause_for_tests(step: int) -> None:
    """DIALTUNE_CKPT_PAUSE=step: hold a finished-but-uncommitted checkpoint (to kill -9 it in tests)."""
    if os.environ.get("DIALTUNE_CKPT_PAUSE") == str(step):
        open(os.path.join(os.environ.get("DIALTUNE_CKPT_PAUSE_MARKER", "/tmp"), "ckpt_paused"), "w").close()
        import time

        time.sleep(600)


def clean_partial(ckpt_root: str) -> None:
    """Remove checkpoints a crash left half-written (rank 0, before training)."""
    if os.path.isdir(ckpt_root):
        for p in os.listdir(ckpt_root):
            if p.endswith(".tmp"):
                path = os.path.join(ckpt_root, p)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)


def load(engine, root: str, tag: str, total_steps: Optional[int] = None) -> Dict[str, Any]:
    """The trainer state of checkpoint root/tag, loaded into the engine (ConfigError when it lies
    past the run's total_steps: another run's, or train.max_steps lowered)."""
    _, client = engine.load_checkpoint(root, tag=tag, load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if client is None:
        raise FileNotFoundError(f"{os.path.join(root, tag)} is not a complete checkpoint")
    step = client["trainer"]["step"]
    if total_steps is not None and step > total_steps:
        from .config import ConfigError

        raise ConfigError(f"{os.path.join(root, tag)} is at step {step}, past this run's {total_steps} steps "
                          "(train.max_steps / train.epochs): raise them to continue it, or set train.resume=none.")
    set_rng_state(torch.load(os.path.join(root, tag, f"rng_rank{_rank()}.pt"), weights_only=False))
    return client["trainer"]


def write_summary(path: str, summary: Dict[str, Any], nothing_trained: bool, is_main: bool) -> Dict[str, Any]:
    """summary.json at the end of a job (rank 0 writes it); the summary the job returns. A job that
    resumed a finished run (a requeued sweep, a resubmission) keeps the summary on disk, with its
    end-of-training eval, when it describes that finished step; whether this job was stopped is this
    job's own (a run signalled at its last step says preempted there, and must not ask to be
    requeued again and again). A summary of an earlier job (one whose end-of-training eval failed
    or was cut short after the final save) is replaced."""
    saved = None
    if nothing_trained and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    if saved and saved.get("finished") and saved.get("steps") == summary["steps"]:
        if is_main:
            log.info("the run had already finished at step %d: nothing to train, its summary.json is kept", summary["steps"])
        return {**saved, "already_finished": True, "preempted": summary["preempted"], "stop_signal": summary["stop_signal"]}
    if nothing_trained and is_main:
        log.warning("the run's last step (%d) was trained and saved before, but its end-of-training evaluation did not finish: "
                    "summary.json has what it measured before the failure (`dialtune eval %s` measures the rest)", summary["steps"], os.path.dirname(path))
    if is_main:
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
