"""incubation.launch.local: the process runner of `incubate --all --parallel` and of the study: thread
budget, dependency order and skipping, failures naming their log, and no child left running
after SIGINT / SIGTERM of the parent (for `incubate --all --parallel 2` itself: test_cli.py).
And the child command line of `--parallel`: every common option of the parent reaches it."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from incubation import cli
from incubation.launch import forkserver
from incubation.launch import local as jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}


def _py(code: str) -> list:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _job(tmp_path, name, code, needs=()):
    return jobs.Job(name, _py(code), str(tmp_path / name / "log.txt"), needs)


def test_thread_budget_reaches_every_child(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    todo = [_job(tmp_path, "torch", "import torch; print(torch.get_num_threads())"),  # sizes its pool from it
            *[_job(tmp_path, f"j{i}", "import os; print(os.environ['OMP_NUM_THREADS'])") for i in range(2)]]
    outcome = jobs.run_jobs(todo, parallel=2)
    assert sorted(outcome.done) == ["j0", "j1", "torch"] and not outcome.failed and not outcome.skipped
    budget = jobs.thread_budget(2)
    assert budget == max(1, len(os.sched_getaffinity(0)) // 2)
    assert [open(job.log).read().strip() for job in todo] == [str(budget)] * 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")   # the user's choice is kept
    jobs.run_jobs(todo[1:], parallel=2)
    assert [open(job.log).read().split()[-1] for job in todo[1:]] == ["3", "3"]


def test_failure_names_its_log_and_dependents_are_skipped(tmp_path):
    seen = []
    todo = [_job(tmp_path, "bad", "import sys; print('working'); sys.exit('bad: the input is damaged')"),
            _job(tmp_path, "after-bad", "pass", needs=["bad"]),
            _job(tmp_path, "after-after", "pass", needs=["after-bad"]),
            _job(tmp_path, "after-old", "pass", needs=["old"]),
            _job(tmp_path, "alone", "pass")]
    outcome = jobs.run_jobs(todo, parallel=1, done={"old"}, report=lambda job, what: seen.append((job.name, what)))
    assert sorted(outcome.done) == ["after-old", "alone"]
    assert outcome.skipped == {"after-bad": "bad", "after-after": "after-bad"}
    failure = outcome.failed["bad"]
    assert str(failure) == f"exit 1: bad: the input is damaged; log {tmp_path / 'bad' / 'log.txt'}"
    assert ("bad", "failed") in seen and ("after-after", "skipped") in seen
    assert not os.path.exists(tmp_path / "after-bad")  # never started
    with pytest.raises(ValueError, match="unknown jobs: nowhere"):
        jobs.run_jobs([_job(tmp_path, "x", "pass", needs=["nowhere"])], 1)
    with pytest.raises(ValueError, match="cycle"):
        jobs.run_jobs([_job(tmp_path, "a", "pass", needs=["b"]), _job(tmp_path, "b", "pass", needs=["a"])], 2)


# a parent running three jobs, two at once; each child writes its pid, then sleeps. The second
# ignores SIGTERM and SIGINT: only the SIGKILL after the grace period ends it. The jobs are
# `python -c` processes, or (argv[3] "fork") `python -m` modules that the fork server forks.
PARENT = """
import os, sys
from incubation import cli
from incubation.launch import local as jobs
sleeper = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(float(sys.argv[1]))"
stubborn = "import os, signal; [signal.signal(s, signal.SIG_IGN) for s in (2, 15)]; " + sleeper
out, seconds, form = sys.argv[1], sys.argv[2], sys.argv[3]
todo = []
if form == "fork":   # where the jobs' modules are written
    os.environ["PYTHONPATH"] = os.pathsep.join([out, os.environ["PYTHONPATH"]])
for name, code in (("a", sleeper), ("b", stubborn), ("c", sleeper)):
    if form == "fork":
        with open(f"{out}/job_{name}.py", "w") as f:
            f.write(code)
    argv = ["-m", f"job_{name}"] if form == "fork" else ["-c", code]
    todo.append(jobs.Job(name, [sys.executable, *argv, seconds], f"{out}/{name}.log"))
sys.exit(cli.run_main("parent", lambda: print(jobs.run_jobs(todo, 2, report=print, grace_s=1.0).done)))
"""
FORMS = pytest.mark.parametrize("form", ["process", "fork"])


def _pids(logs, timeout=60):
    """The pids the children wrote into their logs, once they all have."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        texts = [open(p).read() if os.path.exists(p) else "" for p in logs]
        if all(t.strip() for t in texts):
            return [int(t.split()[0]) for t in texts]
        time.sleep(0.05)
    raise AssertionError(f"the children did not start: {logs}")


