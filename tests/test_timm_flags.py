"""The training flags timm users reach for (issue 25), each against timm's own behaviour: the lr
rule of timm's train.py, create_optimizer_v2's parameter groups, create_scheduler_v2's lr curve
per step, and an epoch that is an epoch."""
import json

import pytest
import torch
from tiny_training import QUIET, easy_data, tiny_vit

from incubation import cli, ops, pipeline
from incubation.recipe import Recipe
from incubation.train import TrainConfig, train
from incubation.train.optim import make_optimizer
from incubation.train.schedule import lr_schedule


@pytest.fixture(autouse=True)
def eager_ops():
    with ops.use_backend("eager"):
        yield


def _recipe(*argv, preset="tiny", stage="meta"):
    spec = cli.spec_from_args(cli.build_parser().parse_args(["meta", *argv]))
    return pipeline.stage_recipe(spec, pipeline.get_preset(preset), stage)


# ----------------------------------------------------------------------------------------------
# --lr is absolute; --lr-base scales by the global batch as timm's train.py does
# ----------------------------------------------------------------------------------------------
def test_lr_is_absolute_and_lr_base_scales_as_timm():
    assert _recipe("--lr", "5e-4", "-b", "16").peak_lr == 5e-4                       # no x batch / 512
    assert _recipe("--lr-base", "1e-3", "--lr-base-size", "256", "-b", "1024").peak_lr == pytest.approx(4e-3)
    # timm's default rule by optimizer: sqrt for Ada* / LAMB, else linear
    base = Recipe(lr_base=1e-3, lr_base_size=256, batch_size=1024)
    assert base.peak_lr == pytest.approx(2e-3)                                        # adamw: sqrt(4)
    assert Recipe(lr_base=1e-3, lr_base_size=256, batch_size=1024, opt="lamb").peak_lr == pytest.approx(2e-3)
    assert Recipe(lr_base=1e-3, lr_base_size=256, batch_size=1024, opt="sgd").peak_lr == pytest.approx(4e-3)
    assert Recipe(lr_base=1e-3, lr_base_size=256, batch_size=1024, lr_base_scale="linear").peak_lr == \
        pytest.approx(4e-3)
    # the presets' official values are base lrs at batch 512, scaled linearly (DeiT's rule)
    assert pipeline.get_preset("vit-b").meta.peak_lr == pytest.approx(5e-4 * 2048 / 512)
    assert _recipe("--opt", "lamb", preset="vit-b").peak_lr == pytest.approx(5e-4 * 2048 / 512)
    assert cli.main(["meta", "--lr-base-scale", "cubic"]) == 2 and cli.main(["meta", "--opt", "nope"]) == 2


def test_a_stage_prints_its_resolved_lr(tiny, folder, run_cli, tmp_path, capsys):
    assert run_cli("meta", "--data", folder, "--out", tmp_path, *tiny, "--lr", "3e-3", "--epochs", "1") == 0
    out = capsys.readouterr().out
    assert "meta: 6 steps of 8 images, adamw at peak lr 0.003 (warmup" in out
    assert "), no autocast (bfloat16 autocast applies on CUDA only)\n" in out   # --amp-dtype's default on CPU


