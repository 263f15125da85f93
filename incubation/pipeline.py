"""The Deep Incubation pipeline, in one place: its stages, the run-dir layout they share, the job
graph that a launcher runs, and each stage run in this process.

    meta -> incubate-0 .. incubate-<K-1> -> assemble -> e2e (at the pipeline's training FLOPs) -> report

- `STAGES`: name, what the stage needs, its recipe key in the preset, and its train function.
  The run dir holds `<out>/<stage>/` (`<out>/incubate-<i>/` per module): the engine's files and
  config.json; a stage whose `final.json` exists is finished.
- `RunSpec`: what a run is (the `incubation` command's common options; Python users build it
  directly), per stage its own recipe changes (`stage_recipes`) and what it asks of a machine
  (`Resources`). Runs may share one meta model (`meta_from`: the incubations of another run's).
- `jobs(spec)`: the graph as `launch.Job`s, each one stage as `python -m incubation.cli <stage>
  ...` (its command line rebuilt from the spec by `stage_argv`); the K incubations are one array.
  A job is named by its stage directory relative to a root (default the run dir: `meta`,
  `incubate-0`, ...), so that the graphs of several runs join into one (the study's).
- `run_stage(spec, stage, module)`: one stage in this process (what each job's command runs); it
  returns at once when the stage is already finished.

No argparse here: the CLI (`incubation.cli`) parses options into a RunSpec and hands the graph to a
launcher (`incubation.launch`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import yaml
from torch.utils.data import Dataset

from . import deep
from .data import Augment, base_dataset, default_workers, holdout, load_dataset
from .errors import IncubationError, UsageError
from .growth import lemon_config
from .launch import Job, Resources
from .nn import ViTConfig, train_flops_per_image
from .presets import Preset, get_preset
from .recipe import EMA_DECAY, Recipe
from .recipe import OPTIONS as RECIPE_OPTIONS
from .timm_compat import timm_config
from .train import TrainConfig
from .train.distributed import auto_device
from .utils import atomic_write, is_inside, json_dumps, json_value, read_json_object, versions

__all__ = ["Stage", "STAGES", "RunSpec", "jobs", "finished", "stage_argv", "run_stage", "run", "num_modules",
           "stage_dir", "meta_dir", "subset", "read_stage", "read_incubations", "pipeline_cost", "EMA_DECAY", "Context", "context",
           "check_stage", "check_initial_checkpoint", "option_fields", "say", "print_result"]


# ----------------------------------------------------------------------------------------------
# the run dir: <out>/<stage>/ (<out>/incubate-<i>/ per module), read back by later stages and the report
# ----------------------------------------------------------------------------------------------
def stage_dir(run_dir: str, stage: str, module: Optional[int] = None) -> str:
    """The directory of one stage in a run dir: meta, incubate-<i>, assemble, e2e, grow."""
    if stage == "incubate":
        if module is None:
            raise ValueError("the incubate stage needs a module index")
        return os.path.join(run_dir, f"incubate-{module}")
    if stage not in STAGES and stage != "grow":
        raise ValueError(f"unknown stage {stage!r}")
    return os.path.join(run_dir, stage)


def read_stage(directory: str) -> Optional[dict]:
    """The record of a finished stage (None if it has no final checkpoint): its final metadata,
    cost so far (wall seconds, train FLOPs, images, steps) and evaluation points."""
    if not os.path.exists(os.path.join(directory, "final.json")):
        return None
    final_path = os.path.join(directory, "final.json")
    final = read_json_object(final_path).get("metadata", {})
    if not isinstance(final, dict):
        raise IncubationError(f"{final_path}: 'metadata' must be a JSON object, got {type(final).__name__}")
    lines = []
    metrics = os.path.join(directory, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as f:
            lines = [json_value(line, f"{metrics} line {i}") for i, line in enumerate(f, 1) if line.strip()]
        if not all(isinstance(m, dict) for m in lines):
            raise IncubationError(f"{metrics}: every line must be a JSON object")
    last = lines[-1] if lines else {}
    config_path = os.path.join(directory, "config.json")   # written by the CLI (absent for API runs)
    config = read_json_object(config_path) if os.path.exists(config_path) else None
    evals = [{"step": m["step"], "flops": m.get("flops"), "wall_s": m.get("wall_s"), "acc": m["eval_acc"],
              "top5": m.get("eval_top5"), "loss": m.get("eval_loss")} for m in lines if "eval_acc" in m]
    return {"dir": directory, "stage": final.get("stage"), "module": final.get("module"), "K": final.get("K"),
            "sizes": final.get("sizes"), "target_config": final.get("target_config"),
            "steps": final.get("step"), "eval_acc": final.get("eval_acc"), "eval_top5": final.get("eval_top5"),
            "eval_loss": final.get("eval_loss"), "train_loss": final.get("train_loss"), "wall_s": last.get("wall_s", 0.0),
            "flops": last.get("flops", 0.0), "images": last.get("images", 0), "evals": evals, "config": config}


def read_incubations(run_dir: str) -> list[dict]:
    found, i = [], 0
    while os.path.isdir(stage_dir(run_dir, "incubate", i)):
        found.append(read_stage(stage_dir(run_dir, "incubate", i)))
        i += 1
    return found


def pipeline_cost(run_dir: str) -> Optional[dict]:
    """Training cost of meta + incubations + assembly (None unless all of them finished)."""
    meta = read_stage(stage_dir(run_dir, "meta"))
    if meta is None:
        return None
    incubations = [read_stage(stage_dir(run_dir, "incubate", i)) for i in range(meta["K"])]
    stages = [meta, *incubations, read_stage(stage_dir(run_dir, "assemble"))]
    if any(s is None for s in stages):
        return None
    return {"flops": sum(s["flops"] for s in stages), "wall_s": sum(s["wall_s"] for s in stages),
            "images": sum(s["images"] for s in stages)}


def _final(run_dir: str, stage: str, module: Optional[int] = None) -> str:
    return os.path.join(stage_dir(run_dir, stage, module), "final")


def meta_dir(spec: "RunSpec") -> str:
    """The meta stage whose model the incubations of `spec` start from: the run's own, or that of
    the run `spec.meta_from` (variants of the incubation sharing one meta model)."""
    return stage_dir(spec.run_dir if spec.meta_from is None else spec.meta_from, "meta")


# ----------------------------------------------------------------------------------------------
# what a run is
# ----------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """A run of the pipeline. The fields are the `incubation` command's common options (same
    names, `None` = the preset's; the recipe options in `recipe`, by their `Recipe` field names);
    `resources` says per stage what one job asks of a machine."""
    data: str = "fashion-mnist"        # 'fashion-mnist' or 'folder:<path>'
    data_dir: Optional[str] = None
    val_size: Optional[int] = None     # evaluate on this many held-out training images
    out: Optional[str] = None          # the run dir (default runs/<preset>)
    experiment: Optional[str] = None   # timm's: the run dir's name under --out (or runs/) instead of the preset's
    preset: str = "tiny"
    model: Optional[str] = None        # a timm ViT name as the target
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    depth: Optional[int] = None        # the target's blocks, width and heads (default: the preset's or --model's)
    embed_dim: Optional[int] = None
    num_heads: Optional[int] = None
    initial_checkpoint: Optional[str] = None   # meta / e2e start from these weights
    skip_bad_images: bool = False
    workers: Optional[int] = None
    modules: Optional[int] = None      # K
    split: Optional[list] = None       # blocks per module
    recipe: dict = field(default_factory=dict)   # Recipe field -> value, replacing the preset's in every stage
    model_ema: bool = False            # an EMA of the weights (recipe.EMA_DECAY unless recipe["ema_decay"])
    accum_steps: int = 1
    compile: bool = False
    grad_checkpointing: bool = False
    channels_last: bool = False        # timm's --channels-last
    pin_mem: bool = False              # timm's --pin-mem (pinned on CUDA anyway)
    seed: int = 0
    device: str = "auto"
    no_progress: bool = False
    log_interval: int = 0              # steps between metrics lines (0: ~1 % of the stage)
    resume: Optional[str] = None       # one stage: resume from this checkpoint instead of its own
    checkpoint_hist: int = 0           # timm's: keep the weights of this many best evaluations
    checkpoint_every: int = 0          # steps between checkpoints (0: at the end of each epoch)
    eval_metric: str = "top1"          # what best means: top1, top5 or loss
    log_tensorboard: Optional[str] = None   # TensorBoard logs, a run per stage
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    init: Optional[str] = None         # incubation only: random or lemon (default: the preset's)
    meta_mode: str = "eval"            # incubation only: the frozen meta blocks in eval or train mode
    meta_from: Optional[str] = None    # incubate / assemble: the run dir whose meta model to use (default this one)
    stage_recipes: dict = field(default_factory=dict)   # stage -> Recipe field -> value, over `recipe` there
    resources: dict = field(default_factory=dict, compare=False)   # stage name -> Resources

    @property
    def run_dir(self) -> str:
        if self.experiment is not None:
            return os.path.join("runs" if self.out is None else self.out, self.experiment)
        return self.out if self.out is not None else os.path.join("runs", self.preset)

    def resources_for(self, stage: str) -> Resources:
        return self.resources.get(stage, Resources())


# RunSpec fields that only some stages take; `resources` is the launcher's, `recipe` and `stage_recipes`
# hold Recipe fields
_STAGE_ONLY = {"init": ("incubate",), "meta_mode": ("incubate",), "meta_from": ("incubate", "assemble")}
_NOT_OPTIONS = ("resources", "recipe", "stage_recipes")


def option_fields(stage: str) -> list[str]:
    """The RunSpec fields that are command-line options of `stage` (`--<name with dashes>`)."""
    return [f.name for f in dataclasses.fields(RunSpec)
            if f.name not in _NOT_OPTIONS and stage in _STAGE_ONLY.get(f.name, (stage,))]


def recipe_changes(spec: RunSpec, stage: str) -> dict:
    """The Recipe fields `spec` gives in `stage`: its `recipe`, then the stage's own."""
    return {**spec.recipe, **spec.stage_recipes.get(stage, {})}


