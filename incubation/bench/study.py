"""The study: E2E vs Deep Incubation vs LEMON vs Apollo vs growth-initialised incubation, at
matched training budgets, on Fashion-MNIST (see docs/STUDY.md for the results).

    incubation bench study run    [--out runs/study] [--budgets 0.5,1,2,4] [--seeds 3] [--parallel 2]
    incubation bench study report [--out runs/study]

The target is a ViT of --depth blocks cut into K modules. A budget is counted in training FLOPs,
in units of one E2E epoch (3 x forward FLOPs x the training images), and every method gets it:
  e2e          the target trained end to end.
  deep         Deep Incubation: meta model, K incubations, assembly; the stages' epochs keep the
               paper's proportions (meta 3 : each module 1 : assembly 1) scaled to the budget.
  deep-lemon   the same with each module initialised by LEMON depth expansion of its meta block
               (`incubate --init lemon`), sharing the `deep` meta model.
  lemon        a ViT of half the depth and width trained on LEMON_SMALL_SHARE of the budget,
               expanded losslessly to the target, trained on the rest with LEMON's schedule.
  apollo       progressive depth growth (LVPS, weight sharing, interpolation) over the budget.
Every budget runs seed 0; the largest runs --seeds seeds (the final points, mean +- std).
FLOPs are the engine's count (`incubation.train`), a hybrid's frozen meta blocks without the
backward they skip. Wall-clock is measured per job: --parallel jobs at once, each on
its share of the cores (incubation.launch.local.LocalLauncher).

Every method at every point is a pipeline run (`incubation.pipeline.RunSpec`) in its own run dir,
<out>/<method>/b<budget>-s<seed>/, whose stages are the pipeline's (`pipeline.stage_dir`), each
with its epochs from the budget (`stage_recipes`). `deep` holds the meta model that the other
Deep Incubation variants share (`meta_from`), `lemon-small` is LEMON's small model (its `e2e`).
The job graph is the pipeline's (`pipeline.jobs`, jobs named by their directory under <out>),
plus two jobs the pipeline has no stage for, built here as `launch.Job`s with the same options:
Apollo is `incubation grow` (<run>/grow/), LEMON's expansion and training the `_lemon` subcommand
of this module (`train_lemon`, <run>/lemon/). `run` writes the graph to <out>/plan.json and runs
it (`incubation.launch.local.LocalLauncher`, a process per stage); a stage is finished when its
final checkpoint exists, so `run` skips finished stages and an interrupted one resumes from its
checkpoint (the engine's): `run` can be repeated until everything is done. It refuses an --out
made with other settings. With --val-size each method's final model is then tested on the test
split (<its last stage>/test.json). It then writes <out>/study.json, study.md and study.png,
read from the stages' own records (`pipeline.read_stage`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from incubation import VisionTransformer, ViTConfig, deep, pipeline
from incubation.bench.study_report import METHODS, markdown, plot
from incubation.cli.exits import run_main
from incubation.cli.options import add_common_arguments, nonempty_path, out_dir, positive_int, spec_from_args
from incubation.errors import IncubationError
from incubation.growth import ApolloViT, apollo_schedule, lemon_config, lemon_expand
from incubation.launch import Job
from incubation.launch.local import LocalLauncher
from incubation.nn import train_flops_per_image
from incubation.pipeline import read_stage, stage_dir
from incubation.presets import get_preset
from incubation.train import steps_per_epoch
from incubation.train.checkpoint import load_checkpoint
from incubation.utils import atomic_write, versions

# the Deep Incubation variants: (module init, how the hybrid runs its frozen meta blocks); all share the meta model
DEEP_VARIANTS = {"deep": ("random", "eval"), "deep-lemon": ("lemon", "eval"), "deep-metatrain": ("random", "train")}
DEEP_EPOCHS = {"meta": 3.0, "incubate": 1.0, "assemble": 1.0}  # the paper's 300 : 100 : 100
LEMON_SMALL_SHARE = 0.25     # of the budget spent on training the small model
CHECKPOINT_EVERY = 100       # steps: an interruption loses at most this much of a job
BATCH = get_preset("tiny").recipe("e2e").batch_size   # every stage's (the tiny preset's recipes)


@dataclass
class StudyConfig:
    depth: int = 12
    width: int = 64
    heads: int = 4
    patch: int = 7
    K: int = 4
    budgets: list = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # E2E epochs of training FLOPs
    seeds: int = 3
    methods: list = field(default_factory=lambda: list(METHODS))
    data_dir: Optional[str] = None
    limit_train: Optional[int] = None  # for the CI miniature: train / evaluate on N random images
    limit_eval: Optional[int] = None
    val_size: Optional[int] = None     # evaluate on this many held-out training images (choices); test at the end

    def __post_init__(self):
        errors = [f"{name} must be a positive integer, got {getattr(self, name)!r}"
                  for name in ("depth", "width", "heads", "patch", "K", "seeds")
                  if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not self.budgets or any(not b > 0 for b in self.budgets):
            errors.append(f"budgets must be positive numbers, got {self.budgets}")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            errors.append(f"methods must be some of {list(METHODS)}, got {self.methods}")
        if self.depth % 2 or self.width % 2 or self.heads % 2:
            errors.append(f"depth, width and heads must be even (LEMON starts from half of each), got "
                          f"{self.depth}, {self.width}, {self.heads}")
        if errors:
            raise ValueError("invalid study settings: " + "; ".join(errors))
        self.budgets = sorted(float(b) for b in self.budgets)

    def target(self) -> ViTConfig:
        return ViTConfig(img_size=28, patch_size=self.patch, in_chans=1, num_classes=10,
                         embed_dim=self.width, depth=self.depth, num_heads=self.heads)

    def runs(self) -> list[tuple[float, int]]:
        """(budget, seed) of every point: seed 0 at each budget, all seeds at the largest."""
        return [(b, 0) for b in self.budgets[:-1]] + [(self.budgets[-1], s) for s in range(self.seeds)]


# ----------------------------------------------------------------------------------------------
# the runs: a pipeline RunSpec per method and point, in <out>/<method>/b<budget>-s<seed>/
# ----------------------------------------------------------------------------------------------
def run_dir(out: str, method: str, budget: float, seed: int) -> str:
    """The run dir of `method` at one point; its stages are the pipeline's (`pipeline.stage_dir`).
    "lemon-small" is LEMON's small model, "deep" also holds the meta model every variant shares."""
    return os.path.join(out, method, f"b{budget:g}-s{seed}")