# ----------------------------------------------------------------------------------------------
# --opt, --momentum, --opt-eps, --opt-betas, --layer-decay: timm's create_optimizer_v2
# ----------------------------------------------------------------------------------------------
def _groups(optimizer):
    """{param id: (weight decay, lr_scale)} and the optimizer's defaults."""
    return {id(p): (g["weight_decay"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("flags", [dict(opt="adamw"), dict(opt="sgd", momentum=0.8), dict(opt="lamb", opt_eps=1e-6),
                                   dict(opt="adamw", opt_betas=(0.8, 0.99)), dict(opt="adamw", layer_decay=0.75)])
def test_the_optimizer_is_timms_for_the_same_flags(flags):
    from timm.optim import create_optimizer_v2
    model = tiny_vit()
    ours = make_optimizer(model, list(model.named_parameters()), TrainConfig(lr=1e-3, weight_decay=0.05, **flags))
    timm_kw = {{"opt_eps": "eps", "opt_betas": "betas"}.get(k, k): v for k, v in flags.items()}
    theirs = create_optimizer_v2(model, lr=1e-3, weight_decay=0.05, **timm_kw)
    assert type(ours) is type(theirs) and ours.defaults == theirs.defaults
    assert _groups(ours) == _groups(theirs)
    if "layer_decay" in flags:
        assert len({scale for _, scale in _groups(ours).values()}) == len(model.blocks) + 2


def test_layer_decay_scales_the_scheduled_lr_and_needs_a_group_matcher(tmp_path):
    model = tiny_vit()
    cfg = TrainConfig(steps=2, batch_size=16, lr=1e-3, min_lr=1e-3, layer_decay=0.5, **QUIET)
    train(model, easy_data(), None, cfg, tmp_path)
    state = torch.load(tmp_path / "checkpoint.state.pt", weights_only=False)["optimizer"]
    assert sorted({g["lr"] / g["lr_scale"] for g in state["param_groups"]}) == pytest.approx([1e-3])
    assert min(g["lr_scale"] for g in state["param_groups"]) == pytest.approx(0.5 ** (len(model.blocks) + 1))
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Sequential has no group_matcher"):
        make_optimizer(plain, list(plain.named_parameters()), TrainConfig(layer_decay=0.5))


# ----------------------------------------------------------------------------------------------
# --sched cosine|step, --warmup-lr, --decay-epochs, --decay-rate: timm's create_scheduler_v2
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,timm_kw", [
    (["--sched", "cosine", "--warmup-epochs", "2", "--warmup-lr", "1e-6", "--min-lr", "2e-5"],
     dict(sched="cosine", warmup_epochs=2, warmup_lr=1e-6, min_lr=2e-5)),
    (["--sched", "cosine", "--warmup-epochs", "1"], dict(sched="cosine", warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5)),
    (["--sched", "step", "--decay-epochs", "3", "--decay-rate", "0.5", "--warmup-epochs", "1"],
     dict(sched="step", decay_epochs=3, decay_rate=0.5, warmup_epochs=1, warmup_lr=1e-5)),
])
def test_the_lr_curve_is_timms_for_the_same_flags(argv, timm_kw):
    from timm.scheduler import create_scheduler_v2
    num_train, per_epoch = 1000, 1000 // 64
    recipe = _recipe(*argv, "--lr", "1e-3", "-b", "64", "--epochs", "10")
    cfg = recipe.train_config(num_train)
    ours = lr_schedule(cfg, cfg.steps, cfg.decay_steps)
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched, _ = create_scheduler_v2(holder, num_epochs=10, step_on_epochs=False, updates_per_epoch=per_epoch,
                                   **timm_kw)
    theirs = []
    for step in range(cfg.steps):   # timm's train.py: step_update(num_updates) after each update
        sched.step_update(step)
        theirs.append(holder.param_groups[0]["lr"])
    assert cfg.steps == 10 * per_epoch and [ours(s) for s in range(cfg.steps)] == pytest.approx(theirs, rel=1e-12)
    assert [ours(s) for s in range(cfg.steps)] == [ours(s) for s in range(cfg.steps)]   # a function of the step


def test_the_engine_follows_timms_schedule(tmp_path):
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, min_lr=1e-5, sched="step", decay_steps=2, decay_rate=0.5,
                      warmup_steps=1, warmup_lr=1e-4, **QUIET)
    train(tiny_vit(), easy_data(), None, cfg, tmp_path)
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [line["lr"] for line in lines] == pytest.approx([1e-4, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4], rel=1e-12)
    with pytest.raises(ValueError, match="timm's cosine"):
        TrainConfig(sched="cosine", decay_steps=3)


# ----------------------------------------------------------------------------------------------
# an epoch is an epoch
# ----------------------------------------------------------------------------------------------
def test_one_epoch_is_one_pass_of_full_batches(tmp_path):
    # 500 images in batches of 128: 3 full batches (the 4th, incomplete, is dropped as the loader drops it)
    assert Recipe(epochs=1, batch_size=128).steps(500) == 3
    recipe = Recipe(epochs=1, batch_size=16, lr=1e-3, mixup=0.0, cutmix=0.0)
    cfg = recipe.train_config(120, progress=False, device="cpu")   # 7.5 batches: 7 steps, 1 epoch
    train(tiny_vit(), easy_data(n=120), None, cfg, tmp_path)
    last = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    assert (last["step"], last["epoch"]) == (7, 1.0)


