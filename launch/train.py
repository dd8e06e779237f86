#!/usr/bin/env python
"""Training entry point for every launcher.

    python launch/train.py [overrides]                         # one process, CPU or one GPU
    deepspeed --num_gpus N launch/train.py recipe=lora_int8 model=<hub id or dir> [overrides]
    torchrun --nproc_per_node N launch/train.py [overrides]

Overrides are Hydra's (`key=value`, `+key=value`, `-m` for sweeps). `model=<hub id or dir>` that
is not a config in conf/model/ means "this model": it becomes `model=hf model.name_or_path=...`.
The `--local_rank=N` the deepspeed launcher appends is dropped (LOCAL_RANK is in the env).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder heads sys.path and `train` would import this very file:
# put the project root first instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "launch"]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":  # before the imports below (seconds): a SIGTERM or SIGUSR1 sent at start-up is handled
    import signal

    from train import signals

    signals.install()
    signals.follow_supervisor()  # ends with the `dialtune train` that started it
    # and a Ctrl-C then ends the process quietly (main() gives Ctrl-C back to Python before training)
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

from launch import name_cpu_accelerator, quiet_loggers  # noqa: E402
from train.config import CONF_DIR, register  # noqa: E402

quiet_loggers()


def normalize_argv(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--local_rank":
            skip = True
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        if arg.startswith("model=") and not (CONF_DIR / "model" / f"{arg[6:]}.yaml").is_file():
            value = arg[6:].replace("\\", "\\\\").replace("'", "\\'")
            out += ["model=hf", f"model.name_or_path='{value}'"]
            continue
        out.append(arg)
    # Hydra's parser wants its flags before the overrides; users (and wrappers) put them anywhere.
    flags = [a for a in out if a in ("-m", "--multirun")]
    return flags + [a for a in out if a not in flags]


NONFINITE_EXIT_CODE = 3


def rank() -> int:
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:  # (a RANK that is no number: main() refuses it with one sentence)
        return 0


def setup_logging() -> None:
    level = logging.INFO if rank() == 0 else logging.WARNING
    logging.getLogger().setLevel(level)
    # "compilers": setuptools' compiler, which DeepSpeed runs at import to probe for libaio (two gcc
    # lines per run at INFO)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "compilers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars() if rank() != 0 else None
    datasets.logging.set_verbosity_error()


def fail(message: str, every_rank: bool = False) -> None:
    """A user-fixable error: one sentence on stderr, exit code 2, no traceback. Said by rank 0 and by
    each node's first rank (LOCAL_RANK 0), so that every node's own log says why it stopped (once on
    one node); with every_rank by each rank (ranks that did not meet: rank 0 may be the one missing)."""
    if every_rank or rank() == 0 or os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"dialtune: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def print_summary(summary: dict) -> None:
    done = summary.get("finished", True)
    lines = ["", "dialtune: training finished" if done else
             f"dialtune: training stopped at step {summary['steps']} of {summary['total_steps']} (resume with train.resume=auto)"]
    if done and summary.get("early_stopped_step"):
        lines[1] += (f" early, at step {summary['early_stopped_step']} of {summary['total_steps']}: the held-out loss stopped "
                     "improving (eval.early_stopping_patience)")
        if summary.get("best_checkpoint") and summary.get("export_checkpoint") != summary["best_checkpoint"]:
            lines[1] += f"; the lowest-loss checkpoint is {summary['best_checkpoint']} (export.checkpoint=best merges it)"
    for key, label in (("run_dir", "run directory"), ("metrics", "metrics (JSONL)"), ("adapter", "adapter"),
                       ("merged", "merged checkpoint"), ("wandb_dir", "W&B run")):
        if summary.get(key):
            lines.append(f"  {label:<34} {summary[key]}")
    if "offline-run-" in (summary.get("wandb_dir") or ""):  # a resumed run has one per job: sync them all
        lines.append(f"  {'sync it to W&B':<34} wandb sync {os.path.join(os.path.dirname(summary['wandb_dir']), 'offline-run-*')}")
    if "eval/loss" in summary:
        lines.append(f"  {'held-out loss / perplexity':<34} {summary['eval/loss']:.4f} / {summary['eval/ppl']:.2f}")
    if summary.get("merged") and summary.get("export_checkpoint") not in (None, summary.get("checkpoint")):
        lines.append(f"  {'merged from (lowest eval loss)':<34} {summary['export_checkpoint']} ({summary['best_eval_loss']:.4f})")
    if summary.get("merged"):
        lines.append(f"  load it: AutoModelForCausalLM.from_pretrained({summary['merged']!r})")
    if summary.get("merged") and summary.get("hub_repo_id"):
        lines.append(f"  push-ready; upload it: hf upload {summary['hub_repo_id']} {summary['merged']} .")
    run_dir = summary.get("run_dir")
    if run_dir and os.path.isdir(os.path.join(run_dir, "eval")):
        lines.append(f"  {'eval suite results':<34} {os.path.join(run_dir, 'eval')}")
    if run_dir and done:
        lines.append(f"  plots and a one-page report: dialtune report {run_dir}")
    print("\n".join(lines), flush=True)


def note_merged(run_dir: str, merged_dir: str, checkpoint: str = None) -> None:
    """Add the merged checkpoint to summary.json, which the recipe wrote before the merge (and, for
    a `dialtune merge --checkpoint` into <run_dir>/merged, the checkpoint it now holds)."""
    import json

    path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        data["merged"] = merged_dir
        if checkpoint:
            data["export_checkpoint"] = checkpoint
        with open(path + ".tmp", "w") as f:
            json.dump(data, f, indent=2)
        os.replace(path + ".tmp", path)


def drop_if_only_hydra(run_dir: str) -> None:
    """A run refused at start leaves no directory behind (e.g. outputs/llama3_8bb-lora-none of a
    mistyped model=): Hydra creates it with its record and log before dialtune checks anything, the
    recipe its config.yaml (and the tiny base) before the checks that need the model; a directory
    with anything else in it (an earlier run's checkpoints, metrics), or that another training holds, is kept."""
    import shutil

    from train.run_lock import held_elsewhere

    try:
        if not held_elsewhere(run_dir) and set(os.listdir(run_dir)) <= {"hydra", ".hydra", "train.log", "config.yaml", "base", ".dialtune-lock"}:  # (nothing trained)
            shutil.rmtree(run_dir)
    except OSError:
        pass


def sweep_job_label() -> str:
    """'sweep job N (key=value, ...): ' for a job of a -m sweep (its swept values), so that an error
    names the job that stopped the sweep; '' for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return ""
    from launch.prepare import sweep_jobs

    jobs = sweep_jobs(["-m", *normalize_argv(sys.argv[1:])])  # (what the sweep varies: keys whose values differ)
    swept = {o.lstrip("+~").partition("=")[0] for o in (jobs[0] if jobs else []) if any(o not in job for job in jobs)}
    values = [o for o in hc.overrides.task if o.lstrip("+~").partition("=")[0] in swept]
    return f"sweep job {hc.job.num}" + (f" ({', '.join(values)})" if values else "") + ": "


def task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from data_pipeline.chat import DataError
    from model.export import ExportError
    from train.config import ConfigError
    from train.run_lock import RunDirInUse
    from train.validate import validate

    setup_logging()
    run_dir = HydraConfig.get().runtime.output_dir
    from train.config import absolute_paths

    absolute_paths(cfg)  # (config.yaml is read again by merge, eval and resume from any directory)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the ranks agree: one node's own paths stop them all
            from train import distributed

            distributed.init(max(1, cfg.deepspeed.timeout_minutes))
            failed = None
            try:
                validate(cfg)
            except Exception as e:  # noqa: BLE001 - any failure: the other ranks must not wait for this one
                failed = e
            if problem := distributed.agree(distributed.as_problem(failed)):
                if failed is not None and not isinstance(failed, ConfigError):
                    raise failed  # (its traceback here; the other ranks stop with its one line)
                raise ConfigError(problem)
        else:
            validate(cfg)
        from train import recipe

        summary = recipe.run(cfg, run_dir)
        if rank() == 0:
            merged_dir = os.path.join(run_dir, "merged")
            from model.export_io import exported_from, is_export_of

            target = summary.get("export_checkpoint") or summary["checkpoint"]  # export.checkpoint: last or best
            if summary.get("already_finished") and is_export_of(merged_dir, target):
                summary["merged"] = merged_dir  # merged when the run finished; `dialtune merge` redoes it on purpose
                note_merged(run_dir, merged_dir)
            elif cfg.export.merge_at_end and summary["finished"]:
                if summary.get("already_finished") and (other := exported_from(merged_dir)):  # e.g. `dialtune merge --checkpoint <earlier step>`
                    print(f"dialtune: {merged_dir} holds an export of {other}, not of {target}: writing it again", flush=True)
                from model.export import export_checkpoint
                from train.signals import Stopped, ignore_further, stopping

                written = os.path.join(merged_dir, "export_summary.json")
                before = os.stat(written).st_mtime_ns if os.path.isfile(written) else None
                try:
                    with stopping():
                        export_checkpoint(cfg, target, merged_dir, base_path=summary["base"], run_dir=run_dir)
                except Stopped as e:
                    ignore_further()
                    # a signal that came as the merge returned finds it written: nothing is left to do
                    if not (os.path.isfile(written) and os.stat(written).st_mtime_ns != before):
                        print_summary(summary)
                        then = ("the requeued job (train.resume=auto) writes it" if e.signal_name == "SIGUSR1" else
                                f"write it with `dialtune merge {run_dir}`")
                        print(f"dialtune: {e.signal_name} after the last step: training is finished and saved, the merged "
                              f"checkpoint was not written; {then} (exit {e.exit_code})", flush=True)
                        sys.exit(e.exit_code)
                summary["merged"] = merged_dir
                summary["hub_repo_id"] = cfg.export.hub_repo_id
                note_merged(run_dir, merged_dir)
            print_summary(summary)
        if summary.get("nonfinite_stop_step"):
            if rank() == 0:
                why = (f"train.nonfinite={cfg.train.nonfinite}" if cfg.train.nonfinite == "stop" else
                       f"the {summary.get('nonfinite_in_row')} in a row are more than train.max_nonfinite_in_row="
                       f"{cfg.train.max_nonfinite_in_row} allows; train.nonfinite=skip")
                print(f"dialtune: error: non-finite loss at step {summary['nonfinite_stop_step']} ({why}); "
                      f"the last good state is saved in {summary['checkpoint']}", file=sys.stderr, flush=True)
            sys.exit(NONFINITE_EXIT_CODE)
        from train.signals import pending

        if not summary.get("preempted") and (late := pending()):  # after the last step, and no merge stopped for it
            from train.signals import REQUEUE_EXIT_CODE, TERM_EXIT_CODE, ignore_further

            ignore_further()  # (a sweep's next job would drop it: SLURM's time-limit warning, lost)
            code = REQUEUE_EXIT_CODE if late == "SIGUSR1" else TERM_EXIT_CODE
            if rank() == 0:
                print(f"dialtune: {late} after the last step: training is finished and saved"
                      + ("; asking to be requeued" if code == REQUEUE_EXIT_CODE else "") + f" (exit {code})", flush=True)
            sys.exit(code)
        if summary.get("preempted"):
            from train.signals import REQUEUE_EXIT_CODE, TERM_EXIT_CODE, ignore_further

            ignore_further()
            if summary.get("stop_signal") == "SIGTERM":  # scancel / preemption / kill: stop, ask for nothing
                if rank() == 0:
                    print(f"dialtune: stopped by SIGTERM after step {summary['steps']}; checkpoint saved "
                          f"(continue with train.resume=auto in the same run directory; exit {TERM_EXIT_CODE})", flush=True)
                sys.exit(TERM_EXIT_CODE)
            if rank() == 0:
                print(f"dialtune: stopped by SIGUSR1 after step {summary['steps']}; checkpoint saved, asking to be requeued (exit {REQUEUE_EXIT_CODE})", flush=True)
            sys.exit(REQUEUE_EXIT_CODE)
    except RunDirInUse as e:  # (the directory is the other training's: nothing of it is dropped)
        fail(sweep_job_label() + str(e))
    except (ConfigError, DataError, ExportError) as e:
        every_rank = getattr(e, "every_rank", False)  # (ranks that did not meet: rank 0 may be the one missing)
        if every_rank or rank() == 0 or os.environ.get("LOCAL_RANK") == "0":  # (a node-local run.root has one per node)
            drop_if_only_hydra(run_dir)
        fail(sweep_job_label() + str(e), every_rank=every_rank)
    except KeyboardInterrupt:  # Ctrl-C: no checkpoint is written for it (SIGTERM / SIGUSR1 write one)
        if rank() == 0:
            latest = os.path.join(run_dir, "checkpoints", "latest")
            kept = (f"the latest checkpoint is {open(latest).read().strip()} (continue with train.resume=auto in the same "
                    "run directory)" if os.path.isfile(latest) else "no checkpoint was written yet")
            print(f"\ndialtune: interrupted; {kept}. `kill -TERM` instead saves a checkpoint first.", file=sys.stderr, flush=True)
        sys.exit(130)
    except OSError as e:
        if "does not appear to have" in str(e) or "not a valid model identifier" in str(e) or "offline mode" in str(e):
            if rank() == 0 or os.environ.get("LOCAL_RANK") == "0":
                drop_if_only_hydra(run_dir)
            fail(f"{sweep_job_label()}model {cfg.model.name_or_path!r} cannot be loaded ({str(e).splitlines()[0]}); check model.name_or_path or your hub access.")
        raise


def main() -> None:
    import hydra

    name_cpu_accelerator()  # (here, not at import: `dialtune slurm` imports this module, and sbatch passes its environment on)
    register()
    from launch.prepare import override_problem
    from train.distributed import launcher_env_problem

    if problem := launcher_env_problem(os.environ):  # before Hydra makes a run directory (train/distributed.py checks it too)
        fail(problem)
    # before Hydra, whose own message for a mistyped key suggests `+key=value` (which adds it)
    if problem := override_problem(sys.argv[1:], root=True):
        fail(problem)
    sys.argv = [sys.argv[0]] + normalize_argv(sys.argv[1:])
    if rank() != 0:  # the run's Hydra record is rank 0's (every rank writing it into one shared directory, the last won)
        sys.argv.append("hydra.output_subdir=null")
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C: KeyboardInterrupt, which task() reports
    hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")(task)()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C before training started (task() handles it from there): nothing to save
        print("\ndialtune: interrupted before training started.", file=sys.stderr, flush=True)
        sys.exit(130)
