"""Issue 17, the engine's part: a diverged run stops with DivergedError and keeps its last good
checkpoint; checkpoints holding NaN/Inf are refused at every load; every JSON file is strict
JSON; files honour the umask; one writer per run directory (a lock that a killed writer does
not leave stuck)."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_training import QUIET, easy_data, tiny_vit

from incubation import ViTConfig, cli, deep, ops
from incubation.report import write_report
from incubation.train import (
    CheckpointError,
    DivergedError,
    RunDirLocked,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    train,
)
from incubation.train.lock import RunDirLock
from incubation.utils import file_sha256


@pytest.fixture(autouse=True)
def eager_ops():
    with ops.use_backend("eager"):
        yield


def strict_json(text: str):
    """json.loads that rejects the NaN / Infinity literals json.dumps writes by default."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def strict_lines(path):
    return [strict_json(line) for line in open(path) if line.strip()]


# --------------------------------------------------------------------------------------
# the non-finite guard
# --------------------------------------------------------------------------------------
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(steps=40, batch_size=16, lr=1e6, min_lr=0.0, checkpoint_every=2, **QUIET)
    with pytest.raises(DivergedError, match=r"stage 'meta' diverged at step \d+") as info:
        train(tiny_vit(), easy_data(64), None, cfg, tmp_path, stage="meta")
    bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
    state, md = load_checkpoint(tmp_path / "checkpoint")  # loads, so every tensor is finite
    assert 0 < md["step"] < bad and f"(step {md['step']})" in str(info.value)
    assert str(tmp_path / "checkpoint.safetensors") in str(info.value)
    assert not (tmp_path / "final.json").exists()
    strict_json((tmp_path / "checkpoint.json").read_text())
    lines = strict_lines(tmp_path / "metrics.jsonl")
    assert lines and all(isinstance(line["loss"], float) for line in lines)

    # a resume starts from that checkpoint (and, being exact, diverges at the same step again)
    seen = []
    with pytest.raises(DivergedError, match=rf"at step {bad}:"):
        train(tiny_vit(), easy_data(64), None, cfg, tmp_path, stage="meta", hooks=[lambda s, m: seen.append(s)])
    assert seen[0] == md["step"]


def test_nan_between_log_lines_is_caught_before_the_next_checkpoint(tmp_path):
    # 400 steps log every 4th; checkpoints every 3rd. A NaN at step 5 is first checked at the
    # save after step 6: it must name step 5 and leave the checkpoint of step 3.
    def poison(step, model):
        if step == 4:
            model.head.weight.data.fill_(float("nan"))

    cfg = TrainConfig(steps=400, batch_size=16, checkpoint_every=3, **QUIET)
    with pytest.raises(DivergedError, match=r"stage 'train' diverged at step 5:.*\(step 3\)"):
        train(tiny_vit(), easy_data(64), None, cfg, tmp_path, hooks=[poison])
    assert load_checkpoint(tmp_path / "checkpoint")[1]["step"] == 3
    assert [line["step"] for line in strict_lines(tmp_path / "metrics.jsonl")] == [4]


def test_non_finite_weight_with_finite_loss_is_not_saved(tmp_path):
    model = tiny_vit()
    model.register_buffer("spare", torch.zeros(3, dtype=torch.float64))  # saved, never used

    def poison(step, m):
        if step == 2:
            m.spare.fill_(float("inf"))

    cfg = TrainConfig(steps=6, batch_size=16, checkpoint_every=2, **QUIET)
    with pytest.raises(DivergedError, match=r"diverged at step 4: .*first non-finite weight: 'spare'"):
        train(model, easy_data(64), None, cfg, tmp_path, hooks=[poison])
    assert load_checkpoint(tmp_path / "checkpoint")[1]["step"] == 2


