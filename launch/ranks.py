"""`dialtune train` / `dialtune demo`: run the launcher command and stand between it and the
signals meant for training.

The deepspeed launcher handles them badly: its runner dies of SIGTERM or SIGUSR1 and leaves the
ranks training; its per-node launcher (deepspeed.launcher.launch), signalled itself, kills the
ranks 30 s later whether they finished their checkpoint or not, and exits 1. So the launcher
chain runs in a session of its own (a Ctrl-C at the terminal or a signal to this command's
process group reaches this process only), and this process passes SIGTERM, SIGUSR1, SIGINT and
SIGHUP (as SIGTERM) on to the ranks themselves (`python [-u] launch/train.py ...`), once each
rank handles the signal (launch/train.py installs its handler before its imports: a signal sent
earlier waits). The ranks save and exit 143 or 85 (Ctrl-C: 130 without a checkpoint), the
launcher passes the code on. A second Ctrl-C stops everything at once. Ctrl-Z stops the chain with
this process, `fg` continues both. What this process cannot pass on (SIGKILL, SIGQUIT) still ends
the ranks: each follows this process (train/signals.follow_supervisor) and stops within a second
of it.

Where something signals every process of the job (SLURM's scancel in a hand-written batch
script), the launchers may die first: this process is the child subreaper of the chain (Linux),
so orphaned ranks become its children and their own exit codes are the command's.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from launch.cli import TRAIN_PY  # what the launch command runs: a process running it is a rank
from train.signals import SUPERVISOR_ENV, supervisor_value

FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGINT,
             signal.SIGHUP: signal.SIGTERM}


def _become_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def handles(pid: int, signum: int) -> bool:
    """Whether process pid has a handler for signum (Linux: SigCgt in /proc/<pid>/status); True
    where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:")).split()[1]
        return bool(int(caught, 16) >> (signum - 1) & 1)
    except (OSError, StopIteration, ValueError, IndexError):
        return True


def is_rank(cmdline: List[str]) -> bool:
    """A training process (python [-u] launch/train.py ...), not a launcher that names the script."""
    return next((a for a in cmdline[1:] if not a.startswith("-")), None) == str(TRAIN_PY)


def outcome(launcher_rc: int, orphan_codes: List[int], signalled: bool) -> int:
    """The command's exit code: the launcher's (killed by a signal: 128 + it), unless a signal came
    and the launcher chain died before its ranks, which this process then reaped: their codes (85
    when any asked for a requeue, else the first failure)."""
    if signalled and orphan_codes:
        if 85 in orphan_codes:
            return 85
        failed = [c for c in orphan_codes if c != 0]
        launcher_rc = failed[0] if failed else 0
    return 128 - launcher_rc if launcher_rc < 0 else launcher_rc


