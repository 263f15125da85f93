"""The training engine: schedule, optimizer step against a hand-written reference, frozen
parameters, accumulation, checkpoints (atomicity, corruption), kill -9 + resume, DDP on gloo."""
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from tiny_training import QUIET, Recording, easy_data, tiny_vit

from incubation import ops
from incubation.train import CheckpointError, TrainConfig, evaluate, load_checkpoint, lr_at, save_checkpoint, train
from incubation.train import checkpoint as ckpt


@pytest.fixture(autouse=True)
def eager_ops():
    # The engine is what is tested here: run the model on the reference backend.
    with ops.use_backend("eager"):
        yield


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------
def test_lr_schedule_values():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, decay_steps=10)
    assert [lr_at(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_at(4, **kw) == pytest.approx(1.0)                       # cosine starts at the peak
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.45)                # half way: mean of peak and floor
    assert lr_at(6, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)))
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(50, **kw) == pytest.approx(0.1)  # then held
    assert lr_at(0, lr=2.0, min_lr=0.0, warmup_steps=0, decay_steps=0) == 0.0   # no decay length: floor
    values = [lr_at(s, **kw) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_engine_sets_the_scheduled_lr(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_steps=3, decay_steps=4, **QUIET)
    train(tiny_vit(), easy_data(), None, cfg, tmp_path)
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["step"] for l in lines] == list(range(1, 9))
    expected = [lr_at(s, lr=1e-3, min_lr=1e-5, warmup_steps=3, decay_steps=4) for s in range(8)]
    assert [l["lr"] for l in lines] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------
# one optimizer step against a hand-written reference (float64)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [None, 0.05])
def test_one_step_matches_reference_adamw_with_clipping(tmp_path, clip):
    data = easy_data(n=32)
    model, ref = tiny_vit(), tiny_vit()
    cfg = TrainConfig(steps=1, batch_size=32, lr=1e-2, weight_decay=0.1, clip_grad=clip, **QUIET)
    train(model, data, None, cfg, tmp_path)

    # reference: full-batch loss (the one step sees every sample), clip by global norm, AdamW
    x, y = data.tensors
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    named = list(ref.named_parameters())
    norm = torch.sqrt(sum((p.grad ** 2).sum() for _, p in named))
    if clip is not None:
        assert norm > clip, "the clip must be active for this test to mean anything"
        for _, p in named:
            p.grad.mul_(clip / (norm + 1e-6))
    no_decay = {"pos_embed", "cls_token"}
    opt = torch.optim.AdamW([
        {"params": [p for n, p in named if p.ndim >= 2 and n not in no_decay], "weight_decay": 0.1},
        {"params": [p for n, p in named if p.ndim < 2 or n in no_decay], "weight_decay": 0.0}], lr=1e-2)
    opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-10, msg=k)


def test_clipping_limits_the_update(tmp_path):
    # With the gradient clipped far below Adam's eps the update is ~ lr * g / eps: tiny.
    data = easy_data(n=32)
    moved = {}
    for clip in (None, 1e-11):
        model = tiny_vit()
        before = weights(model)
        cfg = TrainConfig(steps=1, batch_size=32, lr=1e-2, weight_decay=0.0, clip_grad=clip, **QUIET)
        train(model, data, None, cfg, tmp_path / str(clip))
        moved[clip] = max((model.state_dict()[k] - v).abs().max().item() for k, v in before.items())
    assert moved[None] > 0.5e-2 and moved[1e-11] < 1e-2 * 1e-2


# --------------------------------------------------------------------------------------
# parameters, accumulation, learning
# --------------------------------------------------------------------------------------
def test_parameters_outside_params_do_not_change(tmp_path):
    model = tiny_vit()
    model.patch_embed.requires_grad_(False)   # a flag the engine must restore afterwards
    before = weights(model)
    trained = list(model.blocks[1].parameters())
    cfg = TrainConfig(steps=3, batch_size=16, lr=1e-2, **QUIET)
    train(model, easy_data(), None, cfg, tmp_path, params=trained,
          save_keys=[k for k in before if k.startswith("blocks.1.")])
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("blocks.1."):
            assert not torch.equal(after[k], v), f"{k} was trained but did not change"
        else:
            assert torch.equal(after[k], v), f"{k} is not in params but changed"
    assert not model.patch_embed.proj.weight.requires_grad and model.blocks[0].attn.qkv.weight.requires_grad
    saved, meta = load_checkpoint(tmp_path / "final")
    assert sorted(saved) == sorted(k for k in before if k.startswith("blocks.1.")) and meta["stage"] == "train"


