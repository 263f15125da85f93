"""timm's --amp-dtype bfloat16|float16 (issue 25): bfloat16 (the default) autocasts on CUDA only, as
before the flag; float16 autocasts on CUDA and CPU with a GradScaler, whose steps match torch's
documented GradScaler loop, whose state resumes exactly, whose skipped steps are no divergence
while a NaN loss or a collapsing scale still is."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_training import QUIET, Recording, easy_data, tiny_vit

from incubation import cli, ops, pipeline
from incubation.train import DivergedError, TrainConfig, train
from incubation.train.checkpoint import load_checkpoint_state
from incubation.train.optim import make_optimizer, trained_parameters

FP32 = dict(dtype=torch.float32)   # autocast casts float32 (a float64 model would keep float64)
CPU = dict(QUIET, device="cpu")    # the CPU twins, on a GPU machine too


@pytest.fixture(autouse=True)
def eager_ops():
    with ops.use_backend("eager"):
        yield


def _scaler_state(out):
    return load_checkpoint_state(out / "checkpoint")["scaler"]


def _overflow_at(model, steps):
    """A train() hook making the gradients infinite at `steps` (as an float16 overflow does):
    the head's bias gradient is multiplied by inf during those steps' backward passes."""
    now = {"step": -1}
    model.head.bias.register_hook(lambda g: g * math.inf if now["step"] in steps else g)
    return lambda step, m: now.update(step=step)


def test_the_default_is_bfloat16_on_cuda_only_and_float16_applies_everywhere_with_a_scaler():
    default = TrainConfig()
    assert default.amp_dtype == "bfloat16" and not default.loss_scaling
    assert default.autocast_dtype("cuda") == "bfloat16" and default.autocast_dtype("cpu") is None
    half = TrainConfig(amp_dtype="float16")
    assert half.autocast_dtype("cpu") == half.autocast_dtype("cuda") == "float16" and half.loss_scaling
    off = TrainConfig(amp=False, amp_dtype="float16")
    assert off.autocast_dtype("cuda") is None and not off.loss_scaling
    assert default.precision("cpu") == "no autocast (bfloat16 autocast applies on CUDA only)"
    assert half.precision("cpu") == "float16 autocast with loss scaling"
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        TrainConfig(amp_dtype="float8")


def test_the_bfloat16_default_trains_on_cpu_as_without_amp(tmp_path):
    """On CPU bfloat16 is no autocast: the same weights, bit for bit, as amp=False; no scaler state."""
    results = []
    for amp in (True, False):
        model = tiny_vit(**FP32)
        cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, amp=amp, **CPU)
        train(model, easy_data(**FP32), None, cfg, tmp_path / str(amp))
        results.append(model.state_dict())
        assert _scaler_state(tmp_path / str(amp)) is None
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_float16_step_is_torchs_gradscaler_loop(tmp_path):
    """One full-batch step with clipping against torch's documented recipe: autocast(float16),
    scaler.scale(loss).backward(), unscale_, clip, scaler.step, scaler.update. Bit for bit."""
    data = Recording(easy_data(n=32, **FP32))
    model, ref = tiny_vit(**FP32), tiny_vit(**FP32)
    cfg = TrainConfig(steps=1, batch_size=32, lr=0.1, opt="sgd", weight_decay=0.0, clip_grad=0.5,
                      amp_dtype="float16", **CPU)
    train(model, data, None, cfg, tmp_path / "fp16")

    x, y = data.data.tensors[0][data.reads], data.data.tensors[1][data.reads]   # the engine's order
    scaler, optimizer = torch.amp.GradScaler("cpu"), make_optimizer(ref, trained_parameters(ref, None), cfg)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = ref(x)
    assert logits.dtype == torch.float16
    loss = F.cross_entropy(logits.float(), F.one_hot(y, 4).float())
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    assert torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5) > 0.5, "the clip must be active"
    scaler.step(optimizer)
    scaler.update()
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert _scaler_state(tmp_path / "fp16") == scaler.state_dict()
    # and float16 is in effect: without it the same step gives other weights
    fp32 = tiny_vit(**FP32)
    train(fp32, data, None, dataclasses.replace(cfg, amp_dtype="bfloat16"), tmp_path / "fp32")
    assert not torch.equal(fp32.head.weight, model.head.weight)


def test_skipped_steps_are_no_divergence_and_leave_the_weights(tmp_path):
    """Steps 1 and 2 overflow: the scaler skips them (the weights and the optimizer stay) and
    halves its scale twice; the run is no divergence and ends as a run of the one good step."""
    cfg = TrainConfig(steps=3, batch_size=16, lr=1e-3, min_lr=1e-3, amp_dtype="float16", log_interval=1, **CPU)
    skipped = tiny_vit(**FP32)
    train(skipped, easy_data(**FP32), None, cfg, tmp_path / "skipped", hooks=[_overflow_at(skipped, {1, 2})])
    one = tiny_vit(**FP32)
    train(one, easy_data(**FP32), None, dataclasses.replace(cfg, steps=1), tmp_path / "one")
    for a, b in zip(skipped.parameters(), one.parameters()):
        assert torch.equal(a, b)
    state = _scaler_state(tmp_path / "skipped")
    assert state["scale"] == 2.0 ** 14 and state["_growth_tracker"] == 0   # 2**16 halved twice
    lines = [json.loads(line) for line in open(tmp_path / "skipped" / "metrics.jsonl")]
    assert [math.isfinite(line["grad_norm"] or math.inf) for line in lines] == [True, False, False]


def _stop_at_5_and_resume(cfg, tmp_path, check_cut=lambda: True):
    """A run of `cfg` whose step 1 overflows, stopped at step 5 and resumed, ends with the weights
    and the scaler state of the uninterrupted run (check_cut: asked of the stopped run's files)."""
    def stop_at_5(step, model):
        if step == 5:
            raise KeyboardInterrupt("stopped")
    whole = tiny_vit(**FP32)
    train(whole, easy_data(**FP32), None, cfg, tmp_path / "whole", hooks=[_overflow_at(whole, {1})])
    cut = tiny_vit(**FP32)
    with pytest.raises(KeyboardInterrupt):
        train(cut, easy_data(**FP32), None, cfg, tmp_path / "cut", hooks=[_overflow_at(cut, {1}), stop_at_5])
    assert check_cut()
    resumed = tiny_vit(seed=3, **FP32)
    train(resumed, easy_data(**FP32), None, cfg, tmp_path / "cut", hooks=[_overflow_at(resumed, {1})])
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert _scaler_state(tmp_path / "cut") == _scaler_state(tmp_path / "whole")


def test_a_float16_run_resumes_bit_identically_with_its_scaler(tmp_path):
    """Stopped after its checkpoint at step 4 and resumed, a float16 run with a skipped step ends
    with the weights and the scaler state of the uninterrupted run (a fresh scaler would not)."""
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, checkpoint_every=2, amp_dtype="float16", mixup=0.5, **CPU)

    _stop_at_5_and_resume(cfg, tmp_path, check_cut=lambda: _scaler_state(tmp_path / "cut")["scale"] == 2.0 ** 15)
    assert _scaler_state(tmp_path / "whole") == {"scale": 2.0 ** 15, "growth_factor": 2.0, "backoff_factor": 0.5,
                                                 "growth_interval": 2000, "_growth_tracker": 4}


