"""Dispatch-overhead benchmark: what `auto` costs per call over calling the backend it chose
directly, for every op at a size where the kernel itself takes little time.

    incubation bench dispatch                # CPU (or the GPU), each op with and without grad
    incubation bench dispatch --quick        # shorter timing

Three loops per op, each CALLS calls, interleaved over rounds (median): `direct` calls the function
that `auto` chose; `dispatched` asks the dispatcher first (`DISPATCH.select`: the memo key from the
call's facts, the need for gradients and the thread count, its lookup, the chosen backend's
capability check) and then calls what it returns; `public` is the public call (`ops.linear(...)`:
the input validation `op.validate`, which also returns the facts it read (shapes, dtypes, flags),
then the same). Dispatch overhead = dispatched - direct: what `auto` adds, against the issue's
target of at most 2 us (issue 24 item 3). Validation = public - dispatched, paid in every mode
(auto or forced), is shown beside it. The decision is made (measured) before timing. The rows
without gradients run first: their memo entry is still keyed by the need for gradients (read at
each call); a call with gradients also decides its forward alone, so where both choose alike
(the rows with gradients) one entry serves both and that need is not read.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
from typing import Optional

import torch

from incubation import ops
from incubation.bench.common import (
    benchmark_parser,
    describe_environment,
    environment,
    median_ms,
    resolve_device,
    set_threads,
    table,
    write_outputs,
)
from incubation.dispatch import DISPATCH

TARGET_US = 2.0
CALLS = 200   # calls per timed run: the overhead is a few microseconds, below one timer reading
ROUNDS = 21


def _calls(device: torch.device, grad: bool) -> dict[str, tuple]:
    """op -> (public function, its arguments, its op.validate arguments), small sizes."""
    def t(*shape):
        return torch.randn(*shape, device=device).requires_grad_(grad)
    x, r, w, b = t(4, 8, 32), t(4, 8, 32), t(32), t(32)
    q, k, v = t(2, 2, 8, 16), t(2, 2, 8, 16), t(2, 2, 8, 16)
    weight, bias = t(48, 32), t(48)
    return {
        "attention": (ops.attention, (q, k, v), (q, k, v, None)),
        "layer_norm": (ops.layer_norm, (x, w, b), (x, w, b, 1e-6)),
        "add_layer_norm": (ops.add_layer_norm, (x, r, w, b), (x, r, w, b, 1e-6)),
        "linear": (ops.linear, (x, weight, bias, "gelu"), (x, weight, bias, "gelu", None, None)),
    }


def _loop(fn, args):
    def run():
        for _ in range(CALLS):
            fn(*args)
    return run


def _dispatched_loop(op, device, args, call):
    def run():
        for _ in range(CALLS):
            DISPATCH.select(op, device, args, call)(*args)
    return run


def measure(device: torch.device, quick: bool) -> list[dict]:
    rows = []
    for grad in (False, True):
        with torch.no_grad() if not grad else contextlib.nullcontext():
            for name, (public, args, validated) in _calls(device, grad).items():
                public(*args)   # decides (measures) the signature first
                op = DISPATCH.ops[name]
                _, dispatched, call = op.validate(*validated)
                chosen = DISPATCH.select(op, device, dispatched, call)
                backend = next(b for b, (fn, _) in op.impls.items() if fn is chosen)
                loops = {"direct": _loop(chosen, dispatched),
                         "dispatched": _dispatched_loop(op, device, dispatched, call),
                         "public": _loop(public, args)}
                us = {k: [] for k in loops}
                for _ in range(1 if quick else ROUNDS):   # interleaved: a change of load hits all three
                    for k, run in loops.items():
                        us[k].append(median_ms(run, device, quick=True) * 1e3 / CALLS)
                us = {k: statistics.median(v) for k, v in us.items()}
                rows.append({"op": name, "grad": grad, "backend": backend, "direct_us": us["direct"],
                             "overhead_us": us["dispatched"] - us["direct"],
                             "validation_us": us["public"] - us["dispatched"], "public_us": us["public"]})
    return rows


COLUMNS = [("op", "op", ""), ("grad", "grad", ""), ("backend", "chosen", ""), ("direct_us", "direct us", ".2f"),
           ("overhead_us", "dispatch overhead us", ".2f"), ("validation_us", "validation us", ".2f"),
           ("public_us", "public call us", ".2f")]


def main(argv: Optional[list[str]] = None) -> int:
    p = benchmark_parser("incubation bench dispatch", __doc__, "shorter timing", "runs/bench/dispatch")
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = resolve_device(args.device)
    if ops.current_backend() != "auto":
        print(f"incubation bench dispatch: error: INCUBATION_BACKEND={ops.current_backend()} forces a backend; "
              "this measures auto", file=sys.stderr)
        return 1
    env = environment(device)
    rows = measure(device, args.quick)
    worst = max(r["overhead_us"] for r in rows)
    verdict = (f"worst dispatch overhead {worst:.2f} us per call: {'met' if worst <= TARGET_US else 'missed'} "
               f"(target <= {TARGET_US} us); input validation {min(r['validation_us'] for r in rows):.2f}-"
               f"{max(r['validation_us'] for r in rows):.2f} us more in every mode")
    print(describe_environment(env))
    print(table(rows, COLUMNS))
    print(verdict)
    markdown = "\n\n".join(["## Dispatch overhead per call (`incubation bench dispatch`)", describe_environment(env),
                            table(rows, COLUMNS, markdown=True), verdict])
    out = args.out or os.path.join("runs", "bench", "dispatch")
    write_outputs(out, "dispatch", {"environment": env, "rows": rows, "target_us": TARGET_US, "worst_us": worst},
                  markdown, args.append_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