def _option_argv(spec: RunSpec, names: list[str]) -> list[str]:
    defaults = RunSpec()
    given = [("--" + name.replace("_", "-"), getattr(spec, name), getattr(defaults, name)) for name in names]
    given += [(f.metadata["flags"][-1], spec.recipe[f.name], None) for f in RECIPE_OPTIONS if f.name in spec.recipe]
    argv = []
    for flag, value, default in given:
        if isinstance(value, bool):  # a switch
            argv += [flag] if value else []
        elif value is not None and value != default:  # lists as the text their type parses
            argv += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return argv


def matched_baseline(spec: RunSpec) -> RunSpec:
    """The spec of the pipeline's E2E baseline: no --epochs, so that with the pipeline finished `e2e`
    trains for the pipeline's training FLOPs instead."""
    return dataclasses.replace(spec, recipe={k: v for k, v in spec.recipe.items() if k != "epochs"})


def stage_argv(spec: RunSpec, stage: str, module: Optional[int] = None, python: str = sys.executable,
               program: str = "incubation.cli") -> list[str]:
    """The command line that runs `stage` (module `module` of incubate) of `spec` in its own process:
    `python -m <program> <stage> <options>` (`program`: a command whose subcommand takes the common
    options, `incubation.cli` for the pipeline's stages and `grow`)."""
    head = [python, "-m", program, stage]
    if stage == "report":
        return head + ["--out", spec.run_dir]
    if stage == "incubate":
        head += ["--module", str(module)]
    if stage == "e2e":
        spec = matched_baseline(spec)
    # the child runs this one stage: the stage's own recipe changes join the run's
    spec = dataclasses.replace(spec, recipe=recipe_changes(spec, stage), stage_recipes={})
    out = spec.out if spec.experiment else spec.run_dir   # the child resolves --experiment as the parent did
    return head + _option_argv(dataclasses.replace(spec, out=out), option_fields(stage))


