"""`dialtune slurm`: render an sbatch script for launch/train.py and submit it.

    dialtune slurm recipe=lora_bf16 model=meta-llama/Meta-Llama-3-8B --nodes 2 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu [--dry-run] [--wait]

The job runs one srun task per node; each task starts torchrun (`torch.distributed.run`) with
`--nnodes $SLURM_NNODES --node_rank $SLURM_NODEID --nproc_per_node <G or P>` and a rendezvous
taken from SLURM (MASTER_ADDR = first host of the allocation, MASTER_PORT derived from the job
id), and torchrun starts the ranks of launch/train.py with the user's Hydra overrides.

torchrun is called through `python launch/node_launcher.py ...`: the same
`torch.distributed.run`, plus exit code 85 passed through and SIGUSR1/SIGTERM kept for the ranks
(see that file).

Requeue contract (REQUEUE_EXIT_CODE = 85): SLURM sends SIGUSR1 to the job's processes
`--signal-seconds` before the time limit. Training that catches it, saves a checkpoint and exits
with code 85 says "checkpoint saved, please requeue me": the batch script then runs `scontrol
requeue $SLURM_JOB_ID` and exits 0, and the requeued job (same job id, same run directory, since
`train.resume=auto` is added unless you set train.resume) resumes from the latest checkpoint.
SIGTERM (`scancel`, preemption, `scontrol requeue`) also gets a checkpoint, but training then
exits 143 and nothing is requeued by this script: a cancelled job stays cancelled, and SLURM
itself requeues what it preempts with PreemptMode=REQUEUE or what `scontrol requeue` asked for.
Every other exit code passes through unchanged.

Run directory: with no `run.name` override, `dialtune slurm` pins one for the job at submit
time, the config's own name plus the submission time and the submitting process's id
(`<model>-<peft>-<quant>-YYYYmmdd-HHMMSS-PID`),
so that two submissions never share (and resume=auto never continues) each other's run, while
the job's requeues keep it. Pass `run.name=<that name>` to continue an earlier job's run.

Every user override and every path reaches train.py verbatim: the script shell-quotes them
(`shlex.quote`) and hands them to each node's shell as positional parameters, never as code.
Values that go into `#SBATCH` lines (job name, partition, account, qos, time, mem, log dir),
which sbatch reads without shell quoting, must be plain (no spaces, quotes or control
characters); anything else is refused with a one-sentence error.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

try:
    from launch import node_launcher
except ImportError:  # run as a script (the shim at the end) where dialtune is not installed: launch/ heads sys.path
    import node_launcher

REQUEUE_EXIT_CODE = node_launcher.REQUEUE_EXIT_CODE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TRAIN_PY = HERE / "train.py"
NODE_LAUNCHER = HERE / "node_launcher.py"

# What may go into an #SBATCH line as is: sbatch splits those lines itself, without a shell.
_DIRECTIVE_OK = re.compile(r"^[A-Za-z0-9_.,:/@+=-]+$")


class SlurmError(ValueError):
    """A user-fixable problem with the requested job (one sentence)."""


def _directive(flag: str, value) -> str:
    text = str(value)
    if not _DIRECTIVE_OK.match(text):
        raise SlurmError(f"{flag} {text!r} cannot go into an #SBATCH line: use only letters, digits and _ . , : / @ + = -")
    return text


def override_key(override: str) -> str:
    """`train.resume` for `train.resume=x`, `+train.resume=x`, `++train.resume=x` and `~train.resume`."""
    return override.lstrip("+~").split("=", 1)[0].strip()


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The last value the overrides give `key`, or None."""
    value = None
    for o in overrides:
        if "=" in o and override_key(o) == key:
            value = o.split("=", 1)[1]
    return value


def job_overrides(overrides: Sequence[str]) -> list:
    """The user's overrides plus `train.resume=auto` (unless they set train.resume), so that a
    requeued job resumes from its run directory's latest checkpoint, and no progress bar (unless
    they set train.progress_bar)."""
    out = list(overrides)
    if not any(override_key(o) == "train.resume" for o in out):
        out.append("train.resume=auto")
    if not any(override_key(o) == "train.progress_bar" for o in out):
        out.append("train.progress_bar=false")  # a log file, not a terminal: the per-step lines say the same
    return out


def default_log_dir(overrides: Sequence[str], cwd: Optional[str] = None) -> str:
    """<run.root>/slurm-logs, run.root as the composed config has it (a recipe's, an interpolation resolved)."""
    from launch.prepare import compose, plain_overrides

    try:
        root = str(compose(plain_overrides(overrides)).run.root)
    except Exception:  # noqa: BLE001 - a config that does not compose was already reported (dry runs go on)
        root = (override_value(overrides, "run.root") or "outputs").strip("'\"")
    return os.path.abspath(os.path.join(cwd or os.getcwd(), root, "slurm-logs"))


