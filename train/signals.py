"""Preemption: SIGUSR1/SIGTERM only set a flag; the loop acts on it at the next step boundary
(all ranks agree through the step's all-reduce), saves, and the process exits with
REQUEUE_EXIT_CODE so a SLURM script can requeue the job."""
from __future__ import annotations

import signal

REQUEUE_EXIT_CODE = 85


class StopFlag:
    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum != 0


def install() -> StopFlag:
    flag = StopFlag()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, flag)
    return flag


def ignore_further() -> None:
    """After the save a second signal must not kill the process before it exits 85."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
