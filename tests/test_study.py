"""incubation bench study: budgets matched in FLOPs for every method, the report's arithmetic, and
a miniature study run end to end (parallel job processes, resume, refusal of other settings)."""
import collections
import dataclasses
import json
import os

import pytest

from incubation import bench, deep, pipeline
from incubation.bench import assembly, study
from incubation.bench.study_report import markdown
from incubation.launch import check_graph
from incubation.presets import get_preset
from incubation.train import epochs_to_steps
from incubation.train.checkpoint import load_checkpoint

# one budget, two seeds (the std over seeds): each stage is a process (~7 CPU-s, mostly imports), so
# the budget sweep's report is checked on made-up points (test_the_report_of_a_budget_sweep)
MINI = ["--depth", "4", "--width", "16", "--heads", "2", "--K", "2", "--budgets", "2", "--seeds", "2",
        "--limit-train", "768", "--limit-eval", "128", "--val-size", "256", "--no-progress"]


def _apollo_flops(target, steps, seed, batch=128):
    """Training FLOPs of an Apollo run: full-depth cost of each step's sampled depth."""
    model = study._apollo(target, steps, seed)
    depths = collections.Counter(model.depth_at(s) for s in range(steps))   # (integer FLOPs: exact sums)
    return sum(n * 3 * target.replace(depth=d).flops_per_image() * batch for d, n in depths.items())


def _steps(spec, stage, num_train):
    return epochs_to_steps(spec.stage_recipes[stage]["epochs"], num_train, 128)


