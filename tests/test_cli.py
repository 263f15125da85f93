"""The `incubation` command end to end on a tiny synthetic ImageFolder data set."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from incubation import cli
from incubation.launch import forkserver
from incubation.train.checkpoint import load_checkpoint

pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def meta_run(tiny, folder, tmp_path_factory):
    """A finished `incubation meta --modules 2` run directory, trained once for the tests below;
    each copies it (`fresh_run`) before adding stages to it."""
    out = tmp_path_factory.mktemp("meta-run") / "run"
    assert cli.main(["meta", "--data", folder, "--out", str(out), "--modules", "2", *tiny]) == 0
    return out


def fresh_run(meta_run, tmp_path):
    """A copy of meta_run at tmp_path / "run" (later stages write into it)."""
    return shutil.copytree(meta_run, tmp_path / "run", symlinks=True)


def test_run_writes_every_stage_and_the_report(tiny_run, tiny_pipeline, run_cli):
    out, printed = tiny_run   # `incubation run --modules 2` (conftest), shared with test_pipeline
    stages = ["meta", *[f"incubate-{i}" for i in range(2)], "assemble", "e2e"]
    for stage in stages:
        state, md = load_checkpoint(out / stage / "final")
        assert md["stage"] == stage.split("-")[0]
        assert (out / stage / "metrics.jsonl").exists()
    state, md = load_checkpoint(out / "incubate-1" / "final")
    assert md["module"] == 1 and md["K"] == 2 and md["sizes"] == [4, 4]
    assert sorted({k.split(".")[2] for k in state if k.startswith("module.blocks.")}) == ["4", "5", "6", "7"]
    # the baseline got the pipeline's training FLOPs (to within one step)
    report = json.loads((out / "report.json").read_text())
    pipeline = report["summary"]["deep incubation"]["flops"]
    e2e = report["summary"]["end to end"]["flops"]
    one_step = e2e / report["stages"]["e2e"]["steps"]
    assert abs(e2e - pipeline) <= one_step / 2 + 1
    assert set(report["stages"]) == set(stages)
    for name in ("report.md", "acc_vs_flops.png", "acc_vs_time.png", "stage_time.png"):
        assert (out / name).stat().st_size > 0
    report_md = (out / "report.md").read_text()
    assert "| assemble |" in report_md
    # the assembled model is evaluated before fine-tuning, and the report says how it compares
    first = json.loads(open(out / "assemble" / "metrics.jsonl").readline())
    assert first["step"] == 0 and first["images"] == 0 and 0 <= first["eval_acc"] <= 100
    assert report["assembly"]["assembled_before_fine_tuning"] == first["eval_acc"]
    assert sorted(report["assembly"]["hybrids"]) == ["0", "1"]
    assert f"| all modules assembled, before fine-tuning (step 0) | {first['eval_acc']:.2f} |" in report_md
    assert "| meta model with only module 1 (hybrid 1) |" in report_md
    assert "| data (train / eval images) |" in report_md and "| e2e | folder:" in report_md
    di, e2e = report["summary"]["deep incubation"]["acc"], report["summary"]["end to end"]["acc"]
    n = json.loads((out / "e2e" / "config.json").read_text())["data"]["eval_images"]
    assert f"a margin of {abs(di - e2e):.2f} points on {n} evaluation images" in report_md
    assert ("**No clear winner**" in report_md) != ("won**" in report_md)   # the rule itself: test_report.py
    assert "## Next" in report_md
    assert "deep incubation: eval acc" in printed and "end to end: eval acc" in printed

    # a second run resumes every finished stage instead of training again: same weights
    before = {s: json.loads((out / s / "final.json").read_text())["sha256"] for s in stages}
    assert run_cli("run", "--out", out, *tiny_pipeline) == 0
    assert before == {s: json.loads((out / s / "final.json").read_text())["sha256"] for s in stages}


def test_stages_one_by_one(tiny, run_cli, folder, meta_run, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", folder, "--out", out, "--modules", "2", *tiny]
    assert run_cli("incubate", "--module", "0", *common) == 1  # no meta model yet
    assert "run `incubation meta` first" in capsys.readouterr().err
    assert run_cli("meta", *common, "--split", "2,2,4") == 2
    assert "error: argument --split: 3 block counts for --modules 2" in capsys.readouterr().err
    shutil.rmtree(out, ignore_errors=True)
    fresh_run(meta_run, tmp_path)   # `incubation meta` with these options (exit 0: the fixture checks it)
    assert run_cli("incubate", "--module", "1", *common[:-len(tiny)], "--modules", "3", *tiny) == 1
    assert "K=2 modules of [4, 4] blocks; --modules/--split disagree" in capsys.readouterr().err
    assert run_cli("incubate", "--module", "2", *common) == 2  # a usage error, found once K is known
    assert "error: argument --module: 2 is not a module of this run: it has K=2 modules" in capsys.readouterr().err
    assert run_cli("incubate", "--module", "1", "--init", "lemon", "--meta-mode", "train", *common) == 0
    _, md = load_checkpoint(out / "incubate-1" / "final")
    assert md["init"] == "lemon" and md["K"] == 2 and md["meta_mode"] == "train"
    assert run_cli("assemble", *common) == 1  # module 0 is missing
    assert "incubate-0/final.json does not exist" in capsys.readouterr().err
    assert run_cli("incubate", "--module", "0", *common) == 0
    assert run_cli("assemble", *common) == 0
    assert run_cli("e2e", *common) == 0
    assert "the pipeline's" in capsys.readouterr().out  # matched budget when the pipeline exists
    assert run_cli("report", "--out", out) == 0
    assert (out / "report.md").exists()


def test_bad_module_file_is_named(tiny, run_cli, folder, meta_run, tmp_path, capsys):
    out = fresh_run(meta_run, tmp_path)
    common = ["--data", folder, "--out", out, "--modules", "2", *tiny]
    assert run_cli("incubate", "--all", *common) == 0
    with open(out / "incubate-1" / "final.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert run_cli("assemble", *common) == 1
    err = capsys.readouterr().err
    assert "incubate-1/final.safetensors is corrupt" in err and "Traceback" not in err


@pytest.mark.slow
def test_incubate_all_in_parallel_processes(tiny, run_cli, folder, meta_run, tmp_path):
    out = fresh_run(meta_run, tmp_path)
    common = ["--data", folder, "--out", out, "--modules", "2", *tiny]
    assert run_cli("incubate", "--all", "--parallel", "2", *common) == 0
    for i in range(2):
        _, md = load_checkpoint(out / f"incubate-{i}" / "final")
        assert md["module"] == i
        assert "Traceback" not in (out / f"incubate-{i}" / "log.txt").read_text()
    # the same module trained in this process gives the same weights (same seed, same data; the
    # child ran with fewer threads, so equal up to float rounding)
    os.makedirs(tmp_path / "again")
    os.symlink(out / "meta", tmp_path / "again" / "meta")
    assert run_cli("incubate", "--module", "1", "--data", folder, "--out", tmp_path / "again", *tiny) == 0
    a, _ = load_checkpoint(out / "incubate-1" / "final")
    b, _ = load_checkpoint(tmp_path / "again" / "incubate-1" / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def _descendants(pid) -> list:
    """The pids whose parent is `pid`, or whose parent's is, and so on (the field after the state in
    /proc/<pid>/stat): the jobs, and the fork server whose forks they are where it serves them."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # it ended meanwhile
            continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the children in /proc")
