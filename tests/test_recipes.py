"""Training the way timm users do: the official recipe's transforms, timm's flag names, --model,
--patch-size, --compile, and the record each stage leaves (config.json, summary.csv)."""
import csv
import json

import pytest
import torch

from incubation import cli, data
from incubation.presets import PRESETS
from incubation.train.checkpoint import load_checkpoint

pytest.importorskip("torchvision")

QUICK = ["--batch-size", "8", "--no-progress", "--device", "cpu"]


def test_vit_b_transforms_are_timms_create_transform_with_the_official_arguments(folder):
    from timm.data import create_transform
    # the authors' main.py defaults (DeiT's recipe) and DeiT's eval transform (resize 256/224, bicubic)
    official_train = create_transform(224, is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
                                      interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1,
                                      color_jitter=0.4)
    official_eval = create_transform(224, is_training=False, interpolation="bicubic", crop_pct=224 / 256)
    augment = PRESETS["vit-b"].augment
    train = data.load_dataset(folder, "train", img_size=224, augment=augment)
    evaluation = data.load_dataset(folder, "val", img_size=224, augment=augment)
    assert repr(train.transform) == repr(official_train)
    assert repr(evaluation.transform) == repr(official_eval)
    assert "RandAugment" in repr(train.transform) and "RandomErasing(p=0.25, mode=pixel" in repr(train.transform)
    for stage in ("meta", "incubate", "assemble", "e2e"):
        r = PRESETS["vit-b"].recipe(stage)
        assert (r.aug_repeats, r.mixup, r.cutmix, r.label_smoothing, r.weight_decay) == (3, 0.8, 1.0, 0.1, 0.05)
    x, _ = train[0]
    assert x.shape == (3, 224, 224)


def test_bad_augment_policy_is_a_one_line_error(folder, tmp_path, capsys, run_cli):
    assert run_cli("e2e", "--data", folder, "--out", tmp_path, "--img-size", "14", "--aa", "bogus", *QUICK) == 1
    err = capsys.readouterr().err
    assert "auto-augment policy 'bogus'" in err and "Traceback" not in err


def test_timm_model_trains_on_a_folder_and_each_stage_leaves_its_record(folder, tmp_path, run_cli):
    out = tmp_path / "run"
    assert run_cli("e2e", "--data", folder, "--out", out, "--model", "vit_small_patch16_224", "--img-size", "32",
                "--epochs", "0.5", "--drop-path", "0.1", "--smoothing", "0.2", "--weight-decay", "0.1",
                "--warmup-epochs", "0", "--mixup", "0.2", "--reprob", "0.5", "--aa", "rand-m5-mstd0.5",
                "--model-ema-decay", "0.99", "-j", "0", *QUICK) == 0
    _, md = load_checkpoint(out / "e2e" / "final")
    target = md["target_config"]
    assert (target["embed_dim"], target["depth"], target["num_heads"], target["patch_size"]) == (384, 12, 6, [16, 16])
    assert (target["img_size"], target["num_classes"], target["drop_path_rate"]) == ([32, 32], 3, 0.1)
    assert (out / "e2e" / "final_ema.safetensors").exists()

    record = json.loads((out / "e2e" / "config.json").read_text())
    cfg = record["train_config"]
    assert (cfg["label_smoothing"], cfg["weight_decay"], cfg["warmup_steps"], cfg["mixup"], cfg["ema_decay"]) == \
        (0.2, 0.1, 0, 0.2, 0.99)
    assert record["timm_model"] == "vit_small_patch16_224" and record["model"]["drop_path_rate"] == 0.1
    assert record["data"]["classes"] == ["class0", "class1", "class2"]
    assert (record["data"]["train_images"], record["data"]["eval_images"]) == (48, 18)
    assert "RandomErasing(p=0.5" in record["data"]["transforms"]["train"]
    assert "rand-m5" not in record["data"]["transforms"]["train"] and record["augment"]["auto_augment"] == \
        "rand-m5-mstd0.5"
    assert record["versions"]["torch"] == torch.__version__ and "commit" in record["versions"]

    rows = list(csv.DictReader(open(out / "e2e" / "summary.csv")))
    evals = [json.loads(line) for line in open(out / "e2e" / "metrics.jsonl") if "eval_acc" in line]
    assert len(rows) == len(evals) >= 1
    assert [float(r["eval_top1"]) for r in rows] == [e["eval_acc"] for e in evals]
    assert float(rows[-1]["ema_eval_top1"]) == evals[-1]["ema_eval_acc"]


