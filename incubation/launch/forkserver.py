"""The local launcher's fork server: one process imports torch, timm and incubation once, then
forks each `python -m module ...` job, which so starts without those imports (about 4 CPU-s a
job here; a pipeline runs one job per stage).

A forked job gets what a new process of the job's command line would: its environment, working
directory, log (stdout and stderr, appended; stdin /dev/null), thread count, fresh Python and
NumPy random seeds, `sys.argv`, and an exit status (a signal's as a negative status). The server
dies with the launcher and the jobs with the server (PR_SET_PDEATHSIG), so none runs on as an
orphan. It serves only Linux machines without CUDA: a process that has touched the CUDA driver cannot
fork a child that uses it, and the server's imports are not checked on a GPU machine. Jobs that
need another interpreter, several ranks or environment variables of their own run as plain
processes; `INCUBATION_FORK_SERVER=0` runs every job so.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import importlib
import itertools
import json
import os
import random
import runpy
import select
import signal
import subprocess
import sys
import threading
import traceback
from typing import Callable, Optional

PRELOAD = ("torch", "timm", "incubation.cli", "incubation.train", "incubation.pipeline")
# a server that has not forked a job this long after being asked hangs (in its imports, say): it is
# stopped, and its jobs fail saying so
START_TIMEOUT_S = 300.0
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a forked child: get SIGKILL when the parent dies (Linux's PR_SET_PDEATHSIG; elsewhere
    children outlive a SIGKILLed parent)."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def enabled() -> bool:
    """Whether jobs may run as forks here (see the module docstring)."""
    # Linux only: PR_SET_PDEATHSIG ends the forks with the server, and macOS's frameworks are not safe
    # to use in a fork of a process that loaded them
    if os.environ.get("INCUBATION_FORK_SERVER", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import torch
    return not torch.cuda.is_available()


def serves(job) -> bool:
    """Whether a `launch.Job` may run as a fork: `python -m` of this interpreter, one process,
    no environment of its own."""
    r, argv = job.resources, job.argv
    return (r.nodes * r.tasks_per_node <= 1 and not job.env and len(argv) >= 3 and argv[0] == sys.executable
            and argv[1] == "-m")


# --------------------------------------------------------------------------------------
# the server process
# --------------------------------------------------------------------------------------
def serve(launcher: int) -> None:
    """The server's main loop: requests (one JSON line each) on stdin, reports on stdout."""
    die_with_parent(launcher)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the launcher stops the jobs; this reports their ends
    reports, server = os.dup(1), os.getpid()
    os.dup2(2, 1)   # what the imports print must not mix with the reports
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass   # the job imports it, and says why if it fails
    sys.stdout.flush()
    children: dict[int, int] = {}   # pid -> request id
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.02 if children else 1.0)
        if readable:
            data = os.read(0, 1 << 16)
            if not data:   # the launcher closed its end, or died: its jobs die with this process
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request, server, reports)
                children[pid] = request["id"]
                _report(reports, {"id": request["id"], "pid": pid})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            _report(reports, {"id": children.pop(pid), "status": os.waitstatus_to_exitcode(status)})


def _report(reports: int, message: dict) -> None:
    os.write(reports, (json.dumps(message) + "\n").encode())


def _child(request: dict, server: int, reports: int) -> None:
    """In the forked child: become the job's process, run its module, exit with its status."""
    code = 1
    try:
        die_with_parent(server)
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (log, 1), (log, 2)):
            os.dup2(fd, target)
        for fd in (log, null, reports):
            os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        random.seed()   # a new process draws its own seeds; forks would share the server's
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        import torch
        torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS") or torch.get_num_threads()))
        module, *args = request["argv"][2:]
        sys.argv = [module, *args]
        code = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else (print(exc.code, file=sys.stderr) or 1)
        except KeyboardInterrupt:   # as Python ends on an unhandled Ctrl-C: killed by SIGINT
            code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - the job's traceback goes to its log, as a process's would
        traceback.print_exc()
        code = 1
    finally:   # what Python does on its way out: the exit handlers, then the streams flushed
        for ending in (atexit._run_exitfuncs, sys.stdout.flush, sys.stderr.flush):
            try:
                ending()
            except BaseException:  # noqa: BLE001 - nothing left to tell it to
                pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


# --------------------------------------------------------------------------------------
# the launcher's side
# --------------------------------------------------------------------------------------
class Forked:
    """A job forked by the server, with the part of subprocess.Popen's surface the launcher uses."""

    def __init__(self, log: str, on_exit: Callable[[], None]):
        self.log, self.pid = log, None
        self.returncode: Optional[int] = None
        self.on_exit = on_exit
        self.started, self.ended = threading.Event(), threading.Event()

    def poll(self) -> Optional[int]:
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"job {self.pid}", timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None and self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass   # it ended; the server is reporting it

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def end(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
            self.started.set()
            self.ended.set()
            self.on_exit()


class ForkServer:
    """The server, started at once (its imports run while the launcher goes on) with the
    environment its jobs share; `start` forks a job, `close` ends the server."""

    def __init__(self, env: dict):
        code = f"from incubation.launch import forkserver; forkserver.serve({os.getpid()})"
        self.process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=env)   # (its imports' warnings: once)
        self.jobs: dict[int, Forked] = {}
        self.ids = itertools.count()
        self.stalled = False
        threading.Thread(target=self._read, daemon=True).start()

    def start(self, argv, env: dict, log: str, on_exit: Callable[[], None]) -> Forked:
        job_id, forked = next(self.ids), Forked(log, on_exit)
        self.jobs[job_id] = forked
        request = {"id": job_id, "argv": list(argv), "env": env, "log": os.path.abspath(log), "cwd": os.getcwd()}
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        except OSError:
            self._lost(forked)
        if not forked.started.wait(START_TIMEOUT_S):   # the pid, once the server has imported and forked
            self.stalled = True
            self.process.kill()   # its reader then sees the end and fails every job (_lost)
            forked.started.wait()
        return forked

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            forked = self.jobs[message["id"]]
            if "pid" in message:
                forked.pid = message["pid"]
                forked.started.set()
            else:
                forked.end(message["status"])
        for forked in list(self.jobs.values()):   # the server died: so did its jobs (PR_SET_PDEATHSIG)
            self._lost(forked)

    def _lost(self, forked: Forked) -> None:
        if forked.returncode is None:
            why = f", stopped after {START_TIMEOUT_S:g} s without forking a job" if self.stalled else ""
            with open(forked.log, "a") as log:
                log.write(f"incubation: the local launcher's fork server ended (exit {self.process.poll()}{why}) "
                          "before this job did; rerun, or set INCUBATION_FORK_SERVER=0\n")
            forked.end(-signal.SIGKILL)

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:   # it ends at the end of its input, once its imports are done
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
