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

Each stage of each method is one job (`run` writes them all to <out>/plan.json), run as its own
process (`_job`), which writes <out>/<job>/result.json when it finishes. `run` skips finished jobs and an interrupted job
resumes from its checkpoint (the engine's), so `run` can be repeated until everything is done;
it refuses an --out made with other settings. It then writes <out>/study.json, study.md and
study.png.
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

from incubation import VisionTransformer, ViTConfig, deep
from incubation.bench.study_report import METHODS, markdown, plot
from incubation.cli.exits import run_main
from incubation.cli.options import nonempty_path, out_dir, positive_int
from incubation.errors import IncubationError
from incubation.growth import ApolloViT, apollo_schedule, lemon_config, lemon_expand, train_apollo
from incubation.launch import Job as LocalJob
from incubation.launch.local import LocalLauncher
from incubation.nn import train_flops_per_image
from incubation.presets import get_preset
from incubation.train import epochs_to_steps
from incubation.train.checkpoint import load_checkpoint
from incubation.utils import atomic_write, versions

# the Deep Incubation variants: (module init, how the hybrid runs its frozen meta blocks); all share the meta model
DEEP_VARIANTS = {"deep": ("random", "eval"), "deep-lemon": ("lemon", "eval"), "deep-metatrain": ("random", "train")}
DEEP_EPOCHS = {"meta": 3.0, "incubate": 1.0, "assemble": 1.0}  # the paper's 300 : 100 : 100
LEMON_SMALL_SHARE = 0.25     # of the budget spent on training the small model
CHECKPOINT_EVERY = 100       # steps: an interruption loses at most this much of a job


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
# the jobs
# ----------------------------------------------------------------------------------------------
def _recipe(stage: str):
    """The tiny preset's recipe of a stage (batch 128, AdamW, warmup-cosine), evaluated at the end."""
    return dataclasses.replace(get_preset("tiny").recipe(stage), evals=1)


def _tag(budget: float, seed: int) -> str:
    """The part of a job's name (and directory) that says which point it belongs to."""
    return f"b{budget:g}-s{seed}"


@dataclass
class Job:
    name: str               # <stage>/b<budget>-s<seed>: also its directory under --out
    stage: str              # e2e, meta, incubate-<init>-<i>, assemble-<init>, lemon-small, lemon, apollo
    budget: float
    seed: int
    steps: int
    needs: list             # names of the jobs whose outputs it reads


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


def plan_jobs(cfg: StudyConfig, num_train: int) -> list[Job]:
    """Every job of the study, in the order they start: the largest budgets first, so that the
    small jobs fill the end of a parallel run; in a run, the longest chain (Deep Incubation) first."""
    target, K, batch = cfg.target(), cfg.K, _recipe("e2e").batch_size
    epoch = train_flops_per_image(target) * num_train  # the budget unit
    meta = deep.build_meta_model(target, K)
    deep_epoch = num_train * (DEEP_EPOCHS["meta"] * train_flops_per_image(meta)
                              + DEEP_EPOCHS["incubate"] * sum(deep.build_hybrid(meta, target, i).train_flops_per_image()
                                                              for i in range(K))
                              + DEEP_EPOCHS["assemble"] * train_flops_per_image(target))
    jobs = []
    for budget, seed in reversed(cfg.runs()):
        flops, tag = budget * epoch, _tag(budget, seed)

        def add(stage, steps, needs=()):
            jobs.append(Job(f"{stage}/{tag}", stage, budget, seed, steps, [f"{n}/{tag}" for n in needs]))
            return stage

        if set(DEEP_VARIANTS) & set(cfg.methods):
            scale = flops / deep_epoch  # a stage's epochs: DEEP_EPOCHS x scale
            steps = {k: epochs_to_steps(v * scale, num_train, batch) for k, v in DEEP_EPOCHS.items()}
            add("meta", steps["meta"])
            for method in DEEP_VARIANTS:
                if method in cfg.methods:
                    variant = _variant(method)
                    modules = [add(f"incubate-{variant}-{i}", steps["incubate"], ["meta"]) for i in range(K)]
                    add(f"assemble-{variant}", steps["assemble"], ["meta", *modules])
        if "lemon" in cfg.methods:
            small = train_flops_per_image(_small(target)) * batch
            add("lemon-small", max(1, round(LEMON_SMALL_SHARE * flops / small)))
            add("lemon", max(1, round((1 - LEMON_SMALL_SHARE) * budget * num_train / batch)), ["lemon-small"])
        if "apollo" in cfg.methods:
            add("apollo", _apollo_steps(target, flops, batch, seed))
        if "e2e" in cfg.methods:
            add("e2e", epochs_to_steps(budget, num_train, batch))
    return jobs


def method_stages(method: str, K: int) -> list[str]:
    """The stages whose costs add up to a method's (the last one gives its accuracy)."""
    if method in DEEP_VARIANTS:
        variant = _variant(method)
        return ["meta", *[f"incubate-{variant}-{i}" for i in range(K)], f"assemble-{variant}"]
    return {"lemon": ["lemon-small", "lemon"]}.get(method, [method])


def _variant(method: str) -> str:
    """The stage-name part of a Deep Incubation variant: random, lemon or metatrain."""
    return {"deep": "random", "deep-lemon": "lemon", "deep-metatrain": "metatrain"}[method]


def _datasets(cfg: StudyConfig):
    """(train, eval, test): eval is the validation split with --val-size (test stays for the
    final numbers), else the test split itself."""
    from torch.utils.data import Subset

    from incubation.data import holdout, load_dataset
    test = load_dataset("fashion-mnist", "test", cfg.data_dir)
    if cfg.val_size:
        train, evaluation = holdout("fashion-mnist", cfg.val_size, data_dir=cfg.data_dir)
    else:
        train, evaluation = load_dataset("fashion-mnist", "train", cfg.data_dir), test
    sets = []
    for data, limit in ((train, cfg.limit_train), (evaluation, cfg.limit_eval), (test, cfg.limit_eval)):
        if limit is not None and limit < len(data):
            keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit]
            data = Subset(data, keep.tolist())
        sets.append(data)
    return sets