def method_dirs(cfg: StudyConfig, out: str, method: str, budget: float, seed: int) -> list[str]:
    """The stage directories whose costs add up to a method's at one point (the last one gives its
    accuracy and holds its final model)."""
    def run(name):
        return run_dir(out, name, budget, seed)
    if method in DEEP_VARIANTS:
        return [stage_dir(run("deep"), "meta"), *[stage_dir(run(method), "incubate", i) for i in range(cfg.K)],
                stage_dir(run(method), "assemble")]
    return {"e2e": [stage_dir(run("e2e"), "e2e")], "apollo": [stage_dir(run("apollo"), "grow")],
            "lemon": [stage_dir(run("lemon-small"), "e2e"), os.path.join(run("lemon"), "lemon")]}[method]


def _spec(cfg: StudyConfig, directory: str, seed: int, epochs: dict) -> pipeline.RunSpec:
    """A run of the study's target on Fashion-MNIST: the tiny preset's recipes (batch 128, AdamW,
    warmup-cosine), evaluated at the end; `epochs`: stage -> its epochs."""
    return pipeline.RunSpec(data_dir=cfg.data_dir, val_size=cfg.val_size, out=directory, preset="tiny",
                            patch_size=cfg.patch, depth=cfg.depth, embed_dim=cfg.width, num_heads=cfg.heads,
                            modules=cfg.K, seed=seed, no_progress=True, limit_train=cfg.limit_train,
                            limit_eval=cfg.limit_eval, checkpoint_every=CHECKPOINT_EVERY, recipe={"evals": 1},
                            stage_recipes={stage: {"epochs": e} for stage, e in epochs.items()})