# ----------------------------------------------------------------------------------------------
# the stage table and the job graph
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple                        # stage names
    recipe: Optional[str]               # the preset's recipe of the stage (None: no training)
    train: Optional[Callable] = None    # train(context, module) -> TrainResult
    per_module: bool = False            # one job per module (incubate-<i>), submitted as one array


def num_modules(spec: RunSpec) -> tuple[int, Optional[list]]:
    """(K, blocks per module): from the meta checkpoint when there is one, else the options / preset."""
    meta = read_stage(meta_dir(spec))
    if meta is not None:
        if spec.modules not in (None, meta["K"]) or spec.split not in (None, meta["sizes"]):
            raise ValueError(f"{meta['dir']} holds a meta model for K={meta['K']} modules of {meta['sizes']} "
                             f"blocks; --modules/--split disagree (use another --out for another split)")
        return meta["K"], meta["sizes"]
    if None not in (spec.modules, spec.split) and len(spec.split) != spec.modules:
        raise UsageError(f"argument --split: {len(spec.split)} block counts for --modules {spec.modules}")
    preset = get_preset(spec.preset)
    sizes = spec.split if spec.split is not None else (list(preset.sizes) if preset.sizes else None)
    # `is None`, not `or`: a given value is never replaced by the preset's
    K = spec.modules if spec.modules is not None else (len(sizes) if sizes else preset.K)
    return K, sizes


