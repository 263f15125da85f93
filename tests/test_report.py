"""incubation report on run dirs written by hand: the verdict's margin, evaluation-set size and
noise rule, the busy-machine warning, the next steps, and the plots."""
import dataclasses
import json
import math

import pytest

from incubation.report import write_report
from incubation.train import TrainConfig


def _stage(run, name, acc, wall_s, flops, eval_images=None, **metadata):
    d = run / name
    d.mkdir(parents=True)
    (d / "final.json").write_text(json.dumps({"metadata": {"stage": name.split("-")[0], "eval_acc": acc,
                                                            "step": 10, **metadata}}))
    lines = [{"step": 0, "eval_acc": acc / 2, "flops": 0.0, "wall_s": 0.0, "images": 0},
             {"step": 10, "eval_acc": acc, "flops": flops, "wall_s": wall_s, "images": 640, "eval_loss": 1.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if eval_images is not None:   # what the CLI records (the report reads these fields)
        config = {"recipe": {"epochs": 1.0}, "train_config": dataclasses.asdict(TrainConfig()),
                  "augment": {"auto_augment": None, "re_prob": 0.0}, "model": {"drop_path_rate": 0.0},
                  "data": {"name": "fashion-mnist", "train_images": 640, "eval_images": eval_images, "eval_split": "test"},
                  "versions": {"commit": None}}
        (d / "config.json").write_text(json.dumps(config))


def _run(tmp_path, di_acc, e2e_acc, eval_images=10000, incubation_times=(10.0, 11.0)):
    run = tmp_path / "run"
    _stage(run, "meta", 70.0, 30.0, 3e12, K=2)
    for i, t in enumerate(incubation_times):
        _stage(run, f"incubate-{i}", 75.0, t, 1e12, module=i)
    _stage(run, "assemble", di_acc, 10.0, 1e12, eval_images)
    _stage(run, "e2e", e2e_acc, 60.0, 6e12, eval_images)
    return run


def _se(a, b, n):
    return 100 * math.sqrt((a / 100 * (1 - a / 100) + b / 100 * (1 - b / 100)) / n)


def test_a_margin_beyond_noise_names_the_winner_with_margin_and_set_size(tmp_path):
    run = _run(tmp_path, 82.0, 80.0)          # 2 points on 10000 images: se 0.55
    write_report(str(run))
    md = (run / "report.md").read_text()
    assert "**Deep Incubation won**: 82.00 % against 80.00 %" in md
    assert f"a margin of 2.00 points on 10000 evaluation images (standard error {_se(82, 80, 10000):.2f} points)" in md
    assert "## Next" in md and "`incubation incubate --module i`" in md


def test_a_margin_within_the_standard_error_is_no_clear_winner(tmp_path):
    run = _run(tmp_path, 80.5, 80.0)          # 0.5 points on 10000 images: within se 0.56
    write_report(str(run))
    md = (run / "report.md").read_text()
    assert "**No clear winner**: Deep Incubation reached 80.50 % against 80.00 %" in md
    assert "won**" not in md
    assert "within the noise of 10000 evaluation images" in md


@pytest.mark.parametrize("n", [50, 200])
def test_a_one_image_difference_is_never_a_win(tmp_path, n):
    run = _run(tmp_path, 100.0, 100.0 - 100 / n, eval_images=n)   # se of 100 % and 99 % is tiny; one image is not
    write_report(str(run))
    assert "**No clear winner**" in (run / "report.md").read_text()


def test_end_to_end_winner_points_at_the_assembly_diagnosis(tmp_path):
    run = _run(tmp_path, 70.0, 80.0)
    write_report(str(run))
    md = (run / "report.md").read_text()
    assert "**End-to-end training won**: 80.00 % against 70.00 %" in md and "--init lemon" in md


def test_without_config_the_margin_is_stated_and_the_set_size_is_unknown(tmp_path):
    run = _run(tmp_path, 82.0, 80.0, eval_images=None)
    write_report(str(run))
    md = (run / "report.md").read_text()
    assert "a margin of 2.00 points" in md and "evaluation-set size is unknown" in md and "won**" not in md


def test_varied_stage_times_flag_the_wall_clock(tmp_path):
    calm = _run(tmp_path / "a", 82.0, 80.0, incubation_times=(69.0, 80.0))
    busy = _run(tmp_path / "b", 82.0, 80.0, incubation_times=(69.0, 642.0))
    write_report(str(calm))
    write_report(str(busy))
    assert "Wall-clock is unreliable" not in (calm / "report.md").read_text()
    assert "the incubations did the same work in 69 to 642 s" in (busy / "report.md").read_text()


def test_plots_have_titles_final_values_and_the_k_machine_curve(tmp_path, monkeypatch):
    import matplotlib.axes

    titles, notes, labels = [], [], []
    for name, store, pick in (("set_title", titles, lambda a, k: a[0]), ("annotate", notes, lambda a, k: a[0]),
                              ("plot", labels, lambda a, k: k.get("label"))):
        original = getattr(matplotlib.axes.Axes, name)

        def spy(self, *a, _orig=original, _store=store, _pick=pick, **k):
            _store.append(_pick(a, k))
            return _orig(self, *a, **k)
        monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    run = _run(tmp_path, 82.0, 80.0)
    report = write_report(str(run))
    assert titles == ["Eval accuracy vs training cost", "Eval accuracy vs wall-clock (one machine, and K)",
                      "Wall time per stage"]
    assert notes.count("82.00 %") == 3 and notes.count("80.00 %") == 2   # K-machine curve ends at DI's value too
    assert "deep incubation, K machines" in labels
    di = report["summary"]["deep incubation"]
    assert di["wall_s_parallel"] == 30.0 + 11.0 + 10.0 and di["wall_s"] == 30.0 + 21.0 + 10.0


def test_top5_is_reported_per_stage_and_per_method(tmp_path):
    """timm's second metric: the stage table and the method table carry eval top-5 beside top-1,
    from each stage's final.json ('-' where a stage recorded none)."""
    run = tmp_path / "run"
    _stage(run, "meta", 70.0, 30.0, 3e12, K=1)
    _stage(run, "incubate-0", 75.0, 10.0, 1e12, module=0)
    _stage(run, "assemble", 82.0, 10.0, 1e12, 10000, eval_top5=98.25)
    _stage(run, "e2e", 80.0, 60.0, 6e12, 10000, eval_top5=97.5)
    report = write_report(str(run))
    md = (run / "report.md").read_text()
    assert "| stage | steps | images | train TFLOP | wall s | eval acc % | eval top-5 % | eval loss |" in md
    assert "| assemble | 10 | 640 | 1.000 | 10.0 | 82.00 | 98.25 | - |" in md
    assert "| meta | 10 | 640 | 3.000 | 30.0 | 70.00 | - | - |" in md
    assert "| deep incubation | 82.00 | 98.25 |" in md and "| end to end | 80.00 | 97.50 |" in md
    assert report["summary"]["end to end"]["top5"] == 97.5
