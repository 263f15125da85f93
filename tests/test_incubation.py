"""Deep Incubation: splits, hybrids (only module i trains), assembly and its file validation."""
import json
import os
import shutil

import pytest
import torch
from torch.utils.data import TensorDataset

from incubation import VisionTransformer, ViTConfig, deep, ops
from incubation.nn.vit import DropPath
from incubation.train import TrainConfig, train
from incubation.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

TARGET = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=5, num_heads=2)
K = 3  # even-as-possible split of 5 blocks: [2, 2, 1]


def _data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _cfg(**kw):
    return TrainConfig(**{"steps": 2, "batch_size": 8, "lr": 1e-2, "device": "cpu", "progress": False, **kw})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# split_modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,k,sizes,expected", [
    (12, 4, None, [3, 3, 3, 3]),
    (24, 4, None, [6, 6, 6, 6]),
    (10, 4, None, [3, 3, 2, 2]),
    (5, 5, None, [1, 1, 1, 1, 1]),
    (12, 4, [4, 2, 2, 4], [4, 2, 2, 4]),
    (7, 2, (1, 6), [1, 6]),
])
def test_split_modules(depth, k, sizes, expected):
    spans = deep.split_modules(depth, k, sizes)
    assert [len(s) for s in spans] == expected
    assert [b for s in spans for b in s] == list(range(depth))  # consecutive, complete, disjoint


def test_split_modules_accepts_config_and_model():
    assert deep.split_modules(TARGET, K) == deep.split_modules(VisionTransformer(TARGET), K) \
        == [range(0, 2), range(2, 4), range(4, 5)]


@pytest.mark.parametrize("depth,k,sizes,match", [
    (12, 1, None, "K .* >= 2"),
    (12, 2.0, None, "K .* >= 2"),
    (3, 4, None, "cannot split 3 blocks into K=4"),
    (12, 4, [3, 3, 3], "name 3 modules, but K=4"),
    (12, 4, [3, 3, 3, 4], "add up to 13 blocks, but the target has depth 12"),
    (12, 4, [6, 6, 0, 0], "positive integers"),
    (12, 4, [3, 3, 3.0, 3], "positive integers"),
    (0, 2, None, "depth must be a positive integer"),
])
def test_split_modules_rejects_bad_splits(depth, k, sizes, match):
    with pytest.raises(ValueError, match=match):
        deep.split_modules(depth, k, sizes)


# ----------------------------------------------------------------------------------------------
# modules and hybrids
# ----------------------------------------------------------------------------------------------
def test_target_modules_partition_the_target_keys():
    target = VisionTransformer(TARGET).state_dict()
    seen = {}
    for i in range(K):
        for key, value in deep.TargetModule(TARGET, K, i).state_dict().items():
            assert key not in seen, f"{key} owned by modules {seen[key]} and {i}"
            assert value.shape == target[key].shape
            seen[key] = i
    assert set(seen) == set(target)
    assert {k for k, i in seen.items() if i == 0} >= {"cls_token", "pos_embed", "patch_embed.proj.weight"}
    assert {k for k, i in seen.items() if i == K - 1} >= {"norm.weight", "head.weight", "blocks.4.mlp.fc2.bias"}


def test_target_module_keeps_the_targets_drop_path_schedule():
    module = deep.TargetModule(TARGET.replace(drop_path_rate=0.4), K, 1)
    rates = torch.linspace(0, 0.4, TARGET.depth).tolist()
    assert [module.blocks[b].drop_path1.drop_prob for b in module.span] == pytest.approx(rates[2:4])


@pytest.mark.parametrize("index", [0, 1, 2])
def test_hybrid_forward_is_the_vit_made_of_its_parts(index):
    """The hybrid computes exactly a plain ViT whose stem, blocks and head are its parts (float64)."""
    torch.manual_seed(index)
    meta = deep.build_meta_model(TARGET, K).double()
    hybrid = deep.build_hybrid(meta, TARGET, index).double()
    n = len(hybrid.module.span)
    plain = VisionTransformer(TARGET.replace(depth=K - 1 + n)).double()
    blocks = [meta.blocks[k] for k in range(index)] + [hybrid.module.blocks[b] for b in hybrid.module.span] + \
        [meta.blocks[k] for k in range(index + 1, K)]
    state = {}
    for j, block in enumerate(blocks):
        state.update({f"blocks.{j}.{k}": v for k, v in block.state_dict().items()})
    for source, names in ((hybrid.module if index == 0 else meta, deep.STEM),
                          (hybrid.module if index == K - 1 else meta, deep.HEAD)):
        state.update({k: v for k, v in source.state_dict().items() if k.split(".")[0] in names})
    plain.load_state_dict(state, strict=True)
    hybrid.eval(), plain.eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(hybrid(x), plain(x), rtol=1e-12, atol=1e-12)
    assert hybrid.flops_per_image() == plain.flops_per_image()
    assert hybrid.module.flops_per_image() == n * (
        VisionTransformer(TARGET.replace(depth=2)).flops_per_image() -
        VisionTransformer(TARGET.replace(depth=1)).flops_per_image())