def _dirs(spec: RunSpec, stage: Stage, K: int) -> list[str]:
    """The directories of a stage's jobs (the meta stage: the shared one with `meta_from`)."""
    if stage.name == "meta":
        return [meta_dir(spec)]
    if stage.per_module:
        return [stage_dir(spec.run_dir, stage.name, i) for i in range(K)]
    return [stage_dir(spec.run_dir, stage.name)]


def _name(spec: RunSpec, directory: str, root: Optional[str]) -> str:
    """A job's name: its directory relative to `root` (default the run dir: meta, incubate-0, ...)."""
    return os.path.relpath(directory, spec.run_dir if root is None else root)


def _own_stages(spec: RunSpec, stages=None) -> list[Stage]:
    """The stages of `spec` (those named in `stages`) that run in its run dir (not a shared meta)."""
    return [s for s in STAGES.values() if (stages is None or s.name in stages)
            and not (s.name == "meta" and spec.meta_from is not None)]


def finished(spec: RunSpec, root: Optional[str] = None) -> set:
    """The names of the jobs of `spec` whose stage has its final checkpoint (the report never is),
    the shared meta model's included."""
    K, _ = num_modules(spec)
    dirs = [d for s in STAGES.values() if s.recipe for d in _dirs(spec, s, K)]
    return {_name(spec, d, root) for d in dirs if os.path.exists(os.path.join(d, "final.json"))}


def jobs(spec: RunSpec, python: str = sys.executable, stages=None, root: Optional[str] = None) -> list[Job]:
    """The unfinished jobs of the pipeline (all of `STAGES`, or those named in `stages`), in an order
    that runs, named relative to `root` (default the run dir). A job needs the jobs of the stages it
    needs among those chosen, and with `meta_from` the shared meta model's job (another run's, or
    finished: `finished(spec)` names it)."""
    K, _ = num_modules(spec)
    done, graph = finished(spec, root), []
    for stage in _own_stages(spec, stages):
        needs = [_name(spec, d, root) for s in stage.needs
                 if stages is None or s in stages or (s == "meta" and spec.meta_from is not None)
                 for d in _dirs(spec, STAGES[s], K)]
        for i, directory in enumerate(_dirs(spec, stage, K)):
            name = _name(spec, directory, root)
            if name in done:
                continue
            log = os.path.join(directory, "log.txt") if stage.recipe else os.path.join(spec.run_dir, "report.log")
            graph.append(Job(name, stage_argv(spec, stage.name, i if stage.per_module else None, python), log,
                             needs, resources=spec.resources_for(stage.name),
                             array=stage.name if stage.per_module else None))
    return graph


# ----------------------------------------------------------------------------------------------
# one stage in this process
# ----------------------------------------------------------------------------------------------
def say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def print_result(name: str, result) -> None:
    acc = "-" if result.eval_acc is None else f"{result.eval_acc:.2f}%"
    say(f"{name}: eval acc {acc}, {result.steps} steps, {result.wall_seconds:.1f} s -> {result.checkpoint_path}")


def subset(dataset, limit: Optional[int]):
    """`limit` random images of `dataset`: the same ones whatever --seed (runs of several seeds
    differ in their training only, as the study's points do)."""
    if limit is None or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
    return torch.utils.data.Subset(dataset, keep.tolist())


