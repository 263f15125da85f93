"""The command-line defects of issue 25's probe campaign, one regression test each: an output that
is an input, options accepted silently (--aa, abbreviations), tracebacks and vague messages for
bad files and schedules, and records or defaults that said something else than what was used."""
import argparse
import os

import pytest

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
                                          (["grow", "--sched", "even"], "--sched")])
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
                                            ("randfoo", "timm knows no such policy")])
def test_an_unknown_auto_augment_policy_is_a_usage_error(policy, reason, capsys):
    assert cli.main(["meta", "--aa", policy]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: incubation meta") and "Traceback" not in err
    assert f"incubation meta: error: argument --aa: auto-augment policy {policy!r}: {reason}" in err


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original", "v0", "3a", "none"])
def test_timm_auto_augment_policies_are_accepted(policy):
    assert cli.build_parser().parse_args(["meta", "--aa", policy]).auto_augment == policy