def test_hybrid_keeps_meta_frozen_and_in_eval_mode():
    meta = deep.build_meta_model(TARGET, K)
    hybrid = deep.build_hybrid(meta, TARGET, 1).train()
    assert hybrid.training and hybrid.module.training
    assert not any(m.training for m in hybrid.meta.modules())
    assert not any(p.requires_grad for p in hybrid.meta.parameters())
    assert all(p.requires_grad for p in hybrid.module.parameters())
    assert hybrid.module_keys() == ["module." + k for k in hybrid.module.state_dict()]


def _drop_paths(module):
    return [m for m in module.modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_hybrid_meta_mode_train_spreads_drop_path_over_all_blocks(index):
    target = TARGET.replace(drop_path_rate=0.6)
    torch.manual_seed(0)
    meta = deep.build_meta_model(target, K)  # the meta model itself has no drop-path
    hybrid = deep.build_hybrid(meta, target, index, meta_mode="train").train()
    assert hybrid.meta_mode == "train"
    blocks = hybrid.hybrid_blocks()
    n = len(hybrid.module.span)
    assert len(blocks) == K - 1 + n
    assert blocks[index] is hybrid.module.blocks[hybrid.module.span[0]]
    rates = torch.linspace(0, 0.6, K - 1 + n).tolist()  # timm's rule over the hybrid's blocks
    assert [b.drop_path1.drop_prob for b in blocks] == pytest.approx(rates)
    assert [b.drop_path2.drop_prob for b in blocks] == pytest.approx(rates)
    assert all(m.training for m in hybrid.modules())  # the whole hybrid follows train()
    frozen = [b for k, b in enumerate(meta.blocks) if k != index]
    assert all(dp.training for b in frozen for dp in _drop_paths(b))
    assert frozen[-1].drop_path1.drop_prob > 0  # the last meta block sits past position 0
    assert not any(p.requires_grad for p in hybrid.meta.parameters())
    x = torch.randn(8, 2, 16)
    with ops.use_backend("eager"), torch.no_grad():
        assert not torch.equal(frozen[-1](x), frozen[-1](x))  # drop-path active in a frozen meta block
    hybrid.eval()
    assert not any(m.training for m in hybrid.modules())
    with ops.use_backend("eager"), torch.no_grad():
        assert torch.equal(frozen[-1](x), frozen[-1](x))


@pytest.mark.parametrize("meta_mode", ["eval", "train"])
def test_hybrid_meta_parameters_get_no_gradient_in_either_mode(meta_mode):
    target = TARGET.replace(drop_path_rate=0.3)
    torch.manual_seed(0)
    meta = deep.build_meta_model(target, K)
    hybrid = deep.build_hybrid(meta, target, 1, meta_mode=meta_mode).train()
    frozen = [meta.blocks[0], meta.blocks[2]]
    if meta_mode == "eval":  # today's default: the meta parts stay deterministic
        assert not any(m.training for m in hybrid.meta.modules())
        assert not any(dp.training for b in frozen for dp in _drop_paths(b))
        x = torch.randn(8, 2, 16)
        with ops.use_backend("eager"), torch.no_grad():
            assert torch.equal(frozen[-1](x), frozen[-1](x))
        rates = torch.linspace(0, 0.3, TARGET.depth).tolist()  # the module keeps the target's rates
        assert [hybrid.module.blocks[b].drop_path1.drop_prob for b in hybrid.module.span] == \
            pytest.approx(rates[2:4])
    with ops.use_backend("eager"):
        hybrid(torch.randn(4, 1, 8, 8)).square().sum().backward()
    assert all(p.grad is None for p in hybrid.meta.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hybrid.module.parameters())


def test_hybrid_rejects_mismatched_parts():
    meta = deep.build_meta_model(TARGET, K)
    with pytest.raises(ValueError, match="meta model has 3 blocks, but the target is cut into K=4"):
        deep.Hybrid(meta, deep.TargetModule(TARGET, 4, 0), 0)
    with pytest.raises(ValueError, match="target module is module 1, but the hybrid slot is 2"):
        deep.Hybrid(meta, deep.TargetModule(TARGET, K, 1), 2)
    with pytest.raises(ValueError, match="embed_dim=16 .expected 32"):
        deep.build_hybrid(meta, TARGET.replace(embed_dim=32), 0)
    with pytest.raises(ValueError, match="module index must be in 0..2"):
        deep.build_hybrid(meta, TARGET, 3)
    with pytest.raises(ValueError, match="init must be 'random' or 'lemon'"):
        deep.build_hybrid(meta, TARGET, 0, init="copy")
    with pytest.raises(TypeError, match="TargetModule"):
        deep.Hybrid(meta, meta, 0)
    for bad in ("training", None, True):
        with pytest.raises(ValueError, match="meta_mode must be one of"):
            deep.build_hybrid(meta, TARGET, 0, meta_mode=bad)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_lemon_init_starts_from_the_meta_models_function(index):
    pytest.importorskip("incubation.growth.lemon")
    torch.manual_seed(0)
    meta = deep.build_meta_model(TARGET, K).double()
    for p in meta.parameters():  # non-trivial weights everywhere
        torch.nn.init.normal_(p, std=0.3)
    hybrid = deep.build_hybrid(meta, TARGET.replace(drop_path_rate=0.2), index, init="lemon").double()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(hybrid.eval()(x), meta.eval()(x), rtol=1e-10, atol=1e-10)
    first = hybrid.module.blocks[hybrid.module.span[0]]
    assert first.attn.qkv.weight.data_ptr() != meta.blocks[index].attn.qkv.weight.data_ptr()  # a copy
    assert all(p.requires_grad for p in hybrid.module.parameters())
    assert [hybrid.module.blocks[b].drop_path1.drop_prob for b in hybrid.module.span] == \
        [deep.TargetModule(TARGET.replace(drop_path_rate=0.2), K, index).blocks[b].drop_path1.drop_prob
         for b in hybrid.module.span]


def test_weights_sha256():
    model = VisionTransformer(TARGET)
    sd = _state(model)
    h = deep.weights_sha256(sd)
    assert h == deep.weights_sha256({k: v.clone() for k, v in reversed(list(sd.items()))})
    sd["head.bias"][1] += 1e-6
    assert deep.weights_sha256(sd) != h
    assert deep.weights_sha256({k: v.double() for k, v in _state(model).items()}) != h


# ----------------------------------------------------------------------------------------------
# the stages through the engine
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A meta model and its K incubated modules (a few engine steps each)."""
    root = tmp_path_factory.mktemp("pipeline")
    data = _data()
    deep.train_meta(TARGET, K, data, None, _cfg(), root / "meta")
    meta_path = str(root / "meta" / "final")
    modules = []
    for i in range(K):
        deep.train_module(meta_path, TARGET, i, data, None, _cfg(seed=i), root / f"incubate-{i}")
        modules.append(str(root / f"incubate-{i}" / "final"))
    return root, meta_path, modules


def test_incubation_trains_only_module_i(tmp_path):
    torch.manual_seed(0)
    meta = deep.build_meta_model(TARGET, K)
    hybrid = deep.build_hybrid(meta, TARGET, 1)
    meta_before, module_before = _state(hybrid.meta), _state(hybrid.module)
    train(hybrid, _data(), None, _cfg(steps=3), tmp_path, stage="incubate",
          params=list(hybrid.module.parameters()), save_keys=hybrid.module_keys())
    for k, v in _state(hybrid.meta).items():
        assert torch.equal(v, meta_before[k]), f"meta parameter {k} changed"
    changed = [k for k, v in _state(hybrid.module).items() if not torch.equal(v, module_before[k])]
    assert len(changed) == len(module_before)  # every module tensor was updated
    saved, _ = load_checkpoint(tmp_path / "final")
    assert sorted(saved) == sorted(hybrid.module_keys())


def test_module_checkpoint_metadata(pipeline):
    _, meta_path, modules = pipeline
    meta, meta_md, meta_sha = deep.load_meta(meta_path, TARGET)
    assert meta_md["stage"] == "meta" and meta_md["K"] == K and meta_md["sizes"] == [2, 2, 1]
    for i, path in enumerate(modules):
        state, md = load_checkpoint(path)
        assert md["stage"] == "incubate" and md["module"] == i and md["K"] == K and md["step"] == 2
        assert md["meta_sha256"] == meta_sha
        assert md["init"] == "random" and md["meta_mode"] == "eval"
        assert ViTConfig.from_dict(md["target_config"]) == TARGET
        assert ViTConfig.from_dict(md["meta_config"]) == meta.config
        # only module i's weights, under the target's keys
        expected = deep.TargetModule(TARGET, K, i).state_dict()
        assert sorted(state) == sorted("module." + k for k in expected)


def test_assembly_loads_every_module(pipeline):
    _, meta_path, modules = pipeline
    model = deep.assemble(TARGET, modules, meta_sha256=deep.load_meta(meta_path)[2])
    target = model.state_dict()
    for path in modules:
        state, _ = load_checkpoint(path)
        for key, value in state.items():
            assert torch.equal(target[key[len("module."):]], value)
    assert len(target) == sum(len(load_checkpoint(p)[0]) for p in modules)


def test_assembled_model_fine_tunes_with_metadata(pipeline, tmp_path):
    root, meta_path, modules = pipeline
    result = deep.train_assembled(TARGET, modules, _data(), _data(16, seed=1), _cfg(), tmp_path,
                                  meta_checkpoint=meta_path)
    _, md = load_checkpoint(result.checkpoint_path)
    assert md["stage"] == "assemble" and md["K"] == K and md["meta_sha256"] == deep.load_meta(meta_path)[2]
    assert result.eval_acc is not None


def _copy_module(src, dst, metadata=None, state=None):
    """A module file like `src` with changed metadata or weights (written as the engine would)."""
    s, md = load_checkpoint(src)
    save_checkpoint(dst, state if state is not None else s, {**md, **(metadata or {})})
    return str(dst)


def test_assembly_rejects_bad_module_files(pipeline, tmp_path):
    _, meta_path, modules = pipeline
    m0, m1, m2 = modules

    def rejects(paths, culprit, match, target=TARGET, **kw):
        with pytest.raises(CheckpointError, match=match) as info:
            deep.assemble(target, paths, **kw)
        assert str(culprit) in str(info.value)

    wrong_k = _copy_module(m1, tmp_path / "k", {"K": 4})
    rejects([m0, wrong_k, m2], wrong_k, "incubated for K=4 modules, but 3 module files")
    rejects([m0, m2, m1], m2, "holds module 2, but was given for slot 1")             # wrong slot
    rejects([m0, m1], m0, "incubated for K=3 modules, but 2 module files")            # K from the list
    rejects(modules, m0, "embed_dim=16 .expected 32", target=TARGET.replace(embed_dim=32))  # wrong width
    rejects(modules, m0, "depth=5 .expected 6", target=TARGET.replace(depth=6))             # wrong depth
    rejects([meta_path, m1, m2], meta_path, "'meta' checkpoint, not an incubated module")
    rejects(modules, m0, "different meta model", meta_sha256="0" * 64)
    other_meta = _copy_module(m2, tmp_path / "other", {"meta_sha256": "f" * 64})
    rejects([m0, m1, other_meta], other_meta, "different meta model")
    state, _ = load_checkpoint(m1)
    missing = _copy_module(m1, tmp_path / "missing", state={k: v for k, v in state.items() if "qkv" not in k})
    rejects([m0, missing, m2], missing, "missing \\['blocks.2.attn.qkv")
    extra = _copy_module(m1, tmp_path / "extra", state={**state, "module.head.weight": torch.zeros(3, 16)})
    rejects([m0, extra, m2], extra, "unexpected \\['head.weight'\\]")
    bad_shape = _copy_module(m1, tmp_path / "shape", state={**state, "module.blocks.2.norm1.weight": torch.ones(8)})
    rejects([m0, bad_shape, m2], bad_shape, "norm1.weight has shape \\(8,\\)")

    corrupt = tmp_path / "corrupt"
    for suffix in (".safetensors", ".json"):
        shutil.copy(m1 + suffix, str(corrupt) + suffix)
    with open(str(corrupt) + ".safetensors", "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    rejects([m0, str(corrupt), m2], corrupt, "corrupt")
    rejects([m0, str(tmp_path / "nowhere"), m2], tmp_path / "nowhere", "does not exist")


def test_different_meta_model_is_rejected_end_to_end(pipeline, tmp_path):
    """A module incubated from another (real) meta model cannot join the others."""
    _, meta_path, modules = pipeline
    data = _data()
    deep.train_meta(TARGET, K, data, None, _cfg(seed=7), tmp_path / "meta2")
    deep.train_module(str(tmp_path / "meta2" / "final"), TARGET, 1, data, None, _cfg(), tmp_path / "m1")
    stranger = str(tmp_path / "m1" / "final")
    with pytest.raises(CheckpointError, match="different meta model") as info:
        deep.assemble(TARGET, [modules[0], stranger, modules[2]])
    assert stranger in str(info.value)
    with pytest.raises(CheckpointError, match="different meta model") as info:  # the meta given as reference
        deep.train_assembled(TARGET, [modules[0], stranger, modules[2]], data, None, _cfg(), tmp_path / "a",
                             meta_checkpoint=meta_path)
    assert stranger in str(info.value) and "the given meta model" in str(info.value)
    assert not os.path.exists(tmp_path / "a")  # nothing trained or written
    # resuming module 1's directory with the original meta model is refused, not silently mixed
    with pytest.raises(CheckpointError, match="belongs to another incubate run .meta_sha256 differ"):
        deep.train_module(meta_path, TARGET, 1, data, None, _cfg(), tmp_path / "m1")


def test_meta_mode_is_recorded_and_guards_resume(pipeline, tmp_path):
    _, meta_path, modules = pipeline
    data = _data()
    result = deep.train_module(meta_path, TARGET, 1, data, None, _cfg(steps=1), tmp_path / "train-mode",
                               meta_mode="train")
    assert load_checkpoint(result.checkpoint_path)[1]["meta_mode"] == "train"
    with pytest.raises(CheckpointError, match="meta_mode differ"):  # not resumed in the other mode
        deep.train_module(meta_path, TARGET, 1, data, None, _cfg(steps=1), tmp_path / "train-mode")
    with pytest.raises(ValueError, match="meta_mode"):
        deep.train_module(meta_path, TARGET, 1, data, None, _cfg(steps=1), tmp_path / "x", meta_mode="frozen")
    # a run written before meta_mode existed resumes as the "eval" run it was
    old = tmp_path / "old"
    shutil.copytree(os.path.dirname(modules[1]), old)
    record = json.load(open(old / "checkpoint.json"))
    del record["metadata"]["meta_mode"]
    json.dump(record, open(old / "checkpoint.json", "w"))
    deep.train_module(meta_path, TARGET, 1, data, None, _cfg(seed=1), old)
    with pytest.raises(CheckpointError, match="meta_mode differ"):
        deep.train_module(meta_path, TARGET, 1, data, None, _cfg(seed=1), old, meta_mode="train")


def test_load_meta_rejects_other_targets_and_stages(pipeline):
    _, meta_path, modules = pipeline
    with pytest.raises(CheckpointError, match="num_heads=2 .expected 4") as info:
        deep.load_meta(meta_path, TARGET.replace(num_heads=4))
    assert meta_path in str(info.value)
    with pytest.raises(CheckpointError, match="not a meta model"):
        deep.load_meta(modules[0])


def test_uneven_split_survives_the_pipeline(tmp_path):
    data = _data()
    deep.train_meta(TARGET, 2, data, None, _cfg(steps=1), tmp_path / "meta", sizes=[1, 4])
    meta = str(tmp_path / "meta" / "final")
    paths = []
    for i in range(2):
        deep.train_module(meta, TARGET, i, data, None, _cfg(steps=1), tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}" / "final"))
    assert sorted(k for k in load_checkpoint(paths[1])[0] if k.endswith("norm1.weight")) == \
        [f"module.blocks.{b}.norm1.weight" for b in range(1, 5)]
    deep.assemble(TARGET, paths, sizes=[1, 4])
    with pytest.raises(CheckpointError, match=r"split \[1, 4\], expected \[3, 2\]"):
        deep.assemble(TARGET, paths)


def test_hybrid_training_flops_match_torch_flop_counter():
    """train_flops_per_image / flops_per_image against torch's FLOP counter on a real training
    step (counted backward / counted forward of the same-depth plain ViT): the frozen meta blocks
    before the module run no backward, those after it no weight gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    def counted(model, x, backward):
        with FlopCounterMode(display=False) as counter:
            y = model(x)
            if backward:
                y.sum().backward()
        return counter.get_total_flops() / len(x)

    target = TARGET.replace(img_size=16, embed_dim=32, depth=6)  # blocks large beside the stem and head,
    meta = deep.build_meta_model(target, 3)                     # which are counted as trained
    x = torch.randn(2, 1, 16, 16)
    ratios = []
    with ops.use_backend("eager"):
        for i in range(3):
            hybrid = deep.build_hybrid(meta, target, i).train()
            plain = VisionTransformer(target.replace(depth=4))  # the hybrid's depth: 2 meta + 2 module blocks
            measured = counted(hybrid, x, True) / counted(plain, x, False)
            ours = hybrid.train_flops_per_image() / hybrid.flops_per_image()
            assert ours == pytest.approx(measured, abs=0.03), i
            ratios.append(ours)
    assert ratios[0] > ratios[1] > ratios[2] > 1.9  # the later the module, the less backward