@dataclass
class Context:
    """Everything a stage trains with, resolved once from the spec: data, target, recipes."""
    spec: RunSpec
    preset: Preset
    train_set: Dataset
    eval_set: Dataset
    target: ViTConfig   # without drop-path (each stage sets its own)
    augment: Augment

    @property
    def run_dir(self) -> str:
        return self.spec.run_dir

    def recipe(self, stage: str) -> Recipe:
        recipe = stage_recipe(self.spec, self.preset, stage)
        if not recipe.epochs * len(self.train_set) / recipe.batch_size < 2**53:  # a float counts exactly up to here
            raise UsageError(f"argument --epochs: {recipe.epochs:g} epochs of {len(self.train_set)} images "
                             f"are more steps than can be counted")
        return recipe

    def target_for(self, recipe: Recipe) -> ViTConfig:
        return self.target.replace(drop_path_rate=recipe.drop_path)

    def train_config(self, recipe: Recipe, steps: Optional[int] = None) -> TrainConfig:
        s = self.spec
        workers = s.workers if s.workers is not None else default_workers(self.train_set)
        return recipe.train_config(len(self.train_set), steps, accum_steps=s.accum_steps, seed=s.seed,
                                   num_workers=workers, device=s.device, progress=not s.no_progress,
                                   compile=s.compile, grad_checkpointing=s.grad_checkpointing,
                                   log_interval=s.log_interval, channels_last=s.channels_last,
                                   resume_from=s.resume, checkpoint_hist=s.checkpoint_hist,
                                   checkpoint_every=s.checkpoint_every,
                                   eval_metric=s.eval_metric, tensorboard_dir=s.log_tensorboard)

    def write_config(self, stage: str, recipe: Recipe, cfg: TrainConfig, module: Optional[int] = None,
                     **extra) -> None:
        """<stage dir>/config.json: everything that defines the stage, for the record, and args.yaml
        (timm's record of the options); rank 0."""
        if os.environ.get("RANK", "0") != "0":
            return
        name = stage if module is None else f"{stage} {module}"
        device = "cuda" if auto_device(cfg.device).startswith("cuda") else "cpu"
        say(f"{name}: {cfg.steps} steps of {cfg.batch_size} images, {cfg.opt} at peak lr {cfg.lr:.4g} "
            f"(warmup {cfg.warmup_steps} steps, {cfg.sched} schedule to {cfg.min_lr:.3g}), {cfg.precision(device)}")
        directory = stage_dir(self.run_dir, stage, module)
        os.makedirs(directory, exist_ok=True)
        s, train, ev = self.spec, base_dataset(self.train_set), base_dataset(self.eval_set)
        data = {"name": s.data, "train_images": len(self.train_set), "eval_images": len(self.eval_set),
                "eval_split": getattr(ev, "split", None) if s.val_size is None else   # test, or a folder's val/ or validation/
                f"validation: {s.val_size} images held out of the training split",
                "classes": list(getattr(train, "classes", [])),
                "transforms": {"train": repr(getattr(train, "transform", None)),
                               "eval": repr(getattr(ev, "transform", None))}}
        record = {"stage": stage, "module": module, "command": ["incubation", *sys.argv[1:]],
                  "preset": self.preset.name, "recipe": dataclasses.asdict(recipe), "train_config": cfg.to_dict(),
                  "model": self.target_for(recipe).to_dict(), "timm_model": s.model,
                  "augment": self.augment.to_dict(), "data": data, **extra, "versions": versions()}
        atomic_write(os.path.join(directory, "config.json"), (json_dumps(record, indent=2) + "\n").encode())
        # timm's args.yaml: the options of the stage as one flat mapping (the run's, then the resolved recipe)
        args = {**{f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name not in _NOT_OPTIONS},
                **dataclasses.asdict(recipe)}
        atomic_write(os.path.join(directory, "args.yaml"),
                     yaml.safe_dump(json_value(json_dumps(args), "args.yaml"), sort_keys=False).encode())


def stage_recipe(spec: RunSpec, preset: Preset, stage: str) -> Recipe:
    """The preset's recipe of `stage` with what `spec` gives (in every stage, then in this one)."""
    changes = recipe_changes(spec, stage)
    if spec.model_ema and changes.get("ema_decay") is None:
        changes["ema_decay"] = EMA_DECAY
    return dataclasses.replace(preset.recipe(stage), **changes)


def _img_size(spec: RunSpec, preset: Preset) -> Optional[int]:
    """--img-size, else --model's input size, else the preset's (None: the data set's own)."""
    if spec.img_size is not None:
        return spec.img_size
    if spec.model:
        from timm.models import get_pretrained_cfg_value
        return (get_pretrained_cfg_value(spec.model, "input_size") or (3, 224, 224))[-1]
    return preset.img_size


