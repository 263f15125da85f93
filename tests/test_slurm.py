"""The slurm launcher (incubation.launch.slurm): its pure parts here, then job graphs of small
python commands on the single-node cluster of scripts/slurm-up.sh (the `slurm_cluster` fixture)."""
import json
import os
import subprocess
import sys
import time

import pytest

from incubation.errors import IncubationError
from incubation.launch import Job, Resources
from incubation.launch import slurm_status as st
from incubation.launch.slurm import SlurmLauncher, SlurmOptions, StageOptions, sbatch_parameters, stage_options, submission_order
from incubation.launch.slurm_task import exit_record_path, master_port

# ---------------------------------------------------------------- without a cluster


def test_master_port_differs_for_array_neighbours_and_restarts():
    ports = {master_port(job, restart) for job in range(1000, 1300) for restart in range(4)}
    assert len(ports) == 300 * 4
    assert all(20000 <= p < 60000 for p in ports)
    assert master_port(1000, 0) != master_port(1000, 1)  # a requeued run meets no stale store


@pytest.mark.parametrize("text, seconds", [("90", 5400), ("5:30", 330), ("2:00:01", 7201), ("1-0", 86400),
                                           ("1-2:3", 93780), ("2-00:00:10", 172810), ("0:00", 0)])
def test_slurm_times(text, seconds):
    assert st.slurm_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "1:2:3:4", "-5", "1h"])
def test_slurm_time_refused(text):
    with pytest.raises(ValueError, match="not a Slurm time"):
        st.slurm_seconds(text)


def _job(name, needs=(), array=None, **kw):
    return Job(name, [sys.executable, "-c", "pass"], f"/tmp/{name}.log", needs=list(needs), array=array, **kw)


def test_submission_order_groups_an_array_after_what_it_needs():
    jobs = [_job("report", ["e2e", "assemble"]), _job("e2e"), _job("assemble", ["incubate-0", "incubate-1"]),
            _job("incubate-0", ["meta"], "incubate"), _job("incubate-1", ["meta"], "incubate"), _job("meta")]
    order = [[j.name for j in group] for group in submission_order(jobs, ())]
    assert order[:2] == [["e2e"], ["meta"]] or order[:2] == [["meta"], ["e2e"]]
    assert order.index(["incubate-0", "incubate-1"]) < order.index(["assemble"]) < order.index(["report"])


def test_submission_order_splits_an_array_whose_needs_differ():
    jobs = [_job("a"), _job("x-0", ["a"], "x"), _job("x-1", [], "x")]
    assert sorted(len(g) for g in submission_order(jobs, ())) == [1, 1, 1]
    assert [len(g) for g in submission_order(jobs[1:2] + jobs[2:], ["a"])] == [1, 1]


def test_submission_order_refuses_cycles_and_unknown_needs():
    with pytest.raises(ValueError, match="cycle: a, b"):
        submission_order([_job("a", ["b"]), _job("b", ["a"])], ())
    with pytest.raises(ValueError, match="unknown jobs: meta"):
        submission_order([_job("a", ["meta"])], ())
    assert [[j.name for j in g] for g in submission_order([_job("a", ["meta"])], ["meta"])] == [["a"]]


def test_sbatch_parameters_options_over_resources():
    job = _job("meta", resources=Resources(nodes=1, tasks_per_node=2, cpus_per_task=3))
    p = sbatch_parameters(job, SlurmOptions(), 60, "afterok:7")
    assert (p["nodes"], p["ntasks_per_node"], p["cpus_per_task"], p["dependency"]) == (1, 2, 3, "afterok:7")
    assert "gpus_per_node" not in p and p["additional_parameters"] == {"kill-on-invalid-dep": "yes", "requeue": True}
    opts = SlurmOptions(partition="gpu", account="vit", qos="high", time="2-00:00:00", nodes=4, gpus_per_node=8,
                        cpus_per_task=10, mem="400G", constraint="h100", extra=(("mail-type", "END"),))
    p = sbatch_parameters(job, opts, 2880)
    assert (p["nodes"], p["gpus_per_node"], p["ntasks_per_node"], p["cpus_per_task"]) == (4, 8, 8, 10)  # a task per GPU
    assert (p["partition"], p["account"], p["qos"], p["constraint"], p["time"]) == ("gpu", "vit", "high", "h100", 2880)
    assert p["additional_parameters"]["mem"] == "400G" and p["additional_parameters"]["mail-type"] == "END"
    assert "dependency" not in p