def test_grad_accumulation_equals_big_batch(tmp_path):
    data = easy_data()
    results = []
    for accum, batch in ((1, 16), (2, 16), (4, 16)):
        model = tiny_vit()
        cfg = TrainConfig(steps=3, batch_size=batch, accum_steps=accum, lr=1e-3, **QUIET)
        train(model, data, None, cfg, tmp_path / str(accum))
        results.append(weights(model))
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(other[k], results[0][k], rtol=0, atol=1e-10, msg=k)


def test_data_order_does_not_depend_on_loader_workers(tmp_path):
    results = []
    for workers in (0, 2):
        model = tiny_vit()
        train(model, easy_data(64), None, TrainConfig(steps=5, batch_size=16, num_workers=workers, **QUIET),
              tmp_path / str(workers))
        results.append(weights(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_repeated_augmentation_order_is_deits(tmp_path):
    """Each image R times in a row, cut to the data set's length (DeiT's RASampler), the same
    order for the same seed, and a run resumed mid-epoch reads on in that order. (That the copies
    of an image go to different DDP ranks: test_ddp_two_processes_equal_one_process[ddp-repeats].)"""
    cfg = TrainConfig(steps=3, batch_size=12, aug_repeats=3, seed=7, checkpoint_every=1, **QUIET)

    def run(out, hooks=()):
        data = Recording(easy_data(36))
        train(tiny_vit(), data, None, cfg, tmp_path / out, hooks=list(hooks))
        return data.reads

    epoch = run("a")
    assert len(epoch) == 36 and all(epoch[3 * k] == epoch[3 * k + 1] == epoch[3 * k + 2] for k in range(12))
    assert len(set(epoch)) == 12                     # a third of the images, each thrice
    assert run("b") == epoch                         # deterministic per (seed, epoch)

    def stop_at_1(step, model):
        if step == 1:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        run("cut", [stop_at_1])
    assert run("cut") == epoch[12:]                  # resumed after step 0: steps 1 and 2, the same order


def test_short_run_learns(tmp_path):
    model = tiny_vit(dtype=torch.float32, global_pool="avg")
    train_set, eval_set = easy_data(256, seed=1, dtype=torch.float32), easy_data(128, seed=2, dtype=torch.float32)
    chance = evaluate(model, eval_set)
    cfg = TrainConfig(epochs=12, batch_size=32, lr=1e-2, warmup_steps=10, ema_decay=0.9, progress=False)
    result = train(model, train_set, eval_set, cfg, tmp_path)
    lines = [json.loads(l) for l in open(result.metrics_path)]
    assert result.steps == 96 and result.images_seen == 96 * 32
    assert lines[-1]["loss"] < 0.6 * lines[0]["loss"]
    assert result.eval_acc > 90 and chance["acc"] < 50
    assert result.eval_acc == pytest.approx(evaluate(model, eval_set)["acc"])
    assert result.train_flops == 3 * model.flops_per_image() * 96 * 32
    assert "ema_eval_acc" in lines[-1] and os.path.exists(tmp_path / "final_ema.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU twin: test_short_run_learns)")
def test_cuda_bf16_run_learns(tmp_path):
    model = tiny_vit(dtype=torch.float32, global_pool="avg")
    train_set, eval_set = easy_data(256, seed=1, dtype=torch.float32), easy_data(128, seed=2, dtype=torch.float32)
    cfg = TrainConfig(epochs=12, batch_size=32, lr=1e-2, warmup_steps=10, clip_grad=1.0, amp=True,
                      device="cuda", progress=False)
    result = train(model, train_set, eval_set, cfg, tmp_path)
    assert next(model.parameters()).is_cuda and result.eval_acc > 90
    lines = [json.loads(l) for l in open(result.metrics_path)]
    assert lines[-1]["loss"] < 0.6 * lines[0]["loss"] and all(l["grad_norm"] > 0 for l in lines)
    saved, _ = load_checkpoint(result.checkpoint_path)
    assert all(torch.equal(v, model.state_dict()[k].cpu()) for k, v in saved.items())


def test_hooks_and_in_process_resume(tmp_path):
    """Hooks see every step once, under a per-step seed; a run stopped by an exception after a
    checkpoint resumes to the same weights as an uninterrupted run."""
    data = easy_data(64)
    cfg = TrainConfig(steps=6, batch_size=16, checkpoint_every=2, mixup=0.5, **QUIET)
    calls = []

    def record(step, model):
        calls.append((step, torch.rand(()).item()))

    whole = tiny_vit(drop_path_rate=0.2)
    train(whole, data, None, cfg, tmp_path / "whole", hooks=[record])
    assert [s for s, _ in calls] == list(range(6))
    reference_calls, calls[:] = list(calls), []

    def stop_at_5(step, model):
        if step == 5:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_vit(drop_path_rate=0.2), data, None, cfg, tmp_path / "cut", hooks=[record, stop_at_5])
    calls[:] = []
    resumed = tiny_vit(drop_path_rate=0.2)
    train(resumed, data, None, cfg, tmp_path / "cut", hooks=[record])
    assert calls == reference_calls[4:]  # steps 4 and 5 again, with the same random draws
    for k, v in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    calls[:] = []
    result = train(tiny_vit(), data, None, cfg, tmp_path / "cut", hooks=[record])  # finished: nothing to do
    assert calls == [] and result.steps == 6
    saved, _ = load_checkpoint(result.checkpoint_path)
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in saved.items())


