"""Measuring one call for `incubation.dispatch`: each candidate backend is checked against
eager's outputs and gradients, then timed against eager in interleaved rounds (median).

Measuring leaves no trace: the call's tensors are detached into fresh leaves (no graph reaches
the caller's), and everything runs under identity saved-tensor hooks, so that a caller's hooks
(activation checkpointing counts and recomputes what the forward saves) never see these graphs.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

__all__ = ["MARGIN", "measure", "outputs"]

MARGIN = 0.03            # a fused kernel must beat eager by 3 % to be chosen: ties go to PyTorch
# a candidate whose outputs or gradients differ from eager's by more than this (relative to
# eager's largest magnitude) is broken, not merely rounded differently
AGREEMENT = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2}
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = 5, 40, 0.3


def _leaves(args: tuple) -> tuple:
    """The call's tensors as fresh leaves on the same storage: no graph reaches the caller's."""
    return tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


def outputs(out) -> tuple:
    return tuple(out) if isinstance(out, tuple) else (out,)


def _run(fn: Callable, args: tuple, grad: bool) -> tuple:
    """One forward (+ backward with the outputs themselves as output gradients); returns the
    outputs and the input gradients, detached."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] if grad else []
    with torch.enable_grad() if grad else torch.no_grad():
        outs = outputs(fn(*args))
        grads = ()
        if leaves:
            live = [o for o in outs if o.requires_grad]
            grads = torch.autograd.grad(live, leaves, [o.detach() for o in live], allow_unused=True)
    return tuple(o.detach() for o in outs) + tuple(g for g in grads if g is not None)


def _disagreement(got: tuple, want: tuple) -> Optional[str]:
    """Why `got` (a candidate's outputs and gradients) is not eager's `want`, or None."""
    if len(got) != len(want):
        return f"returned {len(got)} outputs and gradients, eager {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape or g.dtype != w.dtype:
            return f"result {i} is {tuple(g.shape)} {g.dtype}, eager's {tuple(w.shape)} {w.dtype}"
        if g.numel() == 0:
            continue
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), finite):
            return f"result {i} has non-finite values where eager's has none (or the reverse)"
        g64, w64 = g.double()[finite], w.double()[finite]
        if w64.numel():
            error = ((g64 - w64).abs().max() / w64.abs().max().clamp_min(1e-30)).item()
            if error > AGREEMENT.get(w.dtype, 1e-2):
                return f"result {i} differs from eager by {error:.2g} of its largest magnitude"
    return None


def elapsed(fn: Callable, device: torch.device) -> float:
    """Seconds one call of fn takes on device."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _agreeing(eager: Callable, candidates: dict[str, Callable], args: tuple, grad: bool) -> tuple[dict, dict]:
    """(backend -> function, for those whose results agree with eager's; backend -> why not)."""
    refused, ready = {}, {}
    reference = _run(eager, args, grad)
    for backend, fn in candidates.items():
        try:
            reason = _disagreement(_run(fn, args, grad), reference)   # also the warm-up (compiles, autotunes)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails here must not serve
            reason = f"failed when measured ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if reason:
            refused[backend] = reason
        else:
            ready[backend] = fn
    ready["eager"] = eager
    return ready, refused


def _timed(ready: dict[str, Callable], args: tuple, grad: bool, device: torch.device) -> dict[str, list]:
    """backend -> seconds per round, the backends' order rotated each round."""
    samples = {b: [] for b in ready}
    spent, rounds = 0.0, 0
    while rounds < MAX_ROUNDS and (rounds < MIN_ROUNDS or spent < BUDGET_S):
        order = list(ready)
        order = order[rounds % len(order):] + order[:rounds % len(order)]
        for backend in order:
            t = elapsed(lambda: _run(ready[backend], args, grad), device)
            samples[backend].append(t)
            spent += t
        rounds += 1
    return samples


def measure(eager: Callable, candidates: dict[str, Callable], args: tuple, grad: bool,
            device: torch.device) -> tuple[str, dict, dict]:
    """(choice, backend -> median ms, backend -> why refused) for one call: `candidates`
    (backend -> function) checked against and timed against `eager` on the call's own inputs."""
    args = _leaves(args)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        ready, refused = _agreeing(eager, candidates, args, grad)
        samples = _timed(ready, args, grad, device)
    ms = {b: statistics.median(s) * 1e3 for b, s in samples.items()}
    # a kernel wins on its median time relative to eager's in the same round: a burst of load
    # on a shared machine slows both sides of a round, so it cannot crown a kernel by itself
    ratio = {b: statistics.median(t / max(e, 1e-12) for t, e in zip(s, samples["eager"]))
             for b, s in samples.items() if b != "eager"}
    best = min(ratio, key=ratio.get, default=None)
    return (best if best is not None and ratio[best] < 1 - MARGIN else "eager"), ms, refused
