"""The slurm launcher: submits a job graph to Slurm through submitit and returns.

- One submitit executor per submission: an executor cannot clear a dependency once it is set.
- Jobs with one `array` name, the same needs and the same resources are one job array; a job
  that needs a member of an array depends on the whole array (`afterok:<array id>`).
- Every job carries `--kill-on-invalid-dep=yes`: when what it needs fails, Slurm cancels it
  instead of leaving it pending forever.
- `--requeue` and submitit's signal handling: before the time limit, or when preempted, the job
  is requeued and its command resumes from its own checkpoint (`slurm_task`).
- The submission is recorded in `<out>/jobs.json` (`slurm_status` reads it back). A job whose
  last submission is still pending or running is not submitted twice; the launch is refused.
- A request Slurm refuses (more CPUs than a node has, an unknown partition) is an
  IncubationError with sbatch's one line; what this launch had already submitted is cancelled.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import IncubationError
from ..train.lock import RunDirLock
from . import Job, check_graph
from .slurm_status import active, load_record, run_slurm, save_record, slurm_folder, slurm_seconds

__all__ = ["SlurmOptions", "StageOptions", "SlurmLauncher", "OPTIONS", "split_stage", "stage_options", "sbatch_parameters"]

MAX_TIMEOUT_REQUEUES = 100  # a time limit shorter than a stage is a way to run it, not an error
SIGNAL_BEFORE_LIMIT_S = 120  # USR2 this long before the time limit: time to stop and requeue
YEAR_MINUTES = 365 * 24 * 60  # the time asked for on a partition without a time limit


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch options of one stage; None leaves the choice to the job's resources or to Slurm."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None           # --time: minutes, HH:MM:SS or D-HH:MM:SS
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None  # one task per GPU
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None            # --mem, per node: 64G, 500M
    constraint: Optional[str] = None
    extra: tuple = ()                    # (KEY, VALUE) pairs: --KEY=VALUE for anything else

    def __post_init__(self):
        if self.time is not None:
            slurm_seconds(self.time)  # raises ValueError naming the bad time
        for name in ("nodes", "gpus_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "gpus_per_node" else 1)):
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for key, _ in self.extra:
            if not re.fullmatch(r"[a-z][a-z0-9-]*", key):
                raise ValueError(f"slurm option {key!r}: give an sbatch long option without dashes, e.g. mail-type=END")

    def over(self, base: "SlurmOptions") -> "SlurmOptions":
        """These options where set, `base`'s elsewhere; extra options of both, these last."""
        fields = {f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(base, f.name)
                  for f in dataclasses.fields(self) if f.name != "extra"}
        return SlurmOptions(**fields, extra=tuple(base.extra) + tuple(self.extra))


@dataclass(frozen=True)
class StageOptions:
    """Options for every stage, and per stage (by the job's array name, else its name) on top."""
    default: SlurmOptions = SlurmOptions()
    stages: Mapping[str, SlurmOptions] = dataclasses.field(default_factory=dict)

    def for_job(self, job: Job) -> SlurmOptions:
        stage = job.array or job.name
        return self.stages[stage].over(self.default) if stage in self.stages else self.default


INT_OPTIONS = ("nodes", "gpus_per_node", "cpus_per_task")
OPTIONS = ("partition", "account", "qos", "time", *INT_OPTIONS, "mem", "constraint", "slurm_option")


def split_stage(text: str, stages: Iterable[str]) -> tuple:
    """(STAGE, VALUE) of "STAGE:VALUE" with one of `stages`, else (None, text): "48:00:00" is a time."""
    stage, colon, value = text.partition(":")
    return (stage, value) if colon and stage in stages else (None, text)


def stage_options(values: Mapping[str, Sequence[str]], stages: Iterable[str]) -> StageOptions:
    """StageOptions from the command line: `values` maps each of OPTIONS (SlurmOptions' fields,
    and slurm_option for KEY=VALUE) to the strings given, each VALUE for every stage or
    STAGE:VALUE for one of `stages`; a later value wins. ValueError names a bad one."""
    stages = set(stages)
    fields: dict = {}   # stage (None: every stage) -> {field: value}
    for option, given in values.items():
        flag = "--" + option.replace("_", "-")
        for text in given or ():
            stage, value = split_stage(text, stages)
            into = fields.setdefault(stage, {})
            if option == "slurm_option":
                key, eq, setting = value.partition("=")
                if not eq:
                    raise ValueError(f"{flag} {text!r}: want KEY=VALUE or STAGE:KEY=VALUE")
                into["extra"] = into.get("extra", ()) + ((key, setting),)
            elif option in INT_OPTIONS:
                if not value.isdigit():
                    raise ValueError(f"{flag} {text!r}: want a number, or STAGE:NUMBER with a stage of {sorted(stages)}")
                into[option] = int(value)
            else:
                into[option] = value
    try:
        return StageOptions(SlurmOptions(**fields.pop(None, {})), {k: SlurmOptions(**v) for k, v in fields.items()})
    except ValueError as exc:
        raise ValueError(f"slurm options: {exc}") from None


