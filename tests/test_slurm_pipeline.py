"""`incubation run --launcher slurm` end to end on the test cluster (the `slurm_cluster` fixture):
the tiny preset, two gloo ranks for meta and assembly, as a user types it (processes: the jobs
outlive a call)."""
import json
import os
import subprocess
import sys
import time

import pytest

from incubation.launch import slurm_status

pytest.importorskip("torchvision")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["meta", "incubate-0", "incubate-1", "assemble", "e2e"]
# K = 2, three epochs per stage (a checkpoint after each: a requeue has one to resume from), no
# loader workers (their random transforms are not replayed on resume: train/engine.py)
RUN = ("--modules", "2", "--epochs", "3", "--workers", "0", "--nproc-per-node", "meta:2",
       "--nproc-per-node", "assemble:2")
# a single-process stage gets both CPUs, as the local launcher gives it: same threads, same sums
SLURM = ("--launcher", "slurm", "--cpus-per-task", "incubate:2", "--cpus-per-task", "e2e:2")


def _incubation(*argv, wait=True):
    """`incubation ARGV` in a process (the runs a user waits on: the jobs outlive a call): its
    CompletedProcess, or the Popen with wait=False."""
    argv = [sys.executable, "-m", "incubation.cli", *map(str, argv)]
    if not wait:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _here(run_cli, capsys, *argv):
    """`incubation ARGV` in this process (status, cancel, a refused run: no process start to pay
    for): (exit status, stdout, stderr)."""
    status = run_cli(*argv)
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def _weights(out):
    return {s: json.loads((out / s / "final.json").read_text())["sha256"] for s in STAGES}


def _until(condition, what, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, folder, tiny):
    out = tmp_path_factory.mktemp("local") / "run"
    t0 = time.monotonic()
    done = _incubation("run", "--data", folder, "--out", out, *RUN, *tiny)
    assert done.returncode == 0, done.stderr
    print(f"\ntiny pipeline, --launcher local: {time.monotonic() - t0:.0f} s")
    return out


