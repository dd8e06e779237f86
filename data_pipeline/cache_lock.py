"""The cache-build lock of data_pipeline/cache.py: one builder per cache key, and a killed
builder blocks nobody (flock, released by the kernel however its holder exits; an O_EXCL file
with dead-pid takeover on filesystems without flock).

An flock belongs to the open file, which fork shares: a process forked while the lock is held
(the `datasets` map workers of data.num_proc > 1) would keep it after the builder was killed,
and such workers, orphaned, wait forever. So a child forked while this process holds a lock
closes its copy of the lock's fd at once and is killed by the kernel when its parent dies."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import socket
import sys
import threading
import time
from typing import Callable, Optional

_held_fds: set = set()  # flock'd fds of the locks this process holds
_holding = 0  # locks (of either kind) this process holds
_holder_pid = 0  # the process that took them (a forked child is not it)
_main_forks = True  # the thread that forks now is the main thread
_PR_SET_PDEATHSIG = 1


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()  # resolved here: a forked child of a threaded parent should not load libraries


def _forking() -> None:
    """Before fork, in the parent: note whether the main thread forks (see _in_forked_child)."""
    global _main_forks
    _main_forks = threading.current_thread() is threading.main_thread()


def _in_forked_child() -> None:
    """After fork, in the child: drop this process's locks and die with the parent (it is a worker
    of the build, e.g. a datasets map worker, that must neither outlive it nor hold its lock)."""
    global _holding
    if not _holding:
        return
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()
    _holding = 0
    if _LIBC is not None and _main_forks:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    else:  # the kernel's signal follows the forking *thread*, and a pool's helper thread that starts a replacement
        # worker ends before the pool: the worker would die too soon, holding the pool's queue lock (terminate hangs)
        threading.Thread(target=_exit_with_parent, daemon=True).start()
    if os.getppid() != _holder_pid:  # the parent died before we looked: nobody would signal us
        os._exit(1)


def _exit_with_parent() -> None:
    while os.getppid() == _holder_pid:
        time.sleep(1)
    os._exit(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_forking, after_in_child=_in_forked_child)


def _hold(fd: Optional[int]) -> None:
    global _holding, _holder_pid
    if fd is not None:
        _held_fds.add(fd)
    _holding += 1
    _holder_pid = os.getpid()


def _unhold(fd: Optional[int]) -> None:
    global _holding
    _held_fds.discard(fd)
    _holding = max(0, _holding - 1)


def _holder_line() -> str:
    return f"{socket.gethostname()} pid {os.getpid()} since {time.ctime()}\n"


def read_holder(lock: str) -> str:
    try:
        with open(lock) as f:
            return f.read().strip()
    except OSError:
        return ""


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def take_lock(lock: str) -> Optional[Callable[[], None]]:
    """The release function of the build lock, or None while a live process holds it.

    An flock on the lock file: the kernel drops it when its holder exits, however it exits (kill
    -9, OOM, SIGTERM), so a killed build leaves nothing that blocks the next run. The file is
    unlinked on release, hence the inode check: a lock on a file another process just unlinked
    guards nothing. Filesystems without flock (Lustre mounted without -o flock) get an O_EXCL
    file instead, which a process on the holder's host takes over once that pid is gone.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)  # 0o666 & umask, not os.open's 0o777
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            return _take_excl_lock(lock + ".excl")
        try:
            st, now = os.fstat(fd), os.stat(lock)
            current = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            current = False
        if not current:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, _holder_line().encode())
        _hold(fd)

        def release():
            _remove(lock)  # while still holding it: a waiter that opened this file sees the inode change
            _unhold(fd)
            os.close(fd)

        return release


def _take_excl_lock(lock: str) -> Optional[Callable[[], None]]:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if not holder_is_dead(lock):
                return None
            _remove(lock)  # its holder died on this host: take over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_holder_line())
        _hold(None)

        def release():
            _unhold(None)
            _remove(lock)

        return release
    return None


def holder_is_dead(lock: str) -> bool:
    """True only for a holder on this host whose pid no longer exists (elsewhere: unknowable)."""
    try:
        host, _, pid = read_holder(lock).split()[:3]
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        return False
    return False
