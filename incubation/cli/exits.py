"""The `incubation` command's exit policy: one line for the user's and the environment's faults,
a traceback for bugs.

Exit status (EXIT_STATUS): 0 done, 1 the run failed with a one-line error, 2 a bad command line,
130 interrupted, 143 terminated; bugs keep their traceback, and INCUBATION_DEBUG=1 shows every
traceback. A handler raises UsageError for what the parser cannot check alone.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from typing import Callable, Optional

from ..errors import IncubationError, UsageError

__all__ = ["EXIT_STATUS", "UsageError", "error_message", "run_main", "exit_status"]

EXIT_STATUS = """exit status: 0 done; 1 the run failed for a reason the user or the environment must fix (one line
on stderr: bad or missing files, disk full, permissions, a failed job, ...); 2 the command line is
wrong (argparse's usage line and the option at fault); 130 interrupted (143: SIGTERM while --parallel
jobs ran; they end too). Any other exception is a bug and keeps its traceback; INCUBATION_DEBUG=1
shows the traceback of every failure."""



def _free_bytes(path: str) -> Optional[int]:
    here = os.path.dirname(os.path.abspath(path))
    while here and not os.path.isdir(here):
        here = os.path.dirname(here)
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def _file_in_the_way(path: str) -> Optional[str]:
    """The existing non-directory that `path` needs to be a directory (ENOTDIR), if any."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if os.path.exists(parent) and not os.path.isdir(parent):
            return parent
        parent = os.path.dirname(parent)
    return None


def _os_error_message(exc: OSError) -> str:
    if exc.errno is None:  # our own FileNotFoundError("... run `incubation meta` first") and the like
        return str(exc)
    names = [os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else str(f)
             for f in (exc.filename, exc.filename2) if f is not None]
    where = " -> ".join(names)  # '' when the failing call had no path (a write() to an open file)
    if exc.errno == errno.ENOSPC:
        needed = getattr(exc, "bytes_needed", None)  # set by a writer that knows its size
        free = _free_bytes(names[0]) if names else None
        sizes = [f"{needed} bytes needed"] * (needed is not None) + [f"{free} bytes free"] * (free is not None)
        return ("disk full: no space left on the device" + (f" to write {where}" if where else "")
                + (f" ({', '.join(sizes)})" if sizes else ""))
    if not where:
        return exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if exc.errno == errno.EROFS:
        return f"read-only file system: cannot write {where}"
    if exc.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(names[0])
        return f"{blocker} is a file, not a directory (needed for {where})" if blocker else f"not a directory: {where}"
    if exc.errno == errno.EEXIST and os.path.exists(names[0]) and not os.path.isdir(names[0]):
        return f"{where} is a file, not a directory"
    if exc.errno == errno.ENOENT:
        return f"no such file or directory: {where}"
    return f"{exc.strerror}: {where}"


def error_message(exc: BaseException) -> Optional[str]:
    """The one-line message of an expected failure (the user's input or the environment is at
    fault), or None for a bug, which keeps its traceback."""
    if isinstance(exc, IncubationError):
        text = str(exc)
        if "Original Traceback" in text:   # re-raised from a DataLoader worker: keep the worker's last line
            last = text.strip().splitlines()[-1]
            head, _, message = last.partition(": ")
            text = message if head.endswith(type(exc).__name__) else last
        return text
    if isinstance(exc, OSError):
        return _os_error_message(exc)
    if isinstance(exc, ValueError):
        return str(exc)
    return None


def exit_status(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def run_main(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run a command's body and turn how it ends into the exit status of EXIT_STATUS."""
    debug = os.environ.get("INCUBATION_DEBUG", "") not in ("", "0")
    try:
        return body() or 0
    except SystemExit as exc:  # argparse of a nested command (bench) has printed its message
        return exit_status(exc)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except Exception as exc:  # noqa: BLE001 - sorted into expected failures and bugs right here
        message = error_message(exc)
        if message is None or debug:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1

