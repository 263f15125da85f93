"""How `incubation.ops` chooses a backend for each call: capability first, then measurement.

Every op is declared once, in ops.py, as an `Op`: its validation, eager reference, how a call
is keyed (`rows`, `key`) and its backends (`impls`: backend -> (function, capability check:
None when it can serve the call, else the reason)). The one `Dispatcher`, `DISPATCH`, owns all
mutable state: the ops, the forced backend, the decisions (in memory and in their file) and
the notes the report shows.

Per call (`DISPATCH.select`):
- A forced backend (`INCUBATION_BACKEND`, `use_backend`) serves it, or raises BackendError
  if its check refuses. It is never measured.
- `auto` looks up the call's signature, a tuple (op, rows rounded up to a power of two, the
  op's key: dtypes, feature sizes, flags, and whether gradients are needed) among the
  decisions for this device and these versions. On a miss it times every backend whose check
  accepts the call against eager: forward, plus backward when gradients are needed,
  interleaved, median of rounds. Each candidate's outputs and gradients are compared with
  eager's first, so a kernel that is broken on this machine is refused instead of chosen. A
  non-eager backend wins only if it beats eager by MARGIN. Measuring leaves no trace: the
  caller's graph, RNG and saved-tensor hooks (activation checkpointing) never see it.
- A repeated call (the same op, device, thread count, shapes, dtypes and flags) costs one
  lookup in `chosen`, the memo of what served the first such call (keyed by the need for
  gradients too where that changes it); the chosen backend's capability check still runs
  (strides may differ). The memo is cleared whenever a decision is made or forgotten.
- Inside torch.compile / torch.export the decision is read at trace time and never measured:
  the graph serves every batch size, so a backend serves there only where it won every
  measured rows bucket of the signature (`incubation tune` measures them); with no decision,
  eager serves (Inductor fuses its ops) and the report says so.
- Under torch.distributed with several ranks, a signature the ranks did not agree on
  (`share_decisions`) runs eager on every rank, so that every rank runs the same kernels.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import IncubationError
from .measure import MARGIN, measure, outputs
from .utils import cpu_name, user_cache_dir

__all__ = ["BackendError", "Op", "Decision", "Dispatcher", "DISPATCH", "BACKENDS", "MARGIN", "pow2"]

BACKENDS = ("triton", "cuda", "cpp", "eager")
CACHE_FORMAT = "incubation-dispatch/2"
_DEVICES = {"triton": ("cuda",), "cuda": ("cuda",), "cpp": ("cpu",), "eager": ("cpu", "cuda", "meta")}


class BackendError(IncubationError, RuntimeError):
    """A forced backend cannot serve a call."""


_DTYPE_NAMES = {d: str(d).replace("torch.", "") for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32)}
_BY_NAME = {**{name: d for d, name in _DTYPE_NAMES.items()}, "none": None}


def _part_name(part) -> object:
    """A signature part as the report and the decision file show it (a key holds dtypes and None)."""
    if part is None:
        return "none"
    return (_DTYPE_NAMES.get(part) or str(part).replace("torch.", "")) if isinstance(part, torch.dtype) else part


def _key_from_file(parts: list) -> tuple:
    return tuple(_BY_NAME.get(p, p) if isinstance(p, str) else p for p in parts)


def pow2(n: int) -> int:
    """Rows rounded up to a power of two, so a partial last batch reuses the full batch's choice."""
    return 1 << max(n - 1, 0).bit_length() if n > 0 else 0


@dataclass
class Op:
    """An op that `incubation.ops` dispatches. A call's signature is (name, pow2(rows(*args)),
    *key(*args), gradients?): `rows` is the size that varies with the batch, `key` the rest
    (dtype first, then what `fields` names, for the report; dtypes as torch.dtype, an absent
    tensor as None). `validate(*public arguments)` is the public function's input check: it
    raises naming the argument, else returns (device, args, call), `args` as the backends take
    them and `call` the facts it read on the way (shapes whole, dtypes, flags: all that `rows`
    and `key` read), which key the dispatcher's memo without reading a tensor again."""
    name: str
    eager: Callable
    validate: Callable[..., tuple]
    rows: Callable[..., int]
    key: Callable[..., tuple]
    fields: tuple[str, ...]
    rows_field: str = "rows"
    impls: dict = field(default_factory=dict)   # backend -> (function, capability check or None)
    reports: dict = field(default_factory=dict)  # backend -> function(device type) -> {kernel: calls}

    def __post_init__(self):
        self.impls = {"eager": (self.eager, None), **{b: i for b, i in self.impls.items() if i is not None}}

    def describe(self, key: tuple) -> str:
        """A signature as the report and the decision file show it."""
        _, rows, dtype, *rest = key[:-1]
        parts = [f"{name}={_part_name(value)}" for name, value in zip(self.fields, rest)]
        return " ".join([self.name, _part_name(dtype), f"{self.rows_field}={rows}", *parts, "fwd+bwd" if key[-1] else "fwd"])


