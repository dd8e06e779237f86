"""Preemption: SIGUSR1/SIGTERM only set a flag; the loop acts on it at the next step boundary
(all ranks agree through the step's all-reduce) and saves. After SIGUSR1 (SLURM's warning before
the time limit) the process exits with REQUEUE_EXIT_CODE so the SLURM script requeues the job;
after SIGTERM alone (scancel, preemption, a plain `kill`) it exits TERM_EXIT_CODE and asks for
nothing: a cancelled job must stay cancelled.

The merge at the end of a finished run is not a step: a signal that arrives after the last step
boundary (during the final eval, the save) or during the merge stops the merge instead (see
`stopping`), and the process exits with the same codes: the requeued job (train.resume=auto)
finds the run finished and writes the merge with a fresh time allocation.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from typing import Iterator, List, Optional, Tuple

REQUEUE_EXIT_CODE = 85
TERM_EXIT_CODE = 128 + signal.SIGTERM  # 143, what a process killed by SIGTERM reports
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # the two this module handles


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


_installed: Optional[StopFlag] = None


def install() -> StopFlag:
    """Handle SIGUSR1/SIGTERM with a new flag (launch/train.py installs one before its imports, the
    recipe again at its start: a SIGUSR1 the earlier one kept carries over)."""
    global _installed
    flag, earlier = StopFlag(), _installed
    _installed = flag
    for sig in SIGNALS:
        signal.signal(sig, flag)
    if earlier is not None and not earlier.armed:  # (after the swap: one that came meanwhile reached either)
        flag.usr1 = flag.usr1 or earlier.usr1
    return flag


class Stopped(BaseException):
    """Raised by `stopping` for SIGUSR1/SIGTERM; a BaseException, as KeyboardInterrupt is, so that
    no library's `except Exception` swallows it. `signal_name`: "SIGUSR1" or "SIGTERM"."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return REQUEUE_EXIT_CODE if self.signal_name == "SIGUSR1" else TERM_EXIT_CODE


_lost: Optional[str] = None  # the signal of a Stopped that `stopping` raised where Python can only print it


@contextlib.contextmanager
def stopping() -> Iterator[None]:
    """Run the block (the final merge) so that SIGUSR1/SIGTERM abort it with Stopped: at once when
    one already reached the installed flag after the training loop's last look, else when it
    arrives. Raised inside a finalizer or a weakref callback, the exception is lost (Python prints
    it and goes on): it is kept instead and raised again where the block commits its work
    (check_stop). The previous handlers come back afterwards."""
    global _lost
    if _installed is not None and (_installed.usr1 or _installed.term):
        raise Stopped("SIGUSR1" if _installed.usr1 else "SIGTERM")

    def stop(signum, frame):
        global _lost
        ignore_further()  # one-shot: a second signal must not break the cleanup
        _lost = signal.Signals(signum).name  # (until it gets through)
        raise Stopped(_lost)

    def unraisable(info):
        if not isinstance(info.exc_value, Stopped):
            hook(info)

    _lost, hook, sys.unraisablehook = None, sys.unraisablehook, unraisable
    previous = {sig: signal.signal(sig, stop) for sig in SIGNALS}
    try:
        yield
    except Stopped:
        _lost = None
        raise
    finally:
        sys.unraisablehook = hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_stop() -> None:
    """Where a `stopping` block commits its work (the export taking its place): raise the Stopped
    that a signal raised where it was lost."""
    if _lost:
        raise Stopped(_lost)


def pending() -> Optional[str]:
    """"SIGUSR1" or "SIGTERM" when one reached the installed flag and nothing answered it yet (it
    came after the training loop's last look, and no merge ran to stop for it); else None."""
    if _installed is not None and (_installed.usr1 or _installed.term):
        return "SIGUSR1" if _installed.usr1 else "SIGTERM"
    return None


def ignore_further() -> None:
    """After the save a second signal must not kill the process before it exits 85."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


SUPERVISOR_ENV = "DIALTUNE_SUPERVISOR"  # "host:pid:start time" of the `dialtune train` that runs the ranks


def _process(pid: int) -> Tuple[str, str]:
    """(state, start time) of a process from /proc/<pid>/stat; ("X", "") when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "X", ""


def supervisor_value() -> str:
    """SUPERVISOR_ENV's value naming this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process(os.getpid())[1]}"


def follow_supervisor(interval: float = 1.0) -> None:
    """A rank started by `dialtune train` (SUPERVISOR_ENV set) ends at once when that command is
    gone (kill -9, a process-group SIGKILL, SIGQUIT): the launcher chain runs in a session of its
    own, out of reach of what ends the command, and would otherwise train on unattended."""
    host, _, rest = os.environ.pop(SUPERVISOR_ENV, "").partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or not start:  # (a rank on another node: not ours to watch)
        return

    def watch():
        while True:
            state, started = _process(int(pid))
            if state in ("Z", "X") or started != start:
                break
            time.sleep(interval)
        try:
            print(f"dialtune: the `dialtune train` command (pid {pid}) that started this process is gone; "
                  "stopping now", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dialtune-supervisor", daemon=True).start()


def continue_when_gone(me: int, group: int, ranks: List[int]) -> None:
    """The watcher of a stopped `dialtune train` (launch/ranks.py, Ctrl-Z): once process `me` is
    gone, SIGCONT to the ranks and to the launcher's process group, which then end as above."""
    while _process(me)[0] not in ("Z", "X"):
        time.sleep(0.5)
    for pid in ranks:
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
    try:
        os.killpg(group, signal.SIGCONT)
    except OSError:
        pass


if __name__ == "__main__":  # python -m train.signals <me> <group> <rank pids>: continue_when_gone
    continue_when_gone(int(sys.argv[1]), int(sys.argv[2]), [int(a) for a in sys.argv[3:]])