def test_mixup_and_cutmix_are_timms(tmp_path, monkeypatch):
    """The engine mixes with timm.data.Mixup and trains on exactly its soft targets."""
    from timm.data import Mixup
    calls, logits_seen = [], []
    timm_call = Mixup.__call__

    def spy(self, x, target):
        before = x.clone()
        mixed, soft = timm_call(self, x, target)
        calls.append((self.mixup_alpha, self.cutmix_alpha, self.label_smoothing, before, mixed.clone(), soft))
        return mixed, soft

    monkeypatch.setattr(Mixup, "__call__", spy)
    model = tiny_vit()
    model.register_forward_hook(lambda m, args, out: logits_seen.append(out.detach()))
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, mixup=0.8, cutmix=1.0, label_smoothing=0.1, progress=False)
    train(model, easy_data(16), None, cfg, tmp_path)
    assert [c[:3] for c in calls] == [(0.8, 1.0, 0.1)] * 2
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    for (_, _, _, before, mixed, soft), logits, line in zip(calls, logits_seen, lines):
        assert not torch.equal(before, mixed)                      # the images were mixed
        torch.testing.assert_close(soft.sum(-1), torch.ones(8, dtype=soft.dtype))
        assert soft.min() >= 0.1 / 4 - 1e-12                      # smoothing kept in the soft targets
        loss = -(soft.to(logits.dtype) * torch.log_softmax(logits, -1)).sum(-1).mean()
        assert line["loss"] == pytest.approx(loss.item(), rel=1e-9)


def test_mixup_needs_an_even_micro_batch(tmp_path):
    with pytest.raises(ValueError, match="even"):
        train(tiny_vit(), easy_data(16), None, TrainConfig(steps=1, batch_size=6, accum_steps=2, mixup=0.8,
                                                           progress=False), tmp_path)


def test_bad_input_is_rejected(tmp_path):
    model, data = tiny_vit(), easy_data(32)
    with pytest.raises(ValueError, match="accum_steps"):
        TrainConfig(accum_steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="divisible"):
        train(model, data, None, TrainConfig(batch_size=10, accum_steps=4, **QUIET), tmp_path)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(model, data, None, TrainConfig(batch_size=64, **QUIET), tmp_path)
    with pytest.raises(ValueError, match="not parameters of the model"):
        train(model, data, None, TrainConfig(batch_size=16, **QUIET), tmp_path, params=[torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="missing from save_keys"):
        train(model, data, None, TrainConfig(batch_size=16, **QUIET), tmp_path, save_keys=["head.weight"])


def test_resume_with_another_config_is_refused(tmp_path):
    data = easy_data(32)
    train(tiny_vit(), data, None, TrainConfig(steps=2, batch_size=16, **QUIET), tmp_path)
    with pytest.raises(CheckpointError, match="different config.*'lr'"):
        train(tiny_vit(), data, None, TrainConfig(steps=2, batch_size=16, lr=1.0, **QUIET), tmp_path)
    before = tiny_vit()  # resume=False starts over from the model as given
    result = train(before, data, None, TrainConfig(steps=2, batch_size=16, lr=1.0, **QUIET), tmp_path, resume=False)
    assert result.steps == 2


# --------------------------------------------------------------------------------------
# checkpoint files
# --------------------------------------------------------------------------------------
def test_checkpoint_roundtrip_stores_tied_tensors_once(tmp_path):
    shared = torch.randn(4, 3)
    sd = {"a.weight": shared, "b.weight": shared, "c": torch.arange(5.0)[1:4], "d": torch.zeros(0)}
    path = save_checkpoint(tmp_path / "ck", sd, {"stage": "meta", "k": 2})
    with safe_open(path, "pt") as f:
        stored = sorted(f.keys())
    assert stored == ["a.weight", "c", "d"]
    loaded, meta = load_checkpoint(tmp_path / "ck.safetensors", expect={"stage": "meta"})
    assert meta == {"stage": "meta", "k": 2} and sorted(loaded) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v)
    assert loaded["a.weight"].data_ptr() == loaded["b.weight"].data_ptr()
    model = tiny_vit()
    save_checkpoint(tmp_path / "vit", model.state_dict(), {})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in load_checkpoint(tmp_path / "vit")[0].items())