def run_job(cfg: StudyConfig, out: str, job: Job) -> dict:
    """Train one job (resuming its checkpoint if any); write and return its result.json."""
    from incubation.train import evaluate, train
    train_set, eval_set, test_set = _datasets(cfg)
    target, n, d = cfg.target(), len(train_set), os.path.join(out, job.name)
    tag = job.name.split("/", 1)[1]

    def final(stage):
        return os.path.join(out, stage, tag, "final")

    def config(stage, lemon=False):
        c = _recipe(stage).train_config(n, job.steps, seed=job.seed, progress=False, checkpoint_every=CHECKPOINT_EVERY)
        return lemon_config(c) if lemon else c

    data = (train_set, eval_set)
    if job.stage == "e2e":
        result = deep.train_e2e(target, *data, config("e2e"), d)
    elif job.stage == "meta":
        result = deep.train_meta(target, cfg.K, *data, config("meta"), d)
    elif job.stage.startswith("incubate-"):
        _, variant, i = job.stage.split("-")
        init, meta_mode = ("lemon", "eval") if variant == "lemon" else ("random", "train" if variant == "metatrain"
                                                                        else "eval")
        result = deep.train_module(final("meta"), target, int(i), *data, config("incubate", init == "lemon"), d,
                                   init=init, meta_mode=meta_mode)
    elif job.stage.startswith("assemble-"):
        variant = job.stage.split("-")[1]
        result = deep.train_assembled(target, [final(f"incubate-{variant}-{i}") for i in range(cfg.K)], *data,
                                      config("assemble"), d, meta_checkpoint=final("meta"))
    elif job.stage == "lemon-small":
        result = deep.train_e2e(_small(target), *data, config("e2e"), d)
    elif job.stage == "lemon":
        small = VisionTransformer(_small(target))
        small.load_state_dict(load_checkpoint(final("lemon-small"))[0])
        big = lemon_expand(small, embed_dim=target.embed_dim, depth=target.depth, num_heads=target.num_heads,
                           seed=job.seed)
        result = train(big, *data, config("e2e", lemon=True), d, stage="lemon",
                       metadata={"stage": "lemon", "target_config": big.config.to_dict()})
    elif job.stage == "apollo":
        result, exported = train_apollo(target, *data, config("e2e"), d, stage="apollo")
    else:
        raise ValueError(f"unknown stage {job.stage!r}")
    summary = {"acc": result.eval_acc, "flops": result.train_flops, "wall_s": result.wall_seconds,
               "steps": result.steps, "threads": torch.get_num_threads(), "commit": versions()["commit"]}
    if cfg.val_size and not job.stage.startswith(("meta", "incubate-", "lemon-small")):   # a method's final model
        model = VisionTransformer(target if job.stage != "lemon" else big.config)
        model.load_state_dict(load_checkpoint(exported if job.stage == "apollo" else result.checkpoint_path)[0])
        summary["test_acc"] = evaluate(model, test_set)["acc"]
    atomic_write(os.path.join(d, "result.json"), json.dumps(summary).encode())
    return summary


