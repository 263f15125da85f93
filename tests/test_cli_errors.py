"""How the `incubation` command fails: nonsense arguments are refused while parsing (argparse's
usage line, exit 2, the option named), faults of the user's files or of the environment give one
line and exit 1, Ctrl-C exits 130, and only bugs (or INCUBATION_DEBUG=1) show a traceback."""
import argparse
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from incubation import cli
from incubation.bench import study
from incubation.errors import IncubationError

FUZZ = ["0", "-1", "nan", "inf", ""]
ZERO_IS_VALID = {"--seed", "--module", "--evals", "--checkpoint-every",
                 "--num-workers", "--drop-path", "--smoothing", "--reprob", "--mixup", "--cutmix",
                 "--weight-decay", "--warmup-epochs", "--momentum", "--warmup-lr"}  # the numeric options where 0 means something
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subparsers(parser):
    return parser._subparsers._group_actions[0].choices


def _is_numeric(action) -> bool:
    """An option whose type turns a small number into a number (or a list of numbers)."""
    if not action.option_strings or action.type is None:
        return False
    for probe in ("1", "2", "64"):
        try:
            value = action.type(probe)
        except argparse.ArgumentTypeError:
            continue  # e.g. --device, --data refuse every probe
        values = value if isinstance(value, list) else [value]
        return all(isinstance(v, (int, float)) for v in values)
    return False


def _numeric_options(parser):
    """(subcommand, option, action) for every numeric option of every subcommand of `parser`."""
    return [(name, action.option_strings[-1], action) for name, sub in _subparsers(parser).items()
            for action in sub._actions if _is_numeric(action)]


def _fuzz_cases(parser):
    cases = []
    for name, option, action in _numeric_options(parser):
        for value in FUZZ:
            if not (value == "0" and option in ZERO_IS_VALID):
                cases.append((name, option, "/".join(action.option_strings), value))
    return cases


def test_numeric_options_are_discovered_and_none_is_a_bare_int_or_float():
    found = {(name, option) for name, option, _ in _numeric_options(cli.build_parser())}
    assert {("meta", "--epochs"), ("meta", "--batch-size"), ("meta", "--modules"), ("meta", "--img-size"),
            ("incubate", "--parallel"), ("run", "--parallel"), ("expand", "--embed-dim"), ("expand", "--mlp-ratio"),
            ("grow", "--stages"), ("tune", "--batch-size")} <= found
    assert len(found) > 60
    for sub in _subparsers(cli.build_parser()).values():
        for action in sub._actions:  # int / float accept -1, nan and inf
            assert action.type not in (int, float), action.option_strings


@pytest.mark.parametrize("command,option,shown,value", _fuzz_cases(cli.build_parser()))
def test_nonsense_numbers_are_usage_errors(command, option, shown, value, capsys):
    assert cli.main([command, option, value]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"usage: incubation {command}")
    assert f"incubation {command}: error: argument {shown}: " in err


def test_study_numbers_are_usage_errors(capsys):
    cases = _fuzz_cases(study.build_parser())
    assert {"--depth", "--K", "--parallel", "--limit-train", "--budgets"} <= {c[1] for c in cases}
    for command, option, shown, value in cases:
        assert study.main([command, option, value]) == 2, (option, value)
        err = capsys.readouterr().err
        assert "Traceback" not in err and f"argument {shown}: " in err, (option, value)


def test_empty_values_are_refused(capsys):
    """'' is never a value: not a path (it would mean the current directory), name or number."""
    for name, sub in _subparsers(cli.build_parser()).items():
        for action in sub._actions:
            if action.option_strings and action.nargs is None and action.const is None:  # takes one value
                assert cli.main([name, action.option_strings[-1], ""]) == 2, (name, action.option_strings)
                err = capsys.readouterr().err
                assert "Traceback" not in err and "argument " in err
    assert cli.main(["expand", "", "-o", "x"]) == 2  # the positional checkpoint
    assert "argument checkpoint: expected a path" in capsys.readouterr().err


