"""The `incubation` command.

    incubation run                       meta + K incubations + assembly, the E2E baseline at the
                                         same training FLOPs, then the report (`make demo`)
    incubation meta                      stage 1: the meta model          -> <out>/meta/
    incubation incubate --module i       stage 2: one module (K independent jobs, e.g. on K machines)
    incubation incubate --all [--parallel N]   all modules, one after another or N processes at once
    incubation assemble                  stage 3: assemble the modules + fine-tune -> <out>/assemble/
    incubation e2e                       the baseline: the target trained directly -> <out>/e2e/
    incubation report                    report.md, report.json and plots of <out>
    incubation expand CKPT -o OUT ...    LEMON: a larger, function-preserving model from a checkpoint
    incubation grow                      Apollo: progressive depth training of the target
    incubation bench ops|train|study|assembly   the benchmarks (incubation.bench) on this machine
    incubation tune [--preset P | --model NAME]   measure every op call of a model on each backend
                                         ahead of training, into the dispatch cache
    incubation backends                  which kernel backend serves each op, its timings, and why

Stages find the previous stage's outputs in the run dir (--out, default runs/<preset>):
<out>/meta/final.safetensors, <out>/incubate-<i>/final.safetensors, <out>/assemble/..., and
resume an interrupted stage from its checkpoint. The training engine draws the progress bars
and writes <stage dir>/metrics.jsonl. A stage uses its preset recipe (incubation.presets);
--epochs / --batch-size / --lr override it (for `run`: every stage; the E2E baseline always gets
the pipeline's FLOPs there). --lr is the base rate for a batch of 512 (peak = lr x batch / 512).

New subcommands are entries of SUBCOMMANDS: name -> (help, add_arguments(parser), handler(args)).
Every option that takes a value has a checking `type=` (positive_int, positive_float, out_dir, ...;
tests/test_cli_errors.py fuzzes each), so nonsense is refused before anything runs; a handler
raises UsageError for what the parser cannot check alone. Exit status: see EXIT_STATUS (0 done,
1 the run failed with a one-line error, 2 a bad command line, 130 interrupted, 143 terminated;
bugs keep their traceback, and INCUBATION_DEBUG=1 shows every traceback).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import shutil
import sys
import time
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from . import bench, deep, ops
from .data import Augment, base_dataset, default_workers, holdout, load_dataset
from .errors import IncubationError
from .growth import lemon_config, lemon_expand, train_apollo
from .launch import local as jobs
from .nn import VisionTransformer, ViTConfig, train_flops_per_image
from .presets import PRESETS, Preset, Recipe, get_preset
from .report import write_report
from .rundir import pipeline_cost, read_stage, stage_dir
from .timm_compat import from_timm, timm_config
from .train import TrainConfig
from .train.checkpoint import load_checkpoint, save_checkpoint
from .utils import atomic_write, json_dumps, versions
from .weights import OFFICIAL_MODELS, import_official

__all__ = ["main", "SUBCOMMANDS", "add_common_arguments", "common_argv", "build_parser", "UsageError",
           "error_message", "run_main", "positive_int", "non_negative_int", "seed_int", "positive_float",
           "positive_ints", "nonempty_path", "out_dir", "output_prefix", "device_name", "data_name"]


# ----------------------------------------------------------------------------------------------
# argument types: a bad value is refused while parsing (argparse's usage line, "argument --x: ...",
# exit 2), before any data is loaded or any file written
# ----------------------------------------------------------------------------------------------
def _int_at_least(text: str, low: int, what: str, high: Optional[int] = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def seed_int(text: str) -> int:
    # torch.manual_seed takes at most 64 bits; the engine wants >= 0
    return _int_at_least(text, 0, "an integer in 0..2**63-1", 2**63 - 1)


def _modules(text: str) -> int:
    return _int_at_least(text, 2, "an integer >= 2 (Deep Incubation splits the model into K >= 2 modules)")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan   # refused below with the option's own message


def positive_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value > 0):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A rate in [0, 1): drop-path, label smoothing, random erasing."""
    value = _float(text)
    if not 0.0 <= value < 1.0:   # nan compares false
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def decay_rate(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def auto_augment(text: str) -> str:
    """A timm auto-augment policy (rand-m9-mstd0.5-inc1, augmix-..., original, ...) or 'none'
    (kept as text, so that child processes get it too); checked when the transforms are built."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1) or "
                                         "'none', got ''")
    return text


def positive_ints(text: str) -> list[int]:
    """Comma-separated positive integers, e.g. block counts 3,3,3,3."""
    try:
        return [positive_int(s) for s in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 3,3,3,3, "
                                         f"got {text!r}") from None


def nonempty_path(text: str) -> str:
    if not text:  # '' would silently mean the current directory
        raise argparse.ArgumentTypeError("expected a path, got ''")
    return text


def out_dir(text: str) -> str:
    """A directory to write into: it may not exist yet, but must not be a file."""
    if os.path.exists(nonempty_path(text)) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return text


def output_prefix(text: str) -> str:
    """The prefix of <prefix>.safetensors / <prefix>.json: DIR/ would write DIR/.safetensors."""
    if nonempty_path(text).endswith((os.sep, os.altsep or os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file prefix like DIR/NAME (writes NAME.safetensors "
                                         f"and NAME.json), got the directory {text!r}")
    return text


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:<i> (what the training engine accepts); cuda must exist here."""
    kind, colon, index = text.partition(":")
    if text not in ("auto", "cpu") and not (kind == "cuda" and (not colon or index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:<i>, got {text!r}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device on this machine")
        if colon and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return text


def model_name(text: str) -> str:
    """A timm model name (checked against timm's registry; the ViT options are checked when built)."""
    import difflib

    import timm
    if not text or not timm.is_model(text):
        near = difflib.get_close_matches(text, timm.list_models(), n=3) if text else []
        raise argparse.ArgumentTypeError(f"{text!r} is not a timm model name"
                                         + (f" (did you mean {', '.join(near)}?)" if near else ""))
    return text


def data_name(text: str) -> str:
    if text == "fashion-mnist" or (text.startswith("folder:") and len(text) > len("folder:")):
        return text
    raise argparse.ArgumentTypeError(f"unknown data set {text!r}: use 'fashion-mnist' or 'folder:<path>'")


class UsageError(IncubationError, ValueError):
    """A combination of arguments that the parser cannot check by itself: reported like an
    argparse error of the subcommand (usage line, exit 2)."""


# ----------------------------------------------------------------------------------------------
# common arguments and the run context
# ----------------------------------------------------------------------------------------------
def add_common_arguments(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options every training subcommand shares; returns their actions (common_argv reads them).
    Recipe options take timm's train.py names (old spellings kept as aliases); each stage starts
    from its preset's recipe and these replace what they name (for `run`: in every stage)."""
    return _add_data_and_model_options(p) + _add_recipe_options(p)


def _add_data_and_model_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    add = p.add_argument_group("data and model").add_argument
    return [
        add("--data", type=data_name, default="fashion-mnist", help="'fashion-mnist' (default) or "
            "'folder:<path>' (ImageFolder with train/ and val/ or validation/)"),
        add("--data-dir", type=nonempty_path, default=None, help="where the data set files are (default: discovered)"),
        add("--val-size", type=positive_int, default=None, help="evaluate on this many training images held out "
            "(a fixed draw) instead of the test split: choose recipes there, keep the test split for the end"),
        add("--out", type=out_dir, default=None, help="run dir (default runs/<preset>)"),
        add("--preset", default="tiny", choices=sorted(PRESETS), help="model + recipe (default tiny)"),
        add("--model", type=model_name, default=None, help="a timm ViT by name as the target (built with "
            "pretrained=False, converted by from_timm) instead of the preset's"),
        add("--img-size", type=positive_int, default=None, help="resize images to this size (default: --model's, "
            "else the preset's, else the data set's own)"),
        add("--patch-size", type=positive_int, default=None, help="patch size of the target (default: the "
            "preset's or --model's); --img-size must be a multiple of it"),
        add("--initial-checkpoint", type=nonempty_path, default=None, help="start from these weights (meta, "
            "e2e, grow): ours, a timm state dict (.pth/.bin) or .safetensors; pos_embed is resampled to "
            "--img-size, a head for other classes is left fresh"),
        add("--skip-bad-images", action="store_true",
            help="folder data: skip unreadable images (counted, warned once each) instead of stopping"),
        add("-j", "--workers", "--num-workers", dest="workers", type=non_negative_int, default=None,
            help="data loader processes per rank (default: 0 for Fashion-MNIST, which is in memory; else "
                 "min(8, cores per rank))"),
        add("--modules", type=_modules, default=None, help="K, the number of modules (meta stage; "
            "later stages read it from the meta checkpoint)"),
        add("--split", type=positive_ints, default=None, help="blocks per module, e.g. 4,2,2,4 (meta stage)"),
    ]


def _add_recipe_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    add = p.add_argument_group("recipe (default: the preset's, per stage)").add_argument
    return [
        add("--epochs", type=positive_float, default=None, help="epochs of the stage"),
        add("-b", "--batch-size", type=positive_int, default=None, help="global batch per optimizer step"),
        add("--lr", type=positive_float, default=None, help="base lr for a batch of 512 (peak = lr x batch / 512)"),
        add("--warmup-epochs", type=non_negative_float, default=None, help="linear warmup epochs"),
        add("--weight-decay", type=non_negative_float, default=None, help="AdamW weight decay"),
        add("--clip-grad", type=positive_float, default=None, help="max global gradient norm"),
        add("--drop-path", type=fraction, default=None, help="stochastic depth rate of the trained model"),
        add("--smoothing", type=fraction, default=None, help="label smoothing"),
        add("--mixup", type=non_negative_float, default=None, help="mixup alpha (0 = off)"),
        add("--cutmix", type=non_negative_float, default=None, help="cutmix alpha (0 = off)"),
        add("--aa", type=auto_augment, default=None, help="folder data: timm auto-augment policy, e.g. "
            "rand-m9-mstd0.5-inc1, or 'none'"),
        add("--reprob", type=fraction, default=None, help="folder data: random erasing probability"),
        add("--aug-repeats", type=positive_int, default=None, help="repeated augmentation: each image this often "
            "per epoch, spread over the ranks (1 = off; the vit-* presets: 3)"),
        add("--model-ema", action="store_true", help="keep an EMA of the weights (final_ema.*, ema_eval_acc)"),
        add("--model-ema-decay", type=decay_rate, default=None, help="EMA decay (default 0.9998; implies --model-ema)"),
        add("--grad-accum-steps", "--accum-steps", dest="accum_steps", type=positive_int, default=1,
            help="gradient accumulation micro-batches per step"),
        add("--compile", action="store_true", help="torch.compile the model for the training steps"),
        add("--grad-checkpointing", action="store_true", help="recompute each block's activations in the "
            "backward pass (less memory, ~1/3 more compute)"),
        add("--seed", type=seed_int, default=0),
        add("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:i"),
        add("--no-progress", action="store_true", help="no progress bars"),
        # for tests and quick looks: train / evaluate on a fixed random subset
        add("--limit-train", type=positive_int, default=None, help=argparse.SUPPRESS),
        add("--limit-eval", type=positive_int, default=None, help=argparse.SUPPRESS),
    ]


def common_argv(args: argparse.Namespace) -> list[str]:
    """The common options of `args` as a command line for a child process. Read off the actions
    of add_common_arguments, so that an option added there reaches the children too."""
    argv = []
    for action in add_common_arguments(argparse.ArgumentParser(add_help=False)):
        value, flag = getattr(args, action.dest), action.option_strings[-1]
        if action.nargs == 0:  # a switch (store_true)
            argv += [flag] if value != action.default else []
        elif value is not None:  # lists as the comma-separated text their type parses
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def _subset(dataset, limit: Optional[int], seed: int):
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"--limit-train/--limit-eval must be >= 1, got {limit}")
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return torch.utils.data.Subset(dataset, keep.tolist())


# recipe options -> the Recipe fields they replace
_RECIPE_OPTIONS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "warmup_epochs": "warmup_epochs",
                   "weight_decay": "weight_decay", "clip_grad": "clip_grad", "drop_path": "drop_path",
                   "smoothing": "label_smoothing", "mixup": "mixup", "cutmix": "cutmix", "aug_repeats": "aug_repeats"}
EMA_DECAY = 0.9998   # timm's --model-ema-decay default


@dataclasses.dataclass
class _Run:
    """Everything a stage needs, resolved once from the arguments."""
    args: argparse.Namespace
    preset: Preset
    run_dir: str
    train_set: Dataset
    eval_set: Dataset
    target: ViTConfig   # without drop-path (each stage sets its own)
    augment: Augment

    def recipe(self, stage: str) -> Recipe:
        a = self.args
        changes = {field: getattr(a, option) for option, field in _RECIPE_OPTIONS.items()
                   if getattr(a, option) is not None}
        if a.model_ema or a.model_ema_decay is not None:
            changes["ema_decay"] = a.model_ema_decay if a.model_ema_decay is not None else EMA_DECAY
        recipe = dataclasses.replace(self.preset.recipe(stage), **changes)
        if not recipe.epochs * len(self.train_set) / recipe.batch_size < 2**53:  # a float counts exactly up to here
            raise UsageError(f"argument --epochs: {recipe.epochs:g} epochs of {len(self.train_set)} images "
                             f"are more steps than can be counted")
        return recipe

    def init(self) -> str:
        """How incubation starts each module: --init, else the preset's."""
        return self.args.init or self.preset.init

    def target_for(self, recipe: Recipe) -> ViTConfig:
        return self.target.replace(drop_path_rate=recipe.drop_path)

    def split(self) -> tuple[int, Optional[list]]:
        """(K, sizes): from the meta checkpoint when there is one, else the options / preset."""
        meta = read_stage(stage_dir(self.run_dir, "meta"))
        if meta is not None:
            if (self.args.modules not in (None, meta["K"])) or (self.args.split not in (None, meta["sizes"])):
                raise ValueError(f"{meta['dir']} holds a meta model for K={meta['K']} modules of {meta['sizes']} "
                                 f"blocks; --modules/--split disagree (use another --out for another split)")
            return meta["K"], meta["sizes"]
        if None not in (self.args.modules, self.args.split) and len(self.args.split) != self.args.modules:
            raise UsageError(f"argument --split: {len(self.args.split)} block counts for --modules "
                             f"{self.args.modules}")
        # `is None`, not `or`: a given value is never replaced by the preset's
        sizes = self.args.split
        if sizes is None:
            sizes = list(self.preset.sizes) if self.preset.sizes else None
        K = self.args.modules if self.args.modules is not None else (len(sizes) if sizes else self.preset.K)
        return K, sizes

    def train_config(self, recipe: Recipe, steps: Optional[int] = None) -> TrainConfig:
        a = self.args
        workers = a.workers if a.workers is not None else default_workers(self.train_set)
        return recipe.train_config(len(self.train_set), steps, accum_steps=a.accum_steps, seed=a.seed,
                                   num_workers=workers, device=a.device, progress=not a.no_progress,
                                   compile=a.compile, grad_checkpointing=a.grad_checkpointing)

    def write_config(self, stage: str, recipe: Recipe, cfg: TrainConfig, module: Optional[int] = None,
                     **extra) -> None:
        """<stage dir>/config.json: everything that defines the stage, for the record (rank 0)."""
        if os.environ.get("RANK", "0") != "0":
            return
        directory = stage_dir(self.run_dir, stage, module)
        os.makedirs(directory, exist_ok=True)
        data = {"name": self.args.data, "train_images": len(self.train_set), "eval_images": len(self.eval_set),
                "eval_split": "test" if self.args.val_size is None else
                f"validation: {self.args.val_size} images held out of the training split",
                "classes": list(getattr(base_dataset(self.train_set), "classes", [])),
                "transforms": {"train": repr(getattr(base_dataset(self.train_set), "transform", None)),
                               "eval": repr(getattr(base_dataset(self.eval_set), "transform", None))}}
        record = {"stage": stage, "module": module, "command": ["incubation", *sys.argv[1:]], "preset": self.preset.name,
                  "recipe": dataclasses.asdict(recipe), "train_config": cfg.to_dict(),
                  "model": self.target_for(recipe).to_dict(), "timm_model": self.args.model,
                  "augment": self.augment.to_dict(), "data": data, **extra, "versions": versions()}
        atomic_write(os.path.join(directory, "config.json"), (json_dumps(record, indent=2) + "\n").encode())


def _augment(args, preset: Preset) -> Augment:
    changes = {}
    if args.aa is not None:
        changes["auto_augment"] = None if args.aa == "none" else args.aa
    if args.reprob is not None:
        changes["re_prob"] = args.reprob
    return dataclasses.replace(preset.augment, **changes)


def _img_size(args, preset: Preset) -> Optional[int]:
    """--img-size, else --model's input size, else the preset's (None: the data set's own)."""
    if args.img_size is not None:
        return args.img_size
    if args.model:
        from timm.models import get_pretrained_cfg_value
        return (get_pretrained_cfg_value(args.model, "input_size") or (3, 224, 224))[-1]
    return preset.img_size


def _target(args, preset: Preset, data) -> ViTConfig:
    """The target ViT for this data: the preset's, or --model's, with --patch-size."""
    size = data.img_size
    patch = args.patch_size
    if patch is None:
        patch = _timm_patch_size(args.model) if args.model else preset.model["patch_size"]
    if size % patch:
        raise UsageError(f"argument --img-size: images of {size} px do not split into patches of {patch} px: give "
                         f"--img-size a multiple of {patch}, or --patch-size a divisor of {size}")
    if not args.model:
        return ViTConfig(**{**preset.model, "patch_size": patch, "img_size": size, "in_chans": data.in_chans,
                            "num_classes": data.num_classes})
    import timm
    model = timm.create_model(args.model, pretrained=False, num_classes=data.num_classes, in_chans=data.in_chans,
                              img_size=size, patch_size=patch)
    try:
        return timm_config(model)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"argument --model: {args.model}: {exc}") from None


def _timm_patch_size(name: str) -> int:
    import timm
    with torch.device("meta"):   # no memory, no init: only the patch size is read
        model = timm.create_model(name, pretrained=False)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise UsageError(f"argument --model: {name} is not a Vision Transformer (it has no patch embedding)")
    return patch[0]


def _context(args) -> _Run:
    if args.initial_checkpoint is not None and args.command not in ("meta", "e2e", "grow"):
        raise UsageError(f"argument --initial-checkpoint: starts the model of `meta`, `e2e` or `grow`; "
                         f"`{args.command}` builds its model from the previous stages")
    preset = get_preset(args.preset)
    if args.out is None:
        args.out = os.path.join("runs", preset.name)
    img_size, augment = _img_size(args, preset), _augment(args, preset)
    load = dict(data_dir=args.data_dir, img_size=img_size, augment=augment, skip_bad_images=args.skip_bad_images)
    if args.val_size is not None:
        train_set, eval_set = holdout(args.data, args.val_size, **load)
    else:
        train_set, eval_set = (load_dataset(args.data, split, **load) for split in ("train", "test"))
    target = _target(args, preset, base_dataset(train_set))
    return _Run(args, preset, args.out, _subset(train_set, args.limit_train, args.seed),
                _subset(eval_set, args.limit_eval, args.seed), target, augment)


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(text, flush=True)


def _done(name: str, result) -> None:
    acc = "-" if result.eval_acc is None else f"{result.eval_acc:.2f}%"
    _say(f"{name}: eval acc {acc}, {result.steps} steps, {result.wall_seconds:.1f} s -> {result.checkpoint_path}")


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
def _final(run: _Run, stage: str, module: Optional[int] = None) -> str:
    return os.path.join(stage_dir(run.run_dir, stage, module), "final")


def _train_meta(run: _Run):
    recipe = run.recipe("meta")
    K, sizes = run.split()
    cfg = run.train_config(recipe)
    run.write_config("meta", recipe, cfg, K=K, sizes=sizes)
    result = deep.train_meta(run.target, K, run.train_set, run.eval_set, cfg, stage_dir(run.run_dir, "meta"),
                             sizes=sizes, drop_path_rate=recipe.drop_path,
                             initial_checkpoint=run.args.initial_checkpoint)
    _done("meta", result)
    return result


def _train_incubate(run: _Run, module: int):
    meta = _final(run, "meta")
    if not os.path.exists(meta + ".json"):
        raise FileNotFoundError(f"incubation needs the meta model {meta}.safetensors: run `incubation meta` first")
    K, _ = run.split()  # --modules / --split must agree with the meta model's
    if not 0 <= module < K:
        raise UsageError(f"argument --module: {module} is not a module of this run: it has K={K} modules, "
                         f"0..{K - 1}")
    recipe = run.recipe("incubate")
    cfg = run.train_config(recipe)
    init, meta_mode = run.init(), run.args.meta_mode
    if init == "lemon":  # LEMON's schedule for a function-preserving start: same peak, no long tail
        cfg = lemon_config(cfg)
    run.write_config("incubate", recipe, cfg, module, init=init, meta_mode=meta_mode)
    result = deep.train_module(meta, run.target_for(recipe), module, run.train_set, run.eval_set, cfg,
                               stage_dir(run.run_dir, "incubate", module), init=init, meta_mode=meta_mode)
    _done(f"incubate-{module}", result)
    return result


def _incubate_all(run: _Run, parallel: int) -> None:
    K, _ = run.split()
    if parallel <= 1:
        for i in range(K):
            _train_incubate(run, i)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("argument --parallel: starts its own processes: do not combine it with torchrun")
    gpus = torch.cuda.device_count()
    # the parent's options, without progress bars (they would only clutter the logs)
    options = common_argv(argparse.Namespace(**{**vars(run.args), "no_progress": True}))
    todo = [jobs.Job(f"incubate-{i}", [sys.executable, "-m", "incubation.cli", "incubate", "--module", str(i),
                                       "--init", run.init(), "--meta-mode", run.args.meta_mode, *options],
                     os.path.join(stage_dir(run.run_dir, "incubate", i), "log.txt"),
                     env={"CUDA_VISIBLE_DEVICES": str(i % gpus)} if gpus > 1 else {})
            for i in range(K)]

    def report(job, what):
        _say(f"{job.name}: started (log {job.log})" if what == "started" else f"{job.name}: {what}")

    failed = jobs.run_jobs(todo, parallel, report=report).failed
    if failed:
        raise IncubationError("incubation failed for " + "; ".join(
            f"module {name.split('-')[1]} ({failure})" for name, failure in failed.items()))


def _train_assemble(run: _Run):
    K, sizes = run.split()
    meta = _final(run, "meta")
    recipe = run.recipe("assemble")
    cfg = run.train_config(recipe)
    run.write_config("assemble", recipe, cfg, K=K, sizes=sizes)
    result = deep.train_assembled(run.target_for(recipe), [_final(run, "incubate", i) for i in range(K)],
                                  run.train_set, run.eval_set, cfg,
                                  stage_dir(run.run_dir, "assemble"), sizes=sizes,
                                  meta_checkpoint=meta if os.path.exists(meta + ".json") else None)
    _done("assemble", result)
    return result


def _train_e2e(run: _Run, matched: bool):
    recipe = run.recipe("e2e")
    target = run.target_for(recipe)
    steps, cost = None, pipeline_cost(run.run_dir) if matched else None
    if matched and cost is None:
        raise FileNotFoundError(f"{run.run_dir} has no finished meta + incubate + assemble stages to match")
    if cost is not None:  # the same training FLOPs as the whole Deep Incubation pipeline
        steps = max(1, round(cost["flops"] / (train_flops_per_image(target) * recipe.batch_size)))
        _say(f"e2e: {steps} steps of {recipe.batch_size} images = the pipeline's "
                       f"{cost['flops'] / 1e12:.2f} TFLOP")
    cfg = run.train_config(recipe, steps)
    run.write_config("e2e", recipe, cfg, matched_flops=cost["flops"] if cost else None)
    result = deep.train_e2e(target, run.train_set, run.eval_set, cfg, stage_dir(run.run_dir, "e2e"),
                            initial_checkpoint=run.args.initial_checkpoint)
    _done("e2e", result)
    return result


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------
def _cmd_meta(args):
    _train_meta(_context(args))


def _cmd_incubate(args):
    if not args.all and args.parallel != 1:
        raise UsageError("argument --parallel: needs --all")
    run = _context(args)
    if args.all:
        _incubate_all(run, args.parallel)
    else:
        _train_incubate(run, args.module)


def _cmd_assemble(args):
    _train_assemble(_context(args))


def _cmd_e2e(args):
    run = _context(args)
    matched = args.epochs is None and pipeline_cost(run.run_dir) is not None
    if not matched:
        _say(f"e2e: {run.recipe('e2e').epochs:g} epochs (give none with a finished pipeline in "
                   f"{run.run_dir} to match its FLOPs)")
    _train_e2e(run, matched)


def _cmd_run(args):
    run = _context(args)
    _train_meta(run)
    _incubate_all(run, args.parallel)
    _train_assemble(run)
    _train_e2e(run, matched=True)
    _cmd_report(args)


def _cmd_report(args):
    run_dir = args.out if args.out is not None else os.path.join("runs", args.preset)
    if os.environ.get("RANK", "0") != "0":
        return
    report = write_report(run_dir)
    for name, s in report["summary"].items():
        print(f"{name}: eval acc {s['acc']:.2f}%, {s['flops'] / 1e12:.2f} TFLOP, {s['wall_s']:.1f} s")
    print(f"report: {os.path.join(run_dir, 'report.md')}")


def _cmd_backends(args):
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("\n\n".join(ops.format_backends(d) for d in devices))


_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _tune_models(args) -> list[torch.nn.Module]:
    """The model(s) whose op calls `tune` measures: with and without the recipe's drop-path,
    since stochastic depth changes which fused ops a block calls."""
    if args.model:
        import timm

        try:
            return [from_timm(timm.create_model(args.model, pretrained=False))]
        except RuntimeError as exc:   # timm's "Unknown model"
            raise ValueError(f"--model {args.model}: {exc}") from None
    preset = get_preset(args.preset)
    # tiny trains on Fashion-MNIST (1 channel, 10 classes, 28 px); the others on ImageNet
    shape = (1, 10, 28) if preset.img_size is None else (3, 1000, preset.img_size)
    config = preset.target_config(*shape)
    rates = sorted({0.0, preset.e2e.drop_path})
    return [VisionTransformer(config.replace(drop_path_rate=r)) for r in rates]


def _cmd_tune(args):
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if ops.current_backend() != "auto":
        raise ValueError(f"INCUBATION_BACKEND={ops.current_backend()} forces a backend: nothing to measure")
    t0, made = time.time(), {}
    for model in _tune_models(args):
        model.to(device)
        c = model.config
        images = torch.randn(args.batch_size, c.in_chans, *c.img_size, device=device)
        with torch.autocast(device.type, dtype=_AMP[args.dtype] or torch.float32, enabled=_AMP[args.dtype] is not None):
            made.update(ops.tune(model, images, fresh=args.fresh))
    print(ops.format_backends(device))
    measured = sum(1 for d in made.values() if d.ms)
    print(f"\nmeasured {measured} op signatures ({len(made) - measured} with eager as the only candidate) "
          f"in {time.time() - t0:.1f} s; decisions file: {ops.dispatch.cache_path()}")


def _model_name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a timm model name, got ''")
    return text


def _add_tune(p):
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="the preset's target ViT (default: tiny)")
    which.add_argument("--model", type=_model_name,
                       help="a timm ViT by name (built with pretrained=False, converted by from_timm)")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per step on this device (default 128)")
    p.add_argument("--dtype", choices=sorted(_AMP), default="fp32",
                   help="fp32, or the autocast dtype training uses (bf16 / fp16)")
    p.add_argument("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:i")
    p.add_argument("--fresh", action="store_true",
                   help="measure again what is already decided (e.g. decided while the machine was busy)")