def data(cfg: StudyConfig, out: str) -> pipeline.Context:
    """The study's data (training and evaluation sets) and target, as each of its runs loads them."""
    return pipeline.context(_spec(cfg, run_dir(out, "e2e", cfg.budgets[0], 0), 0, {}))


def _epochs(steps: int, num_train: int) -> float:
    """`steps` in epochs (epochs_to_steps rounds them back to exactly `steps`)."""
    return steps / steps_per_epoch(num_train, BATCH)


def _deep_epoch_flops(cfg: StudyConfig, num_train: int) -> float:
    """Training FLOPs of Deep Incubation at one unit of DEEP_EPOCHS."""
    target, K = cfg.target(), cfg.K
    meta = deep.build_meta_model(target, K)
    hybrids = sum(deep.build_hybrid(meta, target, i).train_flops_per_image() for i in range(K))
    return num_train * (DEEP_EPOCHS["meta"] * train_flops_per_image(meta) + DEEP_EPOCHS["incubate"] * hybrids
                        + DEEP_EPOCHS["assemble"] * train_flops_per_image(target))


def point_specs(cfg: StudyConfig, out: str, num_train: int, budget: float, seed: int) -> dict:
    """name -> RunSpec of each run at one point, in the order their jobs start (the longest chain,
    Deep Incubation, first): each stage's epochs spend the method's share of the budget."""
    target = cfg.target()
    flops = budget * train_flops_per_image(target) * num_train   # the budget unit: an E2E epoch

    def spec(name, **epochs):
        return _spec(cfg, run_dir(out, name, budget, seed), seed, epochs)
    specs = {}
    if set(DEEP_VARIANTS) & set(cfg.methods):
        scale = flops / _deep_epoch_flops(cfg, num_train)   # a stage's epochs: DEEP_EPOCHS x scale
        specs["deep"] = base = spec("deep", **{k: v * scale for k, v in DEEP_EPOCHS.items()})
        for method in [m for m in DEEP_VARIANTS if m in cfg.methods and m != "deep"]:
            init, meta_mode = DEEP_VARIANTS[method]
            specs[method] = dataclasses.replace(base, out=run_dir(out, method, budget, seed), init=init,
                                                meta_mode=meta_mode, meta_from=base.out)
    if "lemon" in cfg.methods:
        small = train_flops_per_image(_small(target)) * BATCH
        specs["lemon-small"] = dataclasses.replace(
            spec("lemon-small", e2e=_epochs(max(1, round(LEMON_SMALL_SHARE * flops / small)), num_train)),
            depth=cfg.depth // 2, embed_dim=cfg.width // 2, num_heads=cfg.heads // 2)
        steps = max(1, round((1 - LEMON_SMALL_SHARE) * budget * num_train / BATCH))
        specs["lemon"] = spec("lemon", _lemon=_epochs(steps, num_train))
    if "apollo" in cfg.methods:
        specs["apollo"] = spec("apollo", grow=_epochs(_apollo_steps(target, flops, BATCH, seed), num_train))
    if "e2e" in cfg.methods:
        specs["e2e"] = spec("e2e", e2e=budget)
    return specs


def _jobs(cfg: StudyConfig, out: str, specs: dict, python: str = sys.executable) -> tuple[list, set]:
    """(the unfinished jobs of one point's runs, the names of its finished ones). The Deep
    Incubation runs and E2E are the pipeline's graphs; Apollo is `incubation grow` and LEMON's
    expansion the study's `_lemon` subcommand, each one job with the pipeline's options."""
    graph, done = [], set()
    for name, spec in specs.items():
        if name in DEEP_VARIANTS or name in ("e2e", "lemon-small"):
            stages = ["e2e"] if name in ("e2e", "lemon-small") else \
                ["meta"] * (name == "deep") + ["incubate", "assemble"] * (name in cfg.methods)
            graph += pipeline.jobs(spec, python, stages=stages, root=out)
            done |= pipeline.finished(spec, root=out)
            continue
        if name == "lemon":
            small = specs["lemon-small"].run_dir
            argv = pipeline.stage_argv(spec, "_lemon", python=python, program="incubation.bench.study")
            argv, needs = argv + ["--small", small], [os.path.relpath(stage_dir(small, "e2e"), out)]
            directory = os.path.join(spec.run_dir, "lemon")
        else:   # apollo
            argv, needs = pipeline.stage_argv(spec, "grow", python=python), []
            directory = stage_dir(spec.run_dir, "grow")
        name = os.path.relpath(directory, out)
        if os.path.exists(os.path.join(directory, "final.json")):
            done.add(name)
        else:
            graph.append(Job(name, argv, os.path.join(directory, "log.txt"), needs))
    return graph, done


def plan(cfg: StudyConfig, out: str, num_train: int, python: str = sys.executable) -> tuple[list, set]:
    """(every unfinished job of the study, the names of the finished ones): the largest budgets
    first, so that the small jobs fill the end of a parallel run."""
    graph, done = [], set()
    for budget, seed in reversed(cfg.runs()):
        jobs, finished = _jobs(cfg, out, point_specs(cfg, out, num_train, budget, seed), python)
        graph, done = graph + jobs, done | finished
    return graph, done


def _small(target: ViTConfig) -> ViTConfig:
    """LEMON's starting point: half the depth, width and heads (the paper's ViT(6,384) -> ViT(12,768))."""
    return target.replace(depth=target.depth // 2, embed_dim=target.embed_dim // 2, num_heads=target.num_heads // 2)


def _apollo(target: ViTConfig, steps: int, seed: int) -> ApolloViT:
    return ApolloViT(VisionTransformer(target), total_steps=steps, seed=seed)   # the authors' schedule


def _apollo_fits(depth: int, steps: int) -> bool:
    try:
        apollo_schedule(depth, steps)
    except ValueError:
        return False
    return True


def _apollo_steps(target: ViTConfig, flops: float, batch: int, seed: int) -> int:
    """The most Apollo steps whose training FLOPs stay within `flops` (its sampled depths are a
    pure function of (seed, step), so the cost of a run is known before it starts)."""
    per_depth = {d: batch * train_flops_per_image(target.replace(depth=d)) for d in range(1, target.depth + 1)}

    def cost(steps):
        model = _apollo(target, steps, seed)
        return sum(per_depth[model.depth_at(s)] for s in range(steps))

    low = next(n for n in range(1, 1 << 20) if _apollo_fits(target.depth, n))   # every stage gets a step
    high = max(low, 4 * math.ceil(flops / per_depth[target.depth]))
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= flops else (low, mid - 1)
    return low


def train_lemon(spec: pipeline.RunSpec, small_run: str):
    """LEMON (the `_lemon` job): the small model of `small_run` (its e2e stage) expanded losslessly to
    the target of `spec`, then trained on the rest of the budget with LEMON's schedule, into
    <run dir>/lemon/."""
    from incubation.train import train
    run = pipeline.context(spec)
    state, md = load_checkpoint(os.path.join(stage_dir(small_run, "e2e"), "final"))
    small = VisionTransformer(ViTConfig.from_dict(md["target_config"]))
    small.load_state_dict(state)
    t = run.target
    big = lemon_expand(small, embed_dim=t.embed_dim, depth=t.depth, num_heads=t.num_heads, seed=spec.seed)
    cfg = lemon_config(run.train_config(run.recipe("e2e")))
    return train(big, run.train_set, run.eval_set, cfg, os.path.join(spec.run_dir, "lemon"), stage="lemon",
                 metadata={"stage": "lemon", "target_config": big.config.to_dict()})


def _test_set(cfg: StudyConfig):
    from incubation.data import load_dataset
    return pipeline.subset(load_dataset("fashion-mnist", "test", cfg.data_dir), cfg.limit_eval)   # the runs' draw


def _record_tests(cfg: StudyConfig, out: str) -> None:
    """With --val-size (the runs evaluate on validation): each method's final model on the test
    split, once, into <its last stage>/test.json."""
    from incubation.train import evaluate
    if not cfg.val_size:
        return
    finals = [(m, method_dirs(cfg, out, m, b, s)[-1]) for b, s in cfg.runs() for m in cfg.methods]
    todo = [(m, d) for m, d in finals if os.path.exists(os.path.join(d, "final.json"))
            and not os.path.exists(os.path.join(d, "test.json"))]
    test_set = _test_set(cfg) if todo else None
    for method, directory in todo:   # Apollo's final model is the plain ViT it exports
        state, md = load_checkpoint(os.path.join(directory, "model" if method == "apollo" else "final"))
        model = VisionTransformer(ViTConfig.from_dict(md["target_config"]))
        model.load_state_dict(state)
        atomic_write(os.path.join(directory, "test.json"), json.dumps({"test_acc": evaluate(model, test_set)["acc"]}).encode())


# ----------------------------------------------------------------------------------------------
# running: a process per job, --parallel at once, in dependency order
# ----------------------------------------------------------------------------------------------
def _load_config(out: str) -> StudyConfig:
    path = os.path.join(out, "study_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: start the study with `incubation bench study run --out {out}`")
    return StudyConfig(**json.load(open(path)))


def _claim(out: str, cfg: StudyConfig) -> None:
    """Record the settings of `out`, or check that they are those it was started with."""
    path = os.path.join(out, "study_config.json")
    if os.path.exists(path):
        old = _load_config(out)
        diff = [f"{k}: {getattr(old, k)!r} -> {getattr(cfg, k)!r}" for k in dataclasses.asdict(cfg)
                if k != "data_dir" and getattr(old, k) != getattr(cfg, k)]  # (the data is sha256-checked)
        if diff:
            raise ValueError(f"{out} holds a study with other settings ({'; '.join(diff)}): resume it with "
                             f"those, or choose another --out")
        return
    os.makedirs(out, exist_ok=True)
    atomic_write(path, json.dumps(dataclasses.asdict(cfg), indent=1).encode())


def run(cfg: StudyConfig, out: str, parallel: int = 2, progress: bool = True) -> dict:
    """Run every unfinished job of the study, then write the report; returns study.json's dict."""
    from tqdm import tqdm
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    _claim(out, cfg)
    num_train = len(data(cfg, out).train_set)
    _update_state(out, num_train=num_train)
    todo, done = plan(cfg, out, num_train)
    atomic_write(os.path.join(out, "plan.json"), json.dumps({"done": sorted(done), "jobs": [
        dataclasses.asdict(j) for j in todo]}, indent=1).encode())
    t0, total = time.time(), len(todo) + len(done)
    bar = tqdm(total=total, initial=len(done), desc="study", unit="job", disable=not progress)

    finished = []

    def report(job, what):
        if what == "finished":
            finished.append(job.name)
            bar.update(1)
            bar.set_postfix_str(job.name)

    try:
        outcome = LocalLauncher(parallel, report=report).launch(todo, done)
    except KeyboardInterrupt:  # run_jobs has ended every job
        print(f"study interrupted: run the same command again to resume ({len(done) + len(finished)}/{total} "
              "jobs done)", file=sys.stderr)
        raise
    finally:
        bar.close()
        _update_state(out, elapsed_s=_state(out).get("elapsed_s", 0.0) + time.time() - t0)
    failed = {**{k: f"exit {f.returncode}, see {f.log}: {f.last_line}" for k, f in outcome.failed.items()},
              **{k: "a job it needs failed" for k in outcome.skipped}}
    if failed:
        raise IncubationError("study jobs failed: " + "; ".join(f"{k} ({v})" for k, v in failed.items()))
    _record_tests(cfg, out)
    return write_report(out)


def _state(out: str) -> dict:
    """<out>/state.json: the training-set size the plan was made for and the summed wall-clock
    of every `run` on `out` (a resumed study adds up)."""
    path = os.path.join(out, "state.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def _update_state(out: str, **values) -> None:
    atomic_write(os.path.join(out, "state.json"), json.dumps({**_state(out), **values}).encode())


# ----------------------------------------------------------------------------------------------
# the report: study.json, study.md, study.png
# ----------------------------------------------------------------------------------------------
def collect(cfg: StudyConfig, out: str) -> list[dict]:
    """One point per (method, budget, seed) whose jobs have all finished."""
    points = []
    for budget, seed in cfg.runs():
        for method in cfg.methods:
            dirs = method_dirs(cfg, out, method, budget, seed)
            stages = [read_stage(d) for d in dirs]
            if any(s is None for s in stages):
                continue
            walls = [s["wall_s"] for s in stages]
            # K machines: the incubations run at once, so only the slowest counts
            incubations = [s["wall_s"] for s in stages if s["stage"] == "incubate"]
            parallel = sum(walls) - sum(incubations) + max(incubations, default=0.0)
            test = os.path.join(dirs[-1], "test.json")
            points.append({"method": method, "budget": budget, "seed": seed, "acc": stages[-1]["eval_acc"],
                           "test_acc": json.load(open(test))["test_acc"] if os.path.exists(test) else None,
                           "flops": sum(s["flops"] for s in stages), "wall_s": sum(walls),
                           "wall_s_k_machines": parallel})
    return points


def _mean_std(values: list) -> tuple[float, Optional[float]]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(cfg: StudyConfig, points: list[dict]) -> dict:
    """Per method, at each budget: mean (and std over seeds) of accuracy and costs, and the
    E2E FLOPs that reach the same accuracy; and the cost at which the method reaches E2E's
    accuracy at the largest budget. Costs between budgets are interpolated linearly along the
    curve of mean accuracy vs mean cost."""
    table = {}
    for method in cfg.methods:
        rows = []
        for budget in cfg.budgets:
            mine = [p for p in points if p["method"] == method and p["budget"] == budget]
            if not mine:
                continue
            acc, std = _mean_std([p["acc"] for p in mine])
            tests = [p["test_acc"] for p in mine if p.get("test_acc") is not None]
            test, test_std = _mean_std(tests) if tests else (None, None)
            rows.append({"budget": budget, "seeds": len(mine), "acc": acc, "acc_std": std, "test_acc": test,
                         "test_acc_std": test_std,
                         **{k: statistics.fmean(p[k] for p in mine) for k in ("flops", "wall_s", "wall_s_k_machines")}})
        table[method] = {"curve": rows}
    reference = table.get("e2e", {}).get("curve")
    if reference and reference[-1]["budget"] == cfg.budgets[-1]:
        goal = reference[-1]
        for entry in table.values():
            for row in entry["curve"]:  # > 1: the method got there cheaper than E2E
                same = _cost_to_reach(reference, row["acc"], "flops")
                row["e2e_flops_ratio"] = None if same is None else {**same, "ratio": same["cost"] / row["flops"]}
            entry["to_e2e_acc"] = {}
            for key in ("flops", "wall_s", "wall_s_k_machines"):
                reach = _cost_to_reach(entry["curve"], goal["acc"], key)
                entry["to_e2e_acc"][key] = None if reach is None else {**reach, "speedup": goal[key] / reach["cost"]}
    return table


def _cost_to_reach(curve: list, acc: float, key: str) -> Optional[dict]:
    """{cost, bound}: the first cost (`key`) where `curve` reaches `acc`, None if it never does;
    bound "<=" when its cheapest point already does (the true cost may be lower), else "="."""
    for k, row in enumerate(curve):
        if row["acc"] >= acc:
            if k == 0:
                return {"cost": row[key], "bound": "<="}
            prev = curve[k - 1]
            return {"cost": prev[key] + (acc - prev["acc"]) / (row["acc"] - prev["acc"]) * (row[key] - prev[key]),
                    "bound": "="}
    return None


def _machine() -> dict:
    code = versions()
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "torch": code["torch"],
            "python": code["python"], "commit": code["commit"],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_report(out: str) -> dict:
    """Write study.json, study.md and study.png of `out` from its finished jobs."""
    cfg = _load_config(out)
    points = collect(cfg, out)
    if not points:
        raise FileNotFoundError(f"{out} has no finished point yet: run the study first")
    state = _state(out)
    study = {"config": dataclasses.asdict(cfg), "machine": _machine(), "date": time.strftime("%Y-%m-%d"),
             "elapsed_s": state.get("elapsed_s"), "num_train": state["num_train"],
             "budget_unit_flops": train_flops_per_image(cfg.target()) * state["num_train"],
             "points": points, "summary": summarise(cfg, points)}
    atomic_write(os.path.join(out, "study.json"), json.dumps(study, indent=1).encode())
    atomic_write(os.path.join(out, "study.md"), markdown(study).encode())
    plot(study, os.path.join(out, "study.png"))
    return study


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _floats(text: str) -> list:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = [math.nan]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"want comma-separated positive numbers like 1,2,4, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="incubation bench study", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the study, then write the report", allow_abbrev=False)
    r.add_argument("--out", type=out_dir, default=os.path.join("runs", "study"))
    defaults = StudyConfig()
    for name in ("depth", "width", "heads", "patch", "K", "seeds"):
        r.add_argument(f"--{name}", type=positive_int, default=getattr(defaults, name))
    r.add_argument("--budgets", type=_floats, default=defaults.budgets, help="in E2E epochs (default 0.5,1,2,4)")
    r.add_argument("--methods", default=",".join(METHODS), help=f"some of {','.join(METHODS)}")
    r.add_argument("--data-dir", type=nonempty_path, default=None)
    r.add_argument("--parallel", type=positive_int, default=2, help="jobs at once (default 2)")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--val-size", type=positive_int, default=None,
                   help="evaluate on this many held-out training images (every curve and choice); the final "
                        "models are also tested on the test split")
    r.add_argument("--limit-train", type=positive_int, default=None, help=argparse.SUPPRESS)
    r.add_argument("--limit-eval", type=positive_int, default=None, help=argparse.SUPPRESS)
    rep = sub.add_parser("report", help="write study.json / study.md / study.png from the finished jobs",
                         allow_abbrev=False)
    rep.add_argument("--out", type=out_dir, default=os.path.join("runs", "study"))
    lemon = sub.add_parser("_lemon", help=argparse.SUPPRESS, allow_abbrev=False)   # a job of `run`: train_lemon
    add_common_arguments(lemon)
    lemon.add_argument("--small", type=out_dir, required=True, help="the run dir of the small model")
    return p


def _main(args) -> None:
    if args.command == "run":
        cfg = StudyConfig(depth=args.depth, width=args.width, heads=args.heads, patch=args.patch, K=args.K,
                          budgets=args.budgets, seeds=args.seeds, methods=args.methods.split(","),
                          data_dir=args.data_dir, limit_train=args.limit_train, limit_eval=args.limit_eval,
                          val_size=args.val_size)
        study = run(cfg, args.out, args.parallel, progress=not args.no_progress)
    elif args.command == "report":
        study = write_report(args.out)
    else:
        result = train_lemon(spec_from_args(args), args.small)
        print(f"lemon: eval acc {result.eval_acc:.2f}%, {result.steps} steps -> {result.checkpoint_path}")
        return
    print(markdown(study))
    print(f"report: {os.path.join(args.out, 'study.md')}, study.json, study.png")


def main(argv: Optional[list] = None) -> int:
    """The exit status is the `incubation` command's (incubation.cli.EXIT_STATUS): 0 done, 1 an
    expected failure (one line), 2 a bad command line, 130 interrupted; bugs keep their traceback."""
    return run_main("incubation bench study", lambda: _main(build_parser().parse_args(argv)))  # argparse's exit 2 included


if __name__ == "__main__":
    sys.exit(main())
