"""`dialtune` command line: demo, train, merge, prepare, eval, report, chat, slurm, config-doc."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
TRAIN_PY = HERE / "train.py"


def _first_build_note(nproc: int) -> None:
    """Ranks on CPU need DeepSpeed's CPU communication op, compiled on a machine's first run (~30 s
    in which only compiler lines appear): say so then."""
    if nproc < 2 or _cuda_count():
        return
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = any(f.endswith(".so") for f in os.listdir(_get_build_directory("deepspeed_shm_comm", False)))
    except Exception:  # noqa: BLE001 - (a torch without that helper): nothing to say
        return
    if not built:
        print("dialtune: DeepSpeed first compiles its CPU communication op for this machine (once, about 30 s)",
              file=sys.stderr, flush=True)


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # torch missing or broken: the launcher will say so
        return 0


def launch_command(overrides: list[str], nproc: int) -> list[str]:
    """The deepspeed-launcher command for nproc ranks (python alone for one rank)."""
    if nproc <= 1:
        return [sys.executable, str(TRAIN_PY), *overrides]
    runner = shutil.which("deepspeed")
    prefix = [runner] if runner else [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()"]
    from train.distributed import free_port

    # --log_level error: the launcher's INFO lines (its command, world info, CUDA_VISIBLE_DEVICES=0,1
    # on CPU, each spawned process) and its warning that there is no hostfile (this launch is local)
    # say nothing a user acts on; a rank's failure is still an error line
    return [*prefix, "--log_level", "error", *_devices(nproc), "--master_port", str(free_port()), str(TRAIN_PY),
            *overrides]


def _devices(nproc: int) -> list[str]:
    """deepspeed's device arguments: `--num_gpus N` makes it drop CUDA_VISIBLE_DEVICES and take
    physical GPUs 0..N-1, so GPUs the user (or a shared node's scheduler) made visible are named
    with --include instead. On a machine without GPUs CUDA_VISIBLE_DEVICES names nothing (a
    leftover export, a scheduler's default): --num_gpus N, which there starts N CPU ranks."""
    if _cuda_count() == 0:
        return ["--num_gpus", str(nproc)]
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and all(d.isdigit() for d in visible):
        if len(visible) < nproc:
            raise LaunchError(f"--nproc={nproc} but CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} makes only "
                              f"{len(visible)} GPU(s) visible: lower --nproc or make more GPUs visible.")
        return ["--include", "localhost:" + ",".join(visible[:nproc])]
    return ["--num_gpus", str(nproc)]


class LaunchError(ValueError):
    """A user-fixable launch problem (one sentence)."""


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a cgroup or SLURM cpuset), not all the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity on macOS, Windows)
        return os.cpu_count() or 2


def launch_env(nproc: int) -> dict:
    env = dict(os.environ)
    if _cuda_count() == 0:
        # Two ranks fighting for the same cores make tiny CPU steps 10-30x slower.
        env.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // max(1, nproc))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _positive(**given) -> Optional[str]:
    """One sentence for the first --flag given below 1 (argparse takes any int)."""
    for flag, value in given.items():
        if value is not None and value < 1:
            return f"--{flag}={value}: give a number of at least 1."
    return None


def _config_problem(overrides) -> Optional[str]:
    """What is wrong with the config, found before the deepspeed launcher starts ranks whose
    start-up lines would bury the sentence."""
    from launch.prepare import override_problem

    return override_problem(overrides, validate=True, root=True)


