"""incubation.pipeline: the job graph (its shape for any K and split, finished stages left out,
refusal of graphs that cannot run), the child command lines rebuilt from a RunSpec, and the ways
of running the pipeline (serial, --parallel, stage by stage, the Python API) giving the same weights."""
import dataclasses
import json
import os

import pytest

from incubation import cli, pipeline
from incubation.launch import Job, Resources, check_graph
from incubation.train.checkpoint import load_checkpoint


def _names(jobs):
    return [j.name for j in jobs]


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_the_graph_of_K_modules(K, tmp_path):
    spec = pipeline.RunSpec(out=str(tmp_path), modules=K, resources={"meta": Resources(tasks_per_node=2)})
    jobs = pipeline.jobs(spec, python="py")
    incubations = [f"incubate-{i}" for i in range(K)]
    assert _names(jobs) == ["meta", *incubations, "assemble", "e2e", "report"]
    needs = {j.name: list(j.needs) for j in jobs}
    assert needs == {"meta": [], **{n: ["meta"] for n in incubations}, "assemble": incubations, "e2e": ["assemble"],
                     "report": ["e2e"]}
    assert [j.array for j in jobs] == [None, *["incubate"] * K, None, None, None]
    assert jobs[0].resources == Resources(tasks_per_node=2) and jobs[1].resources == Resources()
    for i, job in enumerate(jobs[1:1 + K]):
        assert job.argv[:6] == ["py", "-m", "incubation.cli", "incubate", "--module", str(i)]
        assert job.log == os.path.join(str(tmp_path), f"incubate-{i}", "log.txt")
    assert check_graph(jobs) == jobs


@pytest.mark.parametrize("split", [[4, 2, 2], [1, 6, 1], [3, 5]])
def test_uneven_splits(split, tmp_path):
    spec = pipeline.RunSpec(out=str(tmp_path), split=split)
    jobs = pipeline.jobs(spec)
    assert _names(jobs)[1:-3] == [f"incubate-{i}" for i in range(len(split))]
    assert all(j.argv[j.argv.index("--split") + 1] == ",".join(map(str, split)) for j in jobs[:-1])
    with pytest.raises(ValueError, match="3 block counts for --modules 2"):
        pipeline.jobs(pipeline.RunSpec(out=str(tmp_path), split=[4, 2, 2], modules=2))


def _finish(run_dir, name, **metadata):
    os.makedirs(run_dir / name, exist_ok=True)
    (run_dir / name / "final.json").write_text(json.dumps({"metadata": metadata}))


def test_finished_stages_are_left_out(tmp_path):
    _finish(tmp_path, "meta", stage="meta", K=3, sizes=[2, 3, 3])
    _finish(tmp_path, "incubate-1", stage="incubate")
    spec = pipeline.RunSpec(out=str(tmp_path))   # K and the split come from the meta model
    assert pipeline.finished(spec) == {"meta", "incubate-1"}
    jobs = pipeline.jobs(spec)
    assert _names(jobs) == ["incubate-0", "incubate-2", "assemble", "e2e", "report"]
    assert jobs[-3].needs == ["incubate-0", "incubate-1", "incubate-2"]
    check_graph(jobs, pipeline.finished(spec))
    with pytest.raises(ValueError, match="unknown jobs: incubate-1, meta"):
        check_graph(jobs)
    with pytest.raises(ValueError, match="disagree"):
        pipeline.jobs(pipeline.RunSpec(out=str(tmp_path), modules=4))
    # a finished stage run again returns at once, before any data is loaded
    _finish(tmp_path, "e2e", stage="e2e")
    assert pipeline.run_stage(pipeline.RunSpec(out=str(tmp_path), data="folder:/nowhere"), "e2e") is None
    assert "e2e" not in _names(pipeline.jobs(spec))


def _option(argv, flag):
    return argv[argv.index(flag) + 1]


