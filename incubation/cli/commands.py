"""The `incubation` command: its subcommand table and their handlers.

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
    incubation bench ops|train|study|assembly|dispatch   the benchmarks (incubation.bench) on this machine
    incubation tune [--preset P | --model NAME]   measure every op call of a model on each backend
                                         ahead of training, into the dispatch cache
    incubation backends                  which kernel backend serves each op, its timings, and why
    incubation import-official CKPT -o OUT   the authors' released checkpoint in this format

The pipeline itself is `incubation.pipeline`: a stage subcommand runs one stage in this process
(at once done when its final checkpoint exists), `run` and `incubate --all` hand the job graph
(`pipeline.jobs`) to the local launcher, one process per stage, logs in <out>/<stage>/log.txt.
Stages find the previous stage's outputs in the run dir (--out, default runs/<preset>) and resume an
interrupted stage from its checkpoint. A stage uses its preset recipe (incubation.presets);
--epochs / --batch-size / --lr override it (for `run`: every stage; the E2E baseline always gets
the pipeline's FLOPs there). --lr is the absolute peak lr, as timm's; --lr-base scales to the batch.

New subcommands are entries of SUBCOMMANDS: name -> (help, add_arguments(parser), handler(args)).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

import torch

from .. import bench, ops, pipeline
from ..errors import IncubationError
from ..growth import apollo_schedule, lemon_expand, too_few_steps, train_apollo
from ..launch.local import LocalLauncher, last_line
from ..nn import VisionTransformer
from ..official import import_official
from ..pipeline import say
from ..presets import PRESETS, get_preset
from ..report import write_report
from ..timm_compat import from_timm
from ..train.checkpoint import load_checkpoint, refuse_overwriting
from ..train.distributed import auto_device
from ..weights import OFFICIAL_MODELS, build_model
from . import launching
from .exits import EXIT_STATUS, UsageError, exit_status, run_main
from .options import (
    add_common_arguments,
    add_incubation_options,
    add_meta_from,
    device_name,
    fractions,
    non_negative_int,
    nonempty_path,
    out_dir,
    output_prefix,
    positive_float,
    positive_int,
    positive_ints,
    seed_int,
    spec_from_args,
)

__all__ = ["SUBCOMMANDS", "build_parser", "main"]


# ----------------------------------------------------------------------------------------------
# the pipeline: one stage here, or the graph through the local launcher
# ----------------------------------------------------------------------------------------------
def _stage(args, stage: str, module: Optional[int] = None) -> None:
    pipeline.run_stage(spec_from_args(args), stage, module)


def _report_job(job, what: str) -> None:
    if what == "started":
        say(f"{job.name}: started (log {job.log})")
    elif what == "finished":
        say(f"{job.name}: finished ({last_line(job.log)})")
    else:
        say(f"{job.name}: {what}")


def _launch(spec: pipeline.RunSpec, parallel: int, stages=None) -> None:
    """Run the unfinished jobs of `spec` (those of `stages`) as processes, `parallel` at once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("argument --parallel: starts its own processes: do not combine it with torchrun")
    quiet = dataclasses.replace(spec, no_progress=True)  # progress bars would only clutter the logs
    outcome = LocalLauncher(parallel, report=_report_job).launch(pipeline.jobs(quiet, stages=stages),
                                                                 pipeline.finished(spec))
    if outcome.failed:
        raise IncubationError("failed: " + "; ".join(f"{name} ({failure})" for name, failure in outcome.failed.items())
                              + (f"; not started: {', '.join(outcome.skipped)}" if outcome.skipped else ""))


def _cmd_incubate(args):
    if not args.all and args.parallel != 1:
        raise UsageError("argument --parallel: needs --all")
    spec = spec_from_args(args)
    if not args.all:
        pipeline.run_stage(spec, "incubate", args.module)
        return
    _one_stage_resume(spec, "incubate --all")
    pipeline.check_stage(spec, "incubate", 0)   # the meta model is there
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.parallel == 1:  # under torchrun: here, in turn
        for i in range(pipeline.num_modules(spec)[0]):
            pipeline.run_stage(spec, "incubate", i)
        return
    _launch(spec, args.parallel, stages=["incubate"])


