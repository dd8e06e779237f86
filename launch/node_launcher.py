"""The per-node launcher of `dialtune slurm` jobs (launch/slurm.py renders the batch script): each
node's srun task runs

    python launch/node_launcher.py --nnodes N --node_rank R --nproc_per_node P ... launch/train.py <overrides>

the same `torch.distributed.run` code as torchrun, plus two things plain torchrun does not do:
- it passes the ranks' exit code 85 (REQUEUE_EXIT_CODE) through (torchrun turns every failed
  rank into exit code 1);
- on SIGUSR1 and SIGTERM it keeps waiting for the ranks, instead of dying on SIGUSR1 or
  killing them 30 s after SIGTERM, so that they can finish a checkpoint (torch >= 2.13 reads
  the signals it handles itself from PET_SIGNALS_TO_HANDLE, older ones from
  TORCHELASTIC_SIGNALS_TO_HANDLE: both are set). Inside a SLURM step
  the ranks get the signal from SLURM itself (proctrack/cgroup and proctrack/linuxproc signal
  every process of the step), so it is passed on only where SLURM would miss them
  (proctrack/pgid: torchrun starts ranks in their own session) or outside SLURM; a second copy
  could reach a rank while it is already exiting, when Python has restored the default
  (fatal) action.

Run as a script by the job, so it imports nothing of dialtune's (launch/ heads sys.path there,
and launch/train.py would shadow the `train` package).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REQUEUE_EXIT_CODE = 85
"""Exit code of a training process that saved a checkpoint after SIGUSR1/SIGTERM and wants
its SLURM job requeued (the batch script runs `scontrol requeue` and exits 0). The same as
train/signals.py's (tests/test_preemption.py checks)."""


def _ranks_need_forwarded_signals() -> bool:
    """Whether the launcher must pass SIGUSR1/SIGTERM on to its ranks: outside a SLURM step, or
    in one whose proctrack plugin signals only the task's process group (DIALTUNE_FORWARD_SIGNALS
    =1/0 decides when set)."""
    forced = os.environ.get("DIALTUNE_FORWARD_SIGNALS")
    if forced in ("0", "1"):
        return forced == "1"
    if "SLURM_STEP_ID" not in os.environ:
        return True
    try:
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return re.search(r"^ProctrackType\s*=\s*proctrack/pgid\s*$", config, re.M) is not None


def node_rank(argv: Sequence[str], env) -> str:
    """The node this launcher runs on, as its lines name it: SLURM_NODEID in a SLURM step, else
    torchrun's own --node_rank (`--node_rank N`, `--node_rank=N`, or the --node-rank spelling; 0,
    torchrun's default, when not given; parsed here, before torch is imported, so that the signal
    handlers are in place at once)."""
    if env.get("SLURM_NODEID"):
        return env["SLURM_NODEID"]
    args = list(argv)
    for i, arg in enumerate(args):
        if arg in ("--node_rank", "--node-rank") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(("--node_rank=", "--node-rank=")):
            return arg.split("=", 1)[1]
    return "0"


def torchrun_main(argv: Sequence[str]) -> int:
    """`python launch/slurm.py torchrun <torchrun arguments>`: torch.distributed.run, except that
    SIGUSR1/SIGTERM are forwarded to the ranks (torchrun keeps monitoring them) and a rank's exit
    code REQUEUE_EXIT_CODE becomes this process's exit code."""
    import signal

    import psutil

    # torchrun would die on SIGUSR1 and kill the ranks 30 s after SIGTERM: keep those two for us
    # (torch >= 2.13 takes its --signals-to-handle from PET_SIGNALS_TO_HANDLE, older ones read
    # TORCHELASTIC_SIGNALS_TO_HANDLE).
    os.environ["PET_SIGNALS_TO_HANDLE"] = os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    node = node_rank(argv, os.environ)
    forwarding = _ranks_need_forwarded_signals()

    def forward(signum, frame):
        name = signal.Signals(signum).name
        if not forwarding:
            print(f"dialtune: node {node} got {name} (SLURM delivers it to the ranks too); waiting for them",
                  file=sys.stderr, flush=True)
            return
        ranks = psutil.Process().children()
        for child in ranks:
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass
        print(f"dialtune: node {node} got {name}, forwarded it to {len(ranks)} rank(s)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    _quiet_expected_exits()

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(argv)))
        return 0
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        if REQUEUE_EXIT_CODE in codes.values():
            print(f"dialtune: node {node}: training exited with {REQUEUE_EXIT_CODE} (checkpoint saved, requeue)",
                  file=sys.stderr, flush=True)
            return REQUEUE_EXIT_CODE
        rank, first = e.get_first_failure()  # the one that failed first: the others may be torchrun's kills
        code = first.exitcode
        print(f"dialtune: node {node}: rank {rank} exited with code {code}"
              + (f" first ({len(codes) - 1} other rank(s) stopped after it)" if len(codes) > 1 else ""),
              file=sys.stderr, flush=True)
        return 128 - code if code < 0 else (code or 1)
    except SignalException as e:
        return 128 + int(e.sigval)


def _quiet_expected_exits() -> None:
    """torch-elastic logs every rank that exits non-zero as an ERROR ("failed (exitcode: 85)"):
    not the ranks that stopped as asked (85: checkpoint saved, requeue; 143: SIGTERM, saved) or
    with dialtune's one-sentence error (2: said above it). What failed is said in one line either way."""
    import logging
    import signal

    expected = {2, REQUEUE_EXIT_CODE, 128 + signal.SIGTERM, -signal.SIGTERM}

    def keep(record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("failed (exitcode") and record.args and record.args[0] in expected)

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(keep)


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.exit(torchrun_main(sys.argv[1:]))