def test_runs_sharing_a_meta_model_join_into_one_graph(tmp_path):
    root = str(tmp_path)
    base = pipeline.RunSpec(out=os.path.join(root, "a"), modules=2, stage_recipes={"meta": {"epochs": 3.0}})
    variant = dataclasses.replace(base, out=os.path.join(root, "b"), init="lemon", meta_from=base.out)
    graph = (pipeline.jobs(base, python="py", stages=["meta", "incubate", "assemble"], root=root)
             + pipeline.jobs(variant, python="py", stages=["incubate", "assemble"], root=root))
    assert _names(graph) == ["a/meta", "a/incubate-0", "a/incubate-1", "a/assemble", "b/incubate-0", "b/incubate-1",
                             "b/assemble"]
    needs = {j.name: list(j.needs) for j in graph}
    assert needs["b/incubate-1"] == ["a/meta"] and needs["b/assemble"] == ["b/incubate-0", "b/incubate-1"]
    assert len(check_graph(graph)) == len(graph)   # every need is a job of the joined graph
    argv = {j.name: j.argv for j in graph}
    assert _option(argv["a/meta"], "--epochs") == "3.0" and "--epochs" not in argv["a/incubate-0"]
    assert _option(argv["b/incubate-0"], "--meta-from") == base.out and _option(argv["b/incubate-0"], "--init") == "lemon"
    assert _option(argv["b/assemble"], "--meta-from") == base.out and "--init" not in argv["b/assemble"]
    assert graph[4].log == os.path.join(root, "b", "incubate-0", "log.txt")
    # on its own, the variant has no meta job: it needs the shared one, done once it is finished
    alone = pipeline.jobs(variant)
    assert _names(alone) == ["incubate-0", "incubate-1", "assemble", "e2e", "report"]
    assert alone[0].needs == [os.path.join("..", "a", "meta")]
    _finish(tmp_path / "a", "meta", stage="meta", K=2, sizes=[2, 2])
    assert pipeline.finished(variant) == {os.path.join("..", "a", "meta")}
    assert pipeline.finished(variant, root=root) == {"a/meta"} and pipeline.num_modules(variant) == (2, [2, 2])
    check_graph(pipeline.jobs(variant), pipeline.finished(variant))
    with pytest.raises(ValueError, match="disagree"):
        pipeline.jobs(dataclasses.replace(variant, modules=3))


def test_a_stage_recipe_replaces_the_runs_in_that_stage():
    spec = pipeline.RunSpec(recipe={"epochs": 5.0, "lr": 1e-3}, stage_recipes={"e2e": {"epochs": 2.0}})
    tiny = pipeline.get_preset("tiny")
    assert pipeline.stage_recipe(spec, tiny, "meta").epochs == 5.0
    assert (pipeline.stage_recipe(spec, tiny, "e2e").epochs, pipeline.stage_recipe(spec, tiny, "e2e").lr) == (2.0, 1e-3)
    assert _option(pipeline.stage_argv(spec, "e2e"), "--epochs") == "2.0"   # given for e2e: no FLOP matching
    assert "--epochs" not in pipeline.stage_argv(dataclasses.replace(spec, stage_recipes={}), "e2e")


def test_the_target_shape_options_and_a_subset_the_seed_does_not_change():
    spec = pipeline.RunSpec(depth=2, embed_dim=16, num_heads=2, limit_train=50, limit_eval=20)
    run = pipeline.context(spec)
    assert (run.target.depth, run.target.embed_dim, run.target.num_heads, run.target.patch_size) == (2, 16, 2, (7, 7))
    other = pipeline.context(dataclasses.replace(spec, seed=3))
    assert other.train_set.indices == run.train_set.indices and other.eval_set.indices == run.eval_set.indices


def test_graphs_that_cannot_run_are_refused():
    def job(name, *needs):
        return Job(name, ["true"], "log", needs)
    with pytest.raises(ValueError, match="cycle: a, b"):
        check_graph([job("a", "b"), job("b", "a"), job("c")])
    with pytest.raises(ValueError, match="cycle: a"):
        check_graph([job("a", "a")])
    with pytest.raises(ValueError, match="unknown jobs: nowhere"):
        check_graph([job("a"), job("b", "a", "nowhere")])
    with pytest.raises(ValueError, match="named twice: a"):
        check_graph([job("a"), job("a")])
    assert _names(check_graph([job("b", "a"), job("a")])) == ["a", "b"]


def test_a_child_command_line_parses_back_to_the_spec(tmp_path):
    parser = cli.build_parser()
    spec = pipeline.RunSpec(out=str(tmp_path), data="folder:/x", modules=3, split=[1, 2, 5], model_ema=True, seed=7,
                            limit_train=9, init="lemon", meta_mode="train", no_progress=True, device="cpu",
                            depth=6, embed_dim=32, num_heads=2, checkpoint_every=5, meta_from=str(tmp_path / "other"),
                            recipe=dict(epochs=0.30000000000000004, lr=1e-3, auto_augment="none", label_smoothing=0.0,
                                        ema_decay=0.5, batch_size=3),
                            stage_recipes={"incubate": dict(epochs=0.5, evals=1), "meta": dict(lr=2e-3)})
    for stage, module in (("meta", None), ("incubate", 2), ("assemble", None)):
        argv = pipeline.stage_argv(spec, stage, module)[3:]
        parsed = cli.spec_from_args(parser.parse_args(argv))
        # the child runs one stage: its own recipe changes are its recipe; it takes only its own options
        expected = dict(spec.__dict__, recipe={**spec.recipe, **spec.stage_recipes.get(stage, {})}, stage_recipes={})
        if stage != "incubate":
            expected.update(init=None, meta_mode="eval", meta_from=spec.meta_from if stage == "assemble" else None)
        assert parsed == pipeline.RunSpec(**expected), stage
    e2e = cli.spec_from_args(parser.parse_args(pipeline.stage_argv(spec, "e2e")[3:]))
    assert "epochs" not in e2e.recipe and e2e.recipe["lr"] == 1e-3   # the baseline trains for the pipeline's FLOPs