def _timm_patch_size(name: str) -> int:
    import timm
    with torch.device("meta"):   # no memory, no init: only the patch size is read
        model = timm.create_model(name, pretrained=False)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise UsageError(f"argument --model: {name} is not a Vision Transformer (it has no patch embedding)")
    return patch[0]


def _target(spec: RunSpec, preset: Preset, data) -> ViTConfig:
    """The target ViT for this data: the preset's, or --model's, with --patch-size, --depth,
    --embed-dim and --num-heads."""
    size, patch = data.img_size, spec.patch_size
    shape = {k: getattr(spec, k) for k in ("depth", "embed_dim", "num_heads") if getattr(spec, k) is not None}
    if patch is None:
        patch = _timm_patch_size(spec.model) if spec.model else preset.model["patch_size"]
    if size % patch:
        raise UsageError(f"argument --img-size: images of {size} px do not split into patches of {patch} px: give "
                         f"--img-size a multiple of {patch}, or --patch-size a divisor of {size}")
    if not spec.model:
        return ViTConfig(**{**preset.model, **shape, "patch_size": patch, "img_size": size,
                            "in_chans": data.in_chans, "num_classes": data.num_classes})
    import timm
    model = timm.create_model(spec.model, pretrained=False, num_classes=data.num_classes, in_chans=data.in_chans,
                              img_size=size, patch_size=patch, **shape)
    try:
        return timm_config(model)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"argument --model: {spec.model}: {exc}") from None


def context(spec: RunSpec) -> Context:
    """Load the data and resolve the target of `spec` (what every stage trains with)."""
    preset = get_preset(spec.preset)
    # the augmentation is the same in every stage of a preset: the meta recipe's
    img_size, augment = _img_size(spec, preset), stage_recipe(spec, preset, "meta").augment()
    load = dict(data_dir=spec.data_dir, img_size=img_size, augment=augment, skip_bad_images=spec.skip_bad_images)
    if spec.val_size is not None:
        train_set, eval_set = holdout(spec.data, spec.val_size, **load)
    else:
        train_set, eval_set = (load_dataset(spec.data, split, **load) for split in ("train", "test"))
    target = _target(spec, preset, base_dataset(train_set))
    return Context(spec, preset, subset(train_set, spec.limit_train), subset(eval_set, spec.limit_eval), target,
                   augment)


def _train_meta(run: Context, module=None):
    recipe = run.recipe("meta")
    K, sizes = num_modules(run.spec)
    cfg = run.train_config(recipe)
    run.write_config("meta", recipe, cfg, K=K, sizes=sizes)
    return deep.train_meta(run.target, K, run.train_set, run.eval_set, cfg, stage_dir(run.run_dir, "meta"),
                           sizes=sizes, drop_path_rate=recipe.drop_path,
                           initial_checkpoint=run.spec.initial_checkpoint)


def _train_incubate(run: Context, module: int):
    recipe = run.recipe("incubate")
    cfg = run.train_config(recipe)
    init, meta_mode = run.spec.init or run.preset.init, run.spec.meta_mode
    if init == "lemon":  # LEMON's schedule for a function-preserving start: same peak, no long tail
        cfg = lemon_config(cfg)
    run.write_config("incubate", recipe, cfg, module, init=init, meta_mode=meta_mode)
    return deep.train_module(os.path.join(meta_dir(run.spec), "final"), run.target_for(recipe), module, run.train_set,
                             run.eval_set, cfg, stage_dir(run.run_dir, "incubate", module), init=init,
                             meta_mode=meta_mode)


def _train_assemble(run: Context, module=None):
    K, sizes = num_modules(run.spec)
    meta = os.path.join(meta_dir(run.spec), "final")
    recipe = run.recipe("assemble")
    cfg = run.train_config(recipe)
    run.write_config("assemble", recipe, cfg, K=K, sizes=sizes)
    return deep.train_assembled(run.target_for(recipe), [_final(run.run_dir, "incubate", i) for i in range(K)],
                                run.train_set, run.eval_set, cfg, stage_dir(run.run_dir, "assemble"), sizes=sizes,
                                meta_checkpoint=meta if os.path.exists(meta + ".json") else None)


