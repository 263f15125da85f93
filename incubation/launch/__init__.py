"""Launchers: what runs a job graph. A job is a command line with its environment, its log, the
jobs it needs, and the processes / GPUs / nodes it wants; a launcher runs the graph here
(`local`) or hands it to a scheduler (`slurm`). The graph itself is built by
`incubation.pipeline`; launchers know nothing of stages.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence

__all__ = ["Job", "Resources", "Launcher", "check_graph"]


@dataclass(frozen=True)
class Resources:
    """What one job asks for. `tasks_per_node` processes run the job's command on each node, each
    told its RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (one per GPU, or gloo
    ranks on CPU); 1 runs it as a plain process."""
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None


@dataclass
class Job:
    name: str                         # unique in its graph, e.g. "meta", "incubate-2"
    argv: Sequence[str]               # one process's command line
    log: str                          # stdout and stderr, appended (a resumed job keeps its history)
    needs: Sequence[str] = ()         # names of the jobs that must succeed first
    env: dict = field(default_factory=dict)  # extra environment variables
    resources: Resources = Resources()
    array: Optional[str] = None       # jobs with one array name and the same needs may be submitted as one job array


class Launcher(Protocol):
    """Runs (local) or submits (a scheduler) `jobs`; `done` names jobs that finished before,
    whose dependents may start at once."""

    def launch(self, jobs: Sequence[Job], done: Iterable[str] = ()): ...


def check_graph(jobs: Sequence[Job], done: Iterable[str] = ()) -> list[Job]:
    """`jobs` in an order where each comes after what it needs (a topological order, stable);
    raises ValueError for a duplicate name, a need that is neither a job nor in `done`, or a cycle."""
    names = [j.name for j in jobs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"jobs named twice: {', '.join(twice)}")
    known = set(names) | set(done)
    unknown = sorted({n for j in jobs for n in j.needs} - known)
    if unknown:
        raise ValueError(f"jobs need unknown jobs: {', '.join(unknown)}")
    ordered, placed, pending = [], set(done), list(jobs)
    while pending:
        ready = [j for j in pending if all(n in placed for n in j.needs)]
        if not ready:
            raise ValueError(f"jobs need each other in a cycle: {', '.join(j.name for j in pending)}")
        ordered += ready
        placed |= {j.name for j in ready}
        pending = [j for j in pending if j.name not in placed]
    return ordered
