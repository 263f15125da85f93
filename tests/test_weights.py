"""incubation.weights: weights from every common file format into our ViT, pos-embed resampling,
head replacement, and the import of the Deep Incubation authors' checkpoints (built here in
their exact layout: 'model_stages' with local block indices, 'model' with every tensor twice)."""
import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from incubation import VisionTransformer, ViTConfig, cli, deep, ops
from incubation.official import import_official
from incubation.train import TrainConfig
from incubation.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from incubation.weights import (
    OFFICIAL_MODELS,
    load_into,
    load_state_dict_file,
    official_config,
    read_official,
    resample_pos_embed,
)

EMBED, HEADS, PATCH, IMG, CHANS, CLASSES = 48, 3, 8, 32, 3, 5
GRID = IMG // PATCH


# ----------------------------------------------------------------------------------------------
# the authors' format, written the way their utils.save_model writes it
# ----------------------------------------------------------------------------------------------
def _official_stages(sizes, *, qkv_bias=True, classes=CLASSES, embed=EMBED, patch=PATCH, img=IMG, seed=0):
    """The per-stage state_dicts of their ViT (divided_depths = sizes): stage 0 owns the stem,
    the last stage the final norm and head, blocks under local indices."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    stages = []
    for i, n in enumerate(sizes):
        sd = {}
        if i == 0:
            sd["pos_embed"] = rnd(1, (img // patch) ** 2 + 1, embed, scale=0.2)
            sd["cls_token"] = rnd(1, 1, embed, scale=0.2)
            sd["patch_embed.proj.weight"] = rnd(embed, CHANS, patch, patch)
            sd["patch_embed.proj.bias"] = rnd(embed)
        for j in range(n):
            b = f"blocks.{j}."
            for norm in ("norm1", "norm2"):
                sd[b + norm + ".weight"], sd[b + norm + ".bias"] = 1 + rnd(embed, scale=0.2), rnd(embed, scale=0.2)
            sd[b + "attn.qkv.weight"] = rnd(3 * embed, embed, scale=0.15)
            if qkv_bias:
                sd[b + "attn.qkv.bias"] = rnd(3 * embed)
            sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rnd(embed, embed, scale=0.15), rnd(embed)
            sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rnd(4 * embed, embed, scale=0.15), rnd(4 * embed)
            sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rnd(embed, 4 * embed, scale=0.1), rnd(embed)
        if i == len(sizes) - 1:
            sd["norm.weight"], sd["norm.bias"] = 1 + rnd(embed, scale=0.2), rnd(embed, scale=0.2)
            sd["head.weight"], sd["head.bias"] = rnd(classes, embed, scale=0.3), rnd(classes)
        stages.append(sd)
    return stages


def _official_model_state(stages):
    """Their model.state_dict(): cls_token / pos_embed, then every tensor again under
    stages.<i>..., then patch_embed, blocks.<global n>, norm and head (the same tensors)."""
    s0, last = stages[0], stages[-1]
    sd = {"cls_token": s0["cls_token"], "pos_embed": s0["pos_embed"]}
    for i, stage in enumerate(stages):
        sd.update({f"stages.{i}.{k}": v for k, v in stage.items()})
    sd.update({k: v for k, v in s0.items() if k.startswith("patch_embed.")})
    offset = 0
    for stage in stages:
        n = len({k.split(".")[1] for k in stage if k.startswith("blocks.")})
        for k, v in stage.items():
            if k.startswith("blocks."):
                _, j, rest = k.split(".", 2)
                sd[f"blocks.{offset + int(j)}.{rest}"] = v
        offset += n
    sd.update({k: v for k, v in last.items() if k.split(".")[0] in ("norm", "head")})
    return sd


def _save_official(path, stages, entries="both"):
    """A checkpoint as their save_model writes it (with optimizer, scheduler, epoch, scaler)."""
    ckpt = {"model": _official_model_state(stages), "model_stages": stages,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                          "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.05, "params": [0]}]},
            "lr_scheduler": {"t_initial": 300, "warmup_t": 20, "noise_range_t": None, "base_values": [1e-3]},
            "epoch": 299, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}}
    if entries == "stages":      # a released model file: only what their fine-tuning reads
        ckpt = {"model_stages": stages}
    elif entries == "model":     # written before their save_model fix: 'model_stages' is []
        ckpt["model_stages"] = []
    torch.save(ckpt, path)
    return str(path)


def _reference_logits(stages, x, *, eps):
    """Their VisionTransformer.forward, written out from the stage dicts (float64)."""
    stages = [{k: v.double() for k, v in s.items()} for s in stages]
    s0, last = stages[0], stages[-1]
    t = F.conv2d(x, s0["patch_embed.proj.weight"], s0["patch_embed.proj.bias"], stride=PATCH)
    t = torch.cat([s0["cls_token"].expand(len(x), -1, -1), t.flatten(2).transpose(1, 2)], 1) + s0["pos_embed"]
    for sd in stages:
        for j in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
            def p(name):
                return sd.get(f"blocks.{j}.{name}")
            h = F.layer_norm(t, (EMBED,), p("norm1.weight"), p("norm1.bias"), eps)
            B, N, C = h.shape
            q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(
                B, N, 3, HEADS, C // HEADS).permute(2, 0, 3, 1, 4)
            attn = (q @ k.transpose(-2, -1) * (C // HEADS) ** -0.5).softmax(-1)
            t = t + F.linear((attn @ v).transpose(1, 2).reshape(B, N, C), p("attn.proj.weight"), p("attn.proj.bias"))
            h = F.layer_norm(t, (EMBED,), p("norm2.weight"), p("norm2.bias"), eps)
            t = t + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))),
                             p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    t = F.layer_norm(t, (EMBED,), last["norm.weight"], last["norm.bias"], eps)
    return F.linear(t[:, 0], last["head.weight"], last["head.bias"])


def _logits(model, x):
    model = model.double().eval()
    with torch.no_grad(), ops.use_backend("eager"):
        return model(x)


def _images(n=3, img=IMG, seed=1):
    return torch.randn(n, CHANS, img, img, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _model_from(path):
    state, md = load_checkpoint(path)
    key = "meta_config" if md["stage"] == "meta" else "target_config"
    model = VisionTransformer(ViTConfig.from_dict(md[key]))
    model.load_state_dict(state)
    return model, md


# ----------------------------------------------------------------------------------------------
# import_official
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_bias,eps", [(True, 1e-6), (False, 1e-5)], ids=["base-like", "huge-like"])
@pytest.mark.parametrize("entries", ["both", "stages", "model"])
def test_import_official_whole_model_gives_the_reference_logits(tmp_path, qkv_bias, eps, entries):
    stages = _official_stages([2, 1, 2, 1], qkv_bias=qkv_bias)
    src = _save_official(tmp_path / "finished_checkpoint.pth", stages, entries)
    result = import_official(src, tmp_path / "imported", num_heads=HEADS, norm_eps=eps)
    assert result.kind == "model" and result.sizes == [2, 1, 2, 1] and result.K == 4
    assert result.source == ("model" if entries == "model" else "model_stages")
    model, md = _model_from(tmp_path / "imported")
    c = model.config
    assert (c.embed_dim, c.depth, c.num_heads, c.patch_size, c.img_size, c.num_classes) == \
        (EMBED, 6, HEADS, (PATCH, PATCH), (IMG, IMG), CLASSES)
    assert (c.qkv_bias, c.norm_eps, c.mlp_ratio) == (qkv_bias, eps, 4.0)
    assert md["stage"] == "import" and md["source"] == os.path.abspath(src)
    assert md["source_format"] == "deep-incubation" and md["official_sizes"] == [2, 1, 2, 1]
    theirs = "model_stages[2].blocks.1.mlp.fc1.weight" if entries != "model" else "model.blocks.4.mlp.fc1.weight"
    assert md["keys"]["blocks.4.mlp.fc1.weight"] == theirs
    assert set(md["keys"]) == set(model.state_dict())
    x = _images()
    torch.testing.assert_close(_logits(model, x), _reference_logits(stages, x, eps=eps), rtol=1e-12, atol=1e-12)


def test_import_official_meta_model_is_what_incubation_starts_from(tmp_path):
    stages = _official_stages([1, 1, 1, 1])
    src = _save_official(tmp_path / "PT.pth", stages)
    target_depth = 8
    result = import_official(src, tmp_path / "run" / "meta" / "final", num_heads=HEADS, norm_eps=1e-6,
                             target_depth=target_depth)
    assert result.kind == "meta" and result.K == 4 and result.sizes == [2, 2, 2, 2]
    target = result.target
    assert target.depth == target_depth and target.replace(depth=4) == result.config
    meta, md, sha = deep.load_meta(tmp_path / "run" / "meta" / "final", target)
    x = _images()
    torch.testing.assert_close(_logits(meta, x), _reference_logits(stages, x, eps=1e-6), rtol=1e-12, atol=1e-12)

    # the same metadata keys and values as a meta model trained here (deep.train_meta)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, CHANS, IMG, IMG, generator=g), torch.randint(0, CLASSES, (8,), generator=g))
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-3, device="cpu", progress=False)
    deep.train_meta(target, 4, data, None, cfg, tmp_path / "trained")
    trained = load_checkpoint(tmp_path / "trained" / "final")[1]
    for key in ("stage", "K", "sizes", "target_config", "meta_config"):
        assert md[key] == trained[key], key

    # incubation starts from it: the hybrid builds and module i trains against the imported meta model
    for i in range(4):
        hybrid = deep.build_hybrid(meta, target, i, md["sizes"])
        assert _logits(hybrid, x).shape == (3, CLASSES)
    meta.float()
    deep.train_module(tmp_path / "run" / "meta" / "final", target, 1, data, None, cfg, tmp_path / "run" / "incubate-1")
    incubated = load_checkpoint(tmp_path / "run" / "incubate-1" / "final")[1]
    assert incubated["meta_sha256"] == sha and incubated["K"] == 4

    # a meta model of a known family gets the family's target depth
    with pytest.raises(ValueError, match="--target-depth"):
        import_official(src, tmp_path / "x", num_heads=HEADS, norm_eps=1e-6)
    # forced kinds
    whole = import_official(src, tmp_path / "as-model", num_heads=HEADS, norm_eps=1e-6, kind="model")
    assert whole.kind == "model" and load_checkpoint(tmp_path / "as-model")[1]["stage"] == "import"
    src2 = _save_official(tmp_path / "assembled.pth", _official_stages([2, 2, 2, 2]))
    with pytest.raises(ValueError, match=r"not a meta model: its stages hold \[2, 2, 2, 2\]"):
        import_official(src2, tmp_path / "y", num_heads=HEADS, norm_eps=1e-6, kind="meta", target_depth=16)
    with pytest.raises(ValueError, match="a target depth applies to meta models"):
        import_official(src2, tmp_path / "y", num_heads=HEADS, norm_eps=1e-6, target_depth=16)
    assert not list(tmp_path.glob("y.*"))     # a wrong command writes nothing


def test_import_official_resamples_to_another_image_size(tmp_path):
    stages = _official_stages([1, 1, 1, 1])
    src = _save_official(tmp_path / "m.pth", stages, "stages")
    result = import_official(src, tmp_path / "big", num_heads=HEADS, norm_eps=1e-6, img_size=48, kind="model")
    model, md = _model_from(tmp_path / "big")
    assert model.config.img_size == (48, 48) and md["pos_embed_resampled_from_grid"] == [GRID, GRID]
    assert result.config.num_patches == 36
    torch.testing.assert_close(model.pos_embed[:, :1], stages[0]["pos_embed"][:, :1], rtol=0, atol=0)
    # as the authors' main.py resamples when fine-tuning at another size
    theirs = F.interpolate(stages[0]["pos_embed"][:, 1:].reshape(1, GRID, GRID, EMBED).permute(0, 3, 1, 2),
                           size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(model.pos_embed[:, 1:], theirs.permute(0, 2, 3, 1).reshape(1, 36, EMBED))
    assert md["pos_embed_antialias"] is False
    assert _logits(model, _images(img=48)).isfinite().all()


def test_official_config_knows_the_authors_families():
    def shapes(embed, qkv_bias, patch, img, depth=1):
        z = torch.zeros(())   # shapes only: expanded scalars take no memory
        sd = {"patch_embed.proj.weight": z.expand(embed, 3, patch, patch),
              "pos_embed": z.expand(1, (img // patch) ** 2 + 1, embed), "cls_token": z.expand(1, 1, embed),
              "head.weight": z.expand(1000, embed)}
        for b in range(depth):
            sd[f"blocks.{b}.mlp.fc1.weight"] = z.expand(4 * embed, embed)
            if qkv_bias:
                sd[f"blocks.{b}.attn.qkv.bias"] = z.expand(3 * embed)
        return sd

    cfg, family = official_config(shapes(768, True, 16, 224, depth=4))
    assert family == "base" and (cfg.num_heads, cfg.norm_eps, cfg.qkv_bias, cfg.depth) == (12, 1e-6, True, 4)
    cfg, family = official_config(shapes(1024, True, 16, 224), model="vit_large_patch16_224")
    assert family == "large" and (cfg.num_heads, cfg.norm_eps) == (16, 1e-6)
    cfg, family = official_config(shapes(1280, False, 14, 224), model="vit_huge_patch14_224")
    assert family == "huge" and cfg.patch_size == (14, 14)
    assert (cfg.num_heads, cfg.norm_eps, cfg.qkv_bias) == (16, 1e-5, False)
    assert official_config(shapes(1280, False, 14, 224))[1] == "huge"    # by width
    assert official_config(shapes(768, True, 16, 224), num_heads=6)[0].num_heads == 6   # explicit wins
    with pytest.raises(ValueError, match="is not a vit_huge_patch14_224: .*qkv_bias True"):
        official_config(shapes(1280, True, 14, 224), model="vit_huge_patch14_224")
    with pytest.raises(ValueError, match="patch size"):
        official_config(shapes(768, True, 32, 224), model="vit_base_patch16_224")
    with pytest.raises(ValueError, match="--num-heads"):
        official_config(shapes(EMBED, True, 8, 32))
    with pytest.raises(ValueError, match="unknown official model"):
        official_config(shapes(768, True, 16, 224), model="deit_base")
    assert {"vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224", "base"} <= set(OFFICIAL_MODELS)


def test_read_official_refuses_inconsistent_files(tmp_path):
    stages = _official_stages([1, 1])
    good = read_official(_save_official(tmp_path / "ok.pth", stages))
    assert good.source == "model_stages" and good.sizes == [1, 1]
    assert sorted(good.entries) == ["epoch", "lr_scheduler", "model", "model_stages", "optimizer", "scaler"]
    # 'model' whose stage copies were edited apart from its own tensors
    model = _official_model_state(stages)
    model["stages.1.blocks.0.mlp.fc2.bias"] = model["stages.1.blocks.0.mlp.fc2.bias"] + 1
    torch.save({"model": model, "model_stages": []}, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=r"edited\.pth.*differ.*blocks\.1\.mlp\.fc2\.bias"):
        read_official(tmp_path / "edited.pth")
    # stem outside stage 0
    bad = _official_stages([1, 1])
    bad[1]["cls_token"] = bad[0].pop("cls_token")
    torch.save({"model_stages": bad}, tmp_path / "stray.pth")
    with pytest.raises(CheckpointError, match=r"model_stages\[1\]\.cls_token"):
        read_official(tmp_path / "stray.pth")
    torch.save({"model_stages": [], "epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="non-empty 'model_stages' or a 'model'"):
        read_official(tmp_path / "empty.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Deep Incubation checkpoint"):
        read_official(tmp_path / "other.pth")
    # int64 weights (issue 25): refused, not cast
    ints = [{k: v.long() for k, v in stage.items()} for stage in _official_stages([1, 1])]
    with pytest.raises(CheckpointError, match=r"int\.pth: tensor '.*' is int64, not floating point"):
        read_official(_save_official(tmp_path / "int.pth", ints))


# ----------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------
def test_import_official_cli(tmp_path, capsys):
    src = _save_official(tmp_path / "PT_tiny.pth", _official_stages([1, 1, 1, 1]))
    out = tmp_path / "run" / "meta" / "final"
    argv = ["import-official", src, "-o", str(out), "--num-heads", str(HEADS), "--norm-eps", "1e-6"]
    assert cli.main(argv + ["--target-depth", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "meta model" in printed and str(out) in printed
    deep.load_meta(out, ViTConfig(img_size=IMG, patch_size=PATCH, in_chans=CHANS, num_classes=CLASSES,
                                  embed_dim=EMBED, depth=8, num_heads=HEADS))
    assert cli.main(argv + ["--as", "model", "-o", str(tmp_path / "whole")]) == 0
    assert "whole model (48x4" in capsys.readouterr().out

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all" * 10)
    torch.save({"args": argparse.Namespace(lr=1), "model_stages": []}, tmp_path / "pickled.pth")
    for bad, expected in ((tmp_path / "garbage.pth", "is not a readable weights file"),
                          (tmp_path / "pickled.pth", "holds a argparse.Namespace, which is not loaded"),
                          (tmp_path / "missing.pth", "does not exist")):
        assert cli.main(["import-official", str(bad), "-o", str(tmp_path / "z"), "--num-heads", "3",
                         "--norm-eps", "1e-6"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"incubation import-official: error: {bad}") and expected in err, err
    assert cli.main(argv + ["--model", "vit_base_patch16_224"]) == 1     # width 48 is no ViT-B
    assert "is not a vit_base_patch16_224" in capsys.readouterr().err
    assert cli.main(argv + ["--as", "meta", "--target-depth", "0"]) == 2
    assert "argument --target-depth" in capsys.readouterr().err
    assert not (tmp_path / "z.safetensors").exists()


def test_imported_meta_model_runs_incubate_from_the_cli(tiny, folder, tmp_path, capsys):
    """The user's path: import the authors' meta model as <run>/meta/final, then `incubate`."""
    pytest.importorskip("torchvision")
    # the tiny preset's target on the 3-class folder at --img-size 14: 64 wide, 4 heads, patch 7, depth 8
    embed, patch, img = 64, 7, 14
    stages = _official_stages([1, 1, 1, 1], embed=embed, patch=patch, img=img, classes=3)
    src = _save_official(tmp_path / "finished_checkpoint.pth", stages)
    run = tmp_path / "run"
    assert cli.main(["import-official", src, "-o", str(run / "meta" / "final"), "--num-heads", "4",
                     "--norm-eps", "1e-6", "--target-depth", "8"]) == 0
    sha = deep.load_meta(run / "meta" / "final")[2]
    assert cli.main(["incubate", "--module", "2", "--data", folder, "--out", str(run), "--epochs", "0.5",
                     *tiny]) == 0
    assert "incubate-2: eval acc" in capsys.readouterr().out
    md = load_checkpoint(run / "incubate-2" / "final")[1]
    assert md["meta_sha256"] == sha and md["sizes"] == [2, 2, 2, 2]


# ----------------------------------------------------------------------------------------------
# load_state_dict_file / load_into
# ----------------------------------------------------------------------------------------------
def _timm_vit(num_classes=CLASSES, img=IMG):
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    torch.manual_seed(0)
    model = TimmViT(img_size=img, patch_size=PATCH, num_classes=num_classes, embed_dim=EMBED, depth=2,
                    num_heads=HEADS)
    with torch.no_grad():   # not timm's zero / constant init: every tensor tells
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _ours(num_classes=CLASSES, img=IMG):
    from incubation.timm_compat import timm_config
    return VisionTransformer(timm_config(_timm_vit()).replace(num_classes=num_classes, img_size=img))


def test_load_into_from_a_timm_pth_and_a_safetensors_file(tmp_path):
    timm_model = _timm_vit()
    sd = timm_model.state_dict()
    # a training checkpoint: DDP's 'module.' prefix inside a 'model' entry, next to other entries
    torch.save({"model": {"module." + k: v for k, v in sd.items()}, "epoch": 7, "optimizer": {"state": {}}},
               tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    save_checkpoint(tmp_path / "ours", sd, {"stage": "e2e", "target_config": _ours().config.to_dict()})
    x = _images()
    expected = _logits(timm_model, x)
    for path, fmt in ((tmp_path / "ckpt.pth", "torch"), (tmp_path / "model.safetensors", "safetensors"),
                      (tmp_path / "pytorch_model.bin", "torch"), (tmp_path / "ours", "incubation"),
                      (tmp_path / "ours.safetensors", "incubation")):
        model = _ours()
        report = load_into(model, path)
        assert report.format == fmt and not report.fresh_head and report.pos_embed_resampled is None
        assert report.loaded == sorted(sd)
        torch.testing.assert_close(_logits(model, x), expected, rtol=1e-12, atol=1e-12)
    state, md = load_state_dict_file(tmp_path / "ours")
    assert md["stage"] == "e2e" and set(state) == set(sd)
    assert load_state_dict_file(tmp_path / "ckpt.pth")[1] is None


def test_load_state_dict_file_prefers_the_trained_weights_unless_asked_for_ema(tmp_path):
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    torch.save({"model": a, "model_ema": b}, tmp_path / "c.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "c.pth")[0]["w"], a["w"])
    assert torch.equal(load_state_dict_file(tmp_path / "c.pth", use_ema=True)[0]["w"], b["w"])
    torch.save({"state_dict_ema": b, "epoch": 1}, tmp_path / "only_ema.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "only_ema.pth")[0]["w"], b["w"])


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage" * 20)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"epoch": 3, "args": {"lr": 1}}, tmp_path / "nomodel.pth")
    torch.save({"model": {"w": torch.zeros(1), "n": 3}}, tmp_path / "mixed.pth")
    torch.save({"x": argparse.Namespace()}, tmp_path / "pickled.pth")
    data = (tmp_path / "list.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    cases = {"garbage.pth": "not a readable weights file", "empty.pt": "not a readable weights file",
             "dir": "is a directory", "missing.pth": "does not exist", "list.pth": "holds a list, not a state_dict",
             "nomodel.pth": "without a state_dict", "mixed.pth": r"not named tensors: \[n\]",
             "pickled.pth": "holds a argparse.Namespace", "truncated.pth": "not a readable weights file",
             "bad.safetensors": "not a readable safetensors file"}
    save_checkpoint(tmp_path / "ours", {"w": torch.zeros(2)}, {"stage": "e2e"})
    (tmp_path / "ours.json").write_text("{ damaged")     # never loaded unverified as plain safetensors
    cases["ours.safetensors"] = "ours.json is unreadable"
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_dict_file(tmp_path / name)
        assert str(tmp_path / name.replace(".safetensors", ".json" if name == "ours.safetensors" else
                                           ".safetensors")) in str(info.value)


def test_non_float_weights_are_refused_naming_the_file_and_the_dtype(tmp_path):
    """int64 (or bool) weights would be cast into the model without a word (issue 25): every
    format refuses them; an integer buffer our models register (Apollo's slot map) still loads."""
    sd = {k: (v * 100).long() for k, v in _ours().state_dict().items()}
    torch.save(sd, tmp_path / "int.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "int.safetensors")
    save_checkpoint(tmp_path / "ours", sd, {"stage": "e2e", "target_config": _ours().config.to_dict()})
    torch.save({"model": {"w": torch.zeros(2, dtype=torch.bool)}}, tmp_path / "bool.pth")
    cases = {"int.pth": "int64", "int.safetensors": "int64", "ours": "int64", "bool.pth": "bool"}
    for name, dtype in cases.items():
        shown = tmp_path / (name + ".safetensors" if name == "ours" else name)
        with pytest.raises(CheckpointError, match=f"is {dtype}, not floating point") as info:
            load_state_dict_file(tmp_path / name)
        assert str(shown) in str(info.value)
    with pytest.raises(CheckpointError, match="is int64, not floating point"):
        load_into(_ours(), tmp_path / "int.pth")
    save_checkpoint(tmp_path / "apollo", {"vit.w": torch.zeros(2), "unique_slots": torch.arange(3)}, {"stage": "grow"})
    assert load_checkpoint(tmp_path / "apollo")[0]["unique_slots"].dtype == torch.int64


def test_pos_embed_resampling(tmp_path):
    cfg = _ours().config
    pos = torch.randn(1, GRID * GRID + 1, EMBED)
    sd = {"pos_embed": pos, "other": torch.zeros(1)}
    same = resample_pos_embed(sd, cfg)
    assert same["pos_embed"] is pos and same is not sd            # an equal grid: untouched, bit for bit
    assert resample_pos_embed(sd, cfg, old_grid=(GRID, GRID))["pos_embed"] is pos

    bigger = resample_pos_embed(sd, cfg.replace(img_size=48))["pos_embed"]
    assert bigger.shape == (1, 37, EMBED)
    assert torch.equal(bigger[:, :1], pos[:, :1])                   # the class token's position is kept
    # timm's default (antialiased bicubic) and, with antialias=False, the authors' fine-tuning
    # code (plain bicubic, align_corners=False); the two differ even when enlarging
    grid = pos[:, 1:].reshape(1, GRID, GRID, EMBED).permute(0, 3, 1, 2)
    for antialias in (True, False):
        resampled = resample_pos_embed(sd, cfg.replace(img_size=48), antialias=antialias)["pos_embed"]
        reference = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=antialias)
        torch.testing.assert_close(resampled[:, 1:], reference.permute(0, 2, 3, 1).reshape(1, 36, EMBED))
    torch.testing.assert_close(bigger, resample_pos_embed(sd, cfg.replace(img_size=48), antialias=True)["pos_embed"])
    # a constant field stays constant; non-square grids and shrinking work
    flat = {"pos_embed": torch.cat([pos[:, :1], torch.full((1, 16, EMBED), 0.25)], 1)}
    wide = resample_pos_embed(flat, cfg.replace(img_size=(32, 48)))["pos_embed"]
    assert wide.shape == (1, 4 * 6 + 1, EMBED)
    torch.testing.assert_close(wide[:, 1:], torch.full((1, 24, EMBED), 0.25))
    back = resample_pos_embed({"pos_embed": wide}, cfg.replace(img_size=(16, 24)))["pos_embed"]
    assert back.shape == (1, 2 * 3 + 1, EMBED)                     # 4x6 guessed from the model's 2:3 aspect
    with pytest.raises(ValueError, match="old_grid"):
        resample_pos_embed(sd, cfg.replace(img_size=48), old_grid=(3, 5))

    # load_into resamples a 32-px checkpoint for a 48-px model (the grid from our metadata)
    timm_model = _timm_vit()
    save_checkpoint(tmp_path / "ours", timm_model.state_dict(), {"stage": "e2e", "target_config": cfg.to_dict()})
    torch.save(timm_model.state_dict(), tmp_path / "plain.pth")
    for path in (tmp_path / "ours", tmp_path / "plain.pth"):
        model = _ours(img=48)
        report = load_into(model, path)
        assert report.pos_embed_resampled == ((GRID, GRID), (6, 6))
        expected = resample_pos_embed(timm_model.state_dict(), model.config)["pos_embed"]
        assert torch.equal(model.pos_embed.detach(), expected)
        assert _logits(model, _images(img=48)).isfinite().all()


def test_head_for_other_classes_warns_and_stays_fresh(tmp_path):
    torch.save(_timm_vit().state_dict(), tmp_path / "c.pth")
    model = _ours(num_classes=7)
    fresh = {k: v.clone() for k, v in model.head.state_dict().items()}
    with pytest.warns(UserWarning, match=r"head is for 5 classes, the model's for 7.*keeps its freshly initialised"):
        report = load_into(model, tmp_path / "c.pth")
    assert report.fresh_head and "head.weight" not in report.loaded
    assert all(torch.equal(v, fresh[k]) for k, v in model.head.state_dict().items())
    assert torch.equal(model.blocks[1].mlp.fc2.weight, _timm_vit().blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="head is for 5 classes, the model's for 7"):
        load_into(_ours(num_classes=7), tmp_path / "c.pth", strict_head=True)
    headless = _ours(num_classes=0)
    with pytest.warns(UserWarning, match="for 5 classes, the model's for 0"):
        load_into(headless, tmp_path / "c.pth")


def test_wrong_keys_are_an_error_listing_them(tmp_path):
    sd = dict(_timm_vit().state_dict())
    del sd["blocks.1.mlp.fc1.weight"]
    sd["blocks.1.extra.weight"] = torch.zeros(3)
    sd["blocks.0.norm1.weight"] = torch.zeros(EMBED + 1)
    torch.save(sd, tmp_path / "c.pth")
    model = _ours()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_into(model, tmp_path / "c.pth")
    message = str(info.value)
    assert str(tmp_path / "c.pth") in message
    assert "missing [blocks.1.mlp.fc1.weight]" in message and "unexpected [blocks.1.extra.weight]" in message
    assert "shape mismatch [blocks.0.norm1.weight (49,) (model (48,))]" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())   # nothing copied
    # an incubated module is no whole model
    save_checkpoint(tmp_path / "module", {"module.blocks.0.norm1.weight": torch.ones(EMBED)},
                    {"stage": "incubate"})
    with pytest.raises(CheckpointError, match="one incubated module"):
        load_into(model, tmp_path / "module")


def test_load_into_reads_official_checkpoints(tmp_path):
    stages = _official_stages([1, 2, 1])
    src = _save_official(tmp_path / "vit.pth", stages, "model")
    cfg, _ = official_config(read_official(src).state_dict, num_heads=HEADS, norm_eps=1e-6)
    model = VisionTransformer(cfg)
    assert load_into(model, src).format == "deep-incubation"
    x = _images()
    torch.testing.assert_close(_logits(model, x), _reference_logits(stages, x, eps=1e-6), rtol=1e-12, atol=1e-12)
    assert json.loads(json.dumps(read_official(src).keys))["blocks.2.attn.qkv.bias"] == "model.blocks.2.attn.qkv.bias"
    # a 'model' entry alone (the other entries stripped) is still recognised by its stages.* keys
    torch.save({"model": _official_model_state(stages)}, tmp_path / "stripped.pth")
    state, md = load_state_dict_file(tmp_path / "stripped.pth")
    assert md is None and set(state) == set(model.state_dict())
    assert read_official(tmp_path / "stripped.pth").sizes == [1, 2, 1]