def cmd_demo(args) -> int:
    if problem := _positive(steps=args.steps, nproc=args.nproc):
        print(f"dialtune: error: {problem}", file=sys.stderr)
        return 2
    env = launch_env(args.nproc)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_SILENT", "true")
    overrides = ["recipe=demo", f"run.root={args.root}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if problem := _config_problem(overrides):
        print(f"dialtune: error: {problem}", file=sys.stderr)
        return 2
    print(f"dialtune demo: fine-tuning the embedded tiny model on the bundled customer-service sample "
          f"with {args.nproc} DeepSpeed processes (ZeRO-2) on {'GPU' if _cuda_count() else 'CPU'}", flush=True)
    try:
        cmd = launch_command(overrides, args.nproc)
    except LaunchError as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    print("  $ " + " ".join(cmd), flush=True)
    _first_build_note(args.nproc)
    from launch.ranks import run_ranks

    return run_ranks(cmd, env)


def cmd_train(args) -> int:
    if problem := _positive(nproc=args.nproc):
        print(f"dialtune: error: {problem}", file=sys.stderr)
        return 2
    nproc = args.nproc if args.nproc is not None else max(1, _cuda_count())
    try:
        cmd = launch_command(args.overrides, nproc)
    except LaunchError as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    if nproc > 1 and (problem := _config_problem(args.overrides)):  # one process says it as clearly itself
        print(f"dialtune: error: {problem}", file=sys.stderr)
        return 2
    _first_build_note(nproc)
    from launch.ranks import run_ranks

    return run_ranks(cmd, launch_env(nproc))


def cmd_merge(args) -> int:
    if args.hub_repo_id:  # before the heavy imports: a typo costs a second, not ten
        from model.card import repo_id_problem

        if problem := repo_id_problem(args.hub_repo_id):
            print(f"dialtune: error: --hub-repo-id {args.hub_repo_id!r}: {problem}.", file=sys.stderr)
            return 2
    from train.bounds import value_problem

    for flag, key, value in (("--tolerance", "export.verify_tolerance", args.tolerance),
                             ("--dequantize-error", "export.verify_dequantize_error", args.dequantize_error),
                             ("--eval-conversations", "export.eval_conversations", args.eval_conversations)):
        if value is not None and (problem := value_problem(key, value)):
            print(f"dialtune: error: {flag} {value}: {problem}", file=sys.stderr)
            return 2
    from model.export import ExportError, export_checkpoint
    from omegaconf import OmegaConf

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the merge's phases, on stderr
    logging.getLogger("dialtune").setLevel(logging.INFO)

    run_dir = Path(args.run_dir)
    if args.checkpoint == "latest":
        args.checkpoint = None
    if (run_dir / "trainer_state.json").is_file() and (run_dir.parent.parent / "config.yaml").is_file():
        if args.checkpoint not in (None, run_dir.name):  # <run>/checkpoints/step_N: that run's checkpoint N
            print(f"dialtune: error: {run_dir} is checkpoint {run_dir.name}, but --checkpoint says {args.checkpoint}; "
                  "pass one of the two.", file=sys.stderr)
            return 2
        run_dir, args.checkpoint = run_dir.parent.parent, run_dir.name
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        hint = "pass the directory training wrote"
        if found := _enclosing_run(run_dir):  # <run>/merged; <run>/checkpoints/step_N (unfinished), its adapter/
            hint = (f"pass its run directory and the checkpoint: dialtune merge {found[0]} --checkpoint {found[1]}" if found[1]
                    else f"it lies inside the run directory {found[0]}: pass that")
        print(f"dialtune: error: {run_dir} is not a dialtune run directory (no config.yaml); {hint}.", file=sys.stderr)
        return 2
    cfg = OmegaConf.load(cfg_path)
    ckpt_root = run_dir / "checkpoints"
    tag = args.checkpoint
    if tag is None:
        latest = ckpt_root / "latest"
        if not latest.is_file():
            steps = sorted(p.name for p in ckpt_root.glob("step_*") if (p / "trainer_state.json").is_file())
            print(f"dialtune: error: {ckpt_root} has no finished checkpoint yet; "
                  + (f"pass --checkpoint with one of: {', '.join(steps)}." if steps else "train longer (train.save_every, or run to the end)."),
                  file=sys.stderr)
            return 2
        tag = latest.read_text().strip()
    elif tag == "best":  # the lowest held-out loss the run recorded (trainer state of its latest checkpoint)
        import json

        from train.checkpoint import best_tag

        state = ckpt_root / ((ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else "-") / "trainer_state.json"
        best = json.loads(state.read_text()).get("best") if state.is_file() else None
        if best is None:
            print(f"dialtune: error: {run_dir} recorded no checkpoint's held-out loss (a run does when eval.every_n_steps "
                  "divides train.save_every); pass --checkpoint step_N.", file=sys.stderr)
            return 2
        tag = best_tag({"best": best})
        print(f"dialtune: best: {tag} (held-out loss {best['eval_loss']:.4f}, the lowest measured at a checkpoint)", file=sys.stderr)
    root = Path(os.path.abspath(ckpt_root))
    given = [Path(os.path.abspath(ckpt_root / tag)), Path(os.path.abspath(tag))]  # (a tag, or a path from the checkpoints or from here)
    ckpt = next((c for c in given if root in c.parents and c.exists()), next((c for c in given if root in c.parents), given[0]))
    if root not in ckpt.parents:  # another run's checkpoint would be merged with this run's config, base and tokenizer
        found = _enclosing_run(Path(tag) if Path(tag).exists() else ckpt)
        hint = f"; for that run's: dialtune merge {found[0]} --checkpoint {found[1]}" if found and found[1] else ""
        print(f"dialtune: error: --checkpoint {tag} is not one of {run_dir}'s checkpoints (a tag like step_N, best or latest, "
              f"or a path inside {ckpt_root}){hint}.", file=sys.stderr)
        return 2
    tag = ckpt.relative_to(root).parts[0]  # (a path inside: its checkpoint)
    ckpt = ckpt_root / tag
    needed = ckpt / ("trainer_state.json" if cfg.peft.method == "none" else "adapter")
    if not needed.exists():
        print(f"dialtune: error: {needed} does not exist; pass --checkpoint with one of: {', '.join(sorted(p.name for p in ckpt_root.glob('step_*')))}.", file=sys.stderr)
        return 2
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").is_file() else None
    if args.out is None and latest and os.path.basename(os.path.normpath(tag)) != latest:
        read_by = f"`dialtune chat {run_dir}` and `dialtune eval {run_dir}`" if cfg.peft.method == "none" else \
            f"`dialtune chat {run_dir}` and `dialtune eval {run_dir / 'merged'}` (`dialtune eval {run_dir}` evaluates the latest adapter)"
        print(f"dialtune: note: {run_dir / 'merged'} will hold {tag}, not the run's latest checkpoint {latest}: {read_by} "
              "read it (--out writes elsewhere)", file=sys.stderr)
    out = args.out or str(run_dir / "merged")
    try:
        from model.export_run import run_base

        base = run_base(cfg, str(run_dir))
        summary = export_checkpoint(cfg, str(ckpt), out, base_path=base, run_dir=str(run_dir), dtype=args.dtype, base=args.base,
                                    eval_conversations=args.eval_conversations, tolerance=args.tolerance,
                                    dequantize_error=args.dequantize_error, hub_repo_id=args.hub_repo_id, license=args.license)
    except ExportError as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    diff = summary.get("verify_max_abs_logit_diff")
    if diff is not None:
        print(f"dialtune: verified: max |logit difference| {diff:.2e} against {summary.get('verify_reference')} "
              f"(tolerance {summary.get('verify_tolerance')})")
    if summary.get("eval_loss"):
        print("dialtune: held-out loss: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["eval_loss"].items()))
    print(f"dialtune: merged checkpoint written to {out} (everything measured: {os.path.join(out, 'export_summary.json')})")
    if os.path.abspath(out) == os.path.abspath(run_dir / "merged"):  # the run's own export: summary.json says which
        from launch.train import note_merged

        note_merged(str(run_dir), os.path.abspath(out), os.path.abspath(ckpt))
    if summary.get("hub_repo_id"):
        print(f"dialtune: push-ready; upload with: hf upload {summary['hub_repo_id']} {out} .")
    return 0


def _enclosing_run(path: Path):
    """(run directory, checkpoint tag or None) for a path inside a dialtune run directory (the
    nearest parent with config.yaml and checkpoints/); None outside one."""
    path = Path(os.path.abspath(path))
    for parent in path.parents:
        if (parent / "config.yaml").is_file() and (parent / "checkpoints").is_dir():
            rel = path.relative_to(parent).parts
            return parent, (rel[1] if len(rel) > 1 and rel[0] == "checkpoints" else None)
    return None


def cmd_config_doc(args) -> int:
    from train.config import iter_docs

    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, tname, default, help_ in iter_docs():
        print(f"| `{key}` | {tname} | `{default!r}` | {help_.replace('|', chr(92) + '|')} |")
    return 0


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE.parent))
    from launch import quiet_loggers

    quiet_loggers()
    p = argparse.ArgumentParser(prog="dialtune", description="Fine-tune causal LMs on conversation data.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="fine-tune the embedded tiny model on the bundled sample (CPU, 2 ranks, ZeRO-2)")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps (recipe default: 40)")
    d.add_argument("--nproc", type=int, default=2, help="DeepSpeed processes")
    d.add_argument("--root", default="outputs", help="where the run directory goes")
    d.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="launch launch/train.py with the deepspeed launcher (N ranks) or python (1)")
    t.add_argument("--nproc", type=int, default=None, help="ranks on this node (default: GPUs, or 1 on CPU)")
    t.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. recipe=qlora_nf4 model=<hub id>; -m (--multirun) before "
                   "them runs a sweep, e.g. -m optim.lr=1e-4,2e-4")
    t.set_defaults(fn=cmd_train)

    m = sub.add_parser("merge", help="merge a run's adapter into its full-precision base (a full fine-tune: export its weights)")
    m.add_argument("run_dir")
    m.add_argument("--out", default=None, help="output directory (default: <run_dir>/merged)")
    m.add_argument("--checkpoint", default=None, help="checkpoint tag, e.g. step_0000020, best (the lowest held-out loss the run recorded) or latest (the default)")
    m.add_argument("--dtype", default=None, choices=["auto", "fp32", "bf16", "fp16"], help="dtype of the merged weights")
    m.add_argument("--base", default=None, choices=["original", "dequantized"],
                   help="merge into the original full-precision base or the dequantized quantized base the run trained against (default: the run's export.base)")
    m.add_argument("--tolerance", type=float, default=None, help="largest |logit difference| between merged model and base + adapter, fp32 (default: the run's export.verify_tolerance)")
    m.add_argument("--dequantize-error", type=float, default=None, help="--base dequantized: largest relative output error of a dequantized layer (default: the run's export.verify_dequantize_error)")
    m.add_argument("--hub-repo-id", default=None, help="write the checkpoint push-ready for this Hugging Face repo id, org/name (default: the run's export.hub_repo_id)")
    m.add_argument("--license", default=None, help="license id for the model card metadata (default: the run's export.license)")
    m.add_argument("--eval-conversations", type=int, default=None, help="eval conversations for the held-out losses in export_summary.json (0 skips; default: the run's, 64)")
    m.set_defaults(fn=cmd_merge)

    pr = sub.add_parser("prepare", help="validate, tokenize, pack and cache the data of a config; print the report")
    pr.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.train_files=[a.jsonl] data.on_error=lenient")
    pr.set_defaults(fn=lambda a: __import__("launch.prepare", fromlist=["main"]).main(a.overrides))

    c = sub.add_parser("config-doc", help="print every config key with its type, default and meaning (Markdown)")
    c.set_defaults(fn=cmd_config_doc)

    from launch.chat import add_parser as add_chat_parser

    add_chat_parser(sub)

    from launch.slurm import add_parser as add_slurm_parser

    add_slurm_parser(sub)

    from launch.evaluate import add_parser as add_eval_parser

    add_eval_parser(sub)

    from launch.report import add_parser as add_report_parser

    add_report_parser(sub)

    args, extra = p.parse_known_args(argv)
    if extra and args.cmd == "eval" and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra  # overrides given after the options
    elif extra and args.cmd == "train" and all(x in ("-m", "--multirun") or ("=" in x and not x.startswith("-")) for x in extra):
        # a sweep, `dialtune train -m optim.lr=1e-4,2e-4` (argparse takes -m for an option of its own)
        args.overrides = ["-m", *args.overrides, *(x for x in extra if x not in ("-m", "--multirun"))]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd in ("demo", "train", "merge", "eval", "chat"):  # what runs DeepSpeed here (a submitted job's nodes detect theirs)
        from launch import name_cpu_accelerator

        name_cpu_accelerator()
    try:
        return args.fn(args)
    except BrokenPipeError:  # `dialtune config-doc | head`: the reader left, nothing to say (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:  # Ctrl-C while a model loads, a merge writes...: one line, not a traceback of the import
        print(f"\ndialtune {args.cmd}: stopped by Ctrl-C", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the program itself: a Ctrl-C while Python shuts down (torch's exit hooks) is no traceback
            quiet_exit()


def quiet_exit() -> None:
    """From now on Ctrl-C ends the process at once, quietly, with 130 (what is written so far
    flushed first); an ignored SIGINT (a background job) stays ignored."""
    import signal

    def leave(signum, frame):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(130)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, leave)


if __name__ == "__main__":
    sys.exit(main())
