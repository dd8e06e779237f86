"""Preemption: SIGUSR1/SIGTERM only set a flag; the loop acts on it at the next step boundary
(all ranks agree through the step's all-reduce) and saves. After SIGUSR1 (SLURM's warning before
the time limit) the process exits with REQUEUE_EXIT_CODE so the SLURM script requeues the job;
after SIGTERM alone (scancel, preemption, a plain `kill`) it exits TERM_EXIT_CODE and asks for
nothing: a cancelled job must stay cancelled."""
from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 85
TERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a process killed by SIGTERM reports


class StopFlag:
    """Installed before data preparation and model loading. Until `armed` (the training loop is
    about to start, so there is something to save) SIGTERM ends the process at once with
    TERM_EXIT_CODE instead of waiting through a long load; SIGUSR1 is kept for the first step
    boundary (a checkpoint, then the requeue)."""

    def __init__(self):
        self.usr1 = self.term = self.armed = False

    def __call__(self, signum, frame):
        if signum == signal.SIGUSR1:
            self.usr1 = True
        elif not self.armed:
            raise SystemExit(TERM_EXIT_CODE)
        else:
            self.term = True


def install() -> StopFlag:
    flag = StopFlag()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, flag)
    return flag


def ignore_further() -> None:
    """After the save a second signal must not kill the process before it exits 85."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
