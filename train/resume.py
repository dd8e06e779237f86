"""Resuming a run: which checkpoint (train.resume), whether this run may continue it (the same
model, adapter and ranks; settings that changed are named), and where in the data it goes on."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

from .checkpoint import load

log = logging.getLogger("dialtune")


def find_resume(resume: str, ckpt_root: str) -> Optional[Tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None. A requeued SLURM job continues from the
    checkpoint it saved itself before the requeue, whatever train.resume says (none, or another
    run's checkpoint to start from: taken again, it would redo every step since, at every requeue)."""
    if resume != "auto" and (own := requeued_own_checkpoint(ckpt_root)):
        log.info("requeued SLURM job %s (restart %s): continuing from its own checkpoint %s, not train.resume=%s",
                 os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"], own[1], resume)
        return own
    if resume == "none":
        return None
    if resume == "auto":  # this run's latest checkpoint, if it has one yet
        return resume_path(ckpt_root) if os.path.isfile(os.path.join(ckpt_root, "latest")) else None
    return resume_path(resume)


def requeued_own_checkpoint(ckpt_root: str) -> Optional[Tuple[str, str]]:
    """The run's latest checkpoint when this is a requeued SLURM job (SLURM_RESTART_COUNT > 0) and
    that checkpoint was saved by this very job (its trainer state keeps SLURM_JOB_ID); else None."""
    job, restarts = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_RESTART_COUNT", "0")
    if not job or restarts in ("", "0") or not os.path.isfile(os.path.join(ckpt_root, "latest")):
        return None
    try:
        root, tag = resume_path(ckpt_root)
        with open(os.path.join(root, tag, "trainer_state.json")) as f:
            return (root, tag) if str(json.load(f).get("slurm_job_id")) == job else None
    except (OSError, ValueError):
        return None


def resume_path(resume: str) -> Tuple[str, str]:
    """(checkpoint root, tag) for train.resume=<path>: a checkpoint directory (step_N), or the
    `latest` file, the checkpoints/ directory or the run directory of a run (its latest
    checkpoint). Raises ValueError (one sentence) for anything else."""
    path = os.path.normpath(resume)
    for latest in (path, os.path.join(path, "latest"), os.path.join(path, "checkpoints", "latest")):
        if os.path.basename(latest) == "latest" and os.path.isfile(latest):
            with open(latest) as f:
                root, tag = os.path.dirname(latest), f.read().strip()
            if not os.path.isfile(os.path.join(root, tag, "trainer_state.json")):
                kept = sorted(p for p in os.listdir(root) if p.startswith("step_") and not p.endswith(".tmp"))
                raise ValueError(f"{latest} names {tag}, which is not a complete checkpoint there (removed by hand?): "
                                 + (f"train.resume={os.path.join(root, kept[-1])} continues from one that is kept, " if kept else "")
                                 + "train.resume=none starts afresh.")
            return root, tag
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return os.path.dirname(path), os.path.basename(path)
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "config.yaml")):
        raise ValueError(f"train.resume={resume!r} is a run directory without a finished checkpoint (no checkpoints/latest); "
                         "train.resume=none starts afresh.")
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        kept = sorted(p for p in os.listdir(parent) if p.startswith("step_") and not p.endswith(".tmp")) if os.path.isdir(parent) else []
        raise ValueError(f"train.resume={resume!r} does not exist" + (f" (train.keep_checkpoints may have rotated it away; "
                         f"{parent} keeps {', '.join(kept)})" if kept else "") + ".")
    raise ValueError(f"train.resume={resume!r} is neither none, auto, a checkpoint directory (checkpoints/step_N) nor a run directory.")


# what a checkpoint's tensors and optimizer state are shaped by: a resume must keep them
SHAPE_KEYS = ("model.name_or_path", "model.add_tokens", "peft.method", "peft.r", "peft.target_modules", "peft.bias",
              "peft.modules_to_save", "quant.mode", "deepspeed.stage", "optim.name")


