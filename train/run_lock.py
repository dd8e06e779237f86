"""One training at a time per run directory.

Two trainings started into one run directory (the same run.name twice, a loop of submissions that
pin it) would set each other's results aside, write each other's checkpoints and `merged/`, and
each report the other's model as its own. Rank 0 holds an flock on `<run_dir>/.dialtune-lock` for
as long as its process trains there (the kernel releases it however the process ends, so a killed
or requeued job leaves no stale lock on a local disk); a second training is refused in one
sentence naming the first. A lock held from another host (a shared filesystem) is waited for a
while first: NFS keeps a crashed client's lock until its lease runs out. Filesystems without
flock (some Lustre mounts) run without the lock.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Dict, Optional

from data_pipeline.cache_lock import read_holder

LOCK_NAME = ".dialtune-lock"
OTHER_HOST_WAIT_S = 90.0  # NFSv4's default lease, after which a crashed holder's lock is released

_held: Dict[str, int] = {}  # run dir -> fd of the lock this process holds
_BUSY = (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN)  # flock's "another process holds it"


class RunDirInUse(Exception):
    """Another training holds the run directory (the message is one sentence)."""


def _in_use(run_dir: str, holder: str) -> str:
    parts = holder.split(" ")
    who = f" (pid {parts[1]} on {parts[0]}, started {' '.join(parts[2:])})" if len(parts) > 2 else ""
    return (f"{run_dir} is in use by another training{who}: wait for it to end, or give this run another run.name "
            "(two trainings in one run directory would overwrite each other's checkpoints and results).")


def in_use_problem(run_dir: str) -> Optional[str]:
    """claim()'s sentence when another process on this host trains in run_dir now, without claiming
    it: checked before Hydra writes its record (hydra/) into the directory; else None. A holder on
    another host is left to claim(), which waits for a crashed node's NFS lock to lapse (a job
    requeued after the crash must not be refused for it)."""
    if held_elsewhere(run_dir):
        holder = read_holder(os.path.join(run_dir, LOCK_NAME))
        if holder.split(" ")[0] in ("", socket.gethostname()):
            return _in_use(os.path.realpath(run_dir), holder)
    return None


def claim(run_dir: str, wait_other_host_s: float = OTHER_HOST_WAIT_S) -> Optional[str]:
    """Take the run directory's lock for this process (releasing one it holds for another run
    directory: a sweep's next job); returns None, or the sentence why another training has it."""
    run_dir = os.path.realpath(run_dir)
    for other in [d for d in _held if d != run_dir]:
        os.close(_held.pop(other))
    if run_dir in _held:
        return None
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in _BUSY:  # no flock here: run without it
                os.close(fd)
                return None
        holder = read_holder(path)  # "host pid started"
        host = holder.split(" ")[0] if holder else ""
        if host and host != socket.gethostname():
            deadline = deadline or time.monotonic() + wait_other_host_s
            if time.monotonic() < deadline:
                time.sleep(2.0)
                continue
        os.close(fd)
        return _in_use(run_dir, holder)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    _held[run_dir] = fd
    return None


def claim_for_all(run_dir: str, rank: int) -> None:
    """Rank 0 claims the run directory; every rank raises RunDirInUse with its sentence when taken."""
    import torch.distributed as dist

    problem = [claim(run_dir) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        raise RunDirInUse(problem[0])


def held_elsewhere(run_dir: str) -> bool:
    """Whether another process trains in run_dir now (holds its lock)."""
    run_dir = os.path.realpath(run_dir)
    path = os.path.join(run_dir, LOCK_NAME)
    if run_dir in _held or not os.path.exists(path):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in _BUSY
    finally:
        os.close(fd)