def default_job_name(overrides: Sequence[str]) -> str:
    name = override_value(overrides, "run.name")
    if not name:
        return "dialtune"
    return "dialtune-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run")


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(value: str) -> Optional[int]:
    """Seconds of a SLURM --time value (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; 0 for UNLIMITED and
    INFINITE), or None when it is none of these."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return 0
    m = _TIME.match(value)
    if m is None:
        return None
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # M, M:S


def render(overrides: Sequence[str] = (), *, nodes: int = 1, gpus_per_node: int = 0, nproc_per_node: int = 1,
           cpus_per_task: Optional[int] = None, mem: Optional[str] = None, time: Optional[str] = None,
           partition: Optional[str] = None, account: Optional[str] = None, qos: Optional[str] = None,
           job_name: str = "dialtune", signal_seconds: int = 120, log_dir: str = "outputs/slurm-logs",
           workdir: Optional[str] = None, python: Optional[str] = None,
           train_script: Optional[str] = None) -> str:
    """The sbatch script (a pure function of its arguments; `workdir` defaults to the current
    directory, `python` to this interpreter, `train_script` to launch/train.py).

    On CPU (gpus_per_node=0) each node runs nproc_per_node ranks and gets nproc_per_node CPUs
    unless cpus_per_task says otherwise; OMP_NUM_THREADS is set to the CPUs per rank."""
    for flag, v, low in (("--nodes", nodes, 1), ("--gpus-per-node", gpus_per_node, 0),
                         ("--nproc-per-node", nproc_per_node, 1), ("--signal-seconds", signal_seconds, 0)):
        if not isinstance(v, int) or v < low:
            raise SlurmError(f"{flag} must be an integer >= {low}, not {v!r}")
    if signal_seconds > 65535:
        raise SlurmError(f"--signal-seconds {signal_seconds} is above SLURM's limit of 65535 s; give a smaller one.")
    if "/" in str(job_name):
        raise SlurmError(f"--job-name {job_name!r} cannot hold '/': it names the job's log file; pass a plain name.")
    if cpus_per_task is not None and (not isinstance(cpus_per_task, int) or cpus_per_task < 1):
        raise SlurmError(f"--cpus-per-task must be an integer >= 1, not {cpus_per_task!r}")
    if time is not None and str(time) != "":
        limit = time_limit_seconds(str(time))
        if limit is None:
            raise SlurmError(f"--time {time!r} is not a SLURM time limit: give minutes, M:S, H:M:S, D-H, D-H:M or D-H:M:S "
                             "(e.g. 24:00:00 or 1-12:00:00)")
        if 0 < limit <= signal_seconds:
            raise SlurmError(f"--signal-seconds {signal_seconds} is not below --time {time} ({limit} s): training would be "
                             "told to stop as it starts; give a longer --time or a smaller --signal-seconds")
    gpu = gpus_per_node > 0
    nproc = gpus_per_node if gpu else nproc_per_node
    if cpus_per_task is None and not gpu:
        cpus_per_task = nproc_per_node
    log_dir = os.path.abspath(log_dir)
    workdir = os.path.abspath(workdir or os.getcwd())
    python = python or sys.executable
    train_script = os.path.abspath(train_script or TRAIN_PY)
    q = shlex.quote

    sb = [f"--job-name={_directive('--job-name', job_name)}", f"--nodes={nodes}", "--ntasks-per-node=1"]
    if cpus_per_task is not None:
        sb.append(f"--cpus-per-task={cpus_per_task}")
    if gpu:
        sb.append(f"--gres=gpu:{gpus_per_node}")
    for flag, v in (("--mem", mem), ("--time", time), ("--partition", partition), ("--account", account), ("--qos", qos)):
        if v is not None and str(v) != "":
            sb.append(f"{flag}={_directive(flag, v)}")
    sb += ["--requeue", "--open-mode=append"]
    if signal_seconds > 0:
        sb.append(f"--signal=USR1@{signal_seconds}")
    sb.append(f"--output={_directive('--log-dir', log_dir)}/%x-%j.out")

    lines = ["#!/bin/bash"] + [f"#SBATCH {s}" for s in sb]
    lines += [
        "#",
        "# Rendered by `dialtune slurm` (launch/slurm.py). One srun task per node runs torchrun, which",
        f"# starts {nproc} rank(s) of launch/train.py on that node. Exit code {REQUEUE_EXIT_CODE} from training means",
        "# \"checkpoint saved after SIGUSR1 (time limit near), requeue me\": this script then runs `scontrol requeue`",
        "# and exits 0; the requeued job resumes in the same run directory (train.resume=auto).",
        "set -uo pipefail",
        f"cd {q(workdir)} || exit 1",
        "",
        "# Rendezvous from SLURM: the first host of the allocation, a port derived from the job id.",
        'first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "# (its NodeAddr: where slurm.conf gives nodes an address, the NodeName need not resolve; else the name itself)",
        'addr=$(scontrol show node "$first" -o 2>/dev/null | tr " " "\\n" | sed -n "s/^NodeAddr=//p")',
        'export MASTER_ADDR=${addr:-$first}',
        "export MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 15000 ))  # below the ephemeral range (32768+)",
    ]
    if not gpu:
        lines += [
            "# CPU ranks: one OpenMP thread pool per rank, sized to the CPUs SLURM gave this task.",
            f"threads=$(( ${{SLURM_CPUS_PER_TASK:-{cpus_per_task}}} / {nproc} ))",
            "export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))",
        ]
    else:
        given = "the cluster's default: no --cpus-per-task" if cpus_per_task is None else f"--cpus-per-task {cpus_per_task}"
        lines += [
            "# GPU ranks: each needs a core of its own to keep its GPU fed (kernel launches, data loading).",
            "cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-0}}",
            f"if [ \"$cpus\" -gt 0 ] && [ \"$cpus\" -lt {nproc} ]; then",
            f'    echo "dialtune: warning: $cpus CPU(s) for {nproc} GPU ranks on this node'
            f' ({given});'
            f' ranks that share a core leave their GPUs waiting: resubmit with --cpus-per-task {8 * nproc} or more" >&2',
            "fi",
        ]
    lines += [
        "export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1",
        f"export DIALTUNE_REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}",
        'echo "dialtune: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
        ' rendezvous $MASTER_ADDR:$MASTER_PORT, $(date -Is)"',
        "",
        "# SIGUSR1/SIGTERM sent to this batch shell go on to the training step. bash runs a trap only",
        "# once the foreground command returns, hence srun in the background and `wait`.",
        "step=",
        "# (SIGTERM goes to the step's tasks through scancel: srun itself, given SIGTERM, kills the step at once)",
        'forward() { echo "dialtune: batch shell got SIG$1, forwarding it to the training step"; '
        'if [ "$1" = TERM ] && scancel --signal=TERM "$SLURM_JOB_ID.0" 2>/dev/null; then :; '
        'elif [ -n "$step" ]; then kill -s "$1" "$step" 2>/dev/null; fi; }',
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "",
        "# Each node's shell reads its own SLURM_NODEID; the command line arrives as positional",
        "# parameters ($0 python, $1 launcher, then train.py and the overrides), never as code.",
        'srun --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}'
        + (f" --gres=gpu:{gpus_per_node}" if gpu else "") + " \\",
        "    bash -c 'exec \"$0\" -u \"$1\" --nnodes \"$SLURM_NNODES\" --node_rank \"$SLURM_NODEID\""
        f" --nproc_per_node {nproc} --master_addr \"$MASTER_ADDR\" --master_port \"$MASTER_PORT\" \"${{@:2}}\"' \\",
        f"    {q(python)} {q(str(NODE_LAUNCHER))} \\",
        "    " + " ".join(q(a) for a in [train_script, *job_overrides(overrides)]) + " &",
        "step=$!",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"; rc=$?',
        "",
        f"if [ \"$rc\" -eq {REQUEUE_EXIT_CODE} ]; then",
        f'    echo "dialtune: training saved a checkpoint and asked to be requeued (exit {REQUEUE_EXIT_CODE}); requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" || exit 1',
        "    exit 0",
        "fi",
        'echo "dialtune: training step exited with code $rc, $(date -Is)"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


# ---- the `dialtune slurm` subcommand ------------------------------------------------------------

def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes (one srun task, i.e. one torchrun, per node)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (gres gpu:G); ranks per node = G; 0: CPU")
    p.add_argument("--nproc-per-node", type=int, default=1, help="CPU ranks per node when --gpus-per-node is 0")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per node task (default on CPU: --nproc-per-node)")
    p.add_argument("--mem", default=None, help="memory per node, e.g. 64G")
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--job-name", default=None, help="default: dialtune-<run.name>, or dialtune")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="send SIGUSR1 to training this many seconds before the time limit (0: never)")
    p.add_argument("--log-dir", default=None, help="where <job-name>-<job id>.out goes (default: <run.root>/slurm-logs)")
    p.add_argument("-m", "--multirun", action="store_true", help="Hydra multirun: the sweep's runs one after another in the job")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job (sbatch --wait) and return its exit code")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register `dialtune slurm` on the subparsers of launch/cli.py."""
    s = sub.add_parser("slurm", help="submit launch/train.py as a SLURM batch job (torchrun on every node)",
                       description="Render an sbatch script for launch/train.py and submit it. Options may come "
                                   "before, between or after the Hydra overrides.", allow_abbrev=False)
    _add_options(s)
    s.add_argument("overrides", nargs=argparse.REMAINDER, help="Hydra overrides, e.g. recipe=lora_bf16 model=<hub id>")
    s.set_defaults(fn=cmd_slurm)
    return s