def _saved_config(root: str, tag: str):
    """The resolved config.yaml a checkpoint was written with, or None (older checkpoints)."""
    from omegaconf import OmegaConf

    path = os.path.join(root, tag, "config.yaml")
    return OmegaConf.load(path) if os.path.isfile(path) else None


def resume_mismatch(root: str, tag: str, cfg) -> Optional[str]:
    """One sentence when the checkpoint was written under settings that shape its state
    differently from this run's (DeepSpeed would print pages of size mismatches); else None."""
    from omegaconf import OmegaConf

    then = _saved_config(root, tag)
    if then is None:
        return None

    def plain(value):  # lists come back as ListConfig: compare their contents
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    for key in SHAPE_KEYS:
        old, new = OmegaConf.select(then, key), OmegaConf.select(cfg, key)
        if old is not None and plain(old) != plain(new):
            return (f"checkpoint {os.path.join(root, tag)} was trained with {key}={old}, this run has {key}={new}: resume with "
                    f"the checkpoint's settings, or start afresh (train.resume=none, or another run.name).")
    return None


# keys whose change on resume is routine (how the job runs, not what it trains)
_ROUTINE = ("train.resume", "train.stop_after_steps", "train.progress_bar", "logger.", "run.root")


def resume_changes(root: str, tag: str, cfg, limit: int = 6) -> Optional[str]:
    """A warning naming the settings (besides routine ones) this run changes from the
    checkpoint's config.yaml, e.g. a resubmission with another optim.lr; None when there are none."""
    from omegaconf import OmegaConf

    from .config import DialtuneConfig, flatten

    saved = _saved_config(root, tag)
    if saved is None:
        return None
    then = flatten(OmegaConf.to_container(saved, resolve=False))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    # a setting newer than the checkpoint's dialtune, left at its default, is no change
    default = flatten(OmegaConf.to_container(OmegaConf.structured(DialtuneConfig), resolve=False))
    routine = _ROUTINE + (("run.name",) if cfg.train.resume != "auto" else ())  # a named checkpoint: another run's, on purpose
    changed = [k for k in sorted(set(then) | set(now))
               if not k.startswith(routine) and then.get(k) != now.get(k)
               and not (k not in then and k in default and now.get(k) == default[k])]
    if not changed:
        return None
    shown = ", ".join(f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in changed[:limit])
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    if {"train.max_steps", "train.epochs"} & set(changed) and now.get("optim.scheduler") != "constant":
        more += (f" (the {now.get('optim.scheduler')} lr schedule is rebuilt for the new length: the resumed steps follow it, "
                 "so the lr moves from where the old schedule left it)")
    return (f"resuming {os.path.join(root, tag)} with settings that differ from the checkpoint's: {shown}{more}; "
            "training continues with the new values" + (" (is this the run you meant? another run.name starts afresh)."
                                                          if cfg.train.resume == "auto" else "."))


def saved_state(root: str, tag: str) -> Dict[str, Any]:
    """The trainer state a checkpoint was written with (trainer_state.json), with its world_size
    (older checkpoints: one rng_rank<r>.pt per rank) and micro_batch_size (older ones: config.yaml's)."""
    path = os.path.join(root, tag)
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if "world_size" not in state:
        state["world_size"] = sum(1 for p in os.listdir(path) if p.startswith("rng_rank") and p.endswith(".pt"))
    missing = [k for k in ("micro_batch_size", "grad_accum") if k not in state]
    if missing and (saved := _saved_config(root, tag)) is not None:
        from omegaconf import OmegaConf

        for key in missing:
            state[key] = OmegaConf.select(saved, f"train.{key}")
    return state


