"""The local launcher: run jobs as processes, at most N at once, each on its share of the cores
(and, with several GPUs, on one GPU of its own), in dependency order.

`LocalLauncher(parallel)` is the `Launcher` of `incubation run`, `incubate --all [--parallel N]`
and the study; a job asking for `tasks_per_node` > 1 runs under torchrun on this machine
(`--standalone`, gloo ranks on CPU). A failed job is reported with
its exit status, the last line of its log and the log's path; the jobs that need it (directly or
not) are skipped. If the parent is interrupted (SIGINT, SIGTERM, or an exception) every child gets
the same signal, a short grace period, then SIGKILL: no job keeps writing behind a rerun's back.
If the parent itself is killed (SIGKILL, where nothing can be forwarded), Linux kills its children
(PR_SET_PDEATHSIG): they never run on as orphans. On a machine without CUDA, `python -m` jobs are
forked by a fork server that has imported torch, timm and incubation once (`forkserver`).
"""
from __future__ import annotations

import functools
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from . import Job, check_graph, forkserver

__all__ = ["Job", "Failure", "Outcome", "Interrupted", "LocalLauncher", "run_jobs", "thread_budget", "last_line"]

GRACE_S = 5.0  # between forwarding the parent's signal and SIGKILL


@dataclass
class Failure:
    returncode: int                   # negative: killed by that signal
    log: str
    last_line: str

    def __str__(self) -> str:
        return f"exit {self.returncode}: {self.last_line}; log {self.log}"


@dataclass
class Outcome:
    done: list = field(default_factory=list)       # names, in the order they finished
    failed: dict = field(default_factory=dict)     # name -> Failure
    skipped: dict = field(default_factory=dict)    # name -> the failed or skipped job it needs


class Interrupted(KeyboardInterrupt):
    """The parent got SIGTERM (or SIGINT) while jobs ran; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def thread_budget(parallel: int) -> int:
    """Threads per job: the cores this process may use, shared by `parallel` jobs, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // parallel)


