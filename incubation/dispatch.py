"""How `incubation.ops` chooses a backend for each call: capability first, then measurement.

Backends are modules that export `BACKENDS = {name: {op: (fn, check)}}` and, optionally,
`UNAVAILABLE = {name: reason}`. This module imports them and reads those tables; they never
import it. `check(*args)` returns None when the backend can serve the call, else the reason.

Per call:
- A forced backend (`INCUBATION_BACKEND`, `use_backend`) serves it, or raises BackendError
  if its check refuses. It is never measured.
- `auto` looks up the call's signature (op, dtypes, shape bucket, flags, whether gradients
  are needed) among the decisions for this device and these versions. On a miss it times
  every backend whose check accepts the call against eager: forward, plus backward when
  gradients are needed, interleaved, median of rounds. Each candidate's outputs and
  gradients are compared with eager's first, so a kernel that is broken on this machine is
  refused instead of chosen. A non-eager backend wins only if it beats eager by MARGIN.
  Decisions are kept in memory and in a JSON file (`cache_path()`).
- Eager serves, without measuring, where measuring is impossible: inside torch.compile
  (inductor fuses the eager ops itself), and under torch.distributed with several ranks for
  a signature the ranks did not agree on (`share_decisions`), so that every rank runs the
  same kernels.
"""
from __future__ import annotations

import collections
import contextlib
import importlib
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import IncubationError
from .utils import measurement_dir

__all__ = ["BackendError", "OPS", "BACKENDS", "MARGIN", "register", "use_backend", "current_backend",
           "select", "implements", "backends", "format_backends", "tune", "share_decisions", "cache_path",
           "clear_decisions"]

OPS = ("attention", "layer_norm", "add_layer_norm", "linear")
BACKENDS = ("triton", "cuda", "cpp", "eager")
MARGIN = 0.03            # a fused kernel must beat eager by 3 % to be chosen: ties go to PyTorch
CACHE_FORMAT = "incubation-dispatch/1"
_BACKEND_MODULES = ("incubation.kernels", "incubation.extension")
_DEVICES = {"triton": ("cuda",), "cuda": ("cuda",), "cpp": ("cpu",), "eager": ("cpu", "cuda", "meta")}
# a candidate whose outputs or gradients differ from eager's by more than this (relative to
# eager's largest magnitude) is broken, not merely rounded differently
_AGREEMENT = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 6e-2}
_MIN_ROUNDS, _MAX_ROUNDS, _BUDGET_S = 5, 40, 0.3


class BackendError(IncubationError, RuntimeError):
    """A forced backend cannot serve a call."""


@dataclass
class Decision:
    """Which backend serves one call signature, and the evidence."""
    choice: str
    ms: dict = field(default_factory=dict)        # backend -> median milliseconds
    refused: dict = field(default_factory=dict)   # backend -> why it was not a candidate

    def summary(self) -> str:
        if not self.ms:
            return f"only {self.choice} can serve it"
        times = ", ".join(f"{b} {t:.3g} ms" for b, t in sorted(self.ms.items(), key=lambda kv: kv[1]))
        return f"{times} -> {self.choice}"


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
_impls: dict[str, dict[str, tuple[Callable, Optional[Callable]]]] = {op: {} for op in OPS}
_unavailable: dict[str, str] = {}          # backend -> why it cannot serve anything
_notes: dict[str, dict[str, str]] = {op: {} for op in OPS}   # op -> backend -> last refusal at a call
# backend -> op -> function(device type) -> {kernel: calls}: which of its kernels a backend ran
# (a backend module's optional KERNELS table, e.g. Triton's linear: the TMA kernel or the pointer one)
_kernel_reports: dict[str, dict[str, Callable]] = {}
_forced: Optional[str] = None  # a plain global, not a ContextVar, so torch.compile can trace it


