"""The `incubation` command's argument types and common options.

Every option that takes a value has a checking `type=` (positive_int, positive_float, out_dir, ...;
tests/test_cli_errors.py fuzzes each), so nonsense is refused while parsing (argparse's usage
line, "argument --x: ...", exit 2), before any data is loaded or any file written. The common
options are the fields of `pipeline.RunSpec` (same names): `spec_from_args` reads them, and
`pipeline.stage_argv` writes a child's command line back from the spec.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Optional

import torch

from .. import deep
from ..data import Augment
from ..pipeline import RunSpec, stage_argv
from ..presets import PRESETS
from ..recipe import OPTIONS as RECIPE_OPTIONS
from ..train.config import AMP_DTYPES

__all__ = ["positive_int", "non_negative_int", "seed_int", "positive_float", "non_negative_float", "fraction",
           "decay_rate", "momentum", "betas", "optimizer_name", "lr_base_scale", "sched_name", "amp_dtype",
           "auto_augment", "positive_ints", "fractions", "nonempty_path", "out_dir", "output_prefix",
           "device_name", "model_name", "data_name", "add_common_arguments", "add_incubation_options", "add_meta_from",
           "spec_from_args", "common_argv"]


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


def momentum(text: str) -> float:
    """An optimizer momentum in [0, 1) (0: none)."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text!r}")
    return value


def betas(text: str) -> tuple:
    """Two optimizer betas in [0, 1), e.g. 0.9,0.999."""
    values = tuple(_float(v) for v in text.split(","))
    if len(values) != 2 or not all(0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected two numbers in [0, 1) like 0.9,0.999, got {text!r}")
    return values


def optimizer_name(text: str) -> str:
    """A timm optimizer name (timm.optim.list_optimizers)."""
    from timm.optim import list_optimizers
    if text.lower() not in list_optimizers():
        raise argparse.ArgumentTypeError(f"{text!r} is not a timm optimizer (e.g. adamw, sgd, lamb; "
                                         f"timm.optim.list_optimizers() lists them)")
    return text.lower()


def lr_base_scale(text: str) -> str:
    if text not in ("linear", "sqrt"):
        raise argparse.ArgumentTypeError(f"expected linear or sqrt, got {text!r}")
    return text


def sched_name(text: str) -> str:
    if text not in ("cosine", "step"):
        raise argparse.ArgumentTypeError(f"expected cosine or step (timm's schedulers), got {text!r}")
    return text


def amp_dtype(text: str) -> str:
    """timm's --amp-dtype: bfloat16 or float16 (TrainConfig.autocast_dtype says where each applies)."""
    if text not in AMP_DTYPES:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(AMP_DTYPES)} (timm's autocast dtypes), got {text!r}")
    return text


def auto_augment(text: str) -> str:
    """A timm auto-augment policy (rand-m9-mstd0.5-inc1, augmix-..., original, ...) or 'none'
    (kept as text, so that child processes get it too), checked by timm's own parser of policies:
    the train transform of the policy is built once here."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a timm auto-augment policy (e.g. rand-m9-mstd0.5-inc1) or "
                                         "'none', got ''")
    if text != "none":
        try:
            Augment(auto_augment=text).transform(224, training=True)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
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



def fractions(text: str) -> list[float]:
    """Comma-separated numbers in (0, 1), increasing: e.g. Apollo's switches 0.05,0.10,0.25."""
    values = [_float(v) for v in text.split(",")]
    if not all(0.0 < v < 1.0 for v in values) or values != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing comma-separated numbers in (0, 1) like "
                                         f"0.05,0.10,0.25, got {text!r}")
    return values



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
        add("--experiment", type=nonempty_path, default=None, help="timm's: the run dir is <--out or runs>/NAME"),
        add("--preset", default="tiny", choices=sorted(PRESETS), help="model + recipe (default tiny)"),
        add("--model", type=model_name, default=None, help="a timm ViT by name as the target (built with "
            "pretrained=False, converted by from_timm) instead of the preset's"),
        add("--img-size", type=positive_int, default=None, help="resize images to this size (default: --model's, "
            "else the preset's, else the data set's own)"),
        add("--patch-size", type=positive_int, default=None, help="patch size of the target (default: the "
            "preset's or --model's); --img-size must be a multiple of it"),
        add("--depth", type=positive_int, default=None, help="blocks of the target (default: the preset's or "
            "--model's)"),
        add("--embed-dim", type=positive_int, default=None, help="width of the target (default: the preset's or "
            "--model's)"),
        add("--num-heads", type=positive_int, default=None, help="attention heads of the target (default: the "
            "preset's or --model's)"),
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