@pytest.mark.slurm
def test_requeued_pipeline_on_slurm_ends_bit_identical_to_local(slurm_cluster, local_run, folder, tiny, tmp_path,
                                                                 run_cli, capsys):
    out = tmp_path / "run"
    t0 = time.monotonic()
    run = _incubation("run", "--data", folder, "--out", out, *RUN, *tiny, *SLURM, "--wait", wait=False)
    # requeue incubate-0 once it has a checkpoint and is still running
    ckpt, final = out / "incubate-0" / "checkpoint.json", out / "incubate-0" / "final.json"
    _until(lambda: ckpt.exists() or final.exists(), "checkpoint of incubate-0")
    assert not final.exists(), "incubate-0 finished before it could be requeued"
    job = slurm_status.load_record(str(out))["incubate-0"]["job_id"]
    subprocess.run(["scontrol", "requeue", job], check=True)
    step = json.loads(ckpt.read_text())["metadata"]["step"]
    kept = [line for line in (out / "incubate-0" / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["step"] <= step]
    # meanwhile: a second run on this out dir refuses, naming a job still queued or running
    code, _, error = _here(run_cli, capsys, "run", "--data", folder, "--out", out, *RUN, *tiny, *SLURM)
    assert code == 1 and "is still" in error and "as Slurm job" in error
    assert len(error.strip().splitlines()) == 1
    code, printed, _ = _here(run_cli, capsys, "status", "--out", out)
    assert code == 0 and [line.split()[0] for line in printed.splitlines()] == [*STAGES, "report"]
    stdout, stderr = run.communicate(timeout=900)
    print(f"tiny pipeline, --launcher slurm: {time.monotonic() - t0:.0f} s (one requeue)")
    assert run.returncode == 0, stderr
    for stage in STAGES:  # one line per change of state
        assert f"{stage}: done" in stdout
    assert _weights(out) == _weights(local_run)
    # incubate-0 resumed: the lines it logged up to its checkpoint were kept, not written again
    lines = (out / "incubate-0" / "metrics.jsonl").read_text().splitlines()
    assert lines[:len(kept)] == kept and len(lines) > len(kept)
    record = slurm_status.read_exit_record(slurm_status.slurm_folder(str(out)), job)
    assert record["returncode"] == 0 and record["restart"] == 1


@pytest.mark.slurm
def test_failed_stage_cancels_what_needs_it_and_a_rerun_submits_the_rest(slurm_cluster, folder, tiny, tmp_path,
                                                                          run_cli, capsys):
    out = tmp_path / "run"
    (out / "incubate-1").mkdir(parents=True)
    (out / "incubate-1" / "checkpoint.json").write_text("{damaged")  # incubate-1 cannot resume
    # meta and incubate-0 need only finish: one process each, one epoch of 2 steps (16 images)
    short = ("--modules", "2", "--epochs", "1", "--limit-train", "16", "--workers", "0")
    run = _incubation("run", "--data", folder, "--out", out, *short, *tiny, *SLURM, "--wait")
    assert run.returncode == 1
    error = run.stderr.strip().splitlines()
    assert len(error) == 1 and "incubate-1 failed (exit 1)" in error[0] and "checkpoint" in error[0]
    rows = {r.name: r for r in slurm_status.status(str(out))}
    assert rows["incubate-1"].state == "failed" and "checkpoint" in rows["incubate-1"].last_line
    assert {rows[n].state for n in ("assemble", "e2e", "report")} == {"cancelled"}
    assert {rows[n].state for n in ("meta", "incubate-0")} == {"done"}
    status = _here(run_cli, capsys, "status", "--out", out)[1]
    assert "failed (exit 1)" in status and rows["incubate-1"].last_line in status
    # after the fix, a rerun submits only what is left; cancel stops it (held back by --begin, so
    # that the tiny incubate-1 cannot finish before the cancel: that race failed this test)
    (out / "incubate-1" / "checkpoint.json").unlink()
    code, printed, error = _here(run_cli, capsys, "run", "--data", folder, "--out", out, *short, *tiny, *SLURM,
                                 "--slurm-option", "begin=now+600")
    assert code == 0, error
    submitted = [line.split(":")[0] for line in printed.splitlines() if ": Slurm job " in line]
    assert submitted == ["incubate-1", "assemble", "e2e", "report"]
    code, printed, _ = _here(run_cli, capsys, "cancel", "--out", out)
    assert code == 0 and "cancelled: incubate-1" in printed
    rows = {r.name: r for r in slurm_status.wait(str(out), poll_s=0.5, timeout_s=60)}
    assert {rows[n].state for n in ("incubate-1", "assemble", "e2e", "report")} == {"cancelled"}
    assert rows["meta"].state == "done"


@pytest.mark.parametrize("argv, message", [
    (("--partition", "gpu"), "argument --partition: needs --launcher slurm"),
    (("--wait",), "argument --wait: needs --launcher slurm"),
    (("--nproc-per-node", "meta:two"), "argument --nproc-per-node: expected a positive integer, got 'two'"),
    (("--launcher", "slurm", "--nodes", "incubate:x"), "--nodes 'incubate:x': want a number"),
    (("--launcher", "slurm", "--time", "soon"), "'soon' is not a Slurm time"),
    (("--launcher", "slurm", "--slurm-option", "mail-type"), "--slurm-option 'mail-type': want KEY=VALUE"),
    (("--launcher", "slurm", "--parallel", "2"), "argument --parallel: the slurm launcher runs what Slurm allows"),
])
def test_launcher_options_refused_with_the_usage_line(argv, message, tmp_path, capsys):
    from incubation import cli

    assert cli.main(["run", "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_status_and_cancel_of_a_run_never_submitted(tmp_path, capsys):
    from incubation import cli

    for command in ("status", "cancel"):
        assert cli.main([command, "--out", str(tmp_path)]) == 1
        assert capsys.readouterr().err.strip() == (f"incubation {command}: error: {tmp_path} has no jobs.json: "
                                                   "nothing was submitted to Slurm from it")