def register(op: str, backend: str, fn: Callable, check: Optional[Callable] = None,
             devices: Optional[tuple[str, ...]] = None) -> None:
    """Make `fn` `backend`'s implementation of `op` (`check(*args)`: None or a reason).

    A backend name outside BACKENDS (a plug-in, a test double) must say which device types
    it serves with `devices`."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    if backend not in _DEVICES:
        if not devices:
            raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS} "
                             "(a new one must name the device types it serves: devices=('cuda',))")
        _DEVICES[backend] = tuple(devices)
    _impls[op][backend] = (fn, check)
    clear_decisions()


def _load_backends() -> None:
    """Read the backend modules' tables; a module that fails to import makes its backends
    unavailable with the reason."""
    for name in _BACKEND_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            label = "Triton kernels" if name.endswith("kernels") else "compiled extension incubation._C"
            for backend in (("triton",) if name.endswith("kernels") else ("cpp", "cuda")):
                _unavailable.setdefault(backend, f"{label} unavailable ({type(exc).__name__}: {exc})")
            continue
        for backend, table in module.BACKENDS.items():
            for op, (fn, check) in table.items():
                _impls[op][backend] = (fn, check)
        _unavailable.update(getattr(module, "UNAVAILABLE", {}))
        for backend, table in getattr(module, "KERNELS", {}).items():
            _kernel_reports.setdefault(backend, {}).update(table)


def implements(op: str, backend: str) -> bool:
    """Whether `backend` has a kernel for `op` at all (it may still refuse some calls)."""
    return backend not in _unavailable and backend in _impls.get(op, {})


# --------------------------------------------------------------------------------------
# forcing a backend
# --------------------------------------------------------------------------------------
def current_backend() -> str:
    """The forced backend (`use_backend`, else INCUBATION_BACKEND), or 'auto'."""
    name = _forced or os.environ.get("INCUBATION_BACKEND") or "auto"
    if name != "auto" and name not in _DEVICES:
        raise ValueError(f"INCUBATION_BACKEND={name!r} is not one of {('auto',) + BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force `name` ('auto' restores the measured choice) for the ops called inside the block."""
    if name != "auto" and name not in _DEVICES:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


# --------------------------------------------------------------------------------------
# capability
# --------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(backend: str, device_type: str, forced: bool) -> Optional[str]:
    if backend == "eager":
        return None
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available on this machine"
    if backend == "triton" and device_type == "cpu":
        if not _interpreting():
            return "Triton needs CUDA tensors (set TRITON_INTERPRET=1 to run it on CPU for testing)"
        if not forced:
            return "the Triton interpreter runs on CPU only when forced (it is for testing, not speed)"
        return None
    if device_type not in _DEVICES.get(backend, ()):
        return f"the {backend} kernels need {'/'.join(d.upper() for d in _DEVICES.get(backend, ()))} tensors, got {device_type}"
    return None


def _why_not(op: str, backend: str, device_type: str, args: tuple, forced: bool) -> Optional[str]:
    """None if `backend` can serve this call (args=() asks about the device only)."""
    if backend == "eager":
        return None
    reason = _device_reason(backend, device_type, forced) or _unavailable.get(backend)
    if reason:
        return reason
    if backend not in _impls[op]:
        return f"no {backend} implementation of {op}"
    check = _impls[op][backend][1]
    return check(*args) if (check is not None and args) else None


# --------------------------------------------------------------------------------------
# call signatures: what a decision is keyed by
# --------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    """Rows rounded up to a power of two, so a partial last batch reuses the full batch's choice."""
    return 1 << max(n - 1, 0).bit_length() if n > 0 else 0


def _dtype(t: Optional[torch.Tensor]) -> str:
    return "none" if t is None else str(t.dtype).replace("torch.", "")


def signature(op: str, args: tuple, grad: bool) -> str:
    """The key of a call's decision: op, dtypes, shape bucket, flags, gradients or not."""
    if op == "attention":
        q, k, _, _ = args
        b, h, n, d = q.shape
        parts = [_dtype(q), f"bh={_pow2(b * h)}", f"n={n}", f"nk={k.shape[2]}", f"d={d}"]
    elif op == "linear":
        x, w, bias, act, ls, res = args
        parts = [_dtype(x), f"rows={_pow2(x.numel() // max(x.shape[-1], 1))}", f"in={w.shape[1]}",
                 f"out={w.shape[0]}", f"bias={_dtype(bias)}", f"act={act}", f"ls={_dtype(ls)}",
                 f"res={_dtype(res)}"]
    else:   # layer_norm (x, w, b, eps), add_layer_norm (x, residual, w, b, eps)
        x, w, b = args[0], args[-3], args[-2]
        parts = [_dtype(x), f"rows={_pow2(x.numel() // max(x.shape[-1], 1))}", f"c={x.shape[-1]}",
                 f"w={_dtype(w)}", f"b={_dtype(b)}"]
        if op == "add_layer_norm":
            parts.append(f"res={_dtype(args[1])}")
    return " ".join([op, *parts, "fwd+bwd" if grad else "fwd"])