@dataclass
class Decision:
    """Which backend serves one call signature, and the evidence."""
    choice: str
    ms: dict = field(default_factory=dict)        # backend -> median milliseconds
    refused: dict = field(default_factory=dict)   # backend -> why it was not a candidate

    def summary(self) -> str:
        if not self.ms:
            return f"only {self.choice} can serve it"
        # 4 significant digits: the 3 % rule between two times must be visible in the line
        times = ", ".join(f"{b} {t:.4g} ms" for b, t in sorted(self.ms.items(), key=lambda kv: kv[1]))
        ratio = min((t / self.ms["eager"] for b, t in self.ms.items() if b != "eager"), default=None) \
            if self.ms.get("eager") else None
        versus = f" (best kernel at {ratio:.3f}x eager; it must be < {1 - MARGIN:.2f}x)" if ratio is not None else ""
        return f"{times}{versus} -> {self.choice}"


def cache_path() -> str:
    """The decision file: $INCUBATION_CACHE_DIR/dispatch.json, else the user cache dir."""
    return os.path.join(user_cache_dir(), "dispatch.json")


def _valid(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("choice"), str) and isinstance(record.get("key"), list)
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
        warnings.warn(f"incubation: ignoring the dispatch cache {path}: unreadable ({exc})", stacklevel=4)
        return {}
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT
            and isinstance(data.get("environments"), dict)
            and all(isinstance(e, dict) and all(_valid(r) for r in e.values())
                    for e in data["environments"].values())):
        warnings.warn(f"incubation: ignoring the dispatch cache {path}: not a {CACHE_FORMAT} file", stacklevel=4)
        return {}
    return data["environments"]


def _write_file(environments: dict) -> None:
    path = cache_path()
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
                      "decisions are kept for this process only (set INCUBATION_CACHE_DIR)", stacklevel=4)


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _needs_grad(args: tuple) -> bool:
    if not torch.is_grad_enabled():
        return False
    for a in args:   # a loop, not any(generator): this runs at every call
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
    return False


# os.environ.get raises and catches two KeyErrors for an unset variable (0.7 us, a third of the
# per-call budget); CPython's backing dict of encoded names answers the same in 30 ns.
_ENVIRON, _BACKEND_VARIABLE = os.environ._data, os.environ.encodekey("INCUBATION_BACKEND")
_META = torch.device("meta")
_is_compiling = torch.compiler.is_compiling   # (one attribute lookup less per call; dynamo knows the function)


def _backend_variable() -> Optional[str]:
    """INCUBATION_BACKEND as os.environ.get returns it."""
    value = _ENVIRON.get(_BACKEND_VARIABLE)
    return None if value is None else os.environ.decodevalue(value)