def test_save_checkpoint_refuses_non_finite_tensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor 'b' holds NaN"):
        save_checkpoint(tmp_path / "bad", {"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
    assert os.listdir(tmp_path) == []
    save_checkpoint(tmp_path / "ints", {"i": torch.arange(3), "e": torch.zeros(0)})  # nothing to check


# --------------------------------------------------------------------------------------
# strict JSON
# --------------------------------------------------------------------------------------
def test_json_files_are_strict_json(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": torch.ones(2)}, {"loss": float("nan"), "more": [float("-inf"), 1.5]})
    assert strict_json((tmp_path / "ck.json").read_text())["metadata"] == {"loss": None, "more": [None, 1.5]}

    run = tmp_path / "run"
    cfg = TrainConfig(steps=2, batch_size=16, checkpoint_every=1, **QUIET)
    train(tiny_vit(), easy_data(32), easy_data(16, seed=3), cfg, run / "e2e", stage="e2e",
          metadata={"stage": "e2e", "note": float("inf")})
    for name in ("checkpoint.json", "final.json"):
        assert strict_json((run / "e2e" / name).read_text())["metadata"]["note"] is None
    strict_lines(run / "e2e" / "metrics.jsonl")
    # a final.json from before the fix, with a bare NaN: the report still writes strict JSON
    final = run / "e2e" / "final.json"
    final.write_text(final.read_text().replace('"train_loss": ', '"train_loss": NaN, "was": '))
    write_report(str(run))
    assert strict_json((run / "report.json").read_text())["stages"]["e2e"]["train_loss"] is None


# --------------------------------------------------------------------------------------
# non-finite checkpoints are refused at every load
# --------------------------------------------------------------------------------------
TARGET = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=2, num_heads=2)


def _poison(prefix, key):
    """Put a NaN into `key` of a checkpoint, as a version without the guard wrote them."""
    prefix = str(prefix)
    tensors = load_file(prefix + ".safetensors")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, prefix + ".safetensors")
    record = json.loads(open(prefix + ".json").read())
    record["sha256"] = record["files"][".safetensors"] = file_sha256(prefix + ".safetensors")
    open(prefix + ".json", "w").write(json.dumps(record))


def test_non_finite_checkpoints_are_refused_naming_the_file(tmp_path, capsys):
    data, cfg = easy_data(32, dtype=torch.float32), TrainConfig(steps=2, batch_size=16, device="cpu", **QUIET)
    deep.train_meta(TARGET, 2, data, None, cfg, tmp_path / "meta")
    meta = str(tmp_path / "meta" / "final")
    modules = []
    for i in range(2):
        deep.train_module(meta, TARGET, i, data, None, cfg, tmp_path / f"incubate-{i}")
        modules.append(str(tmp_path / f"incubate-{i}" / "final"))

    def refused(call, path, key):
        with pytest.raises(CheckpointError, match=re.escape(f"{path}.safetensors holds NaN or infinite values "
                                                            f"(first: '{key}')")):
            call()

    bad_meta = str(tmp_path / "bad-meta" / "final")
    shutil.copytree(tmp_path / "meta", tmp_path / "bad-meta")
    _poison(bad_meta, "blocks.1.mlp.fc1.weight")
    # incubation
    refused(lambda: deep.train_module(bad_meta, TARGET, 0, data, None, cfg, tmp_path / "x"), bad_meta,
            "blocks.1.mlp.fc1.weight")
    assert not (tmp_path / "x").exists()
    # assembly
    bad_module = str(tmp_path / "bad-module")
    shutil.copy(modules[1] + ".safetensors", bad_module + ".safetensors")
    shutil.copy(modules[1] + ".json", bad_module + ".json")
    _poison(bad_module, "module.norm.weight")
    refused(lambda: deep.assemble(TARGET, [modules[0], bad_module]), bad_module, "module.norm.weight")
    refused(lambda: deep.train_assembled(TARGET, [modules[0], bad_module], data, None, cfg, tmp_path / "asm"),
            bad_module, "module.norm.weight")
    # expansion (LEMON), through the command that does it
    assert cli.main(["expand", bad_meta, "-o", str(tmp_path / "big"), "--embed-dim", "32"]) != 0
    assert f"{bad_meta}.safetensors holds NaN or infinite values" in capsys.readouterr().err
    assert not (tmp_path / "big.json").exists()
    # the engine's own resume
    _poison(tmp_path / "meta" / "checkpoint", "pos_embed")
    refused(lambda: deep.train_meta(TARGET, 2, data, None, cfg, tmp_path / "meta"),
            str(tmp_path / "meta" / "checkpoint"), "pos_embed")


def test_cli_meta_with_a_huge_lr_fails_naming_stage_and_step(tmp_path, capsys):
    pytest.importorskip("torchvision")
    image = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(2):
            os.makedirs(root / split / f"c{c}")
            for j in range(8):
                pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
                image.fromarray(pixels).save(root / split / f"c{c}" / f"{j}.png")
    argv = ["meta", "--data", f"folder:{root}", "--out", str(tmp_path / "run"), "--img-size", "14",
            "--batch-size", "8", "--epochs", "20", "--lr", "1e6", "--no-progress", "--device", "cpu"]
    try:  # raised here; the command line prints IncubationErrors as one line
        code, message = cli.main(argv), capsys.readouterr().err
    except DivergedError as exc:
        code, message = 1, str(exc)
    assert code != 0 and re.search(r"stage 'meta' diverged at step \d+", message)
    assert not (tmp_path / "run" / "meta" / "final.json").exists()


# --------------------------------------------------------------------------------------
# file modes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_every_file_honours_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, ema_decay=0.9, **QUIET), tmp_path)
        save_checkpoint(tmp_path / "plain", {"w": torch.ones(1)})
    finally:
        os.umask(old)
    names = sorted(os.listdir(tmp_path))
    for prefix in ("checkpoint", "final", "final_ema", "plain"):
        assert {f"{prefix}.safetensors", f"{prefix}.json"} <= set(names)
    assert {"checkpoint.state.pt", "metrics.jsonl"} <= set(names) and ".lock" not in names
    modes = {name: oct(stat.S_IMODE(os.stat(tmp_path / name).st_mode)) for name in names}
    assert modes == {name: oct(0o666 & ~mask) for name in names}


# --------------------------------------------------------------------------------------
# one writer per run directory
# --------------------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from tiny_training import tiny_vit, easy_data
    from incubation.train import TrainConfig, train
    out, started = sys.argv[1], sys.argv[2]

    def hold(step, model):  # a slow run: holds the directory until told to go on
        if step == 0:
            open(started, "w").close()
            while not os.path.exists(started + ".go"):
                time.sleep(0.02)

    train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, progress=False), out,
          stage="meta", hooks=[hold])