def test_checkpoint_errors_name_the_file(tmp_path):
    prefix = str(tmp_path / "ck")
    save_checkpoint(prefix, {"w": torch.randn(8)}, {"stage": "meta", "module": 1})
    with pytest.raises(CheckpointError, match=r"ck\.json has module=1, expected 2"):
        load_checkpoint(prefix, expect={"module": 2})
    with pytest.raises(CheckpointError, match=r"ck\.json has no metadata 'K'"):
        load_checkpoint(prefix, expect={"K": 4})
    with pytest.raises(CheckpointError, match=r"other\.json does not exist"):
        load_checkpoint(tmp_path / "other")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path / "bad", {"w": torch.ones(1)}, {"x": object()})
    raw = bytearray(open(prefix + ".safetensors", "rb").read())
    raw[-1] ^= 0xFF
    open(prefix + ".safetensors", "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"ck\.safetensors is corrupt"):
        load_checkpoint(prefix)
    open(prefix + ".json", "w").write("{not json")
    with pytest.raises(CheckpointError, match=r"ck\.json is unreadable"):
        load_checkpoint(prefix)


@pytest.mark.parametrize("edit, message", [
    (dict(metadata=None), "'metadata' must be a JSON object"), (dict(aliases=[]), "'aliases' must be a JSON object"),
    (dict(aliases={"a": 3}), "'aliases' must map"), (dict(files=[]), "not an incubation checkpoint")])
def test_an_edited_checkpoint_record_is_refused_naming_the_file(tmp_path, edit, message):
    prefix = str(tmp_path / "ck")
    save_checkpoint(prefix, {"w": torch.randn(8)}, {"stage": "meta"})
    record = json.load(open(prefix + ".json"))
    json.dump({**record, **edit}, open(prefix + ".json", "w"))
    with pytest.raises(CheckpointError, match=rf"ck\.json.*{message}"):
        load_checkpoint(prefix)


def test_checkpoint_write_is_atomic_under_crashes(tmp_path, monkeypatch):
    """Crash at each rename of a save: after recovery the checkpoint is the old or the new one."""
    prefix = str(tmp_path / "ck")
    old = {"w": torch.zeros(16)}
    new = {"w": torch.ones(16)}
    real_replace = os.replace
    crash_points = 0
    while True:
        save_checkpoint(prefix, old, {"v": "old"}, state={"step": 1})
        calls = []

        def crashing_replace(src, dst):
            calls.append(dst)
            if len(calls) > crash_points:
                raise KeyboardInterrupt("simulated kill")
            real_replace(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", crashing_replace)
        try:
            save_checkpoint(prefix, new, {"v": "new"}, state={"step": 2})
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(ckpt.os, "replace", real_replace)
        ckpt.recover_checkpoint(prefix)
        sd, meta = load_checkpoint(prefix)
        state = ckpt.load_checkpoint_state(prefix)
        expected = new if meta["v"] == "new" else old
        assert torch.equal(sd["w"], expected["w"]) and state["step"] == (2 if meta["v"] == "new" else 1)
        assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".pending"))]
        if finished:
            break
        crash_points += 1
    assert crash_points >= 4  # pending record, 2 data files, final json were each interrupted


