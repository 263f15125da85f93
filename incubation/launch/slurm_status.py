"""What became of a graph submitted to Slurm: the record `<out>/jobs.json`, each job's state,
`cancel` and `wait`.

A job's state comes from `squeue` while Slurm remembers the job (MinJobAge after it ended,
300 s by default, 3600 s on the test cluster), and from the exit record its rank 0 wrote
(`slurm_task`) after that; a job that Slurm has forgotten and that left no exit record never ran
its command to the end (cancelled, or its dependency never met). No accounting (sacct) needed:
docs/DESIGN.md says why.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import IncubationError
from ..utils import atomic_write
from .local import last_line
from .slurm_task import read_exit_record

__all__ = ["RECORD", "JobStatus", "load_record", "save_record", "slurm_seconds", "squeue", "status",
           "format_status", "active", "cancel", "wait"]

RECORD = "jobs.json"
SLURM_DIR = "slurm"   # <out>/slurm: submitit's pickles, sbatch scripts, per-task logs, exit records
# Slurm's job states, as `incubation status` names them
_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
            "RESIZING"}
_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
ACTIVE_STATES = ("pending", "running")
METRIC_KEYS = ("loss", "acc", "eval_loss", "eval_acc")  # shown from the last line of metrics.jsonl


def slurm_folder(out: str) -> str:
    return os.path.join(os.path.abspath(out), SLURM_DIR)


def load_record(out: str) -> dict:
    """name -> {"job_id", "log", "needs", "array", "submitted"} of every job submitted from `out`."""
    path = os.path.join(out, RECORD)
    try:
        with open(path) as f:
            return json.load(f)["jobs"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncubationError(f"{path} is not a job record ({exc}); move it away to submit again") from None


def save_record(out: str, jobs: dict) -> None:
    atomic_write(os.path.join(out, RECORD), json.dumps({"launcher": "slurm", "jobs": jobs}, indent=1).encode())


def slurm_seconds(text: str) -> int:
    """Seconds in Slurm's time formats: minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes, days-hours:minutes:seconds (sbatch --time, squeue %M)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
    days, *clock = match.groups()
    parts = [int(p) for p in clock if p is not None]
    if days is not None:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = [int(days) * 24 + parts[0]] + parts[1:] + [0] * (3 - len(parts))
    else:  # minutes, minutes:seconds or hours:minutes:seconds
        hours, minutes, seconds = parts if len(parts) == 3 else [0] + parts + [0] * (2 - len(parts))
    return (hours * 60 + minutes) * 60 + seconds