def _gone(pid) -> bool:
    """No such process, or only its zombie (a SIGKILLed parent's children go to a reaper that may be slow)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@FORMS
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_ends_every_child(tmp_path, signum, form):
    parent = subprocess.Popen(_py(PARENT) + [str(tmp_path), "600", form], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    pids = _pids([tmp_path / "a.log", tmp_path / "b.log"])
    parent.send_signal(signum)
    out, err = parent.communicate(timeout=30)
    assert parent.returncode == 128 + signum and err == "parent: interrupted\n", err
    assert all(_gone(pid) for pid in pids)  # the stubborn one too: killed after the grace period
    assert not os.path.exists(tmp_path / "c.log")  # and nothing new started
    if signum == signal.SIGINT:
        return
    # a rerun starts from scratch with nobody else writing
    rerun = subprocess.run(_py(PARENT) + [str(tmp_path), "0", form], env=ENV, capture_output=True, text=True,
                           timeout=60)
    assert rerun.returncode == 0 and rerun.stdout.strip().endswith("]"), rerun.stderr
    assert sorted(eval(rerun.stdout.strip().splitlines()[-1])) == ["a", "b", "c"]


@FORMS
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_sigkilled_parent(tmp_path, form):
    parent = subprocess.Popen(_py(PARENT) + [str(tmp_path), "600", form], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    pids = _pids([tmp_path / "a.log", tmp_path / "b.log"])
    parent.kill()   # nothing to forward: the kernel ends the children
    parent.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in pids)


PROBE = """
import os, random, sys, torch
print(os.getppid(), os.getcwd(), os.environ["OMP_NUM_THREADS"], torch.get_num_threads(), random.random(), sys.argv[1:])
print(sys.stdin.read() == "", flush=True)
how = sys.argv[1]
if how == "exit":
    sys.exit(3)
if how == "message":
    sys.exit("probe: the input is damaged")
if how == "raise":
    raise RuntimeError("probe failed")
if how == "kill":
    os.kill(os.getpid(), 9)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fork server serves machines without CUDA only")
@pytest.mark.parametrize("server", ["1", "0"])
def test_a_forked_job_is_the_process_its_command_line_would_start(tmp_path, monkeypatch, server):
    """`python -m module` jobs of this interpreter are forked by the fork server (their parent is
    not this process) and get what a new process would: cwd, thread count, their own random seed,
    argv, stdin /dev/null, exit statuses, the traceback in their log; INCUBATION_FORK_SERVER=0
    starts them as processes."""
    (tmp_path / "probe_job.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("INCUBATION_FORK_SERVER", server)
    monkeypatch.chdir(tmp_path)
    hows = ["ok", "again", "exit", "message", "raise", "kill"]
    todo = [jobs.Job(how, [sys.executable, "-m", "probe_job", how, "x y"], str(tmp_path / f"{how}.log")) for how in hows]
    outcome = jobs.run_jobs(todo, parallel=2)
    assert sorted(outcome.done) == ["again", "ok"]
    assert {name: f.returncode for name, f in outcome.failed.items()} == {"exit": 3, "message": 1, "raise": 1, "kill": -9}
    assert outcome.failed["message"].last_line == "probe: the input is damaged"
    assert outcome.failed["raise"].last_line == "RuntimeError: probe failed"
    lines = {how: open(tmp_path / f"{how}.log").read().splitlines() for how in hows}
    firsts = {how: lines[how][0].split(" ", 4) for how in hows}
    for how, (ppid, cwd, omp, threads, rest) in firsts.items():
        assert (ppid == str(os.getpid())) == (server == "0"), how   # forked: the server is the parent
        assert (cwd, omp, threads) == (str(tmp_path), "1", "1") and rest.endswith(f"['{how}', 'x y']")
        assert lines[how][1] == "True"   # stdin: /dev/null
    assert firsts["ok"][4].split()[0] != firsts["again"][4].split()[0]   # each its own random seed


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fork server serves machines without CUDA only")
def test_a_job_whose_fork_server_dies_fails_and_says_so(tmp_path, monkeypatch):
    (tmp_path / "waiting_job.py").write_text("import os, time; print(os.getppid(), os.getpid(), flush=True); "
                                             "time.sleep(60)")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]]))
    monkeypatch.delenv("INCUBATION_FORK_SERVER", raising=False)
    job = jobs.Job("waiting", [sys.executable, "-m", "waiting_job"], str(tmp_path / "log.txt"))
    killer = threading.Thread(target=lambda: os.kill(_pids([job.log])[0], signal.SIGKILL))
    killer.start()
    outcome = jobs.run_jobs([job], parallel=1)
    killer.join()
    failure = outcome.failed["waiting"]
    assert failure.returncode == -signal.SIGKILL and "fork server ended" in failure.last_line
    pid, deadline = int(open(job.log).read().split()[1]), time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:   # the job dies with its server
        time.sleep(0.05)
    assert _gone(pid)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fork server serves machines without CUDA only")
