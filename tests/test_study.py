"""incubation bench study: budgets matched in FLOPs for every method, the report's arithmetic, and
a miniature study run end to end (parallel job processes, resume, refusal of other settings)."""
import json
import os

import pytest

from incubation import bench, deep
from incubation.bench import assembly, study
from incubation.train.checkpoint import load_checkpoint

MINI = ["--depth", "4", "--width", "16", "--heads", "2", "--K", "2", "--budgets", "1,2", "--seeds", "2",
        "--limit-train", "768", "--limit-eval", "128", "--val-size", "256", "--no-progress"]


def _apollo_flops(target, steps, seed, batch=128):
    """Training FLOPs of an Apollo run: full-depth cost of each step's sampled depth."""
    model = study._apollo(target, steps, seed)
    return sum(3 * target.replace(depth=model.depth_at(s)).flops_per_image() * batch for s in range(steps))


def _planned_flops(cfg, job, num_train):
    """Training FLOPs a job will spend, from its model's own FLOP count (independent of the plan)."""
    target, batch = cfg.target(), 128
    meta = deep.build_meta_model(target, cfg.K)
    if job.stage == "meta":
        per_image = 3 * meta.flops_per_image()
    elif job.stage.startswith("incubate-"):
        per_image = deep.build_hybrid(meta, target, int(job.stage.split("-")[2])).train_flops_per_image()
    elif job.stage == "lemon-small":
        per_image = 3 * target.replace(depth=cfg.depth // 2, embed_dim=cfg.width // 2,
                                       num_heads=cfg.heads // 2).flops_per_image()
    elif job.stage == "apollo":
        return _apollo_flops(target, job.steps, job.seed, batch)
    else:  # e2e, lemon (the expanded target), assemble-*
        per_image = 3 * target.flops_per_image()
    return per_image * job.steps * batch


@pytest.mark.parametrize("budgets", [[0.5, 1, 2, 4], [0.3, 7]])
def test_every_method_gets_the_budget_in_flops(budgets):
    cfg = study.StudyConfig(budgets=budgets, seeds=2)
    num_train = 60000
    jobs = study.plan_jobs(cfg, num_train)
    unit = 3 * cfg.target().flops_per_image() * num_train
    assert len({j.name for j in jobs}) == len(jobs)
    for budget, seed in cfg.runs():
        for method in cfg.methods:
            mine = [j for j in jobs if j.budget == budget and j.seed == seed
                    and j.stage in study.method_stages(method, cfg.K)]
            assert len(mine) == len(study.method_stages(method, cfg.K))
            spent = sum(_planned_flops(cfg, j, num_train) for j in mine)
            assert spent == pytest.approx(budget * unit, rel=0.02), (method, budget)
    assert cfg.runs() == [(b, 0) for b in sorted(budgets)[:-1]] + [(max(budgets), 0), (max(budgets), 1)]


def test_apollo_steps_are_the_most_that_fit():
    target = study.StudyConfig().target()
    flops = 2 * 3 * target.flops_per_image() * 60000
    steps = study._apollo_steps(target, flops, 128, 0)
    assert _apollo_flops(target, steps, 0) <= flops < _apollo_flops(target, steps + 1, 0)
    assert steps > 2 * 60000 / 128  # shallower sampled depths buy more steps than E2E's


def test_cost_to_reach_interpolates_along_the_curve():
    curve = [{"acc": 80.0, "flops": 1.0}, {"acc": 84.0, "flops": 2.0}, {"acc": 86.0, "flops": 4.0}]
    assert study._cost_to_reach(curve, 85.0, "flops") == {"cost": 3.0, "bound": "="}
    assert study._cost_to_reach(curve, 79.0, "flops") == {"cost": 1.0, "bound": "<="}
    assert study._cost_to_reach(curve, 90.0, "flops") is None


@pytest.mark.parametrize("changes, message", [
    (dict(budgets=[1, -2]), "budgets must be positive"),
    (dict(depth=5), "must be even"),
    (dict(methods=["e2e", "magic"]), "methods must be some of"),
    (dict(seeds=0), "seeds must be a positive integer"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        study.StudyConfig(**changes)


def test_miniature_study_end_to_end_and_resume(tmp_path, capsys):
    out = str(tmp_path / "study")
    assert study.main(["run", "--out", out, "--parallel", "2", *MINI]) == 0
    result = json.load(open(os.path.join(out, "study.json")))
    cfg = study.StudyConfig(**result["config"])
    unit = result["budget_unit_flops"]
    points = {(p["method"], p["budget"], p["seed"]): p for p in result["points"]}
    assert set(points) == {(m, b, s) for m in study.METHODS for b, s in [(1.0, 0), (2.0, 0), (2.0, 1)]}
    for (method, budget, seed), p in points.items():
        # the budget is met to within the rounding of each stage's steps (one step per stage)
        stages = [json.load(open(os.path.join(out, s, study._tag(budget, seed), "result.json")))
                  for s in study.method_stages(method, cfg.K)]
        assert abs(p["flops"] - budget * unit) <= sum(s["flops"] / s["steps"] for s in stages), (method, budget)
        assert 0 <= p["acc"] <= 100 and p["wall_s"] > 0
        assert 0 <= p["test_acc"] <= 100   # the final model, on the test split (the curves use validation)
    # Deep Incubation's cost is the sum of its stages, its accuracy the assembled model's
    tag = "b2-s1"
    stages = [json.load(open(os.path.join(out, s, tag, "result.json")))
              for s in study.method_stages("deep", cfg.K)]
    assert points[("deep", 2.0, 1)]["flops"] == pytest.approx(sum(s["flops"] for s in stages))
    assert points[("deep", 2.0, 1)]["acc"] == stages[-1]["acc"]
    assert points[("deep", 2.0, 1)]["wall_s_k_machines"] < points[("deep", 2.0, 1)]["wall_s"]
    top = result["summary"]["e2e"]["curve"][-1]
    assert top["seeds"] == 2 and top["acc_std"] is not None
    assert result["summary"]["e2e"]["to_e2e_acc"]["flops"]["speedup"] == pytest.approx(1.0)
    md = open(os.path.join(out, "study.md")).read()
    assert all(name in md for name in study.METHODS.values())
    assert "| method | val top-1 % | test top-1 % |" in md and "validation split of 256 held-out" in md
    _, meta_md = load_checkpoint(os.path.join(out, "incubate-metatrain-1", tag, "final"))
    assert meta_md["meta_mode"] == "train"
    assert open(os.path.join(out, "study.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the assembly diagnosis: every mix of meta blocks and modules; all of them = the assembled
    # model that the assembly stage evaluated before its first step
    modules = [os.path.join(out, f"incubate-random-{i}", tag, "final") for i in range(cfg.K)]
    found = assembly.diagnose(os.path.join(out, "meta", tag, "final"), modules, study._datasets(cfg)[1])
    step0 = json.loads(open(os.path.join(out, "assemble-random", tag, "metrics.jsonl")).readline())
    assert step0["step"] == 0 and found["assembled"] == pytest.approx(step0["eval_acc"])
    assert found["hybrid"] == pytest.approx([s["acc"] for s in stages[1:-1]])   # each hybrid's own final eval
    assert len(found["all_but"]) == cfg.K and 0 <= found["meta"] <= 100

    # a second run finds everything done; a lost job is redone alone, to the same result
    lost = os.path.join(out, "assemble-lemon", tag)
    before = json.load(open(os.path.join(lost, "result.json")))
    mtimes = {j.name: os.path.getmtime(os.path.join(out, j.name, "result.json"))
              for j in study.plan_jobs(cfg, 768)}
    for name in os.listdir(lost):
        os.remove(os.path.join(lost, name))
    assert study.main(["run", "--out", out, "--parallel", "2", *MINI]) == 0  # same threads: same numbers
    assert json.load(open(os.path.join(lost, "result.json")))["acc"] == before["acc"]
    redone = [n for n, t in mtimes.items() if os.path.getmtime(os.path.join(out, n, "result.json")) != t]
    assert redone == [f"assemble-lemon/{tag}"]

    # the same --out with other settings is refused, naming the difference
    capsys.readouterr()
    other = list(MINI)
    other[other.index("--seeds") + 1] = "3"
    assert study.main(["run", "--out", out, *other]) == 1
    assert "seeds: 2 -> 3" in capsys.readouterr().err


def test_incubation_bench_runs_the_study(tmp_path, capsys):
    assert bench.main(["study", "report", "--out", str(tmp_path / "none")]) == 1
    assert "study_config.json not found" in capsys.readouterr().err


def test_a_failing_job_is_named_and_its_dependents_skipped(tmp_path, capsys):
    out = str(tmp_path / "study")
    args = ["run", "--out", out, *MINI[:MINI.index("--budgets")], "--budgets", "1", "--seeds", "1",
            "--methods", "deep", "--limit-train", "768", "--limit-eval", "128", "--val-size", "256", "--no-progress"]
    assert study.main(args) == 0
    for job in ("incubate-random-0/b1-s0", "assemble-random/b1-s0"):
        os.remove(os.path.join(out, job, "result.json"))
    with open(os.path.join(out, "meta", "b1-s0", "final.safetensors"), "r+b") as f:
        f.truncate(100)  # the meta model the incubation reads is damaged
    capsys.readouterr()
    assert study.main(args) == 1
    err = capsys.readouterr().err
    assert "study jobs failed: incubate-random-0/b1-s0 (exit 1, see " in err and "Traceback" not in err
    assert "assemble-random/b1-s0 (a job it needs failed)" in err
    log = open(os.path.join(out, "incubate-random-0", "b1-s0", "log.txt")).read()
    assert "final.safetensors" in log  # the job's own error names the damaged file