def _add_incubate(p):
    add_common_arguments(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--module", type=non_negative_int, help="the module to incubate (0..K-1)")
    which.add_argument("--all", action="store_true", help="incubate every module")
    _add_incubation_options(p)


def _add_incubation_options(p):
    p.add_argument("--parallel", type=positive_int, default=1, help="with --all: modules trained at once, as processes")
    p.add_argument("--meta-mode", choices=deep.META_MODES, default="eval",
                   help="the frozen meta blocks of a hybrid: eval (default: deterministic, as after assembly) or "
                        "train (the authors': drop-path spread over every block of the hybrid)")
    p.add_argument("--init", choices=("random", "lemon"), default=None,
                   help="module init: random (the paper) or lemon (LEMON expansion of the meta block); default: the "
                        "preset's (demo: lemon, the others: random)")


def _add_run(p):
    add_common_arguments(p)
    _add_incubation_options(p)


def _add_report(p):
    p.add_argument("--out", type=out_dir, default=None, help="run dir (default runs/<preset>)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))


# ----------------------------------------------------------------------------------------------
# model growth: LEMON expansion and Apollo progressive training
# ----------------------------------------------------------------------------------------------
def _model_config(path: str, md: dict):
    """The config of the whole model stored in a checkpoint (meta model or target)."""
    key = "meta_config" if md.get("stage") == "meta" else "target_config"
    if key not in md or md.get("stage") == "incubate":
        raise ValueError(f"{path} holds no whole model (stage {md.get('stage')!r}); expand takes a meta, "
                         "assemble, e2e, grow or expand checkpoint")
    return ViTConfig.from_dict(md[key])


def _cmd_expand(args):
    state, md = load_checkpoint(args.checkpoint)
    source = VisionTransformer(_model_config(args.checkpoint, md))
    source.load_state_dict(state)
    source.double().eval()  # expand and check in float64, store in float32
    big = lemon_expand(source, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                       mlp_ratio=args.mlp_ratio, seed=args.seed).eval()
    c = source.config
    torch.manual_seed(args.seed)
    x = torch.randn(8, c.in_chans, *c.img_size, dtype=torch.float64)
    with torch.no_grad(), ops.use_backend("eager"):
        diff = (source(x) - big(x)).abs().max().item()
    big.float()
    metadata = {"stage": "expand", "target_config": big.config.to_dict(), "source": os.path.abspath(args.checkpoint),
                "max_abs_logit_diff_float64": diff}
    path = save_checkpoint(args.output, big.state_dict(), metadata)
    _say(f"expanded {c.embed_dim}x{c.depth} -> {big.config.embed_dim}x{big.config.depth} "
               f"({sum(p.numel() for p in big.parameters()) / 1e6:.2f} M params) -> {path}\n"
               f"max |logit difference| on random inputs (float64): {diff:.3e}")


def _cmd_grow(args):
    if args.switch is not None and args.stages is None:
        raise UsageError("argument --switch: needs --stages (the stages it switches between)")
    if args.switch is not None and len(args.switch) != len(args.stages) - 1:
        raise UsageError(f"argument --switch: {len(args.switch)} fractions for the {len(args.stages) - 1} switches "
                         f"between --stages {','.join(map(str, args.stages))}")
    run = _context(args)
    recipe = run.recipe("e2e")
    target = run.target_for(recipe)
    cfg = run.train_config(recipe)
    run.write_config("grow", recipe, cfg, stages=args.stages, switch=args.switch, schedule=args.schedule)
    try:
        result, path = train_apollo(target, run.train_set, run.eval_set, cfg, stage_dir(run.run_dir, "grow"),
                                    stages=args.stages, switch_fractions=args.switch, schedule=args.schedule,
                                    initial_checkpoint=args.initial_checkpoint)
    except ValueError as exc:
        if "stages" in str(exc) or "switch" in str(exc):   # the schedule options do not fit this target
            raise UsageError(f"argument --stages/--switch/--schedule: {exc}") from None
        raise
    _done("grow (Apollo)", result)
    _say(f"grown model (plain VisionTransformer, depth {target.depth}) -> {path}")


def _add_expand(p):
    p.add_argument("checkpoint", type=nonempty_path, help="a whole-model checkpoint (.safetensors or its prefix)")
    p.add_argument("-o", "--output", type=output_prefix, required=True,
                   help="output prefix: writes <output>.safetensors/.json")
    p.add_argument("--embed-dim", type=positive_int)
    p.add_argument("--depth", type=positive_int)
    p.add_argument("--num-heads", type=positive_int)
    p.add_argument("--mlp-ratio", type=positive_float)
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the symmetry-breaking splits")


def fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1), increasing: e.g. Apollo's switches 0.05,0.10,0.25."""
    values = [_float(v) for v in text.split(",")]
    if not all(0.0 < v < 1.0 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing comma-separated numbers in (0, 1) like "
                                         f"0.05,0.10,0.25, got {text!r}")
    return values


def _add_grow(p):
    add_common_arguments(p)
    p.add_argument("--schedule", choices=("apollo", "even"), default="apollo",
                   help="apollo (default, the authors'): stages of depth/12, /4, /2 and all unique blocks, "
                        "switching after 5, 10 and 25 %% of the steps; even: --stages (default depth/4, /2, all) "
                        "for equal numbers of steps")
    p.add_argument("--stages", type=positive_ints, default=None, help="unique-block counts per stage, e.g. 1,3,6,12")
    p.add_argument("--switch", type=fractions, default=None,
                   help="with --stages: fractions of the steps after which each later stage begins, e.g. "
                        "0.05,0.10,0.25")


def _cmd_bench(args):
    return bench.main(args.bench_args)


def _add_bench(p):
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="ops|train|study|assembly and their options (incubation bench ops --help)")


