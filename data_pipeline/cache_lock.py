"""The cache-build lock of data_pipeline/cache.py: one builder per cache key, and a killed
builder blocks nobody (flock, released by the kernel however its holder exits; an O_EXCL file
with dead-pid takeover on filesystems without flock)."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Callable, Optional


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

        def release():
            _remove(lock)  # while still holding it: a waiter that opened this file sees the inode change
            os.close(fd)

        return release


def _take_excl_lock(lock: str) -> Optional[Callable[[], None]]:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            if not _holder_is_dead(lock):
                return None
            _remove(lock)  # its holder died on this host: take over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_holder_line())
        return lambda: _remove(lock)
    return None


def _holder_is_dead(lock: str) -> bool:
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