def _needs_grad(args: tuple) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


# --------------------------------------------------------------------------------------
# the decisions, in memory and on disk
# --------------------------------------------------------------------------------------
_decisions: dict[str, dict[str, Decision]] = {}   # environment -> signature -> decision
_loaded_file = False
_environments: dict[torch.device, str] = {}
_tuning = False        # inside tune(): measure even under several ranks (rank 0 decides for all)
_remeasured: Optional[set] = None   # inside tune(fresh=True): the signatures measured anew so far


def cache_path() -> str:
    """The decision file: $INCUBATION_CACHE_DIR/dispatch.json, else the user cache dir."""
    return os.path.join(measurement_dir(), "dispatch.json")


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> str:
    """What a measurement depends on besides the call: the device and the software."""
    env = _environments.get(device)
    if env is None:
        from . import __version__
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = "none"
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
        else:
            name = _cpu_name()
        env = f"{device.type}: {name} | torch {torch.__version__} | triton {triton_version} | incubation {__version__}"
        _environments[device] = env
    if device.type == "cpu":   # the thread count changes which kernel is faster
        env += f" | {torch.get_num_threads()} threads"
    return env


def _valid(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("choice"), str)
            and isinstance(record.get("ms", {}), dict) and isinstance(record.get("refused", {}), dict)
            and all(isinstance(v, (int, float)) for v in record.get("ms", {}).values()))


def _read_file() -> dict:
    """The file's environments, or {} (with a warning) if it is missing, corrupt or foreign."""
    path = cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"incubation: ignoring the dispatch cache {path}: unreadable ({exc})", stacklevel=3)
        return {}
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT
            and isinstance(data.get("environments"), dict)
            and all(isinstance(e, dict) and all(_valid(r) for r in e.values())
                    for e in data["environments"].values())):
        warnings.warn(f"incubation: ignoring the dispatch cache {path}: not a {CACHE_FORMAT} file", stacklevel=3)
        return {}
    return data["environments"]


def _load_file() -> None:
    global _loaded_file
    if _loaded_file:
        return
    _loaded_file = True
    for env, records in _read_file().items():
        mine = _decisions.setdefault(env, {})
        for key, r in records.items():
            if r["choice"] in _DEVICES:   # a backend this process knows
                mine.setdefault(key, Decision(r["choice"], dict(r.get("ms", {})), dict(r.get("refused", {}))))


def _save_file() -> None:
    """Merge this process's measured decisions into the file (best effort, atomic)."""
    path = cache_path()
    environments = _read_file()
    for env, records in _decisions.items():
        measured = {k: vars(d) for k, d in records.items() if d.ms}
        if measured:
            environments.setdefault(env, {}).update(measured)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "environments": environments}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        warnings.warn(f"incubation: cannot write the dispatch cache {path} ({exc}); "
                      "decisions are kept for this process only (set INCUBATION_CACHE_DIR)", stacklevel=3)


def clear_decisions(memory_only: bool = True) -> None:
    """Forget the measured decisions (and, with memory_only=False, delete the cache file)."""
    global _loaded_file
    _decisions.clear()
    _loaded_file = False
    if not memory_only:
        with contextlib.suppress(FileNotFoundError):
            os.remove(cache_path())


# --------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------
def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _leaves(args: tuple) -> tuple:
    """The call's tensors as fresh leaves on the same storage: no graph reaches the caller's."""
    return tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, tuple) else (out,)


def _run(fn: Callable, args: tuple, grad: bool) -> tuple:
    """One forward (+ backward with the outputs themselves as output gradients); returns the
    outputs and the input gradients, detached."""
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] if grad else []
    with torch.enable_grad() if grad else torch.no_grad():
        outs = _outputs(fn(*args))
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
            if error > _AGREEMENT.get(w.dtype, 1e-2):
                return f"result {i} differs from eager by {error:.2g} of its largest magnitude"
    return None


def _elapsed(fn: Callable, device: torch.device) -> float:
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