def _add_import_official(p):
    p.add_argument("checkpoint", type=nonempty_path,
                   help="the authors' .pth: a released model (pretrained/vit_*.pth) or a training checkpoint "
                        "(log_dir/*/finished_checkpoint.pth)")
    p.add_argument("-o", "--output", type=output_prefix, required=True,
                   help="output prefix: writes <output>.safetensors/.json (a meta model at <run>/meta/final "
                        "starts `incubation incubate`)")
    p.add_argument("--as", dest="kind", choices=("auto", "meta", "model"), default="auto",
                   help="meta: a meta model for incubation; model: a whole ViT; auto (default): meta when "
                        "every stage holds one block")
    p.add_argument("--model", choices=sorted(OFFICIAL_MODELS),
                   help="their --model name (default: by width, 768 base, 1024 large, 1280 huge)")
    p.add_argument("--target-depth", type=positive_int,
                   help="meta: depth of the target ViT (default: the family's, 12 / 24 / 32)")
    p.add_argument("--split", type=positive_ints, default=None,
                   help="meta: blocks per module of the target, e.g. 3,3,3,3 (default: even)")
    p.add_argument("--num-heads", type=positive_int, help="attention heads (default: the family's)")
    p.add_argument("--norm-eps", type=positive_float, help="LayerNorm eps (default: the family's)")
    p.add_argument("--img-size", type=positive_int,
                   help="image size to resample the position embedding to (default: the checkpoint's)")