def test_output_paths(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    # expand -o DIR/ or DIR would write DIR/.safetensors
    for prefix in (f"{tmp_path}{os.sep}", str(tmp_path), f"{tmp_path}/sub/"):
        assert cli.main(["expand", "ckpt", "-o", prefix]) == 2
        assert "argument -o/--output: expected a file prefix" in capsys.readouterr().err
    # --out being a file is refused while parsing; a file further up shows when writing
    assert cli.main(["meta", "--out", str(tmp_path / "afile")]) == 2
    assert f"argument --out: {tmp_path / 'afile'} exists and is not a directory" in capsys.readouterr().err
    assert cli.main(["report", "--out", str(tmp_path / "afile")]) == 2


def test_out_under_a_file_is_one_line(tiny, folder, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "run"
    assert cli.main(["meta", "--data", folder, "--out", str(out), "--epochs", "0.1", *tiny]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"incubation meta: error: {tmp_path / 'afile'} is a file, not a directory")


def test_expand_output_under_a_file(source_checkpoint, tmp_path, capsys):
    source_checkpoint()
    (tmp_path / "afile").write_text("")
    assert cli.main(["expand", str(tmp_path / "src"), "-o", str(tmp_path / "afile" / "big"), "--depth", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"incubation expand: error: {tmp_path / 'afile'} is a file, not a directory")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("code,expected", [
    (errno.ENOSPC, "disk full: no space left on the device to write {path} ("),
    (errno.EROFS, "read-only file system: cannot write {path}"),
    (errno.EACCES, "permission denied: {path}"),
    (errno.EPERM, "permission denied: {path}"),
])
def test_environment_faults_when_writing_are_one_line(source_checkpoint, code, expected, tmp_path, capsys, monkeypatch):
    source_checkpoint()
    path = str(tmp_path / "big.safetensors")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(cli, "save_checkpoint", fail)   # where `incubation expand` writes
    argv = ["expand", str(tmp_path / "src"), "-o", str(tmp_path / "big"), "--depth", "3"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("incubation expand: error: " + expected.format(path=path))
    assert err.count("\n") == 1 and "Traceback" not in err
    if code == errno.ENOSPC:
        assert "bytes free" in err
    monkeypatch.setenv("INCUBATION_DEBUG", "1")  # the traceback when asked for
    with pytest.raises(OSError):
        cli.main(argv)


def test_disk_full_without_a_path_and_with_the_size():
    exc = OSError(errno.ENOSPC, "No space left on device")
    assert cli.error_message(exc) == "disk full: no space left on the device"
    exc = OSError(errno.ENOSPC, "No space left on device", "/nowhere/x")
    exc.bytes_needed = 1234
    assert cli.error_message(exc).startswith("disk full: no space left on the device to write /nowhere/x "
                                             "(1234 bytes needed")


def test_no_cuda_device(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["meta", "--device", "cuda"], ["tune", "--device", "cuda:0"], ["grow", "--device", "cuda:1"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"argument --device: {argv[-1]}: torch sees no CUDA device on this machine" in err
    assert cli.main(["meta", "--device", "gpu"]) == 2
    assert "expected auto, cpu, cuda or cuda:<i>, got 'gpu'" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_ctrl_c_is_one_line(monkeypatch, capsys):
    def handler(exc):
        def run(args):
            raise exc
        return run

    name, (help_text, add, _) = "backends", cli.SUBCOMMANDS["backends"]
    monkeypatch.setitem(cli.SUBCOMMANDS, name, (help_text, add, handler(TypeError("a bug"))))
    with pytest.raises(TypeError):
        cli.main([name])
    monkeypatch.setitem(cli.SUBCOMMANDS, name, (help_text, add, handler(KeyboardInterrupt())))
    assert cli.main([name]) == 130
    assert capsys.readouterr().err == "incubation backends: interrupted\n"
    monkeypatch.setitem(cli.SUBCOMMANDS, name, (help_text, add, handler(IncubationError("the file x is bad"))))
    assert cli.main([name]) == 1
    assert capsys.readouterr().err == "incubation backends: error: the file x is bad\n"
    monkeypatch.setenv("INCUBATION_DEBUG", "1")
    with pytest.raises(IncubationError):
        cli.main([name])


def test_too_many_epochs_to_count(tiny, folder, tmp_path, capsys):
    assert cli.main(["meta", "--data", folder, "--out", str(tmp_path), "--epochs", "1e308", *tiny]) == 2
    err = capsys.readouterr().err
    assert "incubation meta: error: argument --epochs: 1e+308 epochs of 48 images are more steps" in err


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("INCUBATION_DEBUG", None)
    return env


def _subprocess(*argv):
    return subprocess.run([sys.executable, "-m", "incubation.cli", *map(str, argv)], capture_output=True,
                          text=True, env=_env(), timeout=300)


def test_end_to_end_exit_status_and_no_traceback(tmp_path):
    usage = [["incubate", "--all", "--parallel", "-3"], ["bench", "study", "run", "--depth", "0"]]
    if not torch.cuda.is_available():
        usage.append(["meta", "--device", "cuda"])
    cases = [(2, argv) for argv in usage] + [(1, ["report", "--out", str(tmp_path / "none")])]
    procs = [subprocess.Popen([sys.executable, "-m", "incubation.cli", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env()) for _, argv in cases]  # at once: ~4 s each
    for (code, argv), proc in zip(cases, procs):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == code, (argv, err)
        assert "Traceback" not in err
        if code == 2:
            assert err.startswith("usage: ") and ": error: argument " in err
    assert err == f"incubation report: error: {tmp_path / 'none'} has no finished stage (no */final.json) " \
                  "to report on\n"


@pytest.mark.slow
def test_a_failed_parallel_job_is_one_line_naming_its_log(tiny, folder, tmp_path):
    out = tmp_path / "run"
    (out / "meta").mkdir(parents=True)   # a meta model whose record reads, but whose weights do not: both jobs fail
    (out / "meta" / "final.json").write_text(json.dumps({"metadata": {"stage": "meta", "K": 2}}))
    (out / "meta" / "final.safetensors").write_bytes(b"not safetensors")
    proc = _subprocess("incubate", "--all", "--parallel", "2", "--modules", "2", "--data", folder, "--out", out,
                       *tiny)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("incubation incubate: error: failed: incubate-")
    for i in range(2):
        assert f"incubate-{i} (exit 1: incubation incubate: error: " in proc.stderr
        assert f"log {out / f'incubate-{i}' / 'log.txt'})" in proc.stderr


# --------------------------------------------------------------------------------------
# issue 25: files and sizes that used to end in a traceback, a vague message or silence
# --------------------------------------------------------------------------------------
def _one_line_error(capsys, command):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"incubation {command}: error: "), err
    return err


def test_absurd_sizes_are_refused_before_allocating(source_checkpoint, tmp_path, capsys):
    source_checkpoint()
    src = str(tmp_path / "src")
    assert cli.main(["expand", src, "-o", str(tmp_path / "big"), "--embed-dim", "1000000"]) == 1
    err = _one_line_error(capsys, "expand")
    assert "more than this machine's memory" in err and "embed_dim=1000000," in err
    record = json.loads(open(src + ".json").read())   # a size in the checkpoint's own JSON record
    record["metadata"]["target_config"]["num_classes"] = 10 ** 12
    open(src + ".json", "w").write(json.dumps(record))
    assert cli.main(["expand", src, "-o", str(tmp_path / "big"), "--depth", "3"]) == 1
    assert "num_classes=1000000000000 (the head)" in _one_line_error(capsys, "expand")
    assert not os.path.exists(tmp_path / "big.json")


def test_non_float_weights_are_refused_naming_the_file_and_the_dtype(tmp_path, capsys):
    from incubation import VisionTransformer, ViTConfig
    from incubation.train.checkpoint import save_checkpoint

    cfg = ViTConfig(img_size=14, patch_size=7, in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    state = {k: (v * 100).long() for k, v in VisionTransformer(cfg).state_dict().items()}
    save_checkpoint(str(tmp_path / "ints"), state, {"stage": "e2e", "target_config": cfg.to_dict()})
    assert cli.main(["expand", str(tmp_path / "ints"), "-o", str(tmp_path / "big"), "--depth", "3"]) == 1
    err = _one_line_error(capsys, "expand")
    assert f"{tmp_path / 'ints.safetensors'}: tensor " in err and " is int64, not floating point" in err
    assert not os.path.exists(tmp_path / "big.json")


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "final.json holds a JSON array, not an object"),
    ('{"metadata": {"stage": "meta", "eval_acc": nan}}', "final.json is not valid JSON: Expecting value: line 1"),
    ('{"metadata": [1]}', "final.json: 'metadata' must be a JSON object, got list")])
def test_a_damaged_final_json_is_named(text, message, tmp_path, capsys):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "final.json").write_text(text)
    assert cli.main(["report", "--out", str(tmp_path)]) == 1
    err = _one_line_error(capsys, "report")
    assert f"{tmp_path / 'meta'}{os.sep}{message}" in err


def test_resume_from_a_state_file_holding_code_gives_no_advice_to_unpickle(tiny, folder, tmp_path, capsys):
    """A checkpoint side file with a pickled object is refused without torch's advice to load it
    with weights_only=False (which would run what the file holds)."""
    from incubation.utils import file_sha256

    argv = ["meta", "--data", folder, "--out", str(tmp_path), "--epochs", "0.4", *tiny]
    assert cli.main(argv) == 0
    capsys.readouterr()
    stage = tmp_path / "meta"
    for name in ("final.json", "final.safetensors"):   # unfinished: the next run resumes
        os.remove(stage / name)
    torch.save({"step": 1, "args": argparse.Namespace(lr=1)}, stage / "checkpoint.state.pt")
    record = json.loads((stage / "checkpoint.json").read_text())
    record["files"][".state.pt"] = file_sha256(stage / "checkpoint.state.pt")
    (stage / "checkpoint.json").write_text(json.dumps(record))
    assert cli.main(argv) == 1
    err = _one_line_error(capsys, "meta")
    assert f"{stage / 'checkpoint.state.pt'} holds a argparse.Namespace, which is not loaded" in err
    assert "weights_only=False" not in err and "add_safe_globals" not in err
