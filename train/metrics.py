"""Rank-0 metrics: an always-written metrics.jsonl plus optional Weights & Biases."""
from __future__ import annotations

import json
import logging
import os
import secrets
import time
from typing import Any, Dict, List, Optional

import torch

log = logging.getLogger("dialtune")

def memory_gb() -> Dict[str, float]:
    if torch.cuda.is_available():
        return {"mem/gpu_alloc_gb": torch.cuda.memory_allocated() / 2**30,
                "mem/gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    import psutil

    return {"mem/rss_gb": psutil.Process().memory_info().rss / 2**30}


class Metrics:
    """Writes one JSON object per line to <run_dir>/metrics.jsonl and mirrors it to W&B.

    Only rank 0 constructs one with enabled=True; other ranks get a no-op.
    """

    def __init__(self, run_dir: str, logger_cfg, config: Dict[str, Any], enabled: bool,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self.wandb_run = None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        if not enabled:
            return
        kept, self.rows, unreadable = [], [], 0
        if resume_step is not None and os.path.isfile(self.path):
            # rows a crashed job logged after its last checkpoint are about to be redone; a line a killed
            # job left half-written is dropped (with a warning), not a reason to refuse the resume
            with open(self.path) as f:
                for line in f:
                    try:
                        row = json.loads(line) if line.strip() else None
                    except ValueError:
                        row, unreadable = None, unreadable + 1
                    if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                        self.rows.append(row)
            if unreadable:
                log.warning("%s: %d unreadable line(s) (a job killed while writing) left out", self.path, unreadable)
        self.file = open(self.path, "w", buffering=1)
        self.file.writelines(kept)
        if logger_cfg.backend == "wandb":
            self.wandb_run = _init_wandb(run_dir, logger_cfg, config, resuming=resume_step is not None)

    def evals_at(self, step: int) -> Dict[str, Any]:
        """The eval scalars an earlier job of the run logged at `step` ({} on ranks other than 0)."""
        return {k: v for row in getattr(self, "rows", []) if row.get("step") == step
                for k, v in row.items() if k.startswith(("eval/", "eval_base/"))}

    def log(self, record: Dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **record}
        self.file.write(json.dumps(row) + "\n")
        self._wandb(lambda run: run.log(record, step=step))

    def _wandb(self, call) -> None:
        """A call on the W&B run. W&B is a copy of metrics.jsonl: when its service fails (SLURM's
        scancel signals every process of the step, wandb-core too, while the rank saves its
        checkpoint) training goes on with W&B off, said once, instead of dying of it."""
        if not self.enabled or self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as e:  # noqa: BLE001 - any failure of the W&B service
            log.warning("W&B stopped working (%s); metrics go on to %s only (`wandb sync` can upload the run's offline "
                        "files later)", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, self.path)
            self.wandb_run = None
            try:  # its own teardown now, while its failure is caught (at exit it would print a traceback)
                import wandb

                wandb.teardown()
            except (Exception, SystemExit):  # noqa: BLE001 - (its teardown exits with a failed service's code)
                pass

    def table(self, key: str, rows, step: int) -> None:
        """A list of same-keyed dicts as a W&B table (the run directory has the JSONL)."""
        if rows:
            def call(run):
                import wandb

                cols = list(rows[0])
                run.log({key: wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])}, step=step)

            self._wandb(call)

    def summary(self, values: Dict[str, Any]) -> None:
        self._wandb(lambda run: run.summary.update(values))

    def close(self) -> Optional[str]:
        if not self.enabled:
            return None
        self.file.close()
        if self.wandb_run is None:
            return None
        run_dir = os.path.dirname(self.wandb_run.settings.sync_file) if hasattr(self.wandb_run.settings, "sync_file") else None
        self._wandb(lambda run: run.finish())
        return run_dir


ID_FILE = "wandb_run_id"


def wandb_api_key_found() -> bool:
    """Whether W&B will find an API key: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(mode: str, env=os.environ) -> str:
    """logger.mode as W&B takes it. auto: WANDB_MODE where the user set it (W&B's own switch, which
    the mode passed to wandb.init would override), else online when W&B has an API key (WANDB_API_KEY
    or `wandb login`'s netrc entry), else offline."""
    if mode != "auto":
        return mode
    own = {"dryrun": "offline", "run": "online"}.get(env.get("WANDB_MODE", ""), env.get("WANDB_MODE", ""))
    if own in ("online", "offline", "disabled"):
        return own
    return "online" if wandb_api_key_found() else "offline"


def _init_wandb(run_dir: str, cfg, config: Dict[str, Any], resuming: bool):
    """One W&B run per run directory: a resumed job (a requeue, train.resume) continues the W&B
    run of the job before it (its id is kept in <run_dir>/wandb_run_id), a fresh start gets a new
    one. A Hydra sweep's runs (<name>-sweep/<n>) are named <name>-sweep/<n> and grouped by sweep."""
    import wandb

    mode = wandb_mode(cfg.mode)
    id_path = os.path.join(run_dir, ID_FILE)
    run_id = None
    if resuming and os.path.isfile(id_path):
        with open(id_path) as f:
            run_id = f.read().strip() or None
    run_id = run_id or secrets.token_hex(4)  # W&B ids: 8 lowercase alphanumerics, as its own
    with open(id_path, "w") as f:
        f.write(run_id + "\n")
    from train.config import run_label

    name, sweep = run_label(run_dir)
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        id=run_id,
        resume="allow",
        name=name,
        group=sweep,
        dir=run_dir,
        mode=mode,
        tags=list(cfg.tags) or None,
        config=config,
        settings=wandb.Settings(silent=True, console="off"),
    )


def data_summary(stats: Dict[str, Any], paths: Optional[List[str]] = None) -> Dict[str, Any]:
    """The dataset report (data_stats.json) as summary scalars under data/, each source under its
    short name (train/evaluate.source_names over all the run's sources, `paths` in their config
    order: the names of eval/loss/<source>), not its path, whose slashes W&B would split into
    nested sections."""
    from .config import flatten
    from .evaluate import source_names

    stats = dict(stats)
    splits = [split for split in ("train", "eval") if isinstance(stats.get(split), dict)
              and isinstance(stats[split].get("sources"), dict)]
    paths = paths or list(dict.fromkeys(p for split in splits for p in stats[split]["sources"]))
    names = dict(zip(paths, source_names(paths)))
    for split in splits:
        by_path = stats[split]["sources"]
        stats[split] = {**stats[split], "sources": {names.get(p, p): v for p, v in by_path.items()}}
    return {f"data/{k}": v for k, v in flatten(stats, "/").items() if isinstance(v, (int, float, str))}