def _cmd_import_official(args):
    result = import_official(args.checkpoint, args.output, model=args.model, target_depth=args.target_depth,
                             num_heads=args.num_heads, norm_eps=args.norm_eps, img_size=args.img_size,
                             kind=args.kind, sizes=args.split)
    _say(f"imported {result.summary()}")


SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "run": ("the whole pipeline, the E2E baseline at matched FLOPs, and the report", _add_run, _cmd_run),
    "meta": ("stage 1: train the meta model", add_common_arguments, _cmd_meta),
    "incubate": ("stage 2: incubate one module (--module i) or all (--all)", _add_incubate, _cmd_incubate),
    "assemble": ("stage 3: assemble the incubated modules and fine-tune", add_common_arguments, _cmd_assemble),
    "e2e": ("the baseline: train the target end to end", add_common_arguments, _cmd_e2e),
    "report": ("write report.md / report.json / plots for a run dir", _add_report, _cmd_report),
    "expand": ("LEMON: expand a checkpoint losslessly to a larger ViT", _add_expand, _cmd_expand),
    "grow": ("Apollo: progressive depth training of the target", _add_grow, _cmd_grow),
    "bench": ("kernel / train-step microbenchmarks, or the method study, on this machine", _add_bench,
              _cmd_bench),
    "tune": ("measure every op call of a model on each backend, ahead of training", _add_tune, _cmd_tune),
    "backends": ("show which backend serves each op, with timings and reasons (cpu, and cuda if present)",
                 lambda p: p.add_argument("--device", choices=("cpu", "cuda"), help="only this device type"),
                 _cmd_backends),
    "import-official": ("convert the Deep Incubation authors' released checkpoint (.pth) into this format",
                        _add_import_official, _cmd_import_official),
}


