"""`incubation expand` (LEMON) and `incubation grow` (Apollo) end to end."""
import pytest
import torch

from incubation import VisionTransformer, ViTConfig
from incubation.growth import apollo_schedule
from incubation.train.checkpoint import load_checkpoint, save_checkpoint


def test_expand_preserves_the_function(run_cli, source_checkpoint, tmp_path, capsys):
    source = source_checkpoint()
    assert run_cli("expand", tmp_path / "src", "-o", tmp_path / "big", "--embed-dim", "48", "--depth", "3") == 0
    printed = capsys.readouterr().out
    assert "32x2 -> 48x3" in printed and "max |logit difference|" in printed
    state, md = load_checkpoint(tmp_path / "big")
    assert md["stage"] == "expand" and md["max_abs_logit_diff_float64"] < 1e-10
    big = VisionTransformer(ViTConfig.from_dict(md["target_config"]))
    big.load_state_dict(state)
    x = torch.randn(4, 3, 14, 14)
    torch.testing.assert_close(big.eval()(x), source.eval()(x), atol=1e-4, rtol=1e-4)


def test_expand_errors(run_cli, source_checkpoint, tmp_path, capsys):
    source_checkpoint()
    assert run_cli("expand", tmp_path / "src", "-o", tmp_path / "x", "--embed-dim", "16") == 1
    assert "LEMON only expands" in capsys.readouterr().err
    save_checkpoint(str(tmp_path / "mod"), {"w": torch.zeros(1)}, {"stage": "incubate", "target_config": {}})
    assert run_cli("expand", tmp_path / "mod", "-o", tmp_path / "y", "--depth", "3") == 1
    assert "holds no whole model" in capsys.readouterr().err
    assert run_cli("expand", tmp_path / "missing", "-o", tmp_path / "z") == 1
    # an output prefix that names a directory would write <dir>/.safetensors: refused
    assert run_cli("expand", tmp_path / "src", "-o", f"{tmp_path}/", "--depth", "3") == 2
    assert "argument -o/--output: expected a file prefix" in capsys.readouterr().err
    assert not (tmp_path / ".safetensors").exists()


def test_grow_trains_and_exports_a_plain_vit(tiny, run_cli, folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("grow", "--data", folder, "--out", out, "--stages", "1,2,4", "--switch", "0.2,0.5", "--epochs", "2",
                   *tiny) == 0
    assert "grow (Apollo): eval acc" in capsys.readouterr().out
    _, run = load_checkpoint(out / "grow" / "final")
    assert (run["stages"], run["switch_steps"]) == ([1, 2, 4], [2, 6])   # 12 steps
    state, md = load_checkpoint(out / "grow" / "model")
    cfg = ViTConfig.from_dict(md["target_config"])
    model = VisionTransformer(cfg)
    model.load_state_dict(state)  # a plain VisionTransformer of the target depth
    blocks = [torch.cat([p.flatten() for p in b.parameters()]) for b in model.blocks]
    assert len(blocks) == cfg.depth
    assert len({tuple(b[:8].tolist()) for b in blocks}) > 1  # grown blocks have diverged


def test_grow_defaults_to_apollos_schedule_and_checks_the_options(tiny, run_cli, folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("grow", "--data", folder, "--out", out, "--epochs", "3", *tiny) == 0
    _, run = load_checkpoint(out / "grow" / "final")
    # depth 8: 1/12, 1/4, 1/2, 1 of it; switches after 5, 10 and 25 % of the 18 steps
    assert (run["stages"], run["switch_steps"]) == ([1, 2, 4, 8], [1, 2, 5])
    assert apollo_schedule(8, 18) == ([1, 2, 4, 8], [1, 2, 5])
    assert run_cli("grow", "--data", folder, "--out", tmp_path / "x", "--switch", "0.1,0.2", *tiny) == 2
    assert "argument --switch: needs --stages" in capsys.readouterr().err
    assert run_cli("grow", "--data", folder, "--out", tmp_path / "x", "--stages", "1,8", "--switch", "0.1,0.2",
                   *tiny) == 2
    assert "2 fractions for the 1 switches" in capsys.readouterr().err
    assert run_cli("grow", "--data", folder, "--out", tmp_path / "x", "--switch", "0.3,0.2", *tiny) == 2
    assert "expected increasing comma-separated numbers in (0, 1)" in capsys.readouterr().err
    assert run_cli("grow", "--data", folder, "--out", tmp_path / "x", "--stages", "1,2,4", "--epochs", "3",
                   *tiny) == 2   # apollo sets its own stages: said with the CLI's names, not the API's
    err = capsys.readouterr().err
    assert "argument --stages: --schedule apollo (the default) sets the stages itself (1,2,4,8 at depth 8); " \
           "for --stages 1,2,4 give --schedule even or --switch" in err
    assert "schedule='" not in err and "switch_steps" not in err


def test_initial_checkpoint_starts_e2e_and_grow_and_is_refused_elsewhere(tiny, run_cli, folder, tmp_path, capsys):
    source = tmp_path / "src"
    cfg = ViTConfig(img_size=28, patch_size=7, in_chans=3, num_classes=5, embed_dim=64, depth=8, num_heads=4)
    torch.manual_seed(3)
    save_checkpoint(str(source), VisionTransformer(cfg).state_dict(), {"stage": "e2e", "target_config": cfg.to_dict()})
    out = tmp_path / "run"
    # 28 px -> 14 px: pos_embed resampled; 5 classes -> 3: the head stays fresh (with a warning)
    with pytest.warns(UserWarning, match="head is for 5 classes, the model's for 3"):
        assert run_cli("e2e", "--data", folder, "--out", out, "--initial-checkpoint", source, "--epochs", "0.2",
                       *tiny) == 0
    _, md = load_checkpoint(out / "e2e" / "final")
    assert md["initial_checkpoint"] == str(source)
    with pytest.warns(UserWarning, match="head is for 5 classes"):
        assert run_cli("grow", "--data", folder, "--out", out, "--initial-checkpoint", source, "--epochs", "3",
                       *tiny) == 0
    assert run_cli("assemble", "--data", folder, "--out", out, "--initial-checkpoint", source, *tiny) == 2
    assert "`assemble` builds its model from the previous stages" in capsys.readouterr().err
    assert run_cli("e2e", "--data", folder, "--out", tmp_path / "y", "--initial-checkpoint", tmp_path / "nothing",
                   *tiny) == 1
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err