def _measure(op: str, args: tuple, grad: bool, candidates: list[str], device: torch.device) -> Decision:
    """Time every candidate against eager on the call's own inputs (interleaved rounds,
    median), after checking each against eager's results."""
    args = _leaves(args)
    refused, ready = {}, {}
    reference = _run(_impls[op]["eager"][0], args, grad)
    for backend in candidates:
        fn = _impls[op][backend][0]
        try:
            reason = _disagreement(_run(fn, args, grad), reference)   # also the warm-up (compiles, autotunes)
        except Exception as exc:  # noqa: BLE001 - a kernel that fails here must not serve
            reason = f"failed when measured ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        if reason:
            refused[backend] = reason
        else:
            ready[backend] = fn
    ready["eager"] = _impls[op]["eager"][0]
    del reference
    samples = {b: [] for b in ready}
    spent, rounds = 0.0, 0
    while rounds < _MAX_ROUNDS and (rounds < _MIN_ROUNDS or spent < _BUDGET_S):
        order = list(ready)
        order = order[rounds % len(order):] + order[:rounds % len(order)]  # rotate who goes first
        for backend in order:
            t = _elapsed(lambda: _run(ready[backend], args, grad), device)
            samples[backend].append(t)
            spent += t
        rounds += 1
    ms = {b: statistics.median(s) * 1e3 for b, s in samples.items()}
    # a kernel wins on its median time relative to eager's in the same round: a burst of load
    # on a shared machine slows both sides of a round, so it cannot crown a kernel by itself
    ratio = {b: statistics.median(t / max(e, 1e-12) for t, e in zip(s, samples["eager"]))
             for b, s in samples.items() if b != "eager"}
    best = min(ratio, key=ratio.get, default=None)
    choice = best if best is not None and ratio[best] < 1 - MARGIN else "eager"
    return Decision(choice, ms, refused)


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
_measuring = False


def _forced_impl(op: str, forced: str, device_type: str, args: tuple) -> Callable:
    reason = _why_not(op, forced, device_type, args, forced=True)
    if reason is None:
        return _impls[op][forced][0]
    usable = forced not in _unavailable and not _device_reason(forced, device_type, True)
    if usable and forced not in _impls[op]:  # e.g. attention under "cpp": the rest of the model still runs forced
        _notes[op][forced] = f"no {forced} implementation of {op} (ran eager)"
        return _impls[op]["eager"][0]
    raise BackendError(f"incubation.ops.{op}: backend {forced!r} was forced "
                       f"(INCUBATION_BACKEND / use_backend) but cannot serve this call: {reason}")


def _decide(op: str, args: tuple, device: torch.device) -> Decision:
    """The decision for this call's signature: cached, or measured now."""
    grad = _needs_grad(args)
    key = signature(op, args, grad)
    _load_file()
    env = environment(device)
    decision = _decisions.get(env, {}).get(key)
    if decision is not None and (_remeasured is None or key in _remeasured):
        return decision
    refused, candidates = {}, []
    for backend in _impls[op]:
        if backend != "eager":
            reason = _why_not(op, backend, device.type, args, forced=False)
            if reason:
                refused[backend] = reason
            else:
                candidates.append(backend)
    if not candidates:
        decision = Decision("eager", {}, refused)   # nothing to measure; not worth a file write
    elif _distributed() and not _tuning:   # no rank measures alone: all run eager here
        decision = Decision("eager", {}, {**refused, **{b: "not measured: under several ranks only the "
                                                        "signatures of ops.tune + ops.share_decisions are"
                                                        for b in candidates}})
    else:
        global _measuring
        _measuring = True
        try:
            measured = _measure(op, args, grad, candidates, device)
        finally:
            _measuring = False
        decision = Decision(measured.choice, measured.ms, {**refused, **measured.refused})
    _decisions.setdefault(env, {})[key] = decision
    if _remeasured is not None:
        _remeasured.add(key)
    if decision.ms:
        _save_file()
    return decision


def select(op: str, device: torch.device, args: tuple) -> Callable:
    """The implementation that serves this call of `op` (see the module docstring)."""
    forced = current_backend()
    if forced != "auto":
        return _forced_impl(op, forced, device.type, args)
    if torch.compiler.is_compiling() or _measuring:
        return _impls[op]["eager"][0]
    choice = _decide(op, args, device).choice
    if choice != "eager" and implements(op, choice):
        reason = _impls[op][choice][1] and _impls[op][choice][1](*args)
        if not reason:
            return _impls[op][choice][0]
        _notes[op][choice] = reason   # this call differs from the measured one (e.g. strides)
    return _impls[op]["eager"][0]