EXIT_STATUS = """exit status: 0 done; 1 the run failed for a reason the user or the environment must fix (one line
on stderr: bad or missing files, disk full, permissions, a failed job, ...); 2 the command line is
wrong (argparse's usage line and the option at fault); 130 interrupted (143: SIGTERM while --parallel
jobs ran; they end too). Any other exception is a bug and keeps its traceback; INCUBATION_DEBUG=1
shows the traceback of every failure."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="incubation", description="Deep Incubation: train a large ViT as independently incubated modules.",
        epilog=EXIT_STATUS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(handler=handler, parser=p)  # the subparser reports a UsageError of the handler
    return parser


# ----------------------------------------------------------------------------------------------
# errors: one line for the user's and the environment's faults, a traceback for bugs
# ----------------------------------------------------------------------------------------------
def _free_bytes(path: str) -> Optional[int]:
    here = os.path.dirname(os.path.abspath(path))
    while here and not os.path.isdir(here):
        here = os.path.dirname(here)
    try:
        return shutil.disk_usage(here).free
    except OSError:
        return None


def _file_in_the_way(path: str) -> Optional[str]:
    """The existing non-directory that `path` needs to be a directory (ENOTDIR), if any."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent != os.path.dirname(parent):
        if os.path.exists(parent) and not os.path.isdir(parent):
            return parent
        parent = os.path.dirname(parent)
    return None