def test_stage_options_per_stage_over_the_default():
    options = StageOptions(SlurmOptions(nodes=4, gpus_per_node=8, time="48:00:00", extra=(("a", "1"),)),
                           {"incubate": SlurmOptions(nodes=1, extra=(("b", "2"),))})
    inc = options.for_job(_job("incubate-3", array="incubate"))
    assert (inc.nodes, inc.gpus_per_node, inc.time, inc.extra) == (1, 8, "48:00:00", (("a", "1"), ("b", "2")))
    assert options.for_job(_job("meta")).nodes == 4


def test_stage_options_from_the_command_line():
    stages = ("meta", "incubate", "assemble")
    options = stage_options({"nodes": ["4", "incubate:1"], "time": ["48:00:00", "incubate:12:00:00"],
                             "gpus_per_node": ["8"], "partition": ["gpu"], "constraint": ["a100|h100"],
                             "slurm_option": ["mail-type=END", "incubate:exclusive=user"], "mem": None}, stages)
    assert options.default == SlurmOptions(partition="gpu", time="48:00:00", nodes=4, gpus_per_node=8,
                                           constraint="a100|h100", extra=(("mail-type", "END"),))
    inc = options.for_job(_job("incubate-0", array="incubate"))
    assert (inc.nodes, inc.time, inc.gpus_per_node, inc.extra) == (1, "12:00:00", 8, (("mail-type", "END"), ("exclusive", "user")))
    with pytest.raises(ValueError, match="--nodes 'e2e:2': want a number"):
        stage_options({"nodes": ["e2e:2"]}, stages)  # e2e is not a stage of this graph
    with pytest.raises(ValueError, match="--slurm-option 'mail-type': want KEY=VALUE"):
        stage_options({"slurm_option": ["mail-type"]}, stages)
    with pytest.raises(ValueError, match="slurm options: 'meta' is not a Slurm time"):
        stage_options({"time": ["incubate:meta"]}, stages)


@pytest.mark.parametrize("kw, match", [({"time": "soon"}, "not a Slurm time"), ({"nodes": 0}, "nodes must be"),
                                       ({"gpus_per_node": -1}, "gpus-per-node must be"),
                                       ({"extra": (("--mem", "1G"),)}, "without dashes")])
def test_slurm_options_refuse_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        SlurmOptions(**kw)


def test_state_of_a_job_slurm_has_forgotten_comes_from_its_exit_record(tmp_path):
    out = tmp_path / "run"
    folder = st.slurm_folder(str(out))
    os.makedirs(folder)
    log = out / "meta" / "log.txt"
    log.parent.mkdir()
    log.write_text("starting\nValueError: bad thing\n")
    (out / "meta" / "metrics.jsonl").write_text('{"step": 5, "loss": 2.5}\n{"step": 10, "loss": 1.25, "acc": 50}\n')
    st.save_record(str(out), {n: {"job_id": i, "log": str(log), "needs": [], "array": None, "submitted": ""}
                              for n, i in (("meta", "7"), ("incubate-0", "8_0"), ("assemble", "9"))})
    with open(exit_record_path(folder, "7"), "w") as f:
        json.dump({"returncode": 1, "started": 100.0, "ended": 130.5, "restart": 0}, f)
    with open(exit_record_path(folder, "8_0"), "w") as f:
        json.dump({"returncode": 0, "started": 100.0, "ended": 101.0, "restart": 1}, f)
    rows = {r.name: r for r in st.status(str(out), rows={})}
    assert (rows["meta"].state, rows["meta"].reason, rows["meta"].elapsed) == ("failed", "exit 1", 30.5)
    assert rows["meta"].last_line == "ValueError: bad thing"
    assert rows["meta"].metric == "step 10, loss 1.25, acc 50"
    assert rows["incubate-0"].state == "done"
    assert rows["assemble"].state == "cancelled"
    # while Slurm remembers a job, its word wins over a stale record of an earlier run
    rows = {r.name: r for r in st.status(str(out), rows={"7": ("PENDING", "BeginTime", 0), "8_0": ("RUNNING", "None", 65)})}
    assert (rows["meta"].state, rows["meta"].reason) == ("pending", "BeginTime")
    assert (rows["incubate-0"].state, rows["incubate-0"].elapsed) == ("running", 65)
    lines = st.format_status(list(rows.values())).splitlines()
    assert lines[0].split()[:4] == ["meta", "7", "pending", "(BeginTime)"] and "0:01:05" in lines[1]


