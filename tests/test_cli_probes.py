"""The command-line defects of issue 25's probe campaign, one regression test each: an output that
is an input, options accepted silently (--aa, abbreviations), tracebacks and vague messages for
bad files and schedules, and records or defaults that said something else than what was used."""
import argparse
import json
import os

import pytest
import torch

from incubation import cli
from incubation.bench import study


def _parsers(parser):
    """`parser` and every sub-parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


# ----------------------------------------------------------------------------------------------
# argparse's prefix matching: --drop became --drop-path without a word
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, prefix", [(["meta", "--drop", "0.1"], "--drop"),
                                          (["expand", "ckpt", "-o", "big", "--dept", "3"], "--dept"),
                                          (["grow", "--schedul", "even"], "--schedul")])
def test_a_prefix_of_an_option_is_no_option(argv, prefix, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err


def test_no_parser_matches_prefixes():
    parsers = _parsers(cli.build_parser()) + _parsers(study.build_parser())
    assert len(parsers) > 10
    for parser in parsers:
        assert parser.allow_abbrev is False, parser.prog


# ----------------------------------------------------------------------------------------------
# data loss: `expand CKPT -o CKPT` replaced its own input, exit 0
# ----------------------------------------------------------------------------------------------
def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"incubation {command}: error: "), err
    return err


def _snapshot(directory):
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("output", ["src", "src.safetensors", "src.json", "relative", "symlink", "hardlink"])
def test_expand_never_writes_over_its_input(output, source_checkpoint, tmp_path, capsys, monkeypatch):
    source_checkpoint()
    src = str(tmp_path / "src")
    if output == "relative":   # the same file by another spelling
        monkeypatch.chdir(tmp_path)
        output = os.path.join("..", tmp_path.name, ".", "src")
    elif output in ("symlink", "hardlink"):   # the same file by another name
        link = os.symlink if output == "symlink" else os.link
        for suffix in (".safetensors", ".json"):
            link(src + suffix, str(tmp_path / f"{output}{suffix}"))
        src = str(tmp_path / output)   # the link is the input, the real file the output
        output = str(tmp_path / "src")
    else:
        output = str(tmp_path / output)
    before = _snapshot(tmp_path)
    assert cli.main(["expand", src, "-o", output, "--depth", "3"]) == 1
    err = _one_line_error(capsys, "expand")
    assert f"the output {output} would overwrite the input " in err and "write the output elsewhere" in err
    assert _snapshot(tmp_path) == before   # nothing written


def test_import_official_never_writes_over_its_input(tmp_path, capsys):
    source = tmp_path / "their.safetensors"   # whatever the file holds: it is not read before the refusal
    source.write_bytes(b"not read")
    assert cli.main(["import-official", str(source), "-o", str(tmp_path / "their")]) == 1
    err = _one_line_error(capsys, "import-official")
    assert f"the output {tmp_path / 'their'} would overwrite the input {source}" in err
    assert _snapshot(tmp_path) == {source: b"not read"}


@pytest.mark.parametrize("command", ["meta", "e2e", "grow"])
def test_a_stage_never_starts_from_weights_in_the_directory_it_writes(command, source_checkpoint, tiny, folder,
                                                                      tmp_path, capsys):
    source_checkpoint()
    run = tmp_path / "run"
    (run / command).mkdir(parents=True)
    for suffix in (".safetensors", ".json"):
        os.replace(tmp_path / f"src{suffix}", run / command / f"start{suffix}")
    os.symlink(run, tmp_path / "link")   # the same run dir by another name
    before = _snapshot(run)
    for out in (run, tmp_path / "link"):
        argv = [command, "--data", folder, "--out", str(out), "--epochs", "0.2", *tiny,
                "--initial-checkpoint", str(run / command / "start.safetensors")]
        assert cli.main(argv) == 1
        err = _one_line_error(capsys, command)
        assert f"--initial-checkpoint {run / command / 'start.safetensors'} is inside {out / command}, which " \
               f"`{command}` writes" in err
    assert _snapshot(run) == before


# ----------------------------------------------------------------------------------------------
# --aa bogus-policy was accepted silently
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, reason", [("bogus-policy", "Unknown AA policy bogus"),
                                            ("rand-x9", "Unknown RandAugment config section"),
                                            ("randfoo", "timm knows no such policy"),
                                            ("rand-bogus", "section(s) 'bogus' hold no number"),
                                            ("augmix-m5-wide", "section(s) 'wide' hold no number")])
def test_an_unknown_auto_augment_policy_is_a_usage_error(policy, reason, capsys):
    assert cli.main(["meta", "--aa", policy]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: incubation meta") and "Traceback" not in err
    assert f"incubation meta: error: argument --aa: auto-augment policy {policy!r}: {reason}" in err


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original", "v0", "3a", "none"])
def test_timm_auto_augment_policies_are_accepted(policy):
    assert cli.build_parser().parse_args(["meta", "--aa", policy]).auto_augment == policy


# ----------------------------------------------------------------------------------------------
# expand on weights that do not match their recorded config: a load_state_dict traceback
# ----------------------------------------------------------------------------------------------
def _drop(prefix):
    return lambda state: {k: v for k, v in state.items() if not k.startswith(prefix)}


BAD_WEIGHTS = {   # what is done to the weights -> what the message says
    "missing key": (_drop("norm.weight"), "missing [norm.weight]"),
    "missing block": (_drop("blocks.1."), "missing [blocks.1.attn.proj.bias, "),
    "extra key": (lambda s: {**s, "extra.weight": torch.zeros(2)}, "unexpected [extra.weight]"),
    "reshaped key": (lambda s: {**s, "blocks.0.attn.qkv.weight": s["blocks.0.attn.qkv.weight"].reshape(48, 64)},
                     "shape mismatch [blocks.0.attn.qkv.weight (48, 64) (model (96, 32))]"),
}
BAD_CONFIGS = {   # what is recorded instead -> what the message says
    "wider": ({"embed_dim": 64}, "shape mismatch [blocks.0.attn.proj.bias (32,) (model (64,)), "),
    "deeper": ({"depth": 3}, "missing [blocks.2.attn.proj.bias, "),
    "shallower": ({"depth": 1}, "unexpected [blocks.1.attn.proj.bias, "),
    "classes": ({"num_classes": 5}, "shape mismatch [head.bias (3,) (model (5,)), head.weight (3, 32) (model (5, 32))]"),
    "image size": ({"img_size": [28, 28]}, "shape mismatch [pos_embed (1, 5, 32) (model (1, 17, 32))]"),
    "patch size": ({"patch_size": [14, 14]}, "pos_embed (1, 5, 32) (model (1, 2, 32))"),
    "channels": ({"in_chans": 1}, "shape mismatch [patch_embed.proj.weight (32, 3, 7, 7) (model (32, 1, 7, 7))]"),
    "mlp ratio": ({"mlp_ratio": 2.0}, "blocks.0.mlp.fc1.weight (128, 32) (model (64, 32))"),
    "qkv bias": ({"qkv_bias": False}, "unexpected [blocks.0.attn.qkv.bias, blocks.1.attn.qkv.bias]"),
    "unknown field": ({"heads": 2}, "its recorded target_config is no ViT config: unknown ViT config keys: ['heads']"),
    "heads": ({"num_heads": 3}, "is no ViT config: invalid ViT config: embed_dim (32) must be "
              "divisible by num_heads (3)"),
}


@pytest.mark.parametrize("kind", [*BAD_WEIGHTS, *BAD_CONFIGS, "config is a list"])
def test_expand_names_what_does_not_match_in_a_bad_file(kind, source_checkpoint, tmp_path, capsys):
    from incubation.train.checkpoint import load_checkpoint, save_checkpoint

    source_checkpoint()
    src = str(tmp_path / "src")
    state, md = load_checkpoint(src)
    if kind in BAD_WEIGHTS:
        change, expected = BAD_WEIGHTS[kind]
        state = change(state)
    elif kind in BAD_CONFIGS:
        changes, expected = BAD_CONFIGS[kind]
        md["target_config"].update(changes)
    else:
        md["target_config"], expected = list(md["target_config"]), "its recorded target_config is no ViT config: "
    save_checkpoint(src, state, md)
    assert cli.main(["expand", src, "-o", str(tmp_path / "big"), "--depth", "3"]) == 1
    err = _one_line_error(capsys, "expand")
    if "no ViT config" not in expected:
        assert f"error: {src}: its weights do not match its recorded target_config (" in err, err
    assert expected in err, err
    assert not (tmp_path / "big.json").exists()


# ----------------------------------------------------------------------------------------------
# folder data: 28 px images were upsampled to 224 (1024 tokens at patch 7), and the record said
# "test" where the folder's val/ was used
# ----------------------------------------------------------------------------------------------
def test_a_folder_run_keeps_the_images_size_and_records_the_split_it_used(folder, tmp_path):
    argv = ["meta", "--data", folder, "--out", str(tmp_path), "--patch-size", "8", "--epochs", "0.2", "-b", "8",
            "--no-progress", "--device", "cpu"]   # no --img-size: the tiny preset leaves it to the data
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "meta" / "config.json").read_text())
    assert record["model"]["img_size"] == [16, 16] and record["model"]["patch_size"] == [8, 8]
    assert record["data"]["eval_split"] == "val"


def test_the_own_size_of_folder_images_is_their_first_images_shorter_side(tmp_path):
    from PIL import Image

    from incubation import data
    for split in ("train", "validation"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / split / c)
            for j in range(2):
                Image.new("RGB", (20, 12) if split == "train" else (40, 40)).save(tmp_path / split / c / f"{j}.png")
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not an image")   # the first one
    with pytest.raises(data.DatasetError, match="0.png is not a readable image"):
        data.load_dataset(f"folder:{tmp_path}", "train")
    for split, name in (("train", "train"), ("test", "validation")):   # eval images at the training images' size
        ds = data.load_dataset(f"folder:{tmp_path}", split, skip_bad_images=True)
        assert (ds.img_size, ds.split) == (12, name)
        assert ds[1][0].shape == (3, 12, 12)


# ----------------------------------------------------------------------------------------------
# grow with too few steps named the Python argument switch_steps
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, schedule, least", [
    ([], "--schedule apollo", 15),   # apollo_schedule(8, 15) is the first that fits (below)
    # 9 steps switch at round(0.9, 1.8, 2.7) = 1, 2, 3; 8 at 1, 2, 2 (round(0.5) = 0 becomes 1)
    (["--stages", "1,2,4,8", "--switch", "0.1,0.2,0.3"], "--switch 0.1,0.2,0.3", 9),
    (["--schedule", "even", "--stages", "1,2,4,6,8"], "--schedule even", 5)])   # a step per stage
def test_grow_with_too_few_steps_names_the_flags_and_the_least_steps(options, schedule, least, tiny, folder,
                                                                     tmp_path, capsys):
    from incubation.growth import apollo_schedule

    apollo_schedule(8, 15)
    with pytest.raises(ValueError, match="use at least 15 steps"):
        apollo_schedule(8, 14)
    argv = ["grow", "--data", folder, "--out", str(tmp_path), "--epochs", "0.5", *tiny, *options]   # 3 steps
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "switch_steps" not in err and "Traceback" not in err
    assert f"incubation grow: error: argument --epochs: 3 steps (--epochs 0.5 of 48 images at --batch-size 8) are " \
           f"too few for {schedule} at depth 8: every stage needs a step, which takes at least {least} steps; give " \
           f"more --epochs, or fewer stages (--stages, --switch, --schedule even)" in err
    assert not os.path.exists(tmp_path / "grow" / "final.json")