def _os_error_message(exc: OSError) -> str:
    if exc.errno is None:  # our own FileNotFoundError("... run `incubation meta` first") and the like
        return str(exc)
    names = [os.fsdecode(f) if isinstance(f, (str, bytes, os.PathLike)) else str(f)
             for f in (exc.filename, exc.filename2) if f is not None]
    where = " -> ".join(names)  # '' when the failing call had no path (a write() to an open file)
    if exc.errno == errno.ENOSPC:
        needed = getattr(exc, "bytes_needed", None)  # set by a writer that knows its size
        free = _free_bytes(names[0]) if names else None
        sizes = [f"{needed} bytes needed"] * (needed is not None) + [f"{free} bytes free"] * (free is not None)
        return ("disk full: no space left on the device" + (f" to write {where}" if where else "")
                + (f" ({', '.join(sizes)})" if sizes else ""))
    if not where:
        return exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {where}"
    if exc.errno == errno.EROFS:
        return f"read-only file system: cannot write {where}"
    if exc.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(names[0])
        return f"{blocker} is a file, not a directory (needed for {where})" if blocker else f"not a directory: {where}"
    if exc.errno == errno.EEXIST and os.path.exists(names[0]) and not os.path.isdir(names[0]):
        return f"{where} is a file, not a directory"
    if exc.errno == errno.ENOENT:
        return f"no such file or directory: {where}"
    return f"{exc.strerror}: {where}"


