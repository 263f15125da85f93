"""`incubation bench [ops|train|study|assembly|dispatch] [options]`: the benchmarks, part of the package.

- `ops`: per-op microbenchmarks, every backend vs eager / SDPA / torch.compile (`bench.ops`);
- `train`: one ViT training step, ours per backend vs timm eager and torch.compile (`bench.train_step`);
- `study`: Deep Incubation vs E2E vs LEMON vs Apollo at matched FLOPs (`bench.study`);
- `assembly`: every mix of meta blocks and incubated modules of a finished study (`bench.assembly`);
- `dispatch`: what `auto` costs per call over calling the chosen backend directly (`bench.dispatch`).

They write under the current directory (runs/bench/..., runs/study) or `--out`, so they work
from an installed wheel as from a checkout. `incubation bench ops --help` lists the options;
`python -m incubation.bench.ops` is the same command.
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

__all__ = ["BENCHMARKS", "main"]

BENCHMARKS = {"ops": "ops", "train": "train_step", "study": "study", "assembly": "assembly", "dispatch": "dispatch"}


def main(argv: Optional[list[str]] = None) -> int:
    """`incubation bench [ops|train|study|assembly|dispatch] [options]` (ops when no benchmark is named)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    named = bool(argv) and argv[0] in BENCHMARKS
    name = argv.pop(0) if named else "ops"
    if not named and argv[:1] and not argv[0].startswith("-"):
        print(f"incubation bench: error: unknown benchmark {argv[0]!r}; choose from {list(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    return importlib.import_module(f"{__name__}.{BENCHMARKS[name]}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