def test_a_fork_server_that_does_not_fork_in_time_is_stopped(tmp_path, monkeypatch):
    """A server that hangs (here: still importing when the limit, shrunk to 0.2 s, is reached) is
    killed; its job fails and its log says why, instead of the launcher waiting forever."""
    monkeypatch.setattr(forkserver, "START_TIMEOUT_S", 0.2)
    monkeypatch.delenv("INCUBATION_FORK_SERVER", raising=False)
    job = jobs.Job("late", [sys.executable, "-m", "json.tool", "--help"], str(tmp_path / "log.txt"))
    outcome = jobs.run_jobs([job], parallel=1)
    failure = outcome.failed["late"]
    assert failure.returncode == -signal.SIGKILL
    assert "stopped after 0.2 s without forking a job" in failure.last_line


def test_local_launcher_runs_several_ranks_under_torchrun(tmp_path):
    from incubation.launch import Resources
    from incubation.launch.local import LocalLauncher
    script = tmp_path / "ranks.py"
    # one write a line: the two ranks append to one log at once (print's pieces could interleave)
    script.write_text("import os; os.write(1, f\"{os.environ['RANK']} {os.environ['WORLD_SIZE']}\\n\".encode())")
    job = jobs.Job("ranks", [sys.executable, str(script)], str(tmp_path / "log.txt"),
                   resources=Resources(tasks_per_node=2))
    outcome = LocalLauncher(1).launch([job])
    assert outcome.done == ["ranks"], open(job.log).read()
    lines = [line.split() for line in open(job.log).read().splitlines() if line[:1].isdigit()]
    assert sorted(line[:2] for line in lines) == [["0", "2"], ["1", "2"]]
    with pytest.raises(ValueError, match="2 nodes"):
        LocalLauncher(1).launch([jobs.Job("far", ["x"], str(tmp_path / "far.txt"), resources=Resources(nodes=2))])


# ----------------------------------------------------------------------------------------------
# the child command line of `incubate --all --parallel`
# ----------------------------------------------------------------------------------------------
def _sample(action) -> list:
    """A command-line value of `action` that parses to something other than its default."""
    if action.nargs == 0:
        return []
    if action.choices:
        return [next(c for c in action.choices if c != action.default)]
    special = {"--data": "folder:/some/images", "--device": "cpu", "--split": "3,1", "--modules": "2",
               "--model": "vit_tiny_patch16_224", "--aa": "rand-m7-mstd0.5", "--lr-base-scale": "sqrt",
               "--opt": "sgd", "--sched": "step", "--opt-betas": "0.8,0.9", "--amp-dtype": "float16"}
    if action.option_strings[-1] in special:
        return [special[action.option_strings[-1]]]
    for text in ("3", "0.5", "/some/dir"):
        try:
            if action.type(text) != action.default:
                return [text]
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            continue
    raise AssertionError(f"no sample value for {action.option_strings}")


def _common_actions(parser):
    """The options of `meta`, which takes the common options and nothing else."""
    meta = parser._subparsers._group_actions[0].choices["meta"]
    return [a for a in meta._actions if a.option_strings and a.dest != "help"]


def _round_trip(parser):
    given = [arg for a in _common_actions(parser) for arg in (a.option_strings[-1], *_sample(a))]
    args = parser.parse_args(["incubate", "--all", "--parallel", "2", *given])
    child = parser.parse_args(["incubate", "--module", "0", *cli.common_argv(args)])
    return args, child


def test_every_common_option_reaches_the_parallel_children():
    parser = cli.build_parser()
    assert len(_common_actions(parser)) >= 17
    args, child = _round_trip(parser)
    for action in _common_actions(parser):
        assert getattr(child, action.dest) == getattr(args, action.dest) != action.default, action.option_strings


def test_every_common_option_is_a_field_of_the_run_spec():
    """The children's command lines are rebuilt from a RunSpec: an option added to the parser
    without its field would never reach them."""
    from incubation import pipeline
    dests = {a.dest for a in _common_actions(cli.build_parser())}
    from incubation.recipe import OPTIONS
    assert dests == set(pipeline.option_fields("meta")) | {f.name for f in OPTIONS}
    incubate = cli.build_parser()._subparsers._group_actions[0].choices["incubate"]
    assert set(pipeline.option_fields("incubate")) <= {a.dest for a in incubate._actions}