def error_message(exc: BaseException) -> Optional[str]:
    """The one-line message of an expected failure (the user's input or the environment is at
    fault), or None for a bug, which keeps its traceback."""
    if isinstance(exc, IncubationError):
        text = str(exc)
        if "Original Traceback" in text:   # re-raised from a DataLoader worker: keep the worker's last line
            last = text.strip().splitlines()[-1]
            head, _, message = last.partition(": ")
            text = message if head.endswith(type(exc).__name__) else last
        return text
    if isinstance(exc, OSError):
        return _os_error_message(exc)
    if isinstance(exc, ValueError):
        return str(exc)
    return None


def _exit_status(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)  # sys.exit("message") prints it and exits 1
    return 1


def run_main(prog: str, body: Callable[[], Optional[int]]) -> int:
    """Run a command's body and turn how it ends into the exit status of EXIT_STATUS."""
    debug = os.environ.get("INCUBATION_DEBUG", "") not in ("", "0")
    try:
        return body() or 0
    except SystemExit as exc:  # argparse of a nested command (bench) has printed its message
        return _exit_status(exc)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", 2)  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except Exception as exc:  # noqa: BLE001 - sorted into expected failures and bugs right here
        message = error_message(exc)
        if message is None or debug:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 1


def main(argv: Optional[list[str]] = None) -> int:
    """`incubation` with `argv` (default sys.argv[1:]); returns the exit status (EXIT_STATUS),
    for a command-line error too (argparse's SystemExit is caught)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the error (or --help)
        return _exit_status(exc)

    def body():
        try:
            return args.handler(args)
        except UsageError as exc:
            args.parser.error(str(exc))  # prints the usage and the message, raises SystemExit(2)

    return run_main(f"incubation {args.command}", body)


if __name__ == "__main__":
    sys.exit(main())