# ----------------------------------------------------------------------------------------------
# records: eval_top5, timm's summary.csv columns, args.yaml
# ----------------------------------------------------------------------------------------------
def test_top5_is_timms_accuracy_and_is_recorded(tmp_path):
    import csv

    from timm.utils import accuracy

    from incubation.train import evaluate, load_checkpoint
    model, data = tiny_vit(num_classes=8), easy_data(n=64)
    cfg = TrainConfig(steps=4, batch_size=16, lr=1e-3, eval_every=2, **QUIET)
    result = train(model, data, data, cfg, tmp_path)
    x, y = data.tensors
    with torch.no_grad():
        top1, top5 = accuracy(model(x), y, topk=(1, 5))
    assert evaluate(model, data)["top5"] == pytest.approx(float(top5)) and result.eval_top5 == pytest.approx(float(top5))
    assert result.eval_acc == pytest.approx(float(top1))
    assert load_checkpoint(tmp_path / "final")[1]["eval_top5"] == result.eval_top5
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert list(rows[0])[:6] == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    assert [float(r["eval_top5"]) for r in rows][-1] == result.eval_top5 and len(rows) == 2   # per epoch here


def test_a_stage_writes_args_yaml(tiny, folder, run_cli, tmp_path):
    import yaml
    assert run_cli("meta", "--data", folder, "--out", tmp_path, *tiny, "--opt", "sgd", "--epochs", "1") == 0
    args = yaml.safe_load(open(tmp_path / "meta" / "args.yaml"))
    assert (args["opt"], args["batch_size"], args["img_size"], args["data"]) == ("sgd", 8, 14, folder)


# ----------------------------------------------------------------------------------------------
# --log-interval, --experiment
# ----------------------------------------------------------------------------------------------
def test_log_interval_sets_the_metrics_lines(tmp_path):
    cfg = TrainConfig(steps=7, batch_size=16, lr=1e-3, log_interval=3, **QUIET)
    train(tiny_vit(), easy_data(), None, cfg, tmp_path)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [3, 6, 7]   # and the last
    assert cli.main(["meta", "--log-interval", "0"]) == 2


def test_amp_is_timms_switch_to_float16_unless_amp_dtype_says_otherwise():
    assert _recipe().amp_dtype == "bfloat16"                       # autocast is always on here
    assert _recipe("--amp").amp_dtype == "float16"                 # timm's --amp-dtype default
    assert _recipe("--amp", "--amp-dtype", "bfloat16").amp_dtype == "bfloat16"
    assert _recipe("--amp-dtype", "bfloat16", "--amp").amp_dtype == "bfloat16"
    spec = cli.spec_from_args(cli.build_parser().parse_args(["run", "--amp"]))
    child = cli.spec_from_args(cli.build_parser().parse_args(pipeline.stage_argv(spec, "incubate", 1)[3:]))
    assert child.recipe["amp_dtype"] == "float16"                  # what each stage's process gets
    assert cli.main(["meta", "--amp=1"]) == 2                      # a switch takes no value


def test_experiment_names_the_run_dir_as_timms_output_subdirectory(tmp_path):
    parse = cli.build_parser().parse_args
    spec = cli.spec_from_args(parse(["run", "--out", str(tmp_path), "--experiment", "lamb-1", "--log-interval", "5"]))
    assert spec.run_dir == str(tmp_path / "lamb-1")
    assert cli.spec_from_args(parse(["run", "--experiment", "x"])).run_dir == "runs/x"
    child = cli.spec_from_args(parse(pipeline.stage_argv(spec, "meta")[3:]))
    assert child.run_dir == spec.run_dir and child.log_interval == 5   # the child does not add the name twice


def test_channels_last_trains_the_same_model(tmp_path):
    results = []
    for channels_last in (False, True):
        model = tiny_vit()
        cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, channels_last=channels_last, **QUIET)
        train(model, easy_data(), None, cfg, tmp_path / str(channels_last))
        results.append(model)
    conv = results[1].patch_embed.proj.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.stride()[1] == 1   # C is innermost
    for a, b in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)   # float64: a layout, not another model
    args = cli.build_parser().parse_args(["meta", "--channels-last", "--pin-mem"])
    assert cli.spec_from_args(args).channels_last and cli.spec_from_args(args).pin_mem