def _train_e2e(run: Context, module=None):
    """At the pipeline's training FLOPs when it has finished and no --epochs is given."""
    recipe = run.recipe("e2e")
    target = run.target_for(recipe)
    cost = pipeline_cost(run.run_dir) if "epochs" not in recipe_changes(run.spec, "e2e") else None
    steps = None
    if cost is not None:  # the same training FLOPs as the whole Deep Incubation pipeline
        steps = max(1, round(cost["flops"] / (train_flops_per_image(target) * recipe.batch_size)))
        say(f"e2e: {steps} steps of {recipe.batch_size} images = the pipeline's {cost['flops'] / 1e12:.2f} TFLOP")
    else:
        say(f"e2e: {recipe.epochs:g} epochs (give none with a finished pipeline in {run.run_dir} to match its "
             f"FLOPs)")
    cfg = run.train_config(recipe, steps)
    run.write_config("e2e", recipe, cfg, matched_flops=cost["flops"] if cost else None)
    return deep.train_e2e(target, run.train_set, run.eval_set, cfg, stage_dir(run.run_dir, "e2e"),
                          initial_checkpoint=run.spec.initial_checkpoint)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("meta", (), "meta", _train_meta),
    Stage("incubate", ("meta",), "incubate", _train_incubate, per_module=True),
    Stage("assemble", ("incubate",), "assemble", _train_assemble),
    Stage("e2e", ("assemble",), "e2e", _train_e2e),
    Stage("report", ("e2e",), None),   # `incubation report` (incubation.report) reads the run dir
)}
STARTS_FROM_WEIGHTS = ("meta", "e2e", "grow")   # the commands that take --initial-checkpoint


def check_initial_checkpoint(spec: RunSpec, command: str) -> None:
    if spec.initial_checkpoint is None:
        return
    if command not in STARTS_FROM_WEIGHTS:
        raise UsageError(f"argument --initial-checkpoint: starts the model of `meta`, `e2e` or `grow`; "
                         f"`{command}` builds its model from the previous stages")
    written = stage_dir(spec.run_dir, command)
    if is_inside(spec.initial_checkpoint, written):   # the stage's checkpoints would replace it
        raise IncubationError(f"--initial-checkpoint {spec.initial_checkpoint} is inside {written}, which "
                              f"`{command}` writes: copy it elsewhere or give another --out")


def check_stage(spec: RunSpec, stage: str, module: Optional[int]) -> None:
    """What can be refused before any data is loaded."""
    check_initial_checkpoint(spec, stage)
    if stage == "incubate":
        meta = os.path.join(meta_dir(spec), "final")
        if not os.path.exists(meta + ".json"):
            raise FileNotFoundError(f"incubation needs the meta model {meta}.safetensors: run `incubation meta` "
                                    f"first")
        K, _ = num_modules(spec)  # --modules / --split must agree with the meta model's
        if not 0 <= module < K:
            raise UsageError(f"argument --module: {module} is not a module of this run: it has K={K} modules, "
                             f"0..{K - 1}")
    else:
        num_modules(spec)


def run_stage(spec: RunSpec, stage: str, module: Optional[int] = None, run: Optional[Context] = None):
    """Train one stage of `spec` here (module `module` of incubate); returns its TrainResult, or None
    when its final checkpoint already exists. `run`: a Context of `spec` already loaded."""
    if stage not in STAGES or STAGES[stage].train is None:
        raise ValueError(f"unknown stage {stage!r}: one of {[s for s, v in STAGES.items() if v.train]}")
    check_stage(spec, stage, module)
    name = f"{stage}-{module}" if stage == "incubate" else stage
    if read_stage(stage_dir(spec.run_dir, stage, module)) is not None:
        say(f"{name}: already finished -> {_final(spec.run_dir, stage, module)}.safetensors")
        return None
    result = STAGES[stage].train(run or context(spec), module)
    print_result(name, result)
    return result


def run(spec: RunSpec) -> None:
    """The whole pipeline in this process, one stage after another (for Python users; the CLI hands
    `jobs(spec)` to a launcher instead). `incubation.report.write_report(spec.run_dir)` then
    writes the report."""
    check_initial_checkpoint(spec, "run")
    loaded = context(spec)
    if spec.meta_from is None:
        run_stage(spec, "meta", run=loaded)
    for i in range(num_modules(spec)[0]):
        run_stage(spec, "incubate", i, run=loaded)
    run_stage(spec, "assemble", run=loaded)
    e2e = matched_baseline(spec)
    run_stage(e2e, "e2e", run=dataclasses.replace(loaded, spec=e2e))