# ----------------------------------------------------------------------------------------------
# the same weights whichever way the pipeline runs
# ----------------------------------------------------------------------------------------------
STAGES = ["meta", "incubate-0", "incubate-1", "assemble", "e2e"]


def _weights(out):
    return {s: load_checkpoint(out / s / "final")[0] for s in STAGES}


def _same(a, b):
    assert a.keys() == b.keys()
    for stage in a:
        assert a[stage].keys() == b[stage].keys()
        for k in a[stage]:
            assert a[stage][k].equal(b[stage][k]), (stage, k)


@pytest.mark.slow
def test_every_way_of_running_gives_the_same_weights(tiny_run, tiny_pipeline, run_cli, tmp_path, monkeypatch):
    """`incubation run` (serial: the shared tiny_run, eager, one thread) against --parallel 2, the
    stages one by one and the Python API, each with the same options, backend and thread count."""
    import torch
    monkeypatch.setenv("INCUBATION_BACKEND", "eager")   # no measured kernel choice between the runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")          # CPU results depend on the thread count: one for every job
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                             # and for the stages run in this process
    try:
        _run_every_way(tmp_path, run_cli, list(tiny_pipeline))
    finally:
        torch.set_num_threads(threads)
    serial = _weights(tiny_run[0])
    for other in ("parallel", "by-hand", "api"):
        _same(serial, _weights(tmp_path / other))


def _run_every_way(tmp_path, run_cli, common):
    assert run_cli("run", "--out", tmp_path / "parallel", "--parallel", "2", *common) == 0
    by_hand = tmp_path / "by-hand"
    for stage in (["meta"], ["incubate", "--module", "1"], ["incubate", "--module", "0"], ["assemble"], ["e2e"]):
        assert run_cli(*stage, "--out", by_hand, *common) == 0
    pipeline.run(cli.spec_from_args(cli.build_parser().parse_args(["run", "--out", str(tmp_path / "api"), *common])))


def test_the_recipe_options_are_generated_from_the_schema():
    from incubation.recipe import OPTIONS, Recipe
    meta = cli.build_parser()._subparsers._group_actions[0].choices["meta"]
    actions = {tuple(a.option_strings): a for a in meta._actions}   # (timm's --amp shares --amp-dtype's dest)
    for f in OPTIONS:
        action = actions[f.metadata["flags"]]
        assert action.dest == f.name and action.help == f.metadata["help"]
        assert action.default is None   # None: the preset's value
    args = meta.parse_args(["--smoothing", "0.2", "--aa", "none", "--model-ema-decay", "0.99", "-b", "4"])
    spec = cli.spec_from_args(args)
    assert spec.recipe == {"label_smoothing": 0.2, "auto_augment": "none", "ema_decay": 0.99, "batch_size": 4}
    recipe = pipeline.stage_recipe(spec, pipeline.get_preset("vit-b"), "incubate")
    assert (recipe.label_smoothing, recipe.ema_decay, recipe.batch_size, recipe.epochs) == (0.2, 0.99, 4, 100)
    assert recipe.augment().auto_augment is None and recipe.augment().re_prob == 0.25
    assert Recipe().augment() == pipeline.get_preset("tiny").augment


def test_min_lr_is_timms_absolute_floor_of_the_cosine():
    import torch
    from timm.scheduler import CosineLRScheduler

    from incubation.train import lr_at
    args = cli.build_parser().parse_args(["meta", "--min-lr", "3e-5", "--lr", "1e-3", "-b", "512", "--epochs", "4",
                                          "--warmup-epochs", "0"])
    spec = cli.spec_from_args(args)
    assert "--min-lr" in pipeline.stage_argv(spec, "assemble")
    cfg = pipeline.stage_recipe(spec, pipeline.get_preset("tiny"), "meta").train_config(num_train=1024)
    assert (cfg.min_lr, cfg.lr, cfg.steps, cfg.warmup_steps) == (3e-5, 1e-3, 8, 0)   # absolute, not x batch / 512
    timm_sched = CosineLRScheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr),
                                   t_initial=cfg.steps, lr_min=cfg.min_lr)
    ours = [lr_at(s, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=0, decay_steps=cfg.steps) for s in range(cfg.steps + 1)]
    theirs = [timm_sched._get_lr(s)[0] for s in range(cfg.steps + 1)]
    assert ours == pytest.approx(theirs, rel=1e-12) and ours[-1] == pytest.approx(3e-5)
    assert cli.main(["meta", "--min-lr", "-1"]) == 2