def _split_options(args: argparse.Namespace) -> list:
    """Options that came after the first override (REMAINDER swallowed them): parse them out,
    keep the rest, in order, as overrides."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    _add_options(p)
    _, overrides = p.parse_known_args(list(args.overrides or []), namespace=args)
    return (["-m"] if args.multirun else []) + [o for o in overrides if o != "--"]


def pinned_run_name(overrides: Sequence[str], now: Optional[float] = None) -> str:
    """The run name the config gives these overrides, plus the submission time: one run
    directory per submission (the job's requeues keep it; see the module docstring)."""
    import time as _time

    from launch.prepare import compose, plain_overrides

    plain = plain_overrides(overrides)  # a sweep: its first job's name
    try:
        name = compose(plain).run.name
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf errors: one sentence, before anything is queued
        from launch.prepare import compose_problem

        raise SlurmError(compose_problem(e, plain)) from None
    # (and this process's id: two submissions in the same second, a loop of `dialtune slurm ... &`, stay apart)
    return f"{name}-{_time.strftime('%Y%m%d-%H%M%S', _time.localtime(now))}-{os.getpid()}"


def cmd_slurm(args: argparse.Namespace) -> int:
    overrides = _split_options(args)
    if override_value(overrides, "run.name") is None:
        try:
            overrides.append(f"run.name={pinned_run_name(overrides)}")
        except SlurmError as e:
            print(f"dialtune: error: {e}", file=sys.stderr)
            return 2
    from launch.prepare import override_problem

    # what the job would stop on, said before it queues (paths are the nodes' business); a dry run shows the script anyway
    if problem := override_problem(overrides, validate=True, cuda_available=args.gpus_per_node > 0, files=False):
        print(f"dialtune: {'warning' if args.dry_run else 'error'}: {problem}", file=sys.stderr)
        if not args.dry_run:
            return 2
    log_dir = args.log_dir or default_log_dir(overrides)
    try:
        script = render(overrides, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                        nproc_per_node=args.nproc_per_node, cpus_per_task=args.cpus_per_task, mem=args.mem,
                        time=args.time, partition=args.partition, account=args.account, qos=args.qos,
                        job_name=args.job_name or default_job_name(overrides),
                        signal_seconds=args.signal_seconds, log_dir=log_dir)
    except SlurmError as e:
        print(f"dialtune: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    if shutil.which("sbatch") is None:
        print("dialtune: error: sbatch is not on PATH; run this on a SLURM login node (or `bash .ci/setup_slurm.sh` "
              "for a local one-node cluster), or use --dry-run to see the script.", file=sys.stderr)
        return 2
    job_name = args.job_name or default_job_name(overrides)
    os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the --output directory
    path = os.path.join(log_dir, f"{job_name}.sbatch")
    with open(path, "w") as f:
        f.write(script)
    log = os.path.join(log_dir, f"{job_name}-<job id>.out")
    if args.wait:
        proc = subprocess.Popen(["sbatch", "--parsable", "--wait", path], stdout=subprocess.PIPE, text=True)
        job_id = (proc.stdout.readline() or "").strip().split(";")[0]  # printed once submitted, before the wait
        if not job_id:
            code = proc.wait()
            print(f"dialtune: error: sbatch failed with exit code {code} (its message is above).", file=sys.stderr)
            return code or 1
        print(job_id, flush=True)
        print(f"dialtune: submitted job {job_id} ({path}), waiting for it; log: {log.replace('<job id>', job_id)}",
              file=sys.stderr, flush=True)
        code = proc.wait()
        print(f"dialtune: job {job_id} finished with exit code {code}", file=sys.stderr, flush=True)
        return code
    proc = subprocess.run(["sbatch", "--parsable", path], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"dialtune: error: sbatch failed with exit code {proc.returncode} (its message is above).", file=sys.stderr)
        return proc.returncode
    job_id = proc.stdout.strip().split(";")[0]
    print(job_id)
    print(f"dialtune: submitted job {job_id} ({path}); log: {log.replace('<job id>', job_id)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    # Batch scripts rendered before the node launcher had its own file call
    # `python launch/slurm.py torchrun ...`: a requeued job of theirs still starts.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    if len(sys.argv) > 1 and sys.argv[1] == "torchrun":
        sys.exit(node_launcher.torchrun_main(sys.argv[2:]))
    print("usage: submit jobs with `dialtune slurm`; the batch script's per-node launcher is launch/node_launcher.py",
          file=sys.stderr)
    sys.exit(2)
