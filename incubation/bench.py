"""`incubation bench [ops|train|study] [options]`: the benchmarks of a source checkout.

The benchmarks live in the repository's benchmarks/ folder (benchmarks/ops.py,
benchmarks/train_step.py, their shared benchmarks/common.py, and the method comparison
benchmarks/study.py), beside this package when it is
installed editable or run from the checkout; this module loads them by path and runs their
`main(argv)`. `incubation bench ops --help` lists the options.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

__all__ = ["BENCHMARKS", "load_benchmark", "main"]

BENCHMARKS = {"ops": "ops.py", "train": "train_step.py", "study": "study.py", "assembly": "assembly.py"}
BENCHMARK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str) -> ModuleType:
    """The benchmark script `name` (a key of BENCHMARKS) as a module."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {list(BENCHMARKS)}")
    path = os.path.join(BENCHMARK_DIR, BENCHMARKS[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: `incubation bench` runs the benchmarks of a source "
                                "checkout (pip install --no-build-isolation -e . from the repository)")
    module_name = f"incubation_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def main(argv: Optional[list[str]] = None) -> int:
    """`incubation bench [ops|train|study] [options]` (ops when no benchmark is named)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = bool(argv) and argv[0] in BENCHMARKS
    name = argv.pop(0) if named else "ops"
    if not named and argv[:1] and not argv[0].startswith("-"):
        print(f"incubation bench: error: unknown benchmark {argv[0]!r}; choose from {list(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    try:
        module = load_benchmark(name)
    except FileNotFoundError as exc:
        print(f"incubation bench: error: {exc}", file=sys.stderr)
        return 2
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