# --------------------------------------------------------------------------------------
# measuring a whole model, and agreeing across ranks
# --------------------------------------------------------------------------------------
def tune(model: torch.nn.Module, *inputs, train: bool = True, fresh: bool = False) -> dict[str, Decision]:
    """Measure every op signature of `model(*inputs)`: a no-grad forward (evaluation) and, if
    `train`, a forward + backward; `fresh` measures again the signatures already decided (a
    decision measured on a busy machine is replaced). Leaves no trace: RNG states, gradients
    and the training flag are restored. Returns the decisions made (signature -> Decision)."""
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    before = {k for e in _decisions.values() for k in e}
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    global _tuning, _remeasured
    remeasured = set() if fresh else None
    _tuning, _remeasured = True, remeasured
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.eval()
            with torch.no_grad():
                model(*inputs)
            if train:
                model.train(was_training)
                for p in grads:
                    p.grad = None
                out = model(*inputs)
                torch.autograd.backward([o for o in _outputs(out) if o.requires_grad],
                                        [torch.ones_like(o) for o in _outputs(out) if o.requires_grad])
    finally:
        _tuning, _remeasured = False, None
        model.train(was_training)
        for p, g in grads.items():
            p.grad = g
    env = environment(device)
    return {k: d for k, d in _decisions.get(env, {}).items() if k not in before or k in (remeasured or ())}


def share_decisions(src: int = 0) -> None:
    """Collective: every rank takes rank `src`'s decisions. Call it on all ranks at the same
    point, after `tune` ran on rank `src`; a signature not among them runs eager on every rank
    (under several ranks no rank measures alone)."""
    _load_file()
    table = [{env: {k: vars(d) for k, d in records.items()} for env, records in _decisions.items()}]
    torch.distributed.broadcast_object_list(table, src=src)
    _decisions.clear()
    for env, records in table[0].items():
        _decisions[env] = {k: Decision(**r) for k, r in records.items()}


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------
def backends(device: str | torch.device = "cpu") -> dict[str, dict]:
    """For every op on `device`: what serves it ("backend": the forced one, or how many
    measured signatures each backend won), the backends that can serve some call
    ("candidates"), why the others cannot ("refused"), the decisions per call signature
    ("decisions": signature -> {choice, ms, refused}), and which kernels of a backend served
    calls so far where it tells ("kernels": backend -> {kernel (and why): calls})."""
    device = torch.device(device)
    forced = current_backend()
    _load_file()
    env = environment(device)
    report = {}
    for op in OPS:
        names = (forced,) if forced != "auto" else tuple(_impls[op])
        candidates, refused = [], {}
        for backend in names:
            reason = _why_not(op, backend, device.type, (), forced=forced != "auto")
            if reason is None:
                candidates.append(backend)
            else:
                refused[backend] = reason
        for backend, reason in _notes[op].items():
            refused.setdefault(backend, f"at run time: {reason}")
        decisions = {k: vars(d) for k, d in _decisions.get(env, {}).items() if k.split(" ", 1)[0] == op}
        counts = collections.Counter(d["choice"] for d in decisions.values())
        backend = forced if forced != "auto" else (
            ", ".join(f"{b} x{n}" for b, n in counts.most_common()) or "not measured yet")
        kernels = {b: used for b, table in _kernel_reports.items() if op in table
                   for used in [table[op](device.type)] if used}
        report[op] = {"backend": backend, "candidates": candidates, "refused": refused, "decisions": decisions,
                      "kernels": kernels}
    return report


def format_backends(device: str | torch.device = "cpu") -> str:
    """`backends(device)` as a human-readable table."""
    device = torch.device(device)
    mode = current_backend()
    lines = [f"incubation.ops backends for {device.type} tensors (mode: {mode}{'' if mode != 'auto' else ', chosen by measurement'})",
             f"  environment: {environment(device)}", f"  decisions file: {cache_path()}"]
    for op, entry in backends(device).items():
        lines.append(f"  {op:<15} candidates: {', '.join(entry['candidates']) or 'none'}")
        for backend, reason in entry["refused"].items():
            lines.append(f"      {backend:<7} refused: {reason}")
        for backend, used in entry["kernels"].items():
            lines.append(f"      {backend:<7} kernels run: " + "; ".join(f"{k} x{n}" for k, n in used.items()))
        if mode == "auto":
            if not entry["decisions"]:
                lines.append("      not measured yet (measured at the first call, or by `incubation tune`)")
            for key, d in entry["decisions"].items():
                lines.append(f"      {key.split(' ', 1)[1]}: {Decision(**d).summary()}")
                for backend, reason in d["refused"].items():
                    if backend in entry["candidates"]:
                        lines.append(f"          {backend} refused: {reason}")
    return "\n".join(lines)


_load_backends()