def run_ranks(cmd: List[str], env: Dict[str, str]) -> int:
    """Run the launcher command; returns its exit code (see the module docstring)."""
    import psutil

    _become_subreaper()
    got: List[int] = []  # signals received, in order (the handler only records them)
    pending: List[int] = []  # signals to pass on, not yet delivered to every rank
    ranks: Dict[int, psutil.Process] = {}
    delivered: Dict[int, set] = {}  # rank pid -> signals it got
    codes: Dict[int, int] = {}  # pid -> exit code of what this process reaped besides the launcher (orphans)
    state = {"child": None, "interrupts": 0, "said": 0, "suspend": False}

    def scan() -> None:
        try:
            procs = psutil.Process(os.getpid()).children(recursive=True)
        except psutil.Error:
            procs = []
        for p in procs:
            try:
                if p.pid not in ranks and is_rank(p.cmdline()):
                    ranks[p.pid] = p
            except psutil.Error:
                pass

    def deliver() -> None:
        while state["said"] < len(got):  # what the handler recorded since
            signum = got[state["said"]]
            state["said"] += 1
            pending.append(FORWARDED[signum])
            try:
                print(f"dialtune: got {signal.Signals(signum).name}; passing it on to the training processes"
                      + (" (a second Ctrl-C stops them at once)" if signum == signal.SIGINT else
                         ", which save a checkpoint at the next step and stop"), file=sys.stderr, flush=True)
            except OSError:  # (a terminal that hung up, a pipe whose reader left)
                pass
        scan()  # every round: ranks known before a signal to every process can orphan them
        if not pending:
            return
        if not ranks and state["child"] is not None and not os.path.isdir("/proc"):  # no way to find the ranks: the chain
            for signum in pending:
                try:
                    os.killpg(state["child"].pid, signum)
                except OSError:
                    pass
            pending.clear()
            return
        for signum in list(pending):
            sent = 0
            for pid, p in ranks.items():
                if pid in codes or signum in delivered.setdefault(pid, set()):
                    sent += 1
                elif handles(pid, signum):
                    try:
                        p.send_signal(signum)
                    except psutil.Error:
                        pass
                    delivered[pid].add(signum)
                    sent += 1
            if ranks and sent == len(ranks):
                pending.remove(signum)

    def chain(signum: int) -> None:  # the launcher's process group and every rank still running
        try:
            os.killpg(state["child"].pid, signum)
        except OSError:
            pass
        for pid, p in ranks.items():
            if pid not in codes:
                try:
                    p.send_signal(signum)
                except psutil.Error:
                    pass

    def suspend() -> None:  # Ctrl-Z: the chain stops, then this process; `fg` continues both
        state["suspend"] = False
        scan()
        chain(signal.SIGSTOP)
        # stopped, the ranks cannot see this process go (a `kill -9 %1` now): a watcher in a session of its own
        # continues them if it does, and they end as they do when it goes (train/signals.follow_supervisor)
        live = [str(pid) for pid in ranks if pid not in codes]
        watcher = subprocess.Popen([sys.executable, "-m", "train.signals", str(os.getpid()), str(state["child"].pid), *live],
                                   start_new_session=True, cwd=str(Path(TRAIN_PY).parent.parent), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.kill(os.getpid(), signal.SIGSTOP)
        watcher.kill()
        watcher.wait()
        chain(signal.SIGCONT)

    def on_signal(signum, frame):
        if signum == signal.SIGTSTP:
            state["suspend"] = True
            return
        if signum == signal.SIGINT:
            state["interrupts"] += 1
            if state["interrupts"] > 1:  # a second Ctrl-C: everything stops now
                try:
                    os.killpg(state["child"].pid, signal.SIGKILL)  # the chain's own process group (its session)
                except (OSError, AttributeError):
                    pass
                for p in list(ranks.values()):
                    try:
                        p.kill()  # (psutil: not a pid reused since)
                    except psutil.Error:
                        pass
                return
        got.append(signum)

    # a signal this process ignores (nohup's SIGHUP, a background job's SIGINT) stays ignored
    previous = {sig: signal.signal(sig, on_signal) for sig in (*FORWARDED, signal.SIGTSTP)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        env = {**env, SUPERVISOR_ENV: supervisor_value()}
        child = state["child"] = subprocess.Popen(cmd, env=env, start_new_session=True)

        def reap() -> None:  # the launcher, and ranks orphaned to this process
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    return
                if not pid:
                    return
                code = os.waitstatus_to_exitcode(status)
                if pid == child.pid:
                    child.returncode = code
                else:
                    codes[pid] = code

        while True:
            time.sleep(0.5)
            if state["suspend"]:
                suspend()
            deliver()
            reap()
            # done once the launcher and every rank have ended (another process the chain left behind is not waited for)
            if child.returncode is not None and not any(_running(p) for pid, p in ranks.items() if pid not in codes):
                break
        reap()
        launcher_rc = child.returncode
        if state["interrupts"] > 1:
            return 130
        return outcome(launcher_rc, [codes[pid] for pid in sorted(codes) if pid in ranks], bool(got))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