def _one_stage_resume(spec, command: str) -> None:
    if spec.resume is not None:
        raise UsageError(f"argument --resume: names one stage's checkpoint, not {command}'s: give it to that "
                         "stage's command (meta, incubate --module I, assemble or e2e)")


def _cmd_run(args):
    spec = launching.with_resources(spec_from_args(args), args)
    _one_stage_resume(spec, "run")
    pipeline.check_initial_checkpoint(spec, "run")
    pipeline.num_modules(spec)   # --modules and --split agree
    if args.launcher == "slurm":
        if args.parallel != 1:
            raise UsageError("argument --parallel: the slurm launcher runs what Slurm allows at once")
        launching.run_on_slurm(dataclasses.replace(spec, no_progress=True), args)
        return
    _launch(spec, args.parallel)
    with open(os.path.join(spec.run_dir, "report.json")) as f:
        _print_summary(json.load(f), spec.run_dir)


def _print_summary(report: dict, run_dir: str) -> None:
    for name, s in report["summary"].items():
        print(f"{name}: eval acc {s['acc']:.2f}%, {s['flops'] / 1e12:.2f} TFLOP, {s['wall_s']:.1f} s")
    print(f"report: {os.path.join(run_dir, 'report.md')}")


def _cmd_report(args):
    run_dir = args.out if args.out is not None else os.path.join("runs", args.preset)
    if os.environ.get("RANK", "0") == "0":
        _print_summary(write_report(run_dir), run_dir)


def _add_assemble(p):
    add_common_arguments(p)
    add_meta_from(p)


