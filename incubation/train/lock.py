"""One writer per run directory: an advisory lock file `<dir>/.lock`.

The lock is `fcntl.flock` on an open file descriptor kept for the whole run, so the kernel
drops it when the holder exits, however it dies: a lock left by a killed process is simply
not held and the next run takes it over. The file holds the holder's pid, host and start time
(JSON) so that a refused writer can say who is in the way. It is removed on release.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings

from ..errors import IncubationError

__all__ = ["RunDirLocked", "RunDirLock", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunDirLocked(IncubationError, RuntimeError):
    """Another process is writing into this run directory."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        who = f"pid {int(info['pid'])} on host {info['host']} (started {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"
    try:
        if info["host"] == socket.gethostname():
            os.kill(int(info["pid"]), 0)
    except ProcessLookupError:  # the lock is shared with the children it forked (data loader workers)
        who += ", which has exited; its child processes still hold the lock"
    except OSError:
        pass  # exists, owned by another user
    return who


class RunDirLock:
    """`with RunDirLock(directory):` holds the directory's lock, or raises RunDirLocked at once."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.fd = None

    def acquire(self) -> "RunDirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirLocked(f"{self.directory} is in use by {_holder(self.path)} (lock file {self.path}): "
                                   f"wait for that run to end or choose another output directory") from None
            except OSError as exc:  # a file system without flock: run unprotected rather than not at all
                os.close(fd)
                warnings.warn(f"cannot lock {self.path} ({exc}): a second writer to {self.directory} "
                              f"would not be stopped")
                return self
            # The holder we raced with may have removed the file on release after we opened it:
            # our lock then guards a deleted file, so start again on the one now at the path.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)  # a stale holder's name
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.remove(self.path)  # still holding the lock: see the check in acquire
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