class _TimmAmp(argparse.Action):
    """timm's --amp: autocast in float16 (timm's --amp-dtype default) unless --amp-dtype names a
    dtype, before or after it. Here autocast is always on, in bfloat16 by default, so the flag
    only gives a timm command line timm's dtype."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, "float16")


def _add_recipe_options(p: argparse.ArgumentParser) -> list[argparse.Action]:
    """The `Recipe` fields that have flags (generated: dest = the field's name, type = the checking
    type of this module it names), then the options of a run that are not the recipe's."""
    group = p.add_argument_group("recipe (default: the preset's, per stage)")
    add = group.add_argument
    return [add(*f.metadata["flags"], dest=f.name, type=globals()[f.metadata["type"]], default=None,
                help=f.metadata["help"]) for f in RECIPE_OPTIONS] + [
        add("--amp", action=_TimmAmp, dest="amp_dtype", default=None, help="timm's: autocast in float16 unless "
            "--amp-dtype says otherwise (without it: --amp-dtype, default bfloat16, where it applies)"),
        add("--model-ema", action="store_true", help="keep an EMA of the weights (final_ema.*, ema_eval_acc)"),
        add("--grad-accum-steps", "--accum-steps", dest="accum_steps", type=positive_int, default=1,
            help="gradient accumulation micro-batches per step"),
        add("--compile", action="store_true", help="torch.compile the model for the training steps"),
        add("--channels-last", action="store_true", help="model and images in channels-last memory format"),
        add("--pin-mem", action="store_true", help="pin the loaders' memory (the default on CUDA; for timm's "
            "command lines)"),
        add("--grad-checkpointing", action="store_true", help="recompute each block's activations in the "
            "backward pass (less memory, ~1/3 more compute)"),
        add("--seed", type=seed_int, default=0),
        add("--device", type=device_name, default="auto", help="auto (cuda if available), cpu, cuda, cuda:i"),
        add("--no-progress", action="store_true", help="no progress bars"),
        add("--resume", type=nonempty_path, default=None, help="resume the stage from this checkpoint (a "
            "checkpoint.* file or its directory) instead of its own; not for run / incubate --all"),
        add("--checkpoint-hist", type=positive_int, default=0, help="keep the weights of this many best "
            "evaluations (checkpoint-<step>.*) and the best as model_best.* (timm's; default none)"),
        add("--checkpoint-every", type=non_negative_int, default=0, help="steps between the checkpoints a stage "
            "resumes from (default 0: at the end of each epoch)"),
        add("--eval-metric", choices=("top1", "top5", "loss"), default="top1", help="what best means for "
            "--checkpoint-hist (default top1)"),
        add("--log-tensorboard", type=out_dir, default=None, help="also write the metrics as TensorBoard scalars "
            "in this directory (a run per stage; tensorboard --logdir DIR)"),
        add("--log-interval", type=positive_int, default=0, help="steps between metrics lines (default ~1 %% of "
            "the stage)"),
        # for tests and quick looks: train / evaluate on a fixed random subset
        add("--limit-train", type=positive_int, default=None, help=argparse.SUPPRESS),
        add("--limit-eval", type=positive_int, default=None, help=argparse.SUPPRESS),
    ]




def add_incubation_options(p: argparse.ArgumentParser) -> None:
    """The options of `incubate` and `run` beyond the common ones."""
    p.add_argument("--parallel", type=positive_int, default=1, help="with --all: modules trained at once, as processes")
    p.add_argument("--meta-mode", choices=deep.META_MODES, default="eval",
                   help="the frozen meta blocks of a hybrid: eval (default: deterministic, as after assembly) or "
                        "train (the authors': drop-path spread over every block of the hybrid)")
    p.add_argument("--init", choices=("random", "lemon"), default=None,
                   help="module init: random (the paper) or lemon (LEMON expansion of the meta block); default: the "
                        "preset's (demo: lemon, the others: random)")


def add_meta_from(p: argparse.ArgumentParser) -> None:
    """The option of `incubate` and `assemble` that shares another run's meta model."""
    p.add_argument("--meta-from", type=out_dir, default=None,
                   help="the run dir whose meta model to incubate / check the modules against (default: this run's): "
                        "variants of the incubation (--init, --meta-mode) sharing one meta model")


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of parsed options: each RunSpec field from the option of the same name (the
    incubation-only ones keep their defaults where a subcommand does not take them), the recipe
    options given into `recipe`."""
    names = [f.name for f in dataclasses.fields(RunSpec) if f.name not in ("resources", "recipe", "stage_recipes")]
    recipe = {f.name: getattr(args, f.name) for f in RECIPE_OPTIONS if getattr(args, f.name, None) is not None}
    return RunSpec(**{name: getattr(args, name) for name in names if hasattr(args, name)}, recipe=recipe)


def common_argv(args: argparse.Namespace) -> list[str]:
    """The common options of `args` as a command line (what a child process of `meta` gets)."""
    return stage_argv(spec_from_args(args), "meta")[4:]
