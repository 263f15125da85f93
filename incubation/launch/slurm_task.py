"""What runs inside a Slurm job: one task per process (one per GPU, or a gloo rank on CPU), each
running the job's command with the torch.distributed variables set, rank 0 appending its output
to the job's log.

submitit starts this (`srun python -m submitit.core._submit`): it unpickles a `StageCommand` and
calls it in every task. On the time-limit or preemption signal (USR2, `--signal`), submitit calls
`checkpoint()` in rank 0, which stops the command and hands back a fresh copy; submitit then
requeues the job, and the re-run command resumes from its own last checkpoint (a finished stage
exits at once).

This module imports nothing of incubation (the launcher pickles it by value): a job starts
without the seconds that `import incubation` (torch) costs, and its command pays them once.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

__all__ = ["StageCommand", "master_port", "distributed_env", "exit_record_path", "read_exit_record"]

STOP_GRACE_S = 30.0  # between SIGTERM to the command and SIGKILL, when the job is preempted
PORT_BASE, PORT_JOBS, PORT_RESTARTS = 20000, 10000, 4


def master_port(job_id: int, restart: int) -> int:
    """The rendezvous port of one run of a job: 20000-59999. Jobs whose ids are less than 10000
    apart (array elements sharing a node) never share a port, and a requeued run (the next
    SLURM_RESTART_COUNT) never meets the store of the run before it."""
    return PORT_BASE + (job_id % PORT_JOBS) * PORT_RESTARTS + restart % PORT_RESTARTS


def distributed_env(job) -> dict:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this task.
    CUDA_VISIBLE_DEVICES is left as Slurm set it: the engine picks its GPU with LOCAL_RANK
    (submitit's TorchDistributedEnvironment.export() would narrow it to one GPU per task)."""
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return {"RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
            "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes), "MASTER_ADDR": job.hostnames[0],
            "MASTER_PORT": str(master_port(int(os.environ["SLURM_JOB_ID"]), restart))}


def exit_record_path(folder: str, job_id: str) -> str:
    """Where rank 0 records how a job's command ended (read once Slurm has forgotten the job)."""
    return os.path.join(folder, f"{job_id}_exit.json")


def read_exit_record(folder: str, job_id: str) -> Optional[dict]:
    try:
        with open(exit_record_path(folder, job_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _stop(pid: int, grace_s: float) -> None:
    """SIGTERM, SIGKILL after `grace_s`, and reap. Called from the signal handler while the main
    thread waits in Popen.wait, whose lock it holds: reaping with os.waitpid avoids that lock."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.1)
    except ChildProcessError:  # already reaped
        pass


def _ignore_usr2() -> None:  # in the command's process, before exec: ignored signals stay ignored
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class StageCommand:
    """One job's command line, its log and its extra environment (see launch.Job). submitit
    treats a callable with a `checkpoint` method as checkpointable: it requeues it."""

    def __init__(self, argv: list, log: str, env: dict):
        self.argv, self.log, self.env = list(argv), log, dict(env)

    def __call__(self) -> int:
        from submitit import JobEnvironment  # imported where it runs: `incubation status` needs none

        job = JobEnvironment()
        env = {**os.environ, **distributed_env(job)}
        # torch sizes its thread pool from OMP_NUM_THREADS: use the CPUs Slurm gave this task
        env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        env.update(self.env)
        rank0 = job.global_rank == 0
        started = time.time()
        if rank0:
            Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        # only rank 0 writes the log; the other ranks' output goes to submitit's per-task files
        with open(self.log, "a") if rank0 else open(os.devnull) as log:
            # the command ignores the USR2 that Slurm sends to every process of the job before its
            # time limit: rank 0 handles it (checkpoint below) and stops the command with SIGTERM
            self._proc = subprocess.Popen(list(self.argv), env=env, preexec_fn=_ignore_usr2,
                                          stdout=log if rank0 else None, stderr=subprocess.STDOUT if rank0 else None)
            returncode = self._proc.wait()
        if rank0:
            record = {"returncode": returncode, "started": started, "ended": time.time(),
                      "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
            path = exit_record_path(str(job.paths.folder), job.job_id)
            Path(path + ".tmp").write_text(json.dumps(record))
            os.replace(path + ".tmp", path)  # readers see the whole record or none
        if returncode != 0:  # the job fails in Slurm; its log's last line says why
            raise RuntimeError(f"{' '.join(self.argv)} exited with {returncode}; log {self.log}")
        return returncode

    def checkpoint(self):
        """Preempted or near the time limit: stop the command (it resumes from its own checkpoint
        when the requeued job runs it again) and hand submitit the same command to requeue."""
        proc: Optional[subprocess.Popen] = getattr(self, "_proc", None)
        if proc is not None and proc.returncode is None:
            _stop(proc.pid, STOP_GRACE_S)
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(StageCommand(self.argv, self.log, self.env))