def test_a_damaged_record_is_named(tmp_path):
    (tmp_path / "jobs.json").write_text("{not json")
    with pytest.raises(IncubationError, match="jobs.json is not a job record"):
        st.load_record(str(tmp_path))


# ---------------------------------------------------------------- on the test cluster

PY = sys.executable
STAMP = "import os, time, pathlib; pathlib.Path({path!r}).write_text(f'{{time.time()}} ' + os.environ['RANK'])\n"


def _cmd(out, name, code, needs=(), array=None, **kw):
    return Job(name, [PY, "-c", code], str(out / name / "log.txt"), needs=list(needs), array=array, **kw)


def _graph(out, fail=None, incubations=3, meta_code=""):
    """meta (2 ranks) -> incubate-0..K-1 (an array) -> assemble: each writes when it ran; the job
    named `fail` exits 3 after printing why."""
    def code(name):
        if name == fail:
            return "import sys; print('working'); print(f'bad input in {sys.argv}', flush=True); sys.exit(3)"
        return STAMP.format(path=str(out / f"{name}.ran")) + (meta_code if name == "meta" else "")
    names = [f"incubate-{i}" for i in range(incubations)]
    meta_env = ("import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], 'local',"
                " os.environ['LOCAL_RANK'], 'port', os.environ['MASTER_PORT'], 'addr', os.environ['MASTER_ADDR'],"
                " 'restart', os.environ.get('SLURM_RESTART_COUNT', '0'), 'job', os.environ['SLURM_JOB_ID'])\n")
    return ([_cmd(out, "meta", meta_env + code("meta"), resources=Resources(tasks_per_node=2))]
            + [_cmd(out, n, code(n), ["meta"], "incubate") for n in names]
            + [_cmd(out, "assemble", code("assemble"), names)])


def _wait(out, timeout_s=120):
    return {r.name: r for r in st.wait(str(out), poll_s=0.5, timeout_s=timeout_s)}


def _ran(out, name):
    return float((out / f"{name}.ran").read_text().split()[0])