def last_line(log_path: str) -> str:
    """The last non-empty line of a log: a job's one-line error, or the last line of a traceback."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


def run_jobs(jobs: Iterable[Job], parallel: int, done: Iterable[str] = (),
             report: Optional[Callable[[Job, str], None]] = None, grace_s: float = GRACE_S) -> Outcome:
    """Run `jobs` in their order, as soon as what they need has succeeded; `done` names jobs that
    finished before (their dependents may start). `report(job, what)` is told "started",
    "finished", "failed" and "skipped". Raises Interrupted (a KeyboardInterrupt) on SIGTERM or
    SIGINT, after every child has ended."""
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    pending, outcome = list(jobs), Outcome()
    check_graph(pending, done)
    succeeded = set(done)
    # the user's OMP_NUM_THREADS, if set, is kept: CPU results depend on the thread count, so the same
    # count for every job makes serial and --parallel runs bit-identical
    threads = os.environ.get("OMP_NUM_THREADS") or str(thread_budget(parallel))
    running: dict = {}                        # name -> (job, Popen or Forked, slot)
    ended: queue.Queue = queue.Queue()        # names of exited children, from one waiter thread each
    report = report or (lambda job, what: None)
    server = None
    if any(forkserver.serves(j) for j in pending) and forkserver.enabled():   # now: it imports while jobs wait
        server = forkserver.ForkServer(_environment(threads))
    previous = _raise_on_signals()
    try:
        while pending or running:
            for job in list(pending):
                blocker = next((n for n in job.needs if n in outcome.failed or n in outcome.skipped), None)
                if blocker is not None:
                    pending.remove(job)
                    outcome.skipped[job.name] = blocker
                    report(job, "skipped")
                elif len(running) < parallel and all(n in succeeded for n in job.needs):
                    pending.remove(job)
                    slot = min(set(range(parallel)) - {r[2] for r in running.values()})
                    running[job.name] = (job, _start(job, threads, ended, _gpu_env(slot, parallel), server), slot)
                    report(job, "started")
            if not running:
                break
            job, proc, _ = running.pop(ended.get())  # blocks until a child exits (signals still interrupt it)
            if proc.returncode == 0:
                succeeded.add(job.name)
                outcome.done.append(job.name)
                report(job, "finished")
            else:
                outcome.failed[job.name] = Failure(proc.returncode, job.log, last_line(job.log))
                report(job, "failed")
    except BaseException as exc:
        _stop([r[1] for r in running.values()], getattr(exc, "signum", signal.SIGTERM), grace_s)
        raise
    finally:
        _restore(previous)
        if server is not None:
            server.close()
    return outcome


def _gpu_env(slot: int, parallel: int) -> dict:
    """Jobs side by side on a machine with several GPUs: one GPU per slot (job at once)."""
    gpus = _cuda_devices() if parallel > 1 else 0
    return {"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus > 1 else {}


def _cuda_devices() -> int:
    import torch  # only here: the runner itself needs no torch
    return torch.cuda.device_count()


def _environment(threads: str, extra: Optional[dict] = None) -> dict:
    """A job's environment: this one's, its thread count and `extra`. (torch sizes its intra-op pool
    from OMP_NUM_THREADS: N jobs on all cores each would oversubscribe.)"""
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **(extra or {})}


def _start(job: Job, threads: str, ended: queue.Queue, gpu_env: dict, server: Optional[forkserver.ForkServer]):
    """Start the job: forked by `server` where it serves the job, else as a new process."""
    os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
    tasks = job.resources.nodes * job.resources.tasks_per_node
    if tasks > 1:   # its ranks share this job's cores
        threads = str(max(1, int(threads) // tasks))
    env = _environment(threads, {**gpu_env, **job.env})
    if server is not None and forkserver.serves(job):
        return server.start(job.argv, env, job.log, lambda: ended.put(job.name))
    with open(job.log, "a") as log:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(_local_argv(job), stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=functools.partial(forkserver.die_with_parent, os.getpid()))

    def wait():  # a thread per child: the parent sleeps in one queue.get instead of polling
        proc.wait()
        ended.put(job.name)

    threading.Thread(target=wait, daemon=True).start()
    return proc


def _stop(procs: list, signum: int, grace_s: float) -> None:
    """Forward `signum` to the children still running, give them `grace_s`, then SIGKILL; reap all."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut this short
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, signal.SIG_IGN)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _raise_on_signals() -> dict:
    """SIGINT and SIGTERM raise Interrupted in the main thread (SIGTERM's default would end the
    parent at once, leaving its children running); returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; its owner must stop us

    def handler(signum, frame):
        raise Interrupted(signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old if old is not None else signal.SIG_DFL)  # None: set outside Python


def _local_argv(job: Job) -> list:
    """The job's command line here: as it is, or under torchrun for several ranks on this machine."""
    argv, r = list(job.argv), job.resources
    if r.nodes > 1:
        raise ValueError(f"job {job.name} asks for {r.nodes} nodes: the local launcher runs on this machine only")
    if r.tasks_per_node <= 1:
        return argv
    if argv[1:2] == ["-c"]:
        raise ValueError(f"job {job.name}: torchrun runs `python -m module ...` or `python script ...`, not -c")
    return [argv[0], "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={r.tasks_per_node}",
            *argv[1:]]


class LocalLauncher:
    """The `Launcher` that runs a job graph here: `parallel` jobs at once (1: one after another).
    `report(job, what)` is told "started", "finished", "failed" and "skipped"."""

    def __init__(self, parallel: int = 1, report: Optional[Callable[[Job, str], None]] = None,
                 grace_s: float = GRACE_S):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.parallel, self.report, self.grace_s = parallel, report, grace_s

    def launch(self, jobs: Sequence[Job], done: Iterable[str] = ()) -> Outcome:
        """Run `jobs` (after those in `done`); returns the Outcome. Raises Interrupted on SIGINT /
        SIGTERM once every child has ended, ValueError for a graph that cannot run."""
        for job in jobs:
            _local_argv(job)   # refuses what cannot run here before anything starts
        return run_jobs(jobs, self.parallel, done=done, report=self.report, grace_s=self.grace_s)