def test_sigterm_to_incubate_all_parallel_leaves_no_child_and_a_rerun_finishes(tiny, folder, meta_run, tmp_path):
    out = fresh_run(meta_run, tmp_path)
    common = ["--data", folder, "--out", str(out), "--modules", "2", *tiny]
    argv = [sys.executable, "-m", "incubation.cli", "incubate", "--all", "--parallel", "2", *common]
    parent = subprocess.Popen(argv, env=_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert parent.stdout.readline().startswith("incubate-0: started")
    assert parent.stdout.readline().startswith("incubate-1: started")
    children = _descendants(parent.pid)   # the two jobs, their fork server, what a job runs (git) meanwhile
    assert len(children) >= 2 + forkserver.enabled()
    parent.terminate()
    _, err = parent.communicate(timeout=60)
    assert parent.returncode == 143 and err == "incubation incubate: interrupted\n"
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children)  # reaped, not orphaned
    rerun = subprocess.run(argv, env=_ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "incubate-0: finished" in rerun.stdout and "incubate-1: finished" in rerun.stdout


def test_argument_errors(capsys):
    # main returns argparse's exit status instead of raising SystemExit
    assert cli.main(["incubate"]) == 2  # --module or --all is required
    assert cli.main(["incubate", "--module", "0", "--all"]) == 2
    assert cli.main(["meta", "--preset", "vit-z"]) == 2
    assert cli.main(["meta", "--split", "3,x"]) == 2
    assert "argument --split: expected comma-separated positive integers" in capsys.readouterr().err
    assert cli.main(["incubate", "--module", "0", "--data", "nope"]) == 2
    assert "argument --data: unknown data set 'nope'" in capsys.readouterr().err
    # a combination argparse cannot check: also a usage error, before any data is loaded
    assert cli.main(["incubate", "--module", "0", "--parallel", "2", "--data", "folder:/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: incubation incubate") and "error: argument --parallel: needs --all" in err
    assert cli.main(["--help"]) == 0
    assert "exit status: 0 done; 1 the run failed" in capsys.readouterr().out


def test_a_corrupt_image_stops_the_run_naming_it_unless_skipped(tiny, run_cli, folder, tmp_path, capsys):
    import shutil
    root = tmp_path / "images"
    shutil.copytree(folder.split(":", 1)[1], root)
    bad = root / "train" / "class1" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    argv = ["meta", "--data", f"folder:{root}", "--epochs", "1", *tiny]   # one epoch reads every image
    assert run_cli(*argv, "--out", tmp_path / "a") == 1
    err = capsys.readouterr().err
    assert "3.png" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert run_cli(*argv, "--out", tmp_path / "b", "--skip-bad-images") == 0


def test_backends_lists_every_op(capsys):
    assert cli.main(["backends"]) == 0
    printed = capsys.readouterr().out
    for op in ("attention", "layer_norm", "add_layer_norm", "linear"):
        assert op in printed


def test_tune_measures_the_preset_model_then_backends_shows_it(capsys, monkeypatch, tmp_path):
    from incubation import dispatch, measure
    monkeypatch.setenv("INCUBATION_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(measure, "MIN_ROUNDS", 1)   # the timing itself is tested in test_dispatch
    monkeypatch.setattr(measure, "BUDGET_S", 0.0)
    dispatch.clear_decisions()
    try:
        assert cli.main(["tune", "--preset", "tiny", "--batch-size", "2", "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        assert "measured" in printed and str(tmp_path / "dispatch.json") in printed
        saved = json.loads((tmp_path / "dispatch.json").read_text())["environments"]
        (decisions,) = saved.values()
        # 2 images x 17 tokens -> rows bucket 64; the block MLP for training, add+LN for evaluation
        assert any(k.startswith("linear float32 rows=64 in=64 out=256") and k.endswith("fwd+bwd") for k in decisions)
        assert any(k.startswith("add_layer_norm") and k.endswith(" fwd") for k in decisions)
        dispatch.clear_decisions()    # a later process: `backends` reads the file
        assert cli.main(["backends"]) == 0
        assert "-> " in capsys.readouterr().out
    finally:
        dispatch.clear_decisions()
    monkeypatch.setenv("INCUBATION_BACKEND", "eager")
    assert cli.main(["tune"]) == 1
    assert "forces a backend" in capsys.readouterr().err


def test_subcommand_table_is_the_parser():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert set(choices) == set(cli.SUBCOMMANDS) >= {"run", "meta", "incubate", "assemble", "e2e", "backends"}


def test_presets_build_the_paper_models():
    from incubation import VisionTransformer, deep
    from incubation.presets import PRESETS
    vit_b = VisionTransformer(PRESETS["vit-b"].target_config(3, 1000, 224))
    assert sum(p.numel() for p in vit_b.parameters()) == 86_567_656  # timm vit_base_patch16_224
    expected = {"tiny": [2, 2, 2, 2], "demo": [6, 6, 6, 6], "vit-b": [3, 3, 3, 3], "vit-l": [6, 6, 6, 6], "vit-h": [8, 8, 8, 8]}
    for name, preset in PRESETS.items():
        target = preset.target_config(3, 1000, preset.img_size or 28)
        assert [len(s) for s in deep.split_modules(target, preset.K, preset.sizes)] == expected[name]
        assert preset.assemble.clip_grad == 1.0 and preset.assemble.warmup_epochs == 0
    assert [PRESETS[n].assemble.drop_path for n in ("vit-b", "vit-l", "vit-h")] == [0.1, 0.5, 0.6]
    assert PRESETS["vit-b"].meta.peak_lr == pytest.approx(2e-3)  # 5e-4 x 2048 / 512