def _result(out: str, name: str) -> Optional[dict]:
    path = os.path.join(out, name, "result.json")
    return json.load(open(path)) if os.path.exists(path) else None


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
    num_train = len(_datasets(cfg)[0])
    _update_state(out, num_train=num_train)
    jobs = plan_jobs(cfg, num_train)
    # the job processes read their job from here instead of each planning the whole study again
    atomic_write(os.path.join(out, "plan.json"), json.dumps([dataclasses.asdict(j) for j in jobs]).encode())
    done = {j.name for j in jobs if _result(out, j.name) is not None}
    todo = [LocalJob(j.name, [sys.executable, "-m", "incubation.bench.study", "_job", "--out", out, j.name],
                     os.path.join(out, j.name, "log.txt"), j.needs) for j in jobs if j.name not in done]
    t0 = time.time()
    bar = tqdm(total=len(jobs), initial=len(done), desc="study", unit="job", disable=not progress)

    finished = []

    def report(job, what):
        if what == "finished":
            finished.append(job.name)
            bar.update(1)
            bar.set_postfix_str(job.name)

    try:
        outcome = LocalLauncher(parallel, report=report).launch(todo, done)
    except KeyboardInterrupt:  # run_jobs has ended every job
        print(f"study interrupted: run the same command again to resume ({len(done) + len(finished)}/{len(jobs)} "
              "jobs done)", file=sys.stderr)
        raise
    finally:
        bar.close()
        _update_state(out, elapsed_s=_state(out).get("elapsed_s", 0.0) + time.time() - t0)
    failed = {**{k: f"exit {f.returncode}, see {f.log}: {f.last_line}" for k, f in outcome.failed.items()},
              **{k: "a job it needs failed" for k in outcome.skipped}}
    if failed:
        raise IncubationError("study jobs failed: " + "; ".join(f"{k} ({v})" for k, v in failed.items()))
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
        tag = _tag(budget, seed)
        for method in cfg.methods:
            stages = method_stages(method, cfg.K)
            results = [_result(out, f"{s}/{tag}") for s in stages]
            if any(r is None for r in results):
                continue
            walls = dict(zip(stages, (r["wall_s"] for r in results)))
            # K machines: the incubations run at once, so only the slowest counts
            incubations = [w for s, w in walls.items() if s.startswith("incubate-")]
            parallel = sum(walls.values()) - sum(incubations) + max(incubations, default=0.0)
            points.append({"method": method, "budget": budget, "seed": seed, "acc": results[-1]["acc"],
                           "test_acc": results[-1].get("test_acc"),
                           "flops": sum(r["flops"] for r in results), "wall_s": sum(walls.values()),
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
    p = argparse.ArgumentParser(prog="incubation bench study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the study, then write the report")
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
    rep = sub.add_parser("report", help="write study.json / study.md / study.png from the finished jobs")
    rep.add_argument("--out", type=out_dir, default=os.path.join("runs", "study"))
    job = sub.add_parser("_job", help=argparse.SUPPRESS)
    job.add_argument("--out", type=out_dir, required=True)
    job.add_argument("name")
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
        cfg = _load_config(args.out)
        jobs = {j["name"]: Job(**j) for j in json.load(open(os.path.join(args.out, "plan.json")))}
        if args.name not in jobs:
            raise ValueError(f"no job {args.name!r} in the study of {args.out}")
        print(json.dumps(run_job(cfg, args.out, jobs[args.name])))
        return
    print(markdown(study))
    print(f"report: {os.path.join(args.out, 'study.md')}, study.json, study.png")


def main(argv: Optional[list] = None) -> int:
    """The exit status is the `incubation` command's (incubation.cli.EXIT_STATUS): 0 done, 1 an
    expected failure (one line), 2 a bad command line, 130 interrupted; bugs keep their traceback."""
    return run_main("incubation bench study", lambda: _main(build_parser().parse_args(argv)))  # argparse's exit 2 included


if __name__ == "__main__":
    sys.exit(main())