def resume_position(root: str, tag: str, world: int, mb: int, gas: int = 0, n_items: int = 0,
                    epochs: int = 0) -> Optional[Tuple[int, int]]:
    """(epoch, micro-batch position) where a resume with `world` ranks of `mb` items (of the
    n_items an epoch has: conversations or packed rows) and `gas` accumulation steps continues, as
    MicroBatchStream takes them; None when the checkpoint's own. The epoch's order does not depend
    on the sizes, so another micro_batch_size continues at the same item when the items consumed
    divide into the new micro-batches (a checkpoint at an epoch's end continues with the next).
    ConfigError (one sentence) when they do not; when the number of ranks changed (DeepSpeed's
    partitioned optimizer state and each rank's random state are per rank); and, in a run whose
    length is train.epochs (epochs > 0), when the items of a step or the steps the epochs make
    changed: its step count (and its learning-rate schedule) would be another run's."""
    from data_pipeline.batching import epoch_steps

    from .config import ConfigError

    then = saved_state(root, tag)
    where = os.path.join(root, tag)
    if then["world_size"] and then["world_size"] != world:
        raise ConfigError(f"checkpoint {where} was written by {then['world_size']} rank(s), this run has {world}: resume it with "
                          f"{then['world_size']} (the optimizer state and the data split are per rank), or start afresh "
                          "(train.resume=none, or another run.name).")
    old_mb, old_gas = then.get("micro_batch_size"), then.get("grad_accum")
    if epochs and old_mb and old_gas and gas and old_mb * old_gas == mb * gas and n_items and (
            steps := (epoch_steps(n_items, old_mb, world, old_gas, epochs), epoch_steps(n_items, mb, world, gas, epochs)))[0] != steps[1]:
        raise ConfigError(f"checkpoint {where} belongs to a run of {steps[0]} steps ({epochs} epoch(s) of {n_items} items in micro-batches "
                          f"of {old_mb} x grad_accum {old_gas}), which micro_batch_size {mb} x grad_accum {gas} make {steps[1]}: its "
                          f"length and learning-rate schedule would change; keep micro_batch_size {old_mb} and grad_accum {old_gas}, "
                          "or set train.max_steps.")
    if epochs and old_mb and old_gas and gas and old_mb * old_gas != mb * gas:
        per_rank = old_mb * old_gas
        keep = f"grad_accum {per_rank // mb} with micro_batch_size {mb}" if per_rank % mb == 0 else f"micro_batch_size {old_mb}"
        raise ConfigError(f"checkpoint {where} trained {per_rank} items per rank a step (micro_batch_size {old_mb} x grad_accum "
                          f"{old_gas}), this run {mb * gas}: a run measured in train.epochs would count its steps anew; keep "
                          f"{per_rank} ({keep}), or set train.max_steps.")
    if not old_mb or old_mb == mb:
        return None
    if n_items and then["pos"] >= -(-n_items // (old_mb * world)):  # the epoch was finished: the next one starts afresh
        return then["epoch"] + 1, 0
    consumed = then["pos"] * old_mb * world  # items of this epoch's order already trained on
    if consumed % (mb * world):
        per_rank = consumed // world
        fits = sorted({k for k in range(1, per_rank + 1) if per_rank % k == 0 and k != mb} | {old_mb}, key=lambda k: (abs(k - mb), k))[:4]
        raise ConfigError(f"checkpoint {where} stopped {consumed} items into epoch {then['epoch']} (micro_batch_size {old_mb} x "
                          f"{world} rank(s)), which train.micro_batch_size={mb} x {world} does not divide: resume with "
                          f"micro_batch_size {' or '.join(map(str, sorted(fits)))}.")
    return then["epoch"], consumed // (mb * world)


def resume(engine, root: str, tag: str, cfg, scheduler, total_steps: int, data_key: str, is_main: bool,
           world: int = 1, mb: Optional[int] = None, gas: int = 0, n_items: int = 0, base_path: Optional[str] = None) -> Dict[str, Any]:
    """Continue from checkpoint root/tag: refuse one of another model or adapter or of another
    number of ranks, warn about the settings and the data that changed since it, load it, and
    train with this run's optimizer settings (what the warning says) from the same place in the
    data (resume_position). data_key: the data cache key (file contents, tokenizer, data settings)
    this run trains on; the state keeps it for the next resume. base_path: the base this run
    loaded, refused when it is not the one the checkpoint's adapter was trained on."""
    from model.base_identity import checkpoint_problem

    from . import distributed, optim
    from .config import ConfigError

    if mismatch := resume_mismatch(root, tag, cfg):
        raise ConfigError(mismatch)
    if base_path and (other := distributed.agree(checkpoint_problem(os.path.join(root, tag), base_path, cfg))):
        raise ConfigError(other)  # (every rank: a node whose copy of the base differs stops them all)
    mb = mb or cfg.train.micro_batch_size
    position = resume_position(root, tag, world, mb, gas, n_items, epochs=cfg.train.epochs if cfg.train.max_steps <= 0 else 0)
    if is_main and (changes := resume_changes(root, tag, cfg)):
        log.warning(changes)
    state = load(engine, root, tag, total_steps=total_steps)
    if position is not None:
        if is_main:
            log.info("train.micro_batch_size changed: micro-batch %d of epoch %d at the old size is %d of epoch %d at the new "
                     "one, so training continues at the same example", state["pos"], state["epoch"], position[1], position[0])
        state["epoch"], state["pos"] = position
    optim.reapply(scheduler, cfg.optim)
    if is_main and state.get("data_key", data_key) != data_key:
        log.warning("the data this run reads differ from those %s was trained on (another data cache key: the files' contents "
                    "or paths, the tokenizer, the data settings or dialtune's data pipeline version changed; %s then, %s now): if the training examples changed, "
                    "training continues at its position in the new data's order, which is not the run an uninterrupted job "
                    "would have made", os.path.join(root, tag), state["data_key"], data_key)
    state["data_key"] = data_key
    log.info("resumed from %s/%s at step %d", root, tag, state["step"])
    return state


EARLIER_RESULTS = ("metrics.jsonl", "summary.json", "data_stats.json", "export_summary.json", "merged", "eval", "report")


def read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def set_aside_earlier(run_dir: str, earlier_config: Optional[str] = None) -> Optional[str]:
    """A run that starts afresh in a directory an earlier run of the same name wrote: that run's
    results (metrics, summary, merged export, eval, report) and its checkpoints move to
    run_dir/earlier-<their time>/, with its config.yaml (earlier_config: read before this run
    wrote its own), so that what this run writes is never read with them (`dialtune report`,
    `chat`, `eval` of a run still training or stopped early), its saves never replace the earlier
    run's checkpoints of the same step, and train.resume=auto after a crash before this run's
    first save does not continue the earlier run. Returns the folder, or None when there was nothing."""
    from .eval_results import earlier_dir

    ckpts = os.path.join(run_dir, "checkpoints")
    steps = sorted(p for p in os.listdir(ckpts) if p.startswith("step_")) if os.path.isdir(ckpts) else []
    found = [name for name in EARLIER_RESULTS if os.path.exists(os.path.join(run_dir, name))] + (["checkpoints"] if steps else [])
    if not found:
        return None
    kept = earlier_dir(run_dir, max(os.path.getmtime(os.path.join(run_dir, name)) for name in found))
    for name in found:
        os.replace(os.path.join(run_dir, name), os.path.join(kept, name))
    if earlier_config is not None:
        with open(os.path.join(kept, "config.yaml"), "w") as f:
            f.write(earlier_config)
    log.warning("%s holds an earlier run's results (%s): moved to %s, apart from this run's (delete it when no longer needed)%s",
                run_dir, ", ".join(found), kept, f"; train.resume={os.path.join(kept, 'checkpoints')} starts a run from its "
                f"latest checkpoint ({steps[-1]})" if steps else "")
    return kept