def test_img_size_and_patch_size_work_together(folder, tmp_path, capsys, run_cli):
    common = ["--data", folder, "--out", tmp_path / "run", "--epochs", "0.2", *QUICK]
    assert run_cli("e2e", "--img-size", "32", *common) == 2   # the tiny preset's patch is 7
    err = capsys.readouterr().err
    assert "images of 32 px do not split into patches of 7 px" in err and "--patch-size" in err
    assert run_cli("e2e", "--img-size", "32", "--patch-size", "8", *common) == 0
    _, md = load_checkpoint(tmp_path / "run" / "e2e" / "final")
    assert (md["target_config"]["img_size"], md["target_config"]["patch_size"]) == ([32, 32], [8, 8])


def test_unknown_or_unsupported_models_are_refused(folder, tmp_path, capsys, run_cli):
    assert run_cli("e2e", "--model", "vit_smal_patch16_224", "--data", folder, *QUICK) == 2
    assert "is not a timm model name (did you mean" in capsys.readouterr().err
    assert run_cli("e2e", "--model", "resnet18", "--data", folder, "--out", tmp_path, *QUICK) == 2
    assert "resnet18 is not a Vision Transformer" in capsys.readouterr().err


def test_timm_flag_names_and_the_old_spellings_parse_alike():
    parser = cli.build_parser()
    new = parser.parse_args(["meta", "--grad-accum-steps", "2", "-j", "3", "-b", "16"])
    old = parser.parse_args(["meta", "--accum-steps", "2", "--num-workers", "3", "--batch-size", "16"])
    assert (new.accum_steps, new.workers, new.batch_size) == (old.accum_steps, old.workers, old.batch_size) == (2, 3, 16)
    # --parallel children get every option, 'none' policies and switches included
    args = parser.parse_args(["incubate", "--all", "--aa", "none", "--model-ema", "--compile", "--drop-path", "0",
                              "--model", "vit_tiny_patch16_224", "--patch-size", "8"])
    child = parser.parse_args(["incubate", "--module", "0", *cli.common_argv(args)])
    for option in ("auto_augment", "model_ema", "compile", "drop_path", "model", "patch_size"):  # dests: Recipe fields
        assert getattr(child, option) == getattr(args, option), option


@pytest.mark.slow
def test_compile_gives_the_eager_losses(folder, tmp_path, run_cli):
    common = ["--data", folder, "--epochs", "0.5", "--img-size", "14", *QUICK]
    assert run_cli("e2e", "--out", tmp_path / "eager", *common) == 0
    assert run_cli("e2e", "--out", tmp_path / "compiled", "--compile", *common) == 0
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / run / "e2e" / "metrics.jsonl")]
              for run in ("eager", "compiled")]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


def test_grad_checkpointing_flag_gives_the_same_run(folder, tmp_path, run_cli):
    common = ["--data", folder, "--epochs", "0.5", "--img-size", "14", "--drop-path", "0.2", *QUICK]
    assert run_cli("e2e", "--out", tmp_path / "plain", *common) == 0
    assert run_cli("e2e", "--out", tmp_path / "checkpointed", "--grad-checkpointing", *common) == 0
    a, b = (load_checkpoint(tmp_path / run / "e2e" / "final")[0] for run in ("plain", "checkpointed"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_validation_split_is_held_out_of_the_training_images(folder, tmp_path, run_cli):
    train, val = data.holdout(folder, 12, img_size=16)
    assert (len(train), len(val)) == (36, 12)
    assert not set(train.indices) & set(val.indices)                      # disjoint
    assert "RandomResizedCrop" in repr(train.dataset.transform) and "CenterCrop" in repr(val.dataset.transform)
    assert data.holdout(folder, 12, img_size=16)[1].indices == val.indices  # the same draw every time
    with pytest.raises(ValueError, match="validation split of 48 images"):
        data.holdout(folder, 48)
    out = tmp_path / "run"
    assert run_cli("e2e", "--data", folder, "--out", out, "--val-size", "12", "--img-size", "14", "--epochs", "0.5",
                *QUICK) == 0
    record = json.loads((out / "e2e" / "config.json").read_text())["data"]
    assert (record["train_images"], record["eval_images"]) == (36, 12)
    assert record["eval_split"] == "validation: 12 images held out of the training split"