# ----------------------------------------------------------------------------------------------
# --resume PATH
# ----------------------------------------------------------------------------------------------
def test_resume_from_another_runs_checkpoint_replays_the_run(tmp_path):
    import dataclasses

    from incubation.train import CheckpointError
    cfg = TrainConfig(steps=4, batch_size=16, lr=1e-3, checkpoint_every=2, **QUIET)

    def killed_at_step_3(step, model):
        if step == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(tiny_vit(), easy_data(), None, cfg, tmp_path / "killed", hooks=[killed_at_step_3])
    whole, resumed = tiny_vit(), tiny_vit(seed=5)
    train(whole, easy_data(), None, cfg, tmp_path / "whole")
    for given in ("killed", "killed/checkpoint.safetensors"):
        train(resumed, easy_data(), None, dataclasses.replace(cfg, resume_from=str(tmp_path / given)),
              tmp_path / ("resumed" + str(len(given))))
        lines = [json.loads(line) for line in open(tmp_path / ("resumed" + str(len(given))) / "metrics.jsonl")]
        assert [line["step"] for line in lines] == [3, 4]   # it started at the other run's step 2
        for a, b in zip(whole.parameters(), resumed.parameters()):
            assert a.equal(b)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(tiny_vit(), easy_data(), None, dataclasses.replace(cfg, resume_from=str(tmp_path / "nowhere")),
              tmp_path / "x")
    with pytest.raises(CheckpointError, match="stage 'train''s, not 'meta''s"):
        train(tiny_vit(), easy_data(), None, dataclasses.replace(cfg, resume_from=str(tmp_path / "killed")),
              tmp_path / "y", stage="meta")
    assert cli.main(["run", "--resume", str(tmp_path / "killed")]) == 2
    # a checkpoint in the stage's own directory is one of its outputs: refused before anything is written
    before = {f.name: f.read_bytes() for f in (tmp_path / "killed").iterdir()}
    for given in ("killed", "killed/checkpoint.json", "killed/../killed/checkpoint"):
        with pytest.raises(CheckpointError, match="this stage's own directory"):
            train(tiny_vit(), easy_data(), None, dataclasses.replace(cfg, resume_from=str(tmp_path / given)),
                  tmp_path / "killed")
    assert {f.name: f.read_bytes() for f in (tmp_path / "killed").iterdir()} == before


# ----------------------------------------------------------------------------------------------
# --checkpoint-hist, --eval-metric
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric,key,sign", [("loss", "eval_loss", 1), ("top5", "eval_top5", -1)])
def test_the_best_checkpoints_are_kept_as_timms_checkpoint_saver(tmp_path, metric, key, sign):
    from incubation.train import load_checkpoint
    cfg = TrainConfig(steps=6, batch_size=16, lr=3e-3, eval_every=1, checkpoint_hist=2, eval_metric=metric, **QUIET)
    model = tiny_vit(num_classes=8)
    train(model, easy_data(), easy_data(n=32, seed=3), cfg, tmp_path)
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    best = sorted(evals, key=lambda e: (sign * e[key], e["step"]))[:2]
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*.safetensors"))
    assert kept == sorted(f"checkpoint-{e['step']}.safetensors" for e in best)
    weights, meta = load_checkpoint(tmp_path / "model_best")
    assert meta["step"] == best[0]["step"] and meta[key] == best[0][key]
    assert weights.keys() == model.state_dict().keys()
    assert cli.main(["meta", "--eval-metric", "top3"]) == 2


# ----------------------------------------------------------------------------------------------
# --log-tensorboard
# ----------------------------------------------------------------------------------------------
def test_tensorboard_gets_the_metrics_lines(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = TrainConfig(steps=4, batch_size=16, lr=1e-3, eval_every=2, tensorboard_dir=str(tmp_path / "tb"), **QUIET)
    train(tiny_vit(), easy_data(), easy_data(n=32, seed=3), cfg, tmp_path / "meta")
    lines = [json.loads(line) for line in open(tmp_path / "meta" / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "tb" / "meta")).Reload()
    for key in ("loss", "lr", "eval_acc", "eval_top5"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in lines if key in m], key
    assert [e.step for e in events.Scalars("eval_acc")] == [2, 4]