def _add_incubate(p):
    add_common_arguments(p)
    add_meta_from(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--module", type=non_negative_int, help="the module to incubate (0..K-1)")
    which.add_argument("--all", action="store_true", help="incubate every module")
    add_incubation_options(p)


def _add_run(p):
    add_common_arguments(p)
    add_incubation_options(p)
    launching.add_launcher_options(p)


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
    device = torch.device(auto_device(args.device))
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


def _add_report(p):
    p.add_argument("--out", type=out_dir, default=None, help="run dir (default runs/<preset>)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))


# ----------------------------------------------------------------------------------------------
# model growth: LEMON expansion and Apollo progressive training
# ----------------------------------------------------------------------------------------------
def _cmd_expand(args):
    refuse_overwriting(args.output, [args.checkpoint])
    source = build_model(args.checkpoint, *load_checkpoint(args.checkpoint))
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
    # looked up on the package, `incubation.cli.save_checkpoint`: where tests put a failing writer
    path = sys.modules[__package__].save_checkpoint(args.output, big.state_dict(), metadata)
    say(f"expanded {c.embed_dim}x{c.depth} -> {big.config.embed_dim}x{big.config.depth} "
               f"({sum(p.numel() for p in big.parameters()) / 1e6:.2f} M params) -> {path}\n"
               f"max |logit difference| on random inputs (float64): {diff:.3e}")


def _cmd_grow(args):
    if args.switch is not None and args.stages is None:
        raise UsageError("argument --switch: needs --stages (the stages it switches between)")
    if args.switch is not None and len(args.switch) != len(args.stages) - 1:
        raise UsageError(f"argument --switch: {len(args.switch)} fractions for the {len(args.stages) - 1} switches "
                         f"between --stages {','.join(map(str, args.stages))}")
    spec = spec_from_args(args)
    pipeline.check_initial_checkpoint(spec, "grow")
    run = pipeline.context(spec)
    recipe = run.recipe("e2e")
    target = run.target_for(recipe)
    cfg = run.train_config(recipe)
    if args.stages is not None and args.switch is None and args.schedule == "apollo":
        own = apollo_schedule(target.depth, 100)[0]   # its stages do not depend on the steps
        raise UsageError(f"argument --stages: --schedule apollo (the default) sets the stages itself ({','.join(map(str, own))} "
                         f"at depth {target.depth}); for --stages {','.join(map(str, args.stages))} give --schedule even "
                         "or --switch")
    least = too_few_steps(target.depth, cfg.steps, args.stages, args.switch, args.schedule)
    if least is not None:
        schedule = f"--switch {','.join(map(str, args.switch))}" if args.switch else f"--schedule {args.schedule}"
        raise UsageError(f"argument --epochs: {cfg.steps} steps (--epochs {recipe.epochs:g} of {len(run.train_set)} "
                         f"images at --batch-size {recipe.batch_size}) are too few for {schedule} at depth "
                         f"{target.depth}: every stage needs a step, which takes at least {least} steps; give more "
                         f"--epochs, or fewer stages (--stages, --switch, --schedule even)")
    run.write_config("grow", recipe, cfg, stages=args.stages, switch=args.switch, schedule=args.schedule)
    try:
        result, path = train_apollo(target, run.train_set, run.eval_set, cfg, pipeline.stage_dir(run.run_dir, "grow"),
                                    stages=args.stages, switch_fractions=args.switch, schedule=args.schedule,
                                    initial_checkpoint=args.initial_checkpoint)
    except ValueError as exc:
        if "stages" in str(exc) or "switch" in str(exc):   # the schedule options do not fit this target
            raise UsageError(f"argument --stages/--switch/--schedule: {exc}") from None
        raise
    pipeline.print_result("grow (Apollo)", result)
    say(f"grown model (plain VisionTransformer, depth {target.depth}) -> {path}")


def _add_expand(p):
    p.add_argument("checkpoint", type=nonempty_path, help="a whole-model checkpoint (.safetensors or its prefix)")
    p.add_argument("-o", "--output", type=output_prefix, required=True,
                   help="output prefix: writes <output>.safetensors/.json")
    p.add_argument("--embed-dim", type=positive_int)
    p.add_argument("--depth", type=positive_int)
    p.add_argument("--num-heads", type=positive_int)
    p.add_argument("--mlp-ratio", type=positive_float)
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the symmetry-breaking splits")


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
                   help="ops|train|study|assembly|dispatch and their options (incubation bench ops --help)")


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
    say(f"imported {result.summary()}")



SUBCOMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "run": ("the whole pipeline, the E2E baseline at matched FLOPs, and the report", _add_run, _cmd_run),
    "meta": ("stage 1: train the meta model", add_common_arguments, lambda args: _stage(args, "meta")),
    "incubate": ("stage 2: incubate one module (--module i) or all (--all)", _add_incubate, _cmd_incubate),
    "assemble": ("stage 3: assemble the incubated modules and fine-tune", _add_assemble,
                 lambda args: _stage(args, "assemble")),
    "e2e": ("the baseline: train the target end to end", add_common_arguments, lambda args: _stage(args, "e2e")),
    "status": ("the state of each stage of a run submitted to Slurm: pending (why), running, done, failed or "
               "cancelled, elapsed time, last metric and log line", launching.add_status, launching.cmd_status),
    "cancel": ("cancel the Slurm jobs of a run that are still pending or running", launching.add_status,
               launching.cmd_cancel),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="incubation", description="Deep Incubation: train a large ViT as independently incubated modules.",
        epilog=EXIT_STATUS, allow_abbrev=False)   # a prefix of a flag is no flag: --drop is not --drop-path
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, add_arguments, handler) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        add_arguments(p)
        p.set_defaults(handler=handler, parser=p)  # the subparser reports a UsageError of the handler
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """`incubation` with `argv` (default sys.argv[1:]); returns the exit status (EXIT_STATUS),
    for a command-line error too (argparse's SystemExit is caught)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage and the error (or --help)
        return exit_status(exc)

    def body():
        try:
            return args.handler(args)
        except UsageError as exc:
            args.parser.error(str(exc))  # prints the usage and the message, raises SystemExit(2)

    return run_main(f"incubation {args.command}", body)


if __name__ == "__main__":
    sys.exit(main())