def run_slurm(argv: list) -> str:
    """stdout of a Slurm command; its one-line error as an IncubationError."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise IncubationError(f"{argv[0]} not found: the slurm launcher needs Slurm's commands on PATH") from None
    except subprocess.TimeoutExpired:
        raise IncubationError(f"{argv[0]} did not answer in 120 s: is slurmctld up?") from None
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()] or ["no message"]
        raise IncubationError(f"{' '.join(argv[:2])} failed: {lines[-1]}")
    return done.stdout


def squeue() -> dict:
    """job id ("12" or "12_3") -> (Slurm state, reason, elapsed seconds), for every job of this user
    that Slurm still remembers."""
    rows = {}
    for line in run_slurm(["squeue", "--me", "--noheader", "--array", "--states=all",
                           "--format=%i|%T|%r|%M"]).splitlines():
        fields = line.strip().split("|")
        if len(fields) == 4:
            job_id, state, reason, elapsed = fields
            rows[job_id] = (state.split()[0], reason, slurm_seconds(elapsed) if elapsed[:1].isdigit() else None)
    return rows


@dataclass
class JobStatus:
    name: str
    job_id: str
    state: str                   # pending, running, done, failed or cancelled
    reason: str                  # why pending / failed / cancelled, Slurm's words ("" when none)
    elapsed: Optional[float]     # seconds, None when unknown
    metric: str                  # from the last line of metrics.jsonl beside the log ("" when none)
    last_line: str               # the log's last line

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _state(job_id: str, row: Optional[tuple], folder: str) -> tuple:
    """(state, reason, elapsed) from squeue's row, else from the job's exit record."""
    exit_record = read_exit_record(folder, job_id)
    if row is not None:
        slurm_state, reason, elapsed = row
        reason = "" if reason in ("None", "(null)") else reason
        if slurm_state in _PENDING:
            return "pending", reason, elapsed
        if slurm_state in _RUNNING:
            return "running", reason, elapsed
        if slurm_state == "COMPLETED":
            return "done", "", elapsed
        if exit_record is not None and exit_record["returncode"] != 0:
            reason = f"exit {exit_record['returncode']}"
        return ("failed" if slurm_state in _FAILED else "cancelled"), reason or slurm_state, elapsed
    if exit_record is None:
        return "cancelled", "forgotten by Slurm without running to the end", None
    elapsed = exit_record["ended"] - exit_record["started"]
    if exit_record["returncode"] == 0:
        return "done", "", elapsed
    return "failed", f"exit {exit_record['returncode']}", elapsed


def _metric(log: str) -> str:
    """`step N, loss x, ...` from the last line of metrics.jsonl in the log's directory."""
    try:
        with open(os.path.join(os.path.dirname(log), "metrics.jsonl")) as f:
            lines = [line for line in f if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return ""
    if not isinstance(last, dict) or "step" not in last:
        return ""
    return ", ".join([f"step {last['step']}"] + [f"{k} {last[k]:.4g}" for k in METRIC_KEYS
                                                  if isinstance(last.get(k), (int, float))])


def status(out: str, rows: Optional[dict] = None) -> list:
    """A JobStatus per job of the record, in the order they were submitted; `rows` is squeue's
    answer (asked when not given)."""
    record = load_record(out)
    if not record:
        return []
    rows = squeue() if rows is None else rows
    folder = slurm_folder(out)
    result = []
    for name, entry in record.items():
        state, reason, elapsed = _state(entry["job_id"], rows.get(entry["job_id"]), folder)
        result.append(JobStatus(name, entry["job_id"], state, reason, elapsed, _metric(entry["log"]),
                                last_line(entry["log"])))
    return result


def _clock(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_status(rows: list) -> str:
    """One line per job: name, Slurm id, state (reason), elapsed, last metric, last log line."""
    lines = []
    width = max((len(r.name) for r in rows), default=0)
    for r in rows:
        state = f"{r.state} ({r.reason})" if r.reason else r.state
        metric = f"  [{r.metric}]" if r.metric else ""
        lines.append(f"{r.name:<{width}}  {r.job_id:<10} {state:<30} {_clock(r.elapsed):>9}{metric}  | {r.last_line}")
    return "\n".join(lines)


def active(out: str, names) -> list:
    """The JobStatus of each job among `names` whose last submission is still pending or running."""
    wanted = set(names)
    return [r for r in status(out) if r.name in wanted and r.active]


def cancel(out: str) -> list:
    """scancel every job of the record that is still pending or running; returns their statuses."""
    alive = [r for r in status(out) if r.active]
    if alive:
        run_slurm(["scancel", *sorted({r.job_id for r in alive})])
    return alive


def wait(out: str, report: Callable[[JobStatus], None] = lambda r: None, poll_s: float = 5.0,
         timeout_s: Optional[float] = None) -> list:
    """Poll until no job of the record is pending or running; `report` is told each job whenever
    its state changes. Returns the final statuses; IncubationError after `timeout_s`."""
    seen: dict = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        rows = status(out)
        for r in rows:
            if seen.get(r.name) != r.state:
                seen[r.name] = r.state
                report(r)
        if not any(r.active for r in rows):
            return rows
        if deadline is not None and time.monotonic() > deadline:
            raise IncubationError(f"jobs of {out} still pending or running after {timeout_s:.0f} s: "
                                  + ", ".join(r.name for r in rows if r.active))
        time.sleep(poll_s)