def _minutes(opts: SlurmOptions) -> int:
    """The time limit in minutes (submitit counts time-outs with it): --time, else the
    partition's default time, else its maximum, else a year."""
    if opts.time is not None:
        return max(1, -(-slurm_seconds(opts.time) // 60))
    where = ["--partition", opts.partition] if opts.partition else []
    for line in run_slurm(["sinfo", "--noheader", "--format=%P|%L|%l", *where]).splitlines():
        partition, default, maximum = line.strip().split("|")
        if opts.partition or partition.endswith("*"):
            for limit in (default, maximum):
                if limit[:1].isdigit():
                    return max(1, -(-slurm_seconds(limit) // 60))
            break
    return YEAR_MINUTES


def sbatch_parameters(job: Job, opts: SlurmOptions, minutes: int, dependency: str = "") -> dict:
    """submitit's SlurmExecutor parameters for `job`: the options over the job's resources."""
    res = job.resources
    gpus = opts.gpus_per_node if opts.gpus_per_node is not None else res.gpus_per_node
    params = {"job_name": job.array or job.name, "nodes": opts.nodes or res.nodes,
              "ntasks_per_node": gpus or res.tasks_per_node, "time": minutes, "stderr_to_stdout": True,
              "signal_delay_s": min(SIGNAL_BEFORE_LIMIT_S, minutes * 60 // 10)}
    if gpus:
        params["gpus_per_node"] = gpus
    if opts.cpus_per_task or res.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task or res.cpus_per_task
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(opts, name) is not None:
            params[name] = getattr(opts, name)
    if dependency:
        params["dependency"] = dependency
    extra = {"kill-on-invalid-dep": "yes", "requeue": True}
    if opts.mem is not None:
        extra["mem"] = opts.mem  # submitit's own mem takes GB as a number
    params["additional_parameters"] = {**extra, **dict(opts.extra)}
    return params


def _request(params: dict) -> str:
    """What a job asked for, as sbatch options (for the one line of a refusal)."""
    shown = {k: v for k, v in params.items() if k not in ("job_name", "stderr_to_stdout", "signal_delay_s",
                                                           "dependency", "additional_parameters")}
    shown.update({k: v for k, v in params["additional_parameters"].items() if k not in ("kill-on-invalid-dep", "requeue")})
    return " ".join(f"--{k.replace('_', '-')}={v}" for k, v in shown.items())


def submission_order(jobs: Sequence[Job], done: Iterable[str]) -> list:
    """The jobs in groups, each submitted at once (a group of several is one job array), every
    group after the groups it needs (a group comes where its first job is in check_graph's order;
    the jobs of a group need the same jobs, all placed before it)."""
    groups: dict = {}
    for job in check_graph(jobs, done):
        key = (job.array, tuple(job.needs), job.resources) if job.array else job.name
        groups.setdefault(key, []).append(job)
    return list(groups.values())


class SlurmLauncher:
    """`launch(jobs, done)` submits the jobs not in `done` and returns {name: Slurm job id}."""

    def __init__(self, out: str, options: StageOptions = StageOptions()):
        self.out = os.path.abspath(out)
        self.options = options

    def launch(self, jobs: Sequence[Job], done: Iterable[str] = ()) -> dict:
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise IncubationError("the slurm launcher needs Slurm's commands (sbatch, srun, squeue) on PATH")
        order = submission_order(jobs, done)
        os.makedirs(slurm_folder(self.out), exist_ok=True)
        with RunDirLock(slurm_folder(self.out)):  # one submitter per out dir at a time
            running = active(self.out, [j.name for j in jobs])
            if running:
                raise IncubationError("; ".join(
                    f"{r.name} is still {r.state} as Slurm job {r.job_id}" for r in running)
                    + f": wait for it, or cancel it (incubation cancel --out {self.out})")
            ids: dict = {}
            try:
                for group in order:
                    ids.update(self._submit(group, ids))
            except BaseException:
                if ids:  # no half-submitted graph: its dependents would wait on jobs never submitted
                    try:
                        run_slurm(["scancel", *sorted({i.split("_")[0] for i in ids.values()})])
                    except IncubationError:
                        pass  # the submission's own error says more
                raise
            record = load_record(self.out)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            for job in jobs:
                record[job.name] = {"job_id": ids[job.name], "log": os.path.abspath(job.log),
                                    "needs": list(job.needs), "array": job.array, "submitted": stamp}
            save_record(self.out, record)
        return ids

    def _submit(self, group: list, ids: dict) -> dict:
        try:
            import cloudpickle
            import submitit
        except ImportError as exc:
            raise IncubationError(f"the slurm launcher needs submitit ({exc}): pip install -r requirements.txt") from None

        from . import slurm_task

        cloudpickle.register_pickle_by_value(slurm_task)  # the job need not import incubation

        # a job needing a member of an array depends on the whole array: its id before the "_"
        needed = sorted({ids[n].split("_")[0] for j in group for n in j.needs if n in ids}, key=int)
        opts = self.options.for_job(group[0])
        params = sbatch_parameters(group[0], opts, _minutes(opts), "afterok:" + ":".join(needed) if needed else "")
        executor = submitit.SlurmExecutor(folder=slurm_folder(self.out), max_num_timeout=MAX_TIMEOUT_REQUEUES)
        executor.update_parameters(**params)
        try:
            with executor.batch():
                submitted = [executor.submit(slurm_task.StageCommand(j.argv, os.path.abspath(j.log), j.env))
                             for j in group]
        except submitit.core.utils.FailedJobError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or ["no message"]
            raise IncubationError(f"Slurm refused {group[0].array or group[0].name} ({_request(params)}): "
                                  f"{lines[-1]}") from None
        return {j.name: s.job_id for j, s in zip(group, submitted)}