# --------------------------------------------------------------------------------------
# subprocess runs: kill -9 + resume, DDP under torchrun
# --------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from tiny_training import Recording, tiny_vit, easy_data
    from incubation.train import TrainConfig, train
    out, mode, steps, batch, accum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ddp = mode.startswith("ddp")
    extra = dict(mixup=0.8, cutmix=1.0, ema_decay=0.9, label_smoothing=0.1, aug_repeats=3) if not ddp else {{}}
    if mode == "ddp-repeats":
        extra["aug_repeats"] = 3
    model = tiny_vit(drop_path_rate=0.1 if not ddp else 0.0)
    hooks = [lambda step, model: time.sleep(0.15)] if mode == "slow" else []
    cfg = TrainConfig(steps=steps, batch_size=batch, accum_steps=accum, lr=1e-3, warmup_steps=2,
                      checkpoint_every=2, eval_every=3, progress=False, **extra)
    data = easy_data(64)
    train_set = Recording(data) if mode == "ddp-repeats" else data   # the indices this rank reads, in order
    train(model, train_set, easy_data(32, seed=5), cfg, out, hooks=hooks)
    if mode == "ddp-repeats":
        import json, os
        with open(os.path.join(out, "reads-" + os.environ.get("RANK", "0") + ".json"), "w") as f:
            json.dump(train_set.reads, f)
""")


def _script(tmp_path):
    path = tmp_path / "run_train.py"
    path.write_text(SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__))))
    return str(path)


def _env():
    env = dict(os.environ, INCUBATION_BACKEND="eager", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _final(out):
    return load_checkpoint(os.path.join(out, "final"))[0]


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    script, steps = _script(tmp_path), 12
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    subprocess.run([sys.executable, script, whole, "fast", str(steps), "16", "2"], env=_env(), check=True, timeout=120)

    proc = subprocess.Popen([sys.executable, script, killed, "slow", str(steps), "16", "2"], env=_env())
    deadline = time.time() + 90
    while not os.path.exists(os.path.join(killed, "checkpoint.json")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.25)  # into the next steps, maybe into the next checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "final.json")), "the run finished before it was killed"
    step_at_kill = json.load(open(os.path.join(killed, "checkpoint.json")))["metadata"]["step"]
    assert 0 < step_at_kill < steps

    subprocess.run([sys.executable, script, killed, "fast", str(steps), "16", "2"], env=_env(), check=True, timeout=120)
    a, b = _final(whole), _final(killed)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after kill -9 + resume (killed at step {step_at_kill})"
    ema_a = load_checkpoint(os.path.join(whole, "final_ema"))[0]
    ema_b = load_checkpoint(os.path.join(killed, "final_ema"))[0]
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    lines = [json.loads(l) for l in open(os.path.join(killed, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == list(range(1, steps + 1))  # the killed run's extra lines dropped
    ref_lines = [json.loads(l) for l in open(os.path.join(whole, "metrics.jsonl"))]
    assert [l["loss"] for l in lines] == [l["loss"] for l in ref_lines]
    assert [l.get("eval_acc") for l in lines] == [l.get("eval_acc") for l in ref_lines]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "ddp-repeats"])
def test_ddp_two_processes_equal_one_process(tmp_path, mode):
    """2 gloo ranks = 1 process with 2 micro-batches, also with repeated augmentation (whose
    copies of an image go to different ranks: each reads every other image of the global batch)."""
    script = _script(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, script, one, mode, "4", "16", "1"], env=_env(), check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    script, two, mode, "4", "16", "2"], env=_env(), check=True, timeout=180)
    a, b = _final(one), _final(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-10, msg=k)
    lines = [json.loads(l) for l in open(os.path.join(two, "metrics.jsonl"))]
    ref = [json.loads(l) for l in open(os.path.join(one, "metrics.jsonl"))]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]          # written once, by rank 0
    assert [l["loss"] for l in lines] == pytest.approx([l["loss"] for l in ref], rel=1e-9)
    assert lines[-1]["eval_acc"] == pytest.approx(ref[-1]["eval_acc"])  # sharded eval, summed over ranks
    if mode == "ddp-repeats":   # rank r reads every other image of the global batch, from r: copies split
        whole, *ranks = (json.load(open(os.path.join(d, f"reads-{r}.json"))) for d, r in ((one, 0), (two, 0), (two, 1)))
        for s in range(4):
            step = whole[16 * s:16 * (s + 1)]
            mine = [reads[8 * s:8 * (s + 1)] for reads in ranks]
            assert mine == [step[0::2], step[1::2]]
            assert set(mine[0]) & set(mine[1])     # an image's copies on both ranks