def _method_flops(cfg, specs, method, seed, num_train):
    """Training FLOPs a method will spend at a point, from its runs' epochs and its models' own FLOP
    counts (independent of the plan's arithmetic)."""
    target, batch, K = cfg.target(), 128, cfg.K
    meta = deep.build_meta_model(target, K)
    if method in study.DEEP_VARIANTS:
        run = specs[method]
        per_image = [(3 * meta.flops_per_image(), _steps(specs["deep"], "meta", num_train))]
        per_image += [(deep.build_hybrid(meta, target, i).train_flops_per_image(), _steps(run, "incubate", num_train))
                      for i in range(K)]
        per_image += [(3 * target.flops_per_image(), _steps(run, "assemble", num_train))]
    elif method == "lemon":
        small = target.replace(depth=cfg.depth // 2, embed_dim=cfg.width // 2, num_heads=cfg.heads // 2)
        per_image = [(3 * small.flops_per_image(), _steps(specs["lemon-small"], "e2e", num_train)),
                     (3 * target.flops_per_image(), _steps(specs["lemon"], "_lemon", num_train))]
    elif method == "apollo":
        return _apollo_flops(target, _steps(specs["apollo"], "grow", num_train), seed, batch)
    else:
        per_image = [(3 * target.flops_per_image(), _steps(specs["e2e"], "e2e", num_train))]
    return sum(f * steps * batch for f, steps in per_image)


@pytest.mark.parametrize("budgets", [[0.5, 1, 2, 4], [0.3, 7]])
def test_every_method_gets_the_budget_in_flops(budgets, tmp_path):
    cfg = study.StudyConfig(budgets=budgets, seeds=2)
    num_train = 60000
    unit = 3 * cfg.target().flops_per_image() * num_train
    for budget, seed in cfg.runs():
        specs = study.point_specs(cfg, str(tmp_path), num_train, budget, seed)
        assert set(specs) == {*study.METHODS, "lemon-small"}
        for method in cfg.methods:
            spent = _method_flops(cfg, specs, method, seed, num_train)
            assert spent == pytest.approx(budget * unit, rel=0.02), (method, budget)
    assert cfg.runs() == [(b, 0) for b in sorted(budgets)[:-1]] + [(max(budgets), 0), (max(budgets), 1)]


def test_the_study_graph_is_the_pipelines(tmp_path):
    cfg = study.StudyConfig(depth=4, width=16, heads=2, K=2, budgets=[1, 2], seeds=1)
    out = str(tmp_path)
    jobs, done = study.plan(cfg, out, 768, python="py")
    assert not done and len(check_graph(jobs)) == len(jobs)   # no cycle, no unknown need
    needs = {j.name: list(j.needs) for j in jobs}
    point = [n.replace("/b2-s0/", "/*/") for n in needs if "/b2-s0/" in n]
    assert point == ["deep/*/meta", "deep/*/incubate-0", "deep/*/incubate-1", "deep/*/assemble",
                     "deep-lemon/*/incubate-0", "deep-lemon/*/incubate-1", "deep-lemon/*/assemble",
                     "deep-metatrain/*/incubate-0", "deep-metatrain/*/incubate-1", "deep-metatrain/*/assemble",
                     "lemon-small/*/e2e", "lemon/*/lemon", "apollo/*/grow", "e2e/*/e2e"]
    assert needs["deep-lemon/b1-s0/incubate-1"] == ["deep/b1-s0/meta"]
    assert needs["deep-lemon/b1-s0/assemble"] == ["deep-lemon/b1-s0/incubate-0", "deep-lemon/b1-s0/incubate-1"]
    assert needs["lemon/b1-s0/lemon"] == ["lemon-small/b1-s0/e2e"] and needs["e2e/b1-s0/e2e"] == []
    argv = {j.name: j.argv for j in jobs}
    incubate = argv["deep-lemon/b1-s0/incubate-1"]
    assert incubate[:6] == ["py", "-m", "incubation.cli", "incubate", "--module", "1"]
    assert _option(incubate, "--meta-from") == os.path.join(out, "deep", "b1-s0")
    assert _option(incubate, "--init") == "lemon" and _option(incubate, "--evals") == "1"
    assert float(_option(argv["deep/b1-s0/meta"], "--epochs")) == pytest.approx(3 * float(_option(incubate, "--epochs")))
    assert _option(argv["e2e/b1-s0/e2e"], "--epochs") == "1.0"   # E2E: the budget itself
    assert argv["apollo/b1-s0/grow"][2:4] == ["incubation.cli", "grow"]
    assert argv["lemon/b1-s0/lemon"][2:4] == ["incubation.bench.study", "_lemon"]
    assert _option(argv["lemon-small/b1-s0/e2e"], "--depth") == "2"
    # some of the methods: their jobs only, with the meta model that the Deep Incubation variants share
    jobs, _ = study.plan(dataclasses.replace(cfg, methods=["deep-lemon", "e2e"]), str(tmp_path / "some"), 768)
    assert [j.name for j in jobs if "/b1-s0/" in j.name] == [
        "deep/b1-s0/meta", "deep-lemon/b1-s0/incubate-0", "deep-lemon/b1-s0/incubate-1", "deep-lemon/b1-s0/assemble",
        "e2e/b1-s0/e2e"]
    # a finished stage is left out, and named as done
    os.makedirs(os.path.join(out, "deep", "b1-s0", "meta"))
    with open(os.path.join(out, "deep", "b1-s0", "meta", "final.json"), "w") as f:
        f.write('{"metadata": {"K": 2, "sizes": [2, 2]}}')
    jobs, done = study.plan(cfg, out, 768, python="py")
    assert done == {"deep/b1-s0/meta"} and "deep/b1-s0/meta" not in {j.name for j in jobs}
    check_graph(jobs, done)


def _option(argv, flag):
    return argv[argv.index(flag) + 1]


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


def test_the_report_of_a_budget_sweep():
    """summarise and markdown over two budgets (seed 0 at 1, two seeds at 2), on made-up points: a
    row per budget, E2E's FLOPs for the same accuracy along E2E's curve, the cost to reach E2E's top."""
    cfg = study.StudyConfig(budgets=[1, 2], seeds=2, methods=["e2e", "deep"])
    made_up = {("e2e", 1.0, 0): (80.0, 10.0, 4.0), ("e2e", 2.0, 0): (84.0, 20.0, 8.0), ("e2e", 2.0, 1): (86.0, 20.0, 10.0),
               ("deep", 1.0, 0): (83.0, 10.0, 3.0), ("deep", 2.0, 0): (86.0, 20.0, 6.0), ("deep", 2.0, 1): (88.0, 20.0, 6.0)}
    points = [{"method": m, "budget": b, "seed": s, "acc": acc, "test_acc": acc - 1, "flops": flops, "wall_s": 2 * wall,
               "wall_s_k_machines": wall} for (m, b, s), (acc, flops, wall) in made_up.items()]
    summary = study.summarise(cfg, points)
    e2e, incubated = summary["e2e"], summary["deep"]
    assert [(r["budget"], r["seeds"], r["acc"], r["flops"]) for r in e2e["curve"]] == [(1.0, 1, 80.0, 10.0), (2.0, 2, 85.0, 20.0)]
    assert e2e["curve"][0]["acc_std"] is None and e2e["curve"][1]["acc_std"] == pytest.approx(2 ** 0.5)
    assert e2e["curve"][1]["test_acc"] == 84.0 and e2e["curve"][1]["wall_s_k_machines"] == 9.0
    # deep's 83 % at budget 1: E2E gets there at 10 + 3/5 x 10 = 16 FLOPs; its 87 % is beyond E2E's curve
    assert incubated["curve"][0]["e2e_flops_ratio"] == {"cost": pytest.approx(16.0), "bound": "=", "ratio": pytest.approx(1.6)}
    assert incubated["curve"][1]["e2e_flops_ratio"] is None
    # E2E's 85 % at budget 2: deep's curve reaches it half way, at 15 FLOPs and 4.5 s on K machines
    assert incubated["to_e2e_acc"]["flops"] == {"cost": pytest.approx(15.0), "bound": "=", "speedup": pytest.approx(20 / 15)}
    assert incubated["to_e2e_acc"]["wall_s_k_machines"]["speedup"] == pytest.approx(9.0 / 4.5)
    assert e2e["to_e2e_acc"]["flops"]["speedup"] == pytest.approx(1.0)
    md = markdown({"config": dataclasses.asdict(cfg), "budget_unit_flops": 10.0, "summary": summary})
    assert "| method | 1 ep | 2 ep |" in md
    assert "| Deep Incubation | 83.00 (1.60x) | 87.00 ± 1.41 (beyond E2E's curve) |" in md
    assert "| E2E | 80.00 | 85.00 ± 1.41 |" in md
    # without E2E among the methods: no comparison with it, and the tables still come out
    alone = dataclasses.replace(cfg, methods=["deep"])
    summary = study.summarise(alone, [p for p in points if p["method"] == "deep"])
    assert list(summary) == ["deep"] and "to_e2e_acc" not in summary["deep"]
    md = markdown({"config": dataclasses.asdict(alone), "budget_unit_flops": 10.0, "summary": summary})
    assert "| Deep Incubation | 83.00 | 87.00 ± 1.41 |" in md


@pytest.mark.parametrize("changes, message", [
    (dict(budgets=[1, -2]), "budgets must be positive"),
    (dict(depth=5), "must be even"),
    (dict(methods=["e2e", "magic"]), "methods must be some of"),
    (dict(seeds=0), "seeds must be a positive integer"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        study.StudyConfig(**changes)


@pytest.fixture(scope="module")
def mini_study(tmp_path_factory):
    """The CI miniature run once, CPU results made repeatable: eager ops (no measured kernel choice)
    and one thread in every job (CPU results depend on the thread count)."""
    out = str(tmp_path_factory.mktemp("mini") / "study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INCUBATION_BACKEND", "eager")
        mp.setenv("OMP_NUM_THREADS", "1")
        assert study.main(["run", "--out", out, "--parallel", "2", *MINI]) == 0
    return out


def test_miniature_study_end_to_end(mini_study):
    out = mini_study
    result = json.load(open(os.path.join(out, "study.json")))
    cfg = study.StudyConfig(**result["config"])
    unit = result["budget_unit_flops"]
    points = {(p["method"], p["budget"], p["seed"]): p for p in result["points"]}
    assert set(points) == {(m, b, s) for m in study.METHODS for b, s in [(2.0, 0), (2.0, 1)]}
    for (method, budget, seed), p in points.items():
        # the budget is met to within the rounding of each stage's steps (one step per stage)
        stages = [pipeline.read_stage(d) for d in study.method_dirs(cfg, out, method, budget, seed)]
        assert abs(p["flops"] - budget * unit) <= sum(s["flops"] / s["steps"] for s in stages), (method, budget)
        assert 0 <= p["acc"] <= 100 and p["wall_s"] > 0
        assert 0 <= p["test_acc"] <= 100   # the final model, on the test split (the curves use validation)
    # Deep Incubation's cost is the sum of its stages, its accuracy the assembled model's
    dirs = study.method_dirs(cfg, out, "deep", 2.0, 1)
    stages = [pipeline.read_stage(d) for d in dirs]
    assert points[("deep", 2.0, 1)]["flops"] == pytest.approx(sum(s["flops"] for s in stages))
    assert points[("deep", 2.0, 1)]["acc"] == stages[-1]["eval_acc"]
    assert points[("deep", 2.0, 1)]["wall_s_k_machines"] < points[("deep", 2.0, 1)]["wall_s"]
    top = result["summary"]["e2e"]["curve"][-1]
    assert top["seeds"] == 2 and top["acc_std"] is not None
    assert result["summary"]["e2e"]["to_e2e_acc"]["flops"]["speedup"] == pytest.approx(1.0)
    md = open(os.path.join(out, "study.md")).read()
    assert all(name in md for name in study.METHODS.values())
    assert "| method | val top-1 % | test top-1 % |" in md and "validation split of 256 held-out" in md
    metatrain = study.method_dirs(cfg, out, "deep-metatrain", 2.0, 1)
    assert metatrain[0] == dirs[0]   # the variants share the meta model
    assert load_checkpoint(os.path.join(metatrain[2], "final"))[1]["meta_mode"] == "train"
    assert open(os.path.join(out, "study.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # the assembly diagnosis: every mix of meta blocks and modules; all of them = the assembled
    # model that the assembly stage evaluated before its first step
    meta, *modules, assembled = [os.path.join(d, "final") for d in dirs]
    found = assembly.diagnose(meta, modules, study.data(cfg, out).eval_set)
    step0 = json.loads(open(os.path.join(dirs[-1], "metrics.jsonl")).readline())
    assert step0["step"] == 0 and found["assembled"] == pytest.approx(step0["eval_acc"])
    assert found["hybrid"] == pytest.approx([s["eval_acc"] for s in stages[1:-1]])   # each hybrid's own final eval
    assert len(found["all_but"]) == cfg.K and 0 <= found["meta"] <= 100


def _weights(path):
    return load_checkpoint(path)[0]


def _same_weights(path, state):
    mine = _weights(path)
    assert mine.keys() == state.keys() and all(mine[k].equal(state[k]) for k in mine), path


def test_the_study_trains_what_each_method_alone_would(mini_study, tmp_path):
    """Each method at the point (budget 2, seed 1), trained here by direct calls of the training API
    as the study did before its jobs became pipeline stages (its data: the held-out split, then
    768 / 128 random images drawn with seed 0 whatever the run's seed; its steps: the stage's
    record; the tiny preset's recipe, evaluated once), gives bit-identical weights."""
    import torch

    from incubation.data import holdout
    from incubation.growth import lemon_config, lemon_expand, train_apollo
    from incubation.nn import VisionTransformer
    from incubation.train import train
    out, threads = mini_study, torch.get_num_threads()
    cfg = study._load_config(out)
    train_set, eval_set = holdout("fashion-mnist", cfg.val_size, data_dir=cfg.data_dir)
    data = [torch.utils.data.Subset(d, torch.randperm(len(d), generator=torch.Generator().manual_seed(0))[:n].tolist())
            for d, n in ((train_set, cfg.limit_train), (eval_set, cfg.limit_eval))]
    target, K, n = cfg.target(), cfg.K, len(data[0])

    def config(stage, directory, lemon=False):
        recipe = dataclasses.replace(get_preset("tiny").recipe(stage), evals=1)
        c = recipe.train_config(n, pipeline.read_stage(directory)["steps"], seed=1, progress=False, checkpoint_every=100)
        return lemon_config(c) if lemon else c

    def here(name):
        return str(tmp_path / name)
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("INCUBATION_BACKEND", "eager")
            meta, *incubations, assembled = study.method_dirs(cfg, out, "deep", 2.0, 1)
            deep.train_meta(target, K, *data, config("meta", meta), here("meta"))
            _same_weights(os.path.join(meta, "final"), _weights(here("meta/final")))
            for method, (init, meta_mode) in study.DEEP_VARIANTS.items():
                _, *incubations, assembled = study.method_dirs(cfg, out, method, 2.0, 1)
                for i, directory in enumerate(incubations):
                    deep.train_module(here("meta/final"), target, i, *data, config("incubate", directory, init == "lemon"),
                                      here(f"{method}-{i}"), init=init, meta_mode=meta_mode)
                    _same_weights(os.path.join(directory, "final"), _weights(here(f"{method}-{i}/final")))
                deep.train_assembled(target, [here(f"{method}-{i}/final") for i in range(K)], *data,
                                     config("assemble", assembled), here(method), meta_checkpoint=here("meta/final"))
                _same_weights(os.path.join(assembled, "final"), _weights(here(f"{method}/final")))
            (e2e,) = study.method_dirs(cfg, out, "e2e", 2.0, 1)
            deep.train_e2e(target, *data, config("e2e", e2e), here("e2e"))
            _same_weights(os.path.join(e2e, "final"), _weights(here("e2e/final")))
            small_dir, lemon = study.method_dirs(cfg, out, "lemon", 2.0, 1)
            small_cfg = target.replace(depth=cfg.depth // 2, embed_dim=cfg.width // 2, num_heads=cfg.heads // 2)
            deep.train_e2e(small_cfg, *data, config("e2e", small_dir), here("small"))
            small = VisionTransformer(small_cfg)
            small.load_state_dict(_weights(here("small/final")))
            big = lemon_expand(small, embed_dim=target.embed_dim, depth=target.depth, num_heads=target.num_heads, seed=1)
            train(big, *data, config("e2e", lemon, lemon=True), here("lemon"), stage="lemon")
            _same_weights(os.path.join(lemon, "final"), _weights(here("lemon/final")))
            (apollo,) = study.method_dirs(cfg, out, "apollo", 2.0, 1)
            train_apollo(target, *data, config("e2e", apollo), here("apollo"), stage="apollo")
            _same_weights(os.path.join(apollo, "model.safetensors"), _weights(here("apollo/model.safetensors")))
    finally:
        torch.set_num_threads(threads)


def test_a_rerun_skips_finished_stages_and_redoes_a_lost_one(mini_study, capsys):
    out = mini_study
    cfg = study._load_config(out)
    lost = study.method_dirs(cfg, out, "deep-lemon", 2.0, 1)[-1]
    before = pipeline.read_stage(lost)["eval_acc"]
    finals = [os.path.join(root, "final.json") for root, _, files in os.walk(out) if "final.json" in files]
    mtimes = {path: os.path.getmtime(path) for path in finals}
    for name in os.listdir(lost):
        os.remove(os.path.join(lost, name))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INCUBATION_BACKEND", "eager")
        mp.setenv("OMP_NUM_THREADS", "1")
        assert study.main(["run", "--out", out, "--parallel", "2", *MINI]) == 0  # same threads: same numbers
    assert pipeline.read_stage(lost)["eval_acc"] == before
    redone = [path for path, t in mtimes.items() if os.path.getmtime(path) != t]
    assert redone == [os.path.join(lost, "final.json")]

    # the same --out with other settings is refused, naming the difference
    capsys.readouterr()
    other = list(MINI)
    other[other.index("--seeds") + 1] = "3"
    assert study.main(["run", "--out", out, *other]) == 1
    assert "seeds: 2 -> 3" in capsys.readouterr().err


def test_incubation_bench_runs_the_study(tmp_path, capsys):
    assert bench.main(["study", "report", "--out", str(tmp_path / "none")]) == 1
    assert "study_config.json not found" in capsys.readouterr().err


def test_a_failing_job_is_named_and_its_dependents_skipped(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "study")
    args = ["run", "--out", out, *MINI[:MINI.index("--budgets")], "--budgets", "1", "--seeds", "1",
            "--methods", "deep", "--limit-train", "768", "--limit-eval", "128", "--val-size", "256", "--no-progress"]
    cfg = study.StudyConfig(depth=4, width=16, heads=2, K=2, budgets=[1], seeds=1, methods=["deep"], limit_train=768,
                            limit_eval=128, val_size=256)
    # the point's meta model, trained here (the study's jobs would do so in a process each), then damaged
    monkeypatch.setenv("INCUBATION_BACKEND", "eager")
    spec = study.point_specs(cfg, out, len(study.data(cfg, out).train_set), 1.0, 0)["deep"]
    pipeline.run_stage(spec, "meta")
    with open(os.path.join(out, "deep", "b1-s0", "meta", "final.safetensors"), "r+b") as f:
        f.truncate(100)  # the meta model the incubations read is damaged
    capsys.readouterr()
    assert study.main(args) == 1
    err = capsys.readouterr().err
    assert "study jobs failed: " in err and "Traceback" not in err   # both incubations fail, in either order
    assert "deep/b1-s0/incubate-0 (exit 1, see " in err and "deep/b1-s0/assemble (a job it needs failed)" in err
    log = open(os.path.join(out, "deep", "b1-s0", "incubate-0", "log.txt")).read()
    assert "final.safetensors" in log  # the job's own error names the damaged file