# --------------------------------------------------------------------------------------
# the dispatcher
# --------------------------------------------------------------------------------------
class Dispatcher:
    """The ops, the forced backend, the decisions (memory and file) and the report's notes."""

    def __init__(self):
        self.ops: dict[str, Op] = {}
        self.devices = dict(_DEVICES)               # backend -> device types it serves
        self.unavailable: dict[str, str] = {}       # backend -> why it cannot serve anything
        self.forced: Optional[str] = None           # use_backend's; a plain attribute torch.compile can trace
        self.decisions: dict[str, dict[tuple, Decision]] = {}   # environment -> signature -> decision
        self.loaded = False                         # whether the file was read into `decisions`
        self.notes: dict[str, dict[str, str]] = collections.defaultdict(dict)   # op -> backend -> refusal at a call
        self.graph_notes: dict[str, dict[str, str]] = collections.defaultdict(dict)   # op -> signature -> why
        self.environments: dict[tuple, str] = {}   # (device, CPU threads) -> environment
        self.tuning = False                         # inside tune(): measure even under several ranks
        self.remeasured: Optional[set] = None       # inside tune(fresh=True): the signatures measured anew
        self.measuring = False
        # (op, device, threads, the call's facts from op.validate), with the need for gradients where it
        # changes the choice -> (backend, function, capability check or None): what served that exact
        # call, so that a repeated call costs one dict lookup. Cleared whenever a decision changes.
        self.chosen: dict[tuple, tuple] = {}

    # ---- the ops and their backends --------------------------------------------------
    def add(self, op: Op) -> Op:
        self.ops[op.name] = op
        return op

    def register(self, op: str, backend: str, fn: Callable, check: Optional[Callable] = None,
                 devices: Optional[tuple[str, ...]] = None) -> None:
        """Make `fn` `backend`'s implementation of `op` (`check(*args)`: None or a reason).

        A backend name outside BACKENDS (a plug-in, a test double) must say which device types
        it serves with `devices`."""
        if op not in self.ops:
            raise ValueError(f"unknown op {op!r}; ops are {tuple(self.ops)}")
        if backend not in self.devices:
            if not devices:
                raise ValueError(f"unknown backend {backend!r}; backends are {BACKENDS} "
                                 "(a new one must name the device types it serves: devices=('cuda',))")
            self.devices[backend] = tuple(devices)
        self.ops[op].impls[backend] = (fn, check)
        self.clear_decisions()

    def implements(self, op: str, backend: str) -> bool:
        """Whether `backend` has a kernel for `op` at all (it may still refuse some calls)."""
        return backend not in self.unavailable and backend in self.ops[op].impls

    # ---- forcing a backend -----------------------------------------------------------
    def current_backend(self) -> str:
        """The forced backend (`use_backend`, else INCUBATION_BACKEND), or 'auto'."""
        name = self.forced or _backend_variable() or "auto"
        if name != "auto" and name not in self.devices:
            raise ValueError(f"INCUBATION_BACKEND={name!r} is not one of {('auto',) + BACKENDS}")
        return name

    @contextlib.contextmanager
    def use_backend(self, name: str):
        """Force `name` ('auto' restores the measured choice) for the ops called inside the block."""
        if name != "auto" and name not in self.devices:
            raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
        previous, self.forced = self.forced, name
        try:
            yield
        finally:
            self.forced = previous

    # ---- capability ------------------------------------------------------------------
    def _device_reason(self, backend: str, device_type: str, forced: bool) -> Optional[str]:
        if backend == "eager":
            return None
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available on this machine"
        if backend == "triton" and device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return "Triton needs CUDA tensors (set TRITON_INTERPRET=1 to run it on CPU for testing)"
            if not forced:
                return "the Triton interpreter runs on CPU only when forced (it is for testing, not speed)"
            return None
        if device_type not in self.devices.get(backend, ()):
            served = "/".join(d.upper() for d in self.devices.get(backend, ()))
            return f"the {backend} kernels need {served} tensors, got {device_type}"
        return None

    def why_not(self, op: Op, backend: str, device_type: str, args: tuple, forced: bool) -> Optional[str]:
        """None if `backend` can serve this call of `op` (args=() asks about the device only)."""
        if backend == "eager":
            return None
        reason = self._device_reason(backend, device_type, forced) or self.unavailable.get(backend)
        if reason:
            return reason
        if backend not in op.impls:
            return f"no {backend} implementation of {op.name}"
        check = op.impls[backend][1]
        return check(*args) if (check is not None and args) else None

    # ---- the decisions, in memory and on disk -------------------------------------------
    def environment(self, device: torch.device) -> str:
        """What a measurement depends on besides the call: the device and the software (and, on
        the CPU, the thread count, which changes which kernel is faster)."""
        threads = torch.get_num_threads()   # read for every device: device.type costs 0.25 us a call
        env = self.environments.get((device, threads))
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
                name = cpu_name()
            env = (f"{device.type}: {name} | torch {torch.__version__} | triton {triton_version} "
                   f"| incubation {__version__}" + (f" | {threads} threads" if device.type == "cpu" else ""))
            self.environments[(device, threads)] = env
        return env

    def _load_file(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        for env, records in _read_file().items():
            mine = self.decisions.setdefault(env, {})
            for r in records.values():
                key = _key_from_file(r["key"])
                op = self.ops.get(key[0])
                # kept if it chose a backend this process knows and weighed every backend the op has
                # now: a backend registered or built since (a plug-in, the extension) is measured anew
                weighed = {"eager", *r.get("ms", {}), *r.get("refused", {})}
                if r["choice"] in self.devices and op is not None and weighed >= op.impls.keys():
                    mine.setdefault(key, Decision(r["choice"], dict(r.get("ms", {})), dict(r.get("refused", {}))))

    def _save_file(self) -> None:
        """Merge this process's measured decisions into the file (best effort, atomic)."""
        environments = _read_file()
        for env, records in self.decisions.items():
            measured = {self.describe(k): {"key": [_part_name(p) for p in k], **vars(d)} for k, d in records.items() if d.ms}
            if measured:
                environments.setdefault(env, {}).update(measured)
        _write_file(environments)

    def clear_decisions(self, memory_only: bool = True) -> None:
        """Forget the measured decisions (and, with memory_only=False, delete the cache file)."""
        self.decisions.clear()
        self.chosen.clear()
        self.loaded = False
        if not memory_only:
            with contextlib.suppress(FileNotFoundError):
                os.remove(cache_path())

    def describe(self, key: tuple) -> str:
        op = self.ops.get(key[0])
        return op.describe(key) if op else " ".join(map(str, key))

    # ---- selection ---------------------------------------------------------------------
    def select(self, op: Op, device: torch.device, args: tuple, call: tuple) -> Callable:
        """The implementation that serves this call of `op` (see the module docstring); `device`,
        `args` and `call` are what `op.validate` returned for it."""
        if (self.forced is None and not self.measuring and self.remeasured is None
                and _ENVIRON.get(_BACKEND_VARIABLE) is None and not _is_compiling()):
            # auto, run by Python: the memo (the whole cost of a repeated call), first for a call
            # served alike with and without gradients (then their need is not read: 1 us in place)
            memo = (op.name, device, torch.get_num_threads(), call)
            chosen = self.chosen.get(memo)
            if chosen is None:
                grad = _needs_grad(args)
                chosen = self.chosen.get((memo, grad)) or self._memoize(op, device, args, memo, grad)
        else:
            chosen = self._unmemoized(op, device, args)
        backend, fn, check = chosen
        reason = check and check(*args)
        if not reason:
            return fn
        _note(op.name, backend, reason)   # this call differs from the measured one (e.g. strides)
        return op.eager

    def _memoize(self, op: Op, device: torch.device, args: tuple, memo: tuple, grad: bool) -> tuple:
        """Decide the call (measuring if need be) and memoize what serves it: under `memo` if
        it is served alike with and without gradients, else under (memo, grad). A call with
        gradients also decides its forward alone (the cheaper measurement) to know that."""
        if device == _META:   # shapes only: eager's shape rules serve every backend
            chosen = self.chosen[memo] = ("eager", op.eager, None)
            return chosen
        chosen = self._implementation(op, self._decide(op, args, device, grad).choice)
        other = self._decide(op, args, device, not grad, measure_now=grad)
        served_alike = other is not None and self._implementation(op, other.choice) == chosen
        self.chosen[memo if served_alike else (memo, grad)] = chosen
        return chosen

    def _unmemoized(self, op: Op, device: torch.device, args: tuple) -> tuple:
        """select's answer where the memo does not serve: forced, measuring or compiling."""
        if device == _META:
            return "eager", op.eager, None
        forced = self.forced or _backend_variable()
        if forced and forced != "auto":
            return forced, self._forced_impl(op, self.current_backend(), device.type, args), None
        if self.measuring:
            return "eager", op.eager, None
        if _is_compiling():
            choice = _graph_choice(op.name, str(device), (*op.key(*args), _needs_grad(args)))
        else:
            choice = self._decide(op, args, device, _needs_grad(args)).choice
        return self._implementation(op, choice)

    def _implementation(self, op: Op, choice: str) -> tuple[str, Callable, Optional[Callable]]:
        """The backend that serves a call decided for `choice`, its function and capability check
        (eager: none)."""
        if choice != "eager" and choice in op.impls and choice not in self.unavailable:
            return (choice, *op.impls[choice])
        return "eager", op.eager, None

    def _forced_impl(self, op: Op, forced: str, device_type: str, args: tuple) -> Callable:
        reason = self.why_not(op, forced, device_type, args, forced=True)
        if reason is None:
            return op.impls[forced][0]
        usable = forced not in self.unavailable and not self._device_reason(forced, device_type, True)
        if usable and forced not in op.impls:  # e.g. attention under "cpp": the rest of the model still runs forced
            _note(op.name, forced, f"no {forced} implementation of {op.name} (ran eager)")
            return op.impls["eager"][0]
        raise BackendError(f"incubation.ops.{op.name}: backend {forced!r} was forced "
                           f"(INCUBATION_BACKEND / use_backend) but cannot serve this call: {reason}")

    def _candidates(self, op: Op, args: tuple, device: torch.device) -> tuple[list[str], dict]:
        refused, candidates = {}, []
        for backend in op.impls:
            if backend != "eager":
                reason = self.why_not(op, backend, device.type, args, forced=False)
                if reason:
                    refused[backend] = reason
                else:
                    candidates.append(backend)
        return candidates, refused

    def _decide(self, op: Op, args: tuple, device: torch.device, grad: bool,
                measure_now: bool = True) -> Optional[Decision]:
        """The decision for this call's signature with or without gradients: cached, or measured
        now (measure_now=False: None instead of measuring)."""
        key = (op.name, pow2(op.rows(*args)), *op.key(*args), grad)
        if not self.loaded:
            self._load_file()
        env = self.environment(device)
        decision = self.decisions.get(env, {}).get(key)
        if decision is not None and (self.remeasured is None or key in self.remeasured):
            return decision
        candidates, refused = self._candidates(op, args, device)
        if not candidates:
            decision = Decision("eager", {}, refused)   # nothing to measure; not worth a file write
        elif not measure_now:
            return None
        elif _distributed() and not self.tuning:   # no rank measures alone: all run eager here
            decision = Decision("eager", {}, {**refused, **{b: "not measured: under several ranks only the "
                                                            "signatures of ops.tune + ops.share_decisions are"
                                                            for b in candidates}})
        else:
            self.measuring = True
            try:
                choice, ms, failed = measure(op.impls["eager"][0], {b: op.impls[b][0] for b in candidates},
                                             args, grad, device)
            finally:
                self.measuring = False
            decision = Decision(choice, ms, {**refused, **failed})
        self.decisions.setdefault(env, {})[key] = decision
        self.chosen.clear()
        if self.remeasured is not None:
            self.remeasured.add(key)
        if decision.ms:
            self._save_file()
        return decision

    def graph_choice(self, name: str, device: torch.device, key: tuple) -> str:
        """The backend a compiled graph uses for calls of op `name` whose signature is `key`
        but for the rows: the one every measured rows bucket chose, else eager (with a note)."""
        self._load_file()
        choices = {d.choice for k, d in self.decisions.get(self.environment(device), {}).items()
                   if k[0] == name and k[2:] == key}
        shown = self.ops[name].describe((name, "any", *key))
        if len(choices) == 1:
            (choice,) = choices
            self.graph_notes[name].pop(shown, None)
            return choice
        self.graph_notes[name][shown] = (
            "eager: no measured decision (run `incubation tune` before compiling)" if not choices else
            f"eager: the measured rows buckets chose differently ({', '.join(sorted(choices))})")
        return "eager"

    # ---- measuring a whole model, and agreeing across ranks ------------------------------
    def tune(self, model: torch.nn.Module, *inputs, train: bool = True, fresh: bool = False) -> dict[str, Decision]:
        """Measure every op signature of `model(*inputs)`: a no-grad forward (evaluation) and, if
        `train`, a forward + backward; `fresh` measures again the signatures already decided (a
        decision measured on a busy machine is replaced). Leaves no trace: RNG states, gradients
        and the training flag are restored. Returns the decisions made (signature -> Decision)."""
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        before = {k for e in self.decisions.values() for k in e}
        grads = {p: p.grad for p in model.parameters()}
        was_training = model.training
        remeasured = set() if fresh else None
        self.tuning, self.remeasured = True, remeasured
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                model.eval()
                with torch.no_grad():
                    model(*inputs)
                if train:
                    model.train(was_training)
                    for p in grads:
                        p.grad = None
                    out = outputs(model(*inputs))
                    torch.autograd.backward([o for o in out if o.requires_grad],
                                            [torch.ones_like(o) for o in out if o.requires_grad])
        finally:
            self.tuning, self.remeasured = False, None
            model.train(was_training)
            for p, g in grads.items():
                p.grad = g
        return {self.describe(k): d for k, d in self.decisions.get(self.environment(device), {}).items()
                if k not in before or k in (remeasured or ())}

    def share_decisions(self, src: int = 0) -> None:
        """Collective: every rank takes rank `src`'s decisions. Call it on all ranks at the same
        point, after `tune` ran on rank `src`; a signature not among them runs eager on every rank
        (under several ranks no rank measures alone)."""
        self._load_file()
        table = [{env: [(k, vars(d)) for k, d in records.items()] for env, records in self.decisions.items()}]
        torch.distributed.broadcast_object_list(table, src=src)
        self.decisions = {env: {k: Decision(**r) for k, r in records} for env, records in table[0].items()}
        self.chosen.clear()

    # ---- reporting ---------------------------------------------------------------------
    def backends(self, device: str | torch.device = "cpu") -> dict[str, dict]:
        """For every op on `device`: what serves it ("backend": the forced one, or how many
        measured signatures each backend won), the backends that can serve some call
        ("candidates"), why the others cannot ("refused"), the decisions per call signature
        ("decisions": signature -> {choice, ms, refused}), what compiled graphs run where no
        decision serves them ("compiled"), and which kernels of a backend served calls so far
        where it tells ("kernels": backend -> {kernel (and why): calls})."""
        device = torch.device(device)
        forced = self.current_backend()
        self._load_file()
        env = self.environment(device)
        report = {}
        for name, op in self.ops.items():
            candidates, refused = [], {}
            for backend in (forced,) if forced != "auto" else tuple(op.impls):
                reason = self.why_not(op, backend, device.type, (), forced=forced != "auto")
                if reason is None:
                    candidates.append(backend)
                else:
                    refused[backend] = reason
            for backend, reason in self.notes[name].items():
                refused.setdefault(backend, f"at run time: {reason}")
            decisions = {self.describe(k): vars(d) for k, d in self.decisions.get(env, {}).items() if k[0] == name}
            counts = collections.Counter(d["choice"] for d in decisions.values())
            backend = forced if forced != "auto" else (
                ", ".join(f"{b} x{n}" for b, n in counts.most_common()) or "not measured yet")
            kernels = {b: used for b, kernels_used in op.reports.items() for used in [kernels_used(device.type)] if used}
            report[name] = {"backend": backend, "candidates": candidates, "refused": refused, "decisions": decisions,
                            "compiled": dict(self.graph_notes[name]), "kernels": kernels}
        return report

    def format_backends(self, device: str | torch.device = "cpu") -> str:
        """`backends(device)` as a human-readable table."""
        device = torch.device(device)
        mode = self.current_backend()
        lines = [f"incubation.ops backends for {device.type} tensors "
                 f"(mode: {mode}{'' if mode != 'auto' else ', chosen by measurement'})",
                 f"  environment: {self.environment(device)}", f"  decisions file: {cache_path()}"]
        for op, entry in self.backends(device).items():
            lines.append(f"  {op:<15} candidates: {', '.join(entry['candidates']) or 'none'}")
            lines += [f"      {backend:<7} refused: {reason}" for backend, reason in entry["refused"].items()]
            lines += [f"      {backend:<7} kernels run: " + "; ".join(f"{k} x{n}" for k, n in used.items())
                      for backend, used in entry["kernels"].items()]
            if mode != "auto":
                continue
            if not entry["decisions"]:
                lines.append("      not measured yet (measured at the first call, or by `incubation tune`; "
                             "compiled graphs run eager until then)")
            for key, d in entry["decisions"].items():
                lines.append(f"      {key.split(' ', 1)[1]}: {Decision(**d).summary()}")
                lines += [f"          {backend} refused: {reason}" for backend, reason in d["refused"].items()
                          if backend in entry["candidates"]]
            lines += [f"      compiled {key.split(' ', 1)[1]}: {why}" for key, why in entry["compiled"].items()]
        return "\n".join(lines)


DISPATCH = Dispatcher()
clear_decisions = DISPATCH.clear_decisions


@torch.compiler.assume_constant_result
def _note(name: str, backend: str, reason: str) -> None:
    """Record why `backend` did not serve a call of op `name`, for the report (plain Python
    when torch.compile traces the call: no guard on the notes)."""
    DISPATCH.notes[name][backend] = reason


@torch.compiler.assume_constant_result
def _graph_choice(name: str, device: str, key: tuple) -> str:
    """DISPATCH.graph_choice, run as plain Python when torch.compile traces a call: the
    choice enters the graph as a constant (no file reading or dict guards traced)."""
    return DISPATCH.graph_choice(name, torch.device(device), key)