def test_a_nan_loss_under_float16_is_still_a_divergence(tmp_path):
    """A NaN image gives a NaN loss: the scaler skips that step (the weights stay finite), and the
    engine stops there all the same, naming the step."""
    data = easy_data(n=32, **FP32)
    data.tensors[0][7] = math.nan
    cfg = TrainConfig(steps=2, batch_size=16, lr=1e-3, amp_dtype="float16", **CPU)
    model = tiny_vit(**FP32)
    with pytest.raises(DivergedError, match=r"diverged at step [12]: the loss"):
        train(model, data, None, cfg, tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_loss_scale_that_keeps_falling_is_a_divergence(tmp_path):
    """Gradients infinite at every step: the scale halves from 2**16 until it is below 1e-4
    (after 30 skipped steps), and that is a divergence, not one more skipped step."""
    cfg = TrainConfig(steps=40, batch_size=16, lr=1e-3, amp_dtype="float16", log_interval=1, **CPU)
    model = tiny_vit(**FP32)
    with pytest.raises(DivergedError, match=r"at step 30: .*loss scale fell to 6.1\d*e-05"):
        train(model, easy_data(**FP32), None, cfg, tmp_path, hooks=[_overflow_at(model, set(range(40)))])


def test_amp_dtype_on_the_command_line(tiny, folder, run_cli, tmp_path, capsys):
    assert cli.main(["meta", "--amp-dtype", "float8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "incubation meta: error: argument --amp-dtype: expected bfloat16 or float16 (timm's autocast dtypes), "
        "got 'float8'")
    spec = cli.spec_from_args(cli.build_parser().parse_args(["run", "--amp-dtype", "float16"]))
    assert spec.recipe == {"amp_dtype": "float16"}
    assert pipeline.stage_argv(spec, "meta")[-2:] == ["--amp-dtype", "float16"]   # a child gets it
    assert run_cli("meta", "--data", folder, "--out", tmp_path, *tiny, "--amp-dtype", "float16", "--epochs", "1") == 0
    assert "), float16 autocast with loss scaling\n" in capsys.readouterr().out
    config = json.load(open(tmp_path / "meta" / "config.json"))
    assert config["train_config"]["amp_dtype"] == config["recipe"]["amp_dtype"] == "float16"
    assert _scaler_state(tmp_path / "meta")["scale"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (CPU twins: the float16 tests above, on CPU autocast)")
def test_cuda_float16_learns_and_resumes_with_its_scaler(tmp_path):
    model = tiny_vit(dtype=torch.float32, global_pool="avg")
    train_set, eval_set = easy_data(256, seed=1, dtype=torch.float32), easy_data(128, seed=2, dtype=torch.float32)
    cfg = TrainConfig(epochs=12, batch_size=32, lr=1e-2, warmup_steps=10, clip_grad=1.0, amp_dtype="float16",
                      device="cuda", progress=False)
    result = train(model, train_set, eval_set, cfg, tmp_path / "learn")
    assert next(model.parameters()).is_cuda and result.eval_acc > 90
    assert _scaler_state(tmp_path / "learn")["_growth_tracker"] > 0
    # stopped after step 4 and resumed, with a skipped step 1: the uninterrupted run's weights and scaler
    cfg = TrainConfig(steps=6, batch_size=16, lr=1e-3, checkpoint_every=2, amp_dtype="float16", device="cuda",
                      **QUIET)

    _stop_at_5_and_resume(cfg, tmp_path)
    assert _scaler_state(tmp_path / "whole")["scale"] == 2.0 ** 15
