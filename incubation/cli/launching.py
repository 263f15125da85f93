"""How `incubation run` launches the pipeline's job graph (--launcher local | slurm, processes per
stage, the sbatch options, --wait), and the `status` / `cancel` subcommands of a run submitted
to Slurm.

Each of --nproc-per-node and the sbatch options takes VALUE (every stage) or STAGE:VALUE (one
stage: incubations need fewer nodes than the meta stage at ImageNet scale), as often as wanted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

from .. import pipeline
from ..errors import IncubationError, UsageError
from ..launch import Resources
from ..launch import slurm_status as slurm
from ..launch.slurm import OPTIONS, SlurmLauncher, SlurmOptions, split_stage, stage_options
from ..pipeline import say
from ..presets import PRESETS
from .options import out_dir, positive_int

__all__ = ["add_launcher_options", "resources", "run_on_slurm", "add_status", "cmd_status", "cmd_cancel"]

# sbatch option -> (metavar, help)
_SBATCH = {
    "partition": ("NAME", "sbatch --partition"),
    "account": ("NAME", "sbatch --account"),
    "qos": ("NAME", "sbatch --qos"),
    "time": ("TIME", "sbatch --time: the time limit of a job (minutes, HH:MM:SS or D-HH:MM:SS); a stage that "
                     "reaches it is requeued and resumes from its checkpoint"),
    "nodes": ("N", "sbatch --nodes"),
    "gpus_per_node": ("G", "sbatch --gpus-per-node, and one task (rank) per GPU"),
    "cpus_per_task": ("C", "sbatch --cpus-per-task (per rank; also its OMP_NUM_THREADS)"),
    "mem": ("SIZE", "sbatch --mem: memory per node (e.g. 400G)"),
    "constraint": ("FEATURES", "sbatch --constraint"),
    "slurm_option": ("KEY=VALUE", "any other sbatch option: --KEY=VALUE"),
}


def add_launcher_options(p: argparse.ArgumentParser) -> None:
    """`run`'s options: the launcher, processes per stage, the sbatch options, --wait."""
    g = p.add_argument_group("launching", "each value: VALUE for every stage, or STAGE:VALUE (stages: "
                                          + ", ".join(pipeline.STAGES) + "); repeat as needed")
    g.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: processes on this machine (default); slurm: submit the graph to Slurm and return")
    g.add_argument("--nproc-per-node", action="append", metavar="[STAGE:]N",
                   help="ranks of a stage on each node (torchrun here, Slurm tasks there; default 1, "
                        "or one per GPU with --gpus-per-node)")
    for name, (metavar, text) in _SBATCH.items():
        g.add_argument("--" + name.replace("_", "-"), action="append", metavar=f"[STAGE:]{metavar}",
                       help=f"{text} (--launcher slurm)")
    g.add_argument("--wait", action="store_true", help="--launcher slurm: follow the jobs until they end, one "
                                                      "line per stage")


def resources(args: argparse.Namespace) -> dict:
    """stage -> Resources from --nproc-per-node."""
    every, ranks = 1, {}
    for text in args.nproc_per_node or ():
        stage, value = split_stage(text, pipeline.STAGES)
        try:
            n = positive_int(value)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"argument --nproc-per-node: {exc} (or STAGE:N)") from None
        if stage is None:
            every = n
        else:
            ranks[stage] = n
    return {stage: Resources(tasks_per_node=ranks.get(stage, every)) for stage in pipeline.STAGES}


def _check_launcher(args: argparse.Namespace) -> None:
    if args.launcher != "slurm":
        given = [n for n in (*OPTIONS, "wait") if getattr(args, n)]
        if given:
            raise UsageError(f"argument --{given[0].replace('_', '-')}: needs --launcher slurm")


def run_on_slurm(spec: pipeline.RunSpec, args: argparse.Namespace) -> None:
    """Submit the unfinished stages of `spec`; print the job ids; with --wait, follow them."""
    try:
        options = stage_options({n: getattr(args, n) for n in OPTIONS}, pipeline.STAGES)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    # the report reads files: one task without GPUs, unless told otherwise
    report = options.stages.get("report", SlurmOptions()).over(SlurmOptions(nodes=1, gpus_per_node=0))
    options = dataclasses.replace(options, stages={**options.stages, "report": report})
    jobs = pipeline.jobs(spec)
    if not jobs:
        say(f"nothing to submit: every stage of {spec.run_dir} is finished")
        return
    ids = SlurmLauncher(spec.run_dir, options).launch(jobs, pipeline.finished(spec))
    for job in jobs:
        say(f"{job.name}: Slurm job {ids[job.name]} (log {job.log})")
    say(f"record: {os.path.join(spec.run_dir, slurm.RECORD)}; follow with: incubation status --out {spec.run_dir}")
    if args.wait:
        _wait(spec.run_dir)


def _say_state(row: slurm.JobStatus) -> None:
    reason = f" ({row.reason})" if row.reason else ""
    detail = f": {row.last_line}" if row.state == "failed" else ""
    say(f"{row.name}: {row.state}{reason}{detail}")


def _wait(run_dir: str) -> None:
    rows = slurm.wait(run_dir, report=_say_state)
    failed = [r for r in rows if r.state != "done"]
    if failed:
        raise IncubationError("; ".join(f"{r.name} {r.state}" + (f" ({r.reason})" if r.reason else "")
                                        + (f": {r.last_line}" if r.state == "failed" else "") for r in failed))
    report = os.path.join(run_dir, "report.json")
    if os.path.exists(report):
        with open(report) as f:
            summary = json.load(f)["summary"]
        for name, s in summary.items():
            print(f"{name}: eval acc {s['acc']:.2f}%, {s['flops'] / 1e12:.2f} TFLOP, {s['wall_s']:.1f} s")


def add_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=out_dir, default=None, help="run dir (default runs/<preset>)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))


def _run_dir(args: argparse.Namespace) -> str:
    run_dir = args.out if args.out is not None else os.path.join("runs", args.preset)
    if not os.path.exists(os.path.join(run_dir, slurm.RECORD)):
        raise IncubationError(f"{run_dir} has no {slurm.RECORD}: nothing was submitted to Slurm from it")
    return run_dir


def cmd_status(args: argparse.Namespace) -> None:
    print(slurm.format_status(slurm.status(_run_dir(args))))


def cmd_cancel(args: argparse.Namespace) -> Optional[int]:
    cancelled = slurm.cancel(_run_dir(args))
    say("cancelled: " + ", ".join(f"{r.name} ({r.job_id})" for r in cancelled) if cancelled
        else "nothing to cancel: no job of this run is pending or running")
    return None


def with_resources(spec: pipeline.RunSpec, args: argparse.Namespace) -> pipeline.RunSpec:
    _check_launcher(args)
    return dataclasses.replace(spec, resources=resources(args))
