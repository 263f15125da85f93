"""`incubation expand` (LEMON) and `incubation grow` (Apollo) end to end."""
import pytest
import torch

from incubation import VisionTransformer, ViTConfig, cli
from incubation.train.checkpoint import load_checkpoint, save_checkpoint

from test_cli import TINY, _cli


def _source_checkpoint(tmp_path, stage="e2e"):
    cfg = ViTConfig(img_size=14, patch_size=7, in_chans=3, num_classes=3, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    key = "meta_config" if stage == "meta" else "target_config"
    save_checkpoint(str(tmp_path / "src"), model.state_dict(), {"stage": stage, key: cfg.to_dict()})
    return model


def test_expand_preserves_the_function(tmp_path, capsys):
    source = _source_checkpoint(tmp_path)
    assert _cli("expand", tmp_path / "src", "-o", tmp_path / "big", "--embed-dim", "48", "--depth", "3") == 0
    printed = capsys.readouterr().out
    assert "32x2 -> 48x3" in printed and "max |logit difference|" in printed
    state, md = load_checkpoint(tmp_path / "big")
    assert md["stage"] == "expand" and md["max_abs_logit_diff_float64"] < 1e-10
    big = VisionTransformer(ViTConfig.from_dict(md["target_config"]))
    big.load_state_dict(state)
    x = torch.randn(4, 3, 14, 14)
    torch.testing.assert_close(big.eval()(x), source.eval()(x), atol=1e-4, rtol=1e-4)


def test_expand_errors(tmp_path, capsys):
    _source_checkpoint(tmp_path)
    assert _cli("expand", tmp_path / "src", "-o", tmp_path / "x", "--embed-dim", "16") == 1
    assert "LEMON only expands" in capsys.readouterr().err
    save_checkpoint(str(tmp_path / "mod"), {"w": torch.zeros(1)}, {"stage": "incubate", "target_config": {}})
    assert _cli("expand", tmp_path / "mod", "-o", tmp_path / "y", "--depth", "3") == 1
    assert "holds no whole model" in capsys.readouterr().err
    assert _cli("expand", tmp_path / "missing", "-o", tmp_path / "z") == 1
    # an output prefix that names a directory would write <dir>/.safetensors: refused
    assert _cli("expand", tmp_path / "src", "-o", f"{tmp_path}/", "--depth", "3") == 2
    assert "argument -o/--output: expected a file prefix" in capsys.readouterr().err
    assert not (tmp_path / ".safetensors").exists()


def test_grow_trains_and_exports_a_plain_vit(folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli("grow", "--data", folder, "--out", out, "--stages", "1,2,4", "--epochs", "2", *TINY) == 0
    assert "grow (Apollo): eval acc" in capsys.readouterr().out
    state, md = load_checkpoint(out / "grow" / "model")
    cfg = ViTConfig.from_dict(md["target_config"])
    model = VisionTransformer(cfg)
    model.load_state_dict(state)  # a plain VisionTransformer of the target depth
    blocks = [torch.cat([p.flatten() for p in b.parameters()]) for b in model.blocks]
    assert len(blocks) == cfg.depth
    assert len({tuple(b[:8].tolist()) for b in blocks}) > 1  # grown blocks have diverged