""")


def _start_holder(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(tests=os.path.dirname(os.path.abspath(__file__))))
    out, started = tmp_path / "meta", str(tmp_path / "started")
    env = dict(os.environ, INCUBATION_BACKEND="eager", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, str(script), str(out), started], env=env)
    deadline = time.time() + 120
    while not os.path.exists(started):
        assert proc.poll() is None, "the holder exited early"
        assert time.time() < deadline, "the holder did not start"
        time.sleep(0.05)
    return proc, out, started


def _files(directory):
    return {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    holder = rf"in use by pid {os.getpid()} on host {re.escape(socket.gethostname())}"
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirLocked, match=holder):
            train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, **QUIET), tmp_path)
        assert sorted(os.listdir(tmp_path)) == [".lock"]
    assert os.listdir(tmp_path) == []
    train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, **QUIET), tmp_path)
    assert ".lock" not in os.listdir(tmp_path)  # released after the run


def test_lock_is_released_when_the_run_fails(tmp_path):
    def fail(step, model):
        raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, **QUIET), tmp_path, hooks=[fail])
    assert not (tmp_path / ".lock").exists()
    with RunDirLock(tmp_path):
        pass


@pytest.mark.slow
def test_second_concurrent_writer_is_refused_and_the_first_finishes(tmp_path):
    proc, out, started = _start_holder(tmp_path)
    try:
        before = _files(out)
        assert json.loads((out / ".lock").read_text())["pid"] == proc.pid
        for seed in (0, 1):  # the same stage again, same or another seed
            with pytest.raises(RunDirLocked, match=rf"in use by pid {proc.pid} on host ") as info:
                train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, seed=seed, **QUIET), out,
                      stage="meta")
            assert str(out / ".lock") in str(info.value)
        assert _files(out) == before  # the refused writer touched nothing
        open(started + ".go", "w").close()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_checkpoint(out / "final")[1]["step"] == 2
    assert not (out / ".lock").exists()


@pytest.mark.slow
def test_lock_of_a_killed_writer_is_taken_over(tmp_path):
    proc, out, _ = _start_holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # left behind, not held
    result = train(tiny_vit(), easy_data(32), None, TrainConfig(steps=2, batch_size=16, **QUIET), out, stage="meta")
    assert result.steps == 2 and not (out / ".lock").exists()


def test_a_full_disk_while_saving_is_one_oserror_naming_the_file(tmp_path, monkeypatch):
    from incubation import cli
    from incubation.train import checkpoint

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    prefix = str(tmp_path / "ck")
    with pytest.raises(OSError) as info:
        checkpoint.save_checkpoint(prefix, {"w": torch.ones(4)}, {}, state={"step": 1})
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("ck.state.pt.tmp")
    assert cli.error_message(info.value).startswith("disk full: no space left on the device to write")
    assert not os.path.exists(prefix + ".json")         # nothing committed
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 0, 1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):   # space left: not a full disk, left as it is
        checkpoint.save_checkpoint(prefix, {"w": torch.ones(4)}, {}, state={"step": 1})


def test_a_data_error_from_a_loader_worker_prints_as_its_own_line():
    from incubation import cli
    from incubation.data import DatasetError
    wrapped = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in f\nincubation.data.fashion_mnist.DatasetError: "
                           "cannot read image /data/train/a/1.png: truncated")
    assert cli.error_message(wrapped) == "cannot read image /data/train/a/1.png: truncated"