@pytest.mark.slurm
def test_graph_runs_in_order_with_one_array(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    ids = SlurmLauncher(str(out)).launch(_graph(out))
    arrays = {ids[f"incubate-{i}"].split("_")[0] for i in range(3)}
    assert len(arrays) == 1 and [ids[f"incubate-{i}"].split("_")[1] for i in range(3)] == ["0", "1", "2"]
    rows = _wait(out)
    assert {r.state for r in rows.values()} == {"done"}
    assert max(_ran(out, "meta"), 0) < min(_ran(out, f"incubate-{i}") for i in range(3))
    assert max(_ran(out, f"incubate-{i}") for i in range(3)) < _ran(out, "assemble")
    # two tasks for meta: rank 0 wrote the log, with the distributed variables from the job
    line = (out / "meta" / "log.txt").read_text().split()
    assert line[:6] == ["rank", "0", "of", "2", "local", "0"]
    assert int(line[7]) == master_port(int(ids["meta"]), 0) and line[9] == "localhost"
    record = st.load_record(str(out))
    assert [record[n]["job_id"] for n in ids] == list(ids.values())


@pytest.mark.slurm
def test_failed_job_cancels_its_dependents_and_a_rerun_submits_what_is_left(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    first = SlurmLauncher(str(out)).launch(_graph(out, fail="incubate-1"))
    rows = _wait(out)
    assert (rows["incubate-1"].state, rows["incubate-1"].reason) == ("failed", "exit 3")
    assert rows["incubate-1"].last_line.startswith("bad input in")
    assert (rows["assemble"].state, rows["assemble"].reason) == ("cancelled", "DependencyNeverSatisfied")
    assert not (out / "assemble.ran").exists()
    assert {rows[n].state for n in ("meta", "incubate-0", "incubate-2")} == {"done"}
    # after the fix: only what is left
    done = [r.name for r in rows.values() if r.state == "done"]
    left = [j for j in _graph(out) if j.name not in done]
    second = SlurmLauncher(str(out)).launch(left, done)
    assert sorted(second) == ["assemble", "incubate-1"]
    rows = _wait(out)
    assert {r.state for r in rows.values()} == {"done"}
    assert _ran(out, "incubate-1") < _ran(out, "assemble")
    record = st.load_record(str(out))
    assert record["meta"]["job_id"] == first["meta"] and record["incubate-1"]["job_id"] == second["incubate-1"]


RESUMABLE = """
import os, sys, time, pathlib
ckpt = pathlib.Path({ckpt!r})
start = int(ckpt.read_text()) if ckpt.exists() else 0
print('start at', start, 'restart', os.environ.get('SLURM_RESTART_COUNT', '0'), flush=True)
for step in range(start, 24):
    time.sleep(0.2)
    tmp = ckpt.with_suffix('.tmp'); tmp.write_text(str(step + 1)); os.replace(tmp, ckpt)
print('finished', ckpt.read_text(), flush=True)
"""


@pytest.mark.slurm
@pytest.mark.parametrize("how", [["scontrol", "requeue"],  # by hand, or a preempting scheduler
                                 ["scancel", "--signal=USR2"]])  # what Slurm sends before the time limit
def test_requeued_job_resumes_from_its_checkpoint(slurm_cluster, tmp_path, how):
    out = tmp_path / "run"
    ckpt = out / "steps.txt"
    ids = SlurmLauncher(str(out)).launch([_cmd(out, "meta", RESUMABLE.format(ckpt=str(ckpt)))])
    deadline = time.monotonic() + 60
    while not (ckpt.exists() and int(ckpt.read_text()) >= 4):
        assert time.monotonic() < deadline, "the job did not make progress"
        time.sleep(0.2)
    subprocess.run([*how, ids["meta"]], check=True)
    rows = _wait(out)
    assert rows["meta"].state == "done"
    log = (out / "meta" / "log.txt").read_text().splitlines()
    starts = [line.split() for line in log if line.startswith("start at")]
    assert len(starts) == 2 and starts[0][2:] == ["0", "restart", "0"]
    assert int(starts[1][2]) >= 4 and starts[1][3:] == ["restart", "1"]  # resumed, not started over
    assert log[-1] == "finished 24"


@pytest.mark.slurm
def test_impossible_request_is_refused_at_once_and_nothing_is_left(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    options = StageOptions(stages={"incubate": SlurmOptions(cpus_per_task=4096)})
    with pytest.raises(IncubationError) as info:
        SlurmLauncher(str(out), options).launch(_graph(out))
    message = str(info.value)
    assert "\n" not in message and message.startswith("Slurm refused incubate (")
    assert "--cpus-per-task=4096" in message and "More processors requested than permitted" in message
    assert not (out / "jobs.json").exists()
    deadline = time.monotonic() + 60
    while True:  # meta, submitted before incubate was refused, is cancelled (it may have started)
        squeue = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%j|%T|%o"],
                                capture_output=True, text=True, check=True).stdout.splitlines()
        mine = [line.rsplit("|", 1)[0] for line in squeue if str(out) in line]  # submitted from this out dir
        if mine != ["meta|COMPLETING"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mine == ["meta|CANCELLED"]


@pytest.mark.slurm
def test_status_cancel_and_no_second_copy_of_a_running_graph(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    jobs = _graph(out, meta_code="time.sleep(120)\n", incubations=2)
    ids = SlurmLauncher(str(out)).launch(jobs)
    deadline = time.monotonic() + 60
    while (rows := {r.name: r for r in st.status(str(out))})["meta"].state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert {rows[n].state for n in ("incubate-0", "incubate-1", "assemble")} == {"pending"}
    assert rows["assemble"].reason == "Dependency"
    with pytest.raises(IncubationError, match=f"meta is still running as Slurm job {ids['meta']}; "
                                              f"incubate-0 is still pending as Slurm job {ids['incubate-0']}"):
        SlurmLauncher(str(out)).launch(_graph(out, incubations=2))
    assert st.load_record(str(out))["meta"]["job_id"] == ids["meta"]  # the refused launch recorded nothing
    cancelled = st.cancel(str(out))
    assert sorted(r.name for r in cancelled) == sorted(ids)
    rows = _wait(out, timeout_s=60)
    assert {r.state for r in rows.values()} == {"cancelled"}
    assert not (out / "assemble.ran").exists()
