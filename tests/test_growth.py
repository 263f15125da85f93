"""Model growth: LEMON lossless expansion and Apollo progressive depth training."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import incubation
from incubation import ops
from incubation.growth import (
    ApolloViT,
    apollo_hook,
    apollo_schedule,
    default_stages,
    even_switch_steps,
    expand_block,
    interpolation_sources,
    lemon_expand,
    lemon_schedule,
    lvps_depth,
    shared_blocks,
)

BASE = dict(img_size=16, patch_size=8, num_classes=7, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def _source(dtype=torch.float64, seed=0, **changes):
    """A random source ViT: every parameter perturbed so biases, LN affine, tokens and layer
    scale are all non-trivial (layer scale entries of both signs)."""
    torch.manual_seed(seed)
    model = incubation.VisionTransformer(**{**BASE, **changes}).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if name.endswith("gamma") else 0.1))
    return model


def _logits(model, x):
    with ops.use_backend("eager"), torch.no_grad():
        return model(x)


def _images(model, n=3, dtype=torch.float64, seed=1):
    c = model.config
    return torch.randn(n, c.in_chans, *c.img_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ======================================================================================
# LEMON
# ======================================================================================
CASES = {  # name: (source changes, target)
    "width-x1.5": ({}, dict(embed_dim=24)),
    "width-x2": ({}, dict(embed_dim=32)),
    "width-x2.5": ({}, dict(embed_dim=40)),
    "depth+1": ({}, dict(depth=3)),
    "depth-x2": ({}, dict(depth=4)),
    "heads-changed-x2-depth+1": ({}, dict(embed_dim=32, num_heads=4, depth=3)),
    "mlp-ratio-only": ({}, dict(mlp_ratio=3.5)),
    "layer-scale-x1.5-depth-x2": (dict(init_values=0.1), dict(embed_dim=24, depth=4)),
    "layer-scale-x2.5-mlp": (dict(init_values=0.1), dict(embed_dim=40, mlp_ratio=3.0)),
    "avg-pool-regs-x2.5": (dict(global_pool="avg", class_token=False, reg_tokens=2), dict(embed_dim=40, depth=3)),
    "avg-pool-include-prefix-x1.5": (dict(global_pool="avg", reg_tokens=1, pool_include_prefix=True),
                                     dict(embed_dim=24)),
    "max-pool-final-norm-x1.5": (dict(global_pool="max", fc_norm=False), dict(embed_dim=24)),
    "avgmax-fc-norm-x2": (dict(global_pool="avgmax"), dict(embed_dim=32, depth=3)),
    "pre-norm-no-biases-x2": (dict(pre_norm=True, proj_bias=False, qkv_bias=False), dict(embed_dim=32, depth=4)),
    "no-final-norm-x1.5": (dict(final_norm=False), dict(embed_dim=24)),
    "no-final-norm-max-x2.5": (dict(final_norm=False, global_pool="max"), dict(embed_dim=40)),
    "per-token-no-embed-class-x1.5": (dict(global_pool="", no_embed_class=True, reg_tokens=1), dict(embed_dim=24)),
    "one-head-x3": (dict(embed_dim=8, num_heads=1), dict(embed_dim=24, depth=3)),
}


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CASES))
def test_lemon_expansion_keeps_the_function(name, dtype, rtol):
    changes, target = CASES[name]
    src = _source(dtype, **changes)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    big = lemon_expand(src, **target)
    c = big.config
    for key in ("embed_dim", "depth", "mlp_ratio"):
        assert getattr(c, key) == target.get(key, getattr(src.config, key))
    assert c.embed_dim // c.num_heads == src.config.embed_dim // src.config.num_heads  # head_dim kept
    ratio = (c.embed_dim // src.config.embed_dim) * src.config.embed_dim / c.embed_dim
    assert math.isclose(c.norm_eps, src.config.norm_eps * ratio)
    assert all(m.eps == c.norm_eps for m in big.modules() if isinstance(m, torch.nn.LayerNorm))
    assert next(big.parameters()).dtype == dtype and not big.training

    x = _images(src, dtype=dtype)
    ref, out = _logits(src, x), _logits(big, x)
    assert out.shape == ref.shape
    err = (out - ref).abs().max() / ref.abs().max()
    assert err <= rtol, f"relative error {err:.2e}"
    for k, v in src.state_dict().items():  # the source is untouched
        assert torch.equal(v, before[k]), k


def test_lemon_duplicates_are_not_copies_and_zero_blocks_add_zero():
    src = _source(init_values=0.1)
    big = lemon_expand(src, embed_dim=40, depth=4, depth_init="zero")  # x2.5: two copies and a pad
    hidden_s = src.config.mlp_hidden_dim
    fc1 = big.blocks[0].mlp.fc1.weight
    for j in range(hidden_s):  # neuron j is duplicated as j + hidden_s (and j + 2 hidden_s)
        assert not torch.allclose(fc1[j], fc1[j + hidden_s])
    # the split parts sum to the source weight over the copies of each input feature
    d = src.config.embed_dim
    parts = fc1[:hidden_s, :d] + fc1[:hidden_s, d:2 * d]
    torch.testing.assert_close(parts, src.blocks[0].mlp.fc1.weight, rtol=1e-12, atol=1e-14)
    # blocks 1 and 3 are the zero-output copies of source blocks 0 and 1
    x = torch.randn(2, 5, 40, dtype=torch.float64)
    for j in (1, 3):
        block = big.blocks[j]
        with ops.use_backend("eager"), torch.no_grad():
            assert torch.equal(block(x), x)
        assert block.attn.qkv.weight.abs().sum() > 0 and block.mlp.fc1.weight.abs().sum() > 0
        torch.testing.assert_close(block.attn.qkv.weight, big.blocks[j - 1].attn.qkv.weight, rtol=0, atol=0)


@pytest.mark.parametrize("target", [dict(embed_dim=32), dict(embed_dim=24, depth=3)], ids=["x2", "x1.5-depth+1"])
def test_lemon_duplicated_neurons_and_heads_diverge_after_one_step(target):
    src = _source(init_values=0.1)
    big = lemon_expand(src, **target)
    d, hidden_s = src.config.embed_dim, src.config.mlp_hidden_dim
    width = big.config.embed_dim
    # a LayerNorm output of the expanded model: copies of v, zero on the pad
    v = torch.randn(64, d, dtype=torch.float64)
    reps = width // d
    probe = torch.cat([v] * reps + [torch.zeros(64, width - reps * d, dtype=torch.float64)], -1)

    dup_neurons = min(hidden_s, big.config.mlp_hidden_dim - hidden_s)  # neuron j + hidden_s copies j
    dup_channels = min(d, width - d)  # head h + H copies head h

    def duplicate_gaps(model):
        fc1 = model.blocks[0].mlp.fc1
        act = probe @ fc1.weight.T + fc1.bias
        qkv = model.blocks[0].attn.qkv
        q = probe @ qkv.weight[:width].T + qkv.bias[:width]
        return ((act[:, :dup_neurons] - act[:, hidden_s:hidden_s + dup_neurons]).abs().max(),
                (q[:, :dup_channels] - q[:, d:d + dup_channels]).abs().max())

    with torch.no_grad():
        assert max(duplicate_gaps(big)) < 1e-12
    big.train()
    opt = torch.optim.AdamW(big.parameters(), lr=1e-3)
    x = _images(big, n=8)
    y = torch.randint(0, 7, (8,), generator=torch.Generator().manual_seed(0))
    with ops.use_backend("eager"):
        F.cross_entropy(big(x), y).backward()
    fc1_grad = big.blocks[0].mlp.fc1.weight.grad
    assert not torch.allclose(fc1_grad[:dup_neurons], fc1_grad[hidden_s:hidden_s + dup_neurons])
    opt.step()
    with torch.no_grad():
        neuron_gap, head_gap = duplicate_gaps(big)
    assert neuron_gap > 1e-5 and head_gap > 1e-5


def test_lemon_is_reproducible_and_seeded():
    src = _source()
    a, b, c = lemon_expand(src, embed_dim=24), lemon_expand(src, embed_dim=24), lemon_expand(src, embed_dim=24, seed=1)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(a.blocks[0].mlp.fc1.weight, c.blocks[0].mlp.fc1.weight)


def test_expand_block_zero_mode():
    src = _source(dtype=torch.float32, init_values=0.1)
    block = src.blocks[1]
    blocks = expand_block(block, 3, depth_init="zero")
    assert len(blocks) == 3 and blocks[0] is block
    x = torch.randn(2, 5, 16)
    seq = torch.nn.Sequential(*blocks)
    with ops.use_backend("eager"), torch.no_grad():
        torch.testing.assert_close(seq(x), block(x), rtol=0, atol=0)
        for new in blocks[1:]:
            assert torch.equal(new(x), x)
    for new in blocks[1:]:
        assert new.attn.qkv.weight.data_ptr() != block.attn.qkv.weight.data_ptr()  # own parameters
        assert torch.equal(new.attn.qkv.weight, block.attn.qkv.weight)
        assert torch.equal(new.mlp.fc1.weight, block.mlp.fc1.weight)
        assert new.attn.proj.weight.abs().sum() == 0 and new.mlp.fc2.weight.abs().sum() == 0
    # the zero branch still learns: its output projection gets a gradient
    with ops.use_backend("eager"):
        seq(x).square().sum().backward()
    assert blocks[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert expand_block(block, 1) == [block]


# ---------------------------------------------------------------- depth_init="cancel"
CANCEL_CASES = {  # name: (source changes, target)
    "depth-x2": ({}, dict(depth=4)),
    "width-x2-depth+1": ({}, dict(embed_dim=32, depth=3)),
    "layer-scale-x1.5-depth-x2": (dict(init_values=0.1), dict(embed_dim=24, depth=4)),
    "three-heads-odd-hidden": (dict(embed_dim=12, num_heads=3, mlp_ratio=1.25), dict(depth=4)),
    "one-head": (dict(embed_dim=8, num_heads=1), dict(depth=3)),
    "pre-norm-no-biases": (dict(pre_norm=True, proj_bias=False, qkv_bias=False), dict(depth=4)),
    "no-final-norm-avg-layer-scale": (dict(final_norm=False, global_pool="avg", init_values=0.1), dict(depth=3)),
}


def _new_blocks(src_depth, depth):
    """Indices of the blocks lemon_expand adds (source block i is followed by its new blocks)."""
    firsts = {i * depth // src_depth for i in range(src_depth)}
    return [j for j in range(depth) if j not in firsts]


def _first_backward(model, seed=0):
    model.train()
    x = _images(model, n=4, seed=seed)
    y = torch.randint(0, 7, (4,), generator=torch.Generator().manual_seed(seed))
    with ops.use_backend("eager"):
        F.cross_entropy(model(x), y).backward()


def _without_gradient(blocks):
    return [name for j, block in blocks for name, p in block.named_parameters(prefix=str(j))
            if p.grad is None or not p.grad.abs().max() > 1e-10]


@pytest.mark.parametrize("name", list(CANCEL_CASES))
def test_lemon_cancel_depth_is_lossless_and_every_new_parameter_learns(name):
    changes, target = CANCEL_CASES[name]
    src = _source(**changes)
    big = lemon_expand(src, **target)  # depth_init="cancel" is the default
    x = _images(src)
    ref = _logits(src, x)
    assert (_logits(big, x) - ref).abs().max() <= 1e-12 * max(1.0, ref.abs().max())
    new = _new_blocks(src.config.depth, big.config.depth)
    for j in new:  # the output weights are not zero: they cancel
        assert big.blocks[j].attn.proj.weight.abs().sum() > 0
        assert big.blocks[j].mlp.fc2.weight.abs().sum() > 0
    _first_backward(big)
    assert _without_gradient([(j, big.blocks[j]) for j in new]) == []

    zero = lemon_expand(src, depth_init="zero", **target)  # the check can fail: zero blocks are half dead
    assert (_logits(zero, x) - ref).abs().max() <= 1e-12 * max(1.0, ref.abs().max())
    _first_backward(zero)
    dead = _without_gradient([(j, zero.blocks[j]) for j in new])
    assert {f"{j}.{key}" for j in new for key in ("attn.qkv.weight", "mlp.fc1.weight", "norm1.weight",
                                                    "norm2.bias")} <= set(dead)


def test_lemon_cancel_blocks_pair_heads_and_neurons_with_cancelling_outputs():
    src = _source()
    big = lemon_expand(src, depth=4, seed=3)
    block, source = big.blocks[1], big.blocks[0]  # a new block and its source block
    d, head_dim, hidden = 16, 8, src.config.mlp_hidden_dim
    qkv = block.attn.qkv.weight
    # the two heads are copies of the source's head 0 (queries and keys)
    for part in (0, 1):
        rows = slice(part * d, part * d + head_dim)
        assert torch.equal(qkv[rows], source.attn.qkv.weight[rows])
        assert torch.equal(qkv[part * d + head_dim:(part + 1) * d], source.attn.qkv.weight[rows])
    proj = block.attn.proj.weight
    torch.testing.assert_close(proj[:, :head_dim - 1] + proj[:, head_dim:2 * head_dim - 1],
                               torch.zeros(d, head_dim - 1, dtype=torch.float64), rtol=0, atol=0)
    fc1, fc2 = block.mlp.fc1.weight, block.mlp.fc2.weight
    assert torch.equal(fc1[0], fc1[1]) and torch.equal(fc1[0], source.mlp.fc1.weight[0])
    assert torch.equal(fc2[:, 0], -fc2[:, 1]) and fc2[:, 0].abs().sum() > 0
    assert torch.equal(block.mlp.fc2.bias, torch.zeros(d, dtype=torch.float64))
    # the last neuron reads the direction every LayerNorm output is blind to: zero for any input
    x = torch.randn(3, 5, d, dtype=torch.float64) * 4 + 2
    with ops.use_backend("eager"), torch.no_grad():
        h = block.norm2(x)
        assert (h @ fc1[hidden - 1] + block.mlp.fc1.bias[hidden - 1]).abs().max() < 1e-13
        torch.testing.assert_close(block(x), x, rtol=0, atol=1e-13)
    # the copies get opposite gradients, so one optimizer step makes them differ
    _first_backward(big)
    g = block.mlp.fc1.weight.grad
    torch.testing.assert_close(g[0], -g[1], rtol=1e-10, atol=1e-15)
    assert g[0].abs().max() > 1e-8
    opt = torch.optim.SGD(big.parameters(), lr=0.1)
    opt.step()
    assert not torch.allclose(fc1[0], fc1[1])
    assert lemon_expand(src, depth=4, seed=4).blocks[1].mlp.fc2.weight.ne(
        lemon_expand(src, depth=4, seed=3).blocks[1].mlp.fc2.weight).any()  # seeded


def test_expand_block_cancel_mode():
    src = _source(init_values=0.1)
    block = src.blocks[1]
    before = {k: v.clone() for k, v in block.state_dict().items()}
    blocks = expand_block(block, 3, seed=1)  # depth_init="cancel" is the default
    assert len(blocks) == 3 and blocks[0] is block
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())  # the source is untouched
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    seq = torch.nn.Sequential(*blocks)
    with ops.use_backend("eager"), torch.no_grad():
        torch.testing.assert_close(seq(x), block(x), rtol=0, atol=1e-12)
    assert not torch.equal(blocks[1].mlp.fc2.weight, blocks[2].mlp.fc2.weight)  # each draws its own
    with ops.use_backend("eager"):
        seq(x).square().sum().backward()
    assert _without_gradient([(1, blocks[1]), (2, blocks[2])]) == []
    for p in seq.parameters():
        p.grad = None
    zero = torch.nn.Sequential(*expand_block(block, 2, depth_init="zero"))
    with ops.use_backend("eager"):
        zero(x).square().sum().backward()
    assert "1.attn.qkv.weight" in _without_gradient([(1, zero[1])])


@pytest.mark.parametrize("changes, target, message", [
    ({}, dict(embed_dim=8), "embed_dim"),
    ({}, dict(depth=1), "depth"),
    ({}, dict(mlp_ratio=1.0), "MLP hidden"),
    ({}, dict(embed_dim=20), "head_dim"),
    ({}, dict(embed_dim=24, num_heads=5), "must divide embed_dim"),
    ({}, dict(embed_dim=32, num_heads=2), "keeps the source head_dim"),
    ({}, dict(embed_dim=24.0), "integer"),
    ({}, dict(num_heads=0), "num_heads"),
    ({}, dict(mlp_ratio=-1.0), "mlp_ratio"),
    (dict(pre_norm=True), dict(embed_dim=24), "pre_norm"),
    (dict(global_pool="max"), dict(embed_dim=24), "fc_norm"),
    (dict(num_classes=0), dict(embed_dim=32), "num_classes=0"),
])
def test_lemon_bad_targets_raise(changes, target, message):
    with pytest.raises(ValueError, match=message):
        lemon_expand(_source(dtype=torch.float32, **changes), **target)


def test_lemon_bad_inputs_raise():
    with pytest.raises(TypeError, match="VisionTransformer"):
        lemon_expand(torch.nn.Linear(2, 2), embed_dim=4)
    block = _source(dtype=torch.float32).blocks[0]
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            expand_block(block, n)
    with pytest.raises(TypeError, match="Block"):
        expand_block(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="depth_init"):
        expand_block(block, 2, depth_init="copy")
    with pytest.raises(ValueError, match="depth_init"):
        lemon_expand(_source(dtype=torch.float32), depth=3, depth_init=None)


def _lrs(changes, lr=1e-3, min_lr=1e-6):
    from incubation.train import TrainConfig, lr_at
    cfg = dataclasses.replace(TrainConfig(lr=lr, min_lr=min_lr), **changes)
    return [lr_at(s, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, decay_steps=cfg.decay_steps)
            for s in range(cfg.steps)]


@pytest.mark.parametrize("steps, warmup", [(1000, 100), (50, 0), (7, 3), (3, 1), (2, 0)])
def test_lemon_schedule_paper_shape_is_one_cosine_to_the_end(steps, warmup):
    changes = lemon_schedule(steps, warmup_steps=warmup)
    assert changes["steps"] == steps and changes["warmup_steps"] == warmup
    lr = _lrs(changes)
    assert max(lr) == pytest.approx(1e-3)  # from-scratch peak kept, at the first post-warmup step
    assert lr[warmup] == pytest.approx(1e-3)
    assert lr[-1] == pytest.approx(1e-6)  # min_lr reached on the last step ...
    assert all(v > 1e-6 * (1 + 1e-9) for v in lr[:-1])  # ... and not before
    after = lr[warmup:]
    assert all(a > b for a, b in zip(after, after[1:]))  # strictly decreasing after the warmup
    t = [(s - warmup) / max(1, steps - 1 - warmup) for s in range(warmup, steps)]
    assert after == pytest.approx([1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * x)) for x in t])


def test_lemon_schedule_single_post_warmup_step_runs_at_the_peak():
    for steps, warmup in ((1, 0), (5, 4)):
        assert _lrs(lemon_schedule(steps, warmup_steps=warmup))[-1] == pytest.approx(1e-3)


def test_lemon_schedule_rejects_bad_input():
    for bad in (dict(total_steps=0), dict(total_steps=10, warmup_steps=10), dict(total_steps=2.0),
                dict(total_steps=10, warmup_steps=-1), dict(total_steps=True)):
        with pytest.raises(ValueError):
            lemon_schedule(**bad)


# ======================================================================================
# Apollo
# ======================================================================================
def _calibration(r):
    n = 0.6 / (r - 0.2)
    return (r + 0.4) * n, n


def _lvps_pmf(num_unique, depth):
    """P(depth = l) straight from the formula: y = m / (x + n) is decreasing in x, so
    P(floor(clip(y, 1, r) * N) >= l) = P(x <= m / (l / N) - n) for x ~ U(1e-6, 1)."""
    if num_unique == depth:
        return {depth: 1.0}
    m, n = _calibration(depth / num_unique)

    def at_least(level):
        if level <= num_unique:
            return 1.0
        if level > depth:
            return 0.0
        return min(1.0, max(0.0, (m / (level / num_unique) - n - 1e-6) / (1 - 1e-6)))

    return {lv: at_least(lv) - at_least(lv + 1) for lv in range(num_unique, depth + 1)}


def _apollo(depth=12, stages=(1, 3, 6, 12), switch_steps=(100, 200, 300), dtype=torch.float64, seed=0, **changes):
    vit = _source(dtype, **{"depth": depth, "embed_dim": 8, "num_heads": 1, **changes})
    return ApolloViT(vit, stages, switch_steps, seed=seed)


def test_lvps_formula_points():
    m, n = _calibration(4.0)  # N = 3, L = 12
    for x in (0.05, 0.1, 0.2, 0.3, 0.5):
        y = min(4.0, max(1.0, m / (x + n)))
        assert lvps_depth(x, 3, 12) == math.floor(y * 3)
    assert lvps_depth(1e-6, 3, 12) == 12  # y -> r + 0.4, clipped to r
    assert lvps_depth(1 - 1e-9, 3, 12) == 3  # y -> 0.6, clipped to 1
    assert lvps_depth(0.5, 12, 12) == 12
    assert {lvps_depth(x, 7, 12) for x in np.linspace(1e-6, 1 - 1e-9, 2001)} == set(range(7, 13))


@pytest.mark.parametrize("num_unique", [1, 3, 6, 12])
def test_lvps_sampler_distribution_per_stage(num_unique):
    steps = 12_000
    model = _apollo(stages=(num_unique,), switch_steps=())
    depths = np.array([model.depth_at(s) for s in range(steps)])
    pmf = _lvps_pmf(num_unique, 12)
    assert depths.min() >= num_unique and depths.max() <= 12
    for level, p in pmf.items():
        freq = (depths == level).mean()
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / steps) + 1e-9, (level, freq, p)
    mean = sum(lv * p for lv, p in pmf.items())
    std = math.sqrt(sum((lv - mean) ** 2 * p for lv, p in pmf.items()))
    assert abs(depths.mean() - mean) <= 5 * std / math.sqrt(steps) + 1e-9
    if num_unique < 12:  # low values prioritised: the shallowest depth is the most likely
        assert max(pmf, key=pmf.get) == num_unique


def test_depth_sampling_is_seeded_per_step_and_staged():
    a, b, c = _apollo(seed=3), _apollo(seed=3), _apollo(seed=4)
    da = [a.depth_at(s) for s in range(400)]
    assert da == [b.depth_at(s) for s in range(400)]
    assert da != [c.depth_at(s) for s in range(400)]
    assert [a.stage_at(s) for s in (0, 99, 100, 199, 200, 299, 300, 10_000)] == [1, 1, 3, 3, 6, 6, 12, 12]
    assert all(a.stage_at(s) <= d for s, d in enumerate(da))
    assert set(da[300:]) == {12}


def test_sharing_and_interpolation_maps():
    assert shared_blocks(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert shared_blocks(1, 4) == [0, 0, 0, 0]
    assert shared_blocks(12, 12) == list(range(12))
    assert interpolation_sources(3, 6) == [0, 0, 1, 1, 2, 2]
    assert interpolation_sources(3, 4) == [0, 0, 1, 2]
    assert interpolation_sources(1, 3) == [0, 0, 0]
    assert interpolation_sources(6, 12) == [j // 2 for j in range(12)]
    assert even_switch_steps(100, 4) == [25, 50, 75]


@pytest.mark.parametrize("depth, steps, stages, switches", [
    (12, 400, [1, 3, 6, 12], [20, 40, 100]),     # the authors' ViT / BERT-base setting
    (12, 40, [1, 3, 6, 12], [2, 4, 10]),         # --apollo_epoch_list 2,4,10,40
    (24, 1000, [2, 6, 12, 24], [50, 100, 250]),
    (6, 100, [1, 2, 3, 6], [5, 10, 25]),         # 6/12 and 6/4 round half up to 1 and 2
    (10, 200, [1, 3, 5, 10], [10, 20, 50]),      # 10/4 = 2.5 -> 3
    (4, 100, [1, 2, 4], [10, 25]),               # values 1, 1, 2, 4: the switch after 5 % is dropped
    (3, 100, [1, 2, 3], [10, 25]),               # 1, 1, 2, 3 (3/4 -> 1, 3/2 -> 2)
    (2, 100, [1, 2], [25]),                      # 1, 1, 1, 2
    (1, 100, [1], []),                           # a single stage
    (12, 15, [1, 3, 6, 12], [1, 2, 4]),          # the fewest steps giving every stage a step
    (2, 3, [1, 2], [1]),                         # 25 % of 3 rounds to 1
])
def test_apollo_schedule_values(depth, steps, stages, switches):
    assert apollo_schedule(depth, steps) == (stages, switches)


def test_apollo_schedule_rejects_bad_input():
    for depth, steps, message in [(0, 100, "depth"), (12.0, 100, "depth"), (True, 100, "depth"),
                                  (12, 0, "total_steps"), (12, -5, "total_steps"), (12, 100.0, "total_steps"),
                                  (12, None, "total_steps")]:
        with pytest.raises(ValueError, match=message):
            apollo_schedule(depth, steps)
    with pytest.raises(ValueError, match="at least 15 steps"):  # 5 % and 10 % of 14 both round to 1
        apollo_schedule(12, 14)
    with pytest.raises(ValueError, match="at least 2 steps"):
        apollo_schedule(2, 1)


def test_apollo_vit_schedule_options():
    vit = _source(dtype=torch.float32, depth=12, embed_dim=8, num_heads=1)
    default = ApolloViT(vit, total_steps=400)  # the authors' schedule by default
    assert (default.stages, default.switch_steps) == ((1, 3, 6, 12), (20, 40, 100))
    assert [default.stage_at(s) for s in (0, 19, 20, 39, 40, 99, 100, 399)] == [1, 1, 3, 3, 6, 6, 12, 12]
    assert ApolloViT(vit, [1, 3, 6, 12], total_steps=400).switch_steps == (20, 40, 100)  # its own stages: fine
    even = ApolloViT(vit, total_steps=400, schedule="even")  # the equal-length schedule
    assert even.stages == tuple(default_stages(12)) == (3, 6, 12) and even.switch_steps == (133, 267)
    assert ApolloViT(vit, (1, 6, 12), total_steps=300, schedule="even").switch_steps == (100, 200)
    explicit = ApolloViT(vit, (2, 12), (7,))
    assert (explicit.stages, explicit.switch_steps) == ((2, 12), (7,))
    for kwargs, message in [(dict(), "total_steps"), (dict(stages=(1, 12)), "total_steps"),
                            (dict(stages=(1, 12), switch_steps=(5,), total_steps=10), "not both"),
                            (dict(switch_steps=(5,)), "needs the stages"),
                            (dict(stages=(2, 12), total_steps=400), "sets the stages itself"),
                            (dict(total_steps=400, schedule="linear"), "schedule must be one of"),
                            (dict(total_steps=10), "at least 15 steps"),
                            (dict(total_steps=2, schedule="even"), "total_steps"),
                            (dict(total_steps=0, schedule="even"), "total_steps")]:
        with pytest.raises(ValueError, match=message):
            ApolloViT(vit, **kwargs)


def test_shared_block_is_one_tensor_with_summed_gradients():
    model = _apollo(depth=4, stages=(1, 2), switch_steps=(10,)).train()
    model.depth = 3
    assert model.block_slots(3) == [0, 0, 0]
    x = _images(model.vit, n=2)
    with ops.use_backend("eager"):
        model(x).square().sum().backward()
    # the same computation unrolled with three independent copies of the block
    vit = model.vit
    copies = [copy.deepcopy(vit.blocks[0]) for _ in range(3)]
    with ops.use_backend("eager"):
        h = vit.embed(x)
        for blk in copies:
            h = blk(h)
        vit.head_logits(h).square().sum().backward()
    for name, p in vit.blocks[0].named_parameters():
        summed = sum(dict(c.named_parameters())[name].grad for c in copies)
        torch.testing.assert_close(p.grad, summed, rtol=1e-10, atol=1e-12, msg=name)
    for slot in (1, 2, 3):  # blocks not in use get no gradient (the optimizer skips them)
        assert all(p.grad is None for p in vit.blocks[slot].parameters())


def test_growth_interpolates_and_keeps_slots():
    model = _apollo(depth=8, stages=(3, 4, 8), switch_steps=(5, 10))
    blocks = model.vit.blocks
    assert model.slots == [0, 1, 2] and model.num_unique == 3
    before = [copy.deepcopy(b.state_dict()) for b in blocks]
    model.prepare_step(5)  # 3 -> 4: new j <- old floor(3j / 4) = 0, 0, 1, 2
    assert model.num_unique == 4
    assert model.slots[0] == 0 and model.slots[2:] == [1, 2]  # old blocks keep their slots
    assert model.slots[1] not in (0, 1, 2)  # the extra copy goes to a never-used slot
    for j, source in enumerate(interpolation_sources(3, 4)):
        for key, value in blocks[model.slots[j]].state_dict().items():
            assert torch.equal(value, before[source][key]), (j, key)
    model.prepare_step(12)  # 4 -> 8 directly (resuming past a switch)
    assert model.num_unique == 8 and sorted(model.slots) == list(range(8))
    with pytest.raises(ValueError, match="only grows"):
        model.grow(4)


def test_growth_through_an_optimizer_built_at_the_start():
    model = _apollo(depth=4, stages=(1, 4), switch_steps=(1,), dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = _images(model.vit, n=4, dtype=torch.float32)
    for step in range(3):
        apollo_hook(step, model)
        with ops.use_backend("eager"):
            model(x).square().mean().backward()
        before = [b.mlp.fc1.weight.detach().clone() for b in model.vit.blocks]
        opt.step()
        opt.zero_grad(set_to_none=True)
        changed = [not torch.equal(b.mlp.fc1.weight, w) for b, w in zip(model.vit.blocks, before)]
        used = set(model.block_slots(model.depth))
        assert changed == [s in used for s in range(4)], (step, changed, used)
    assert model.num_unique == 4


def test_export_matches_eval_forward():
    model = _apollo(depth=6, stages=(2, 3), switch_steps=(3,))
    model.prepare_step(4)
    assert model.num_unique == 3
    plain = model.export()
    assert isinstance(plain, incubation.VisionTransformer) and plain.config.depth == 6
    for t, slot in enumerate(model.block_slots(6)):
        assert torch.equal(plain.blocks[t].attn.qkv.weight, model.vit.blocks[slot].attn.qkv.weight)
    model.eval()
    x = _images(model.vit)
    torch.testing.assert_close(_logits(plain, x), _logits(model, x), rtol=0, atol=0)
    with torch.no_grad():  # a copy: training the export leaves the wrapper alone
        plain.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(plain.blocks[0].attn.qkv.weight, model.vit.blocks[model.slots[0]].attn.qkv.weight)


def test_hook_resume_from_state_dict_does_not_regrow():
    model = _apollo(depth=6, stages=(2, 3, 6), switch_steps=(3, 6))
    for step in range(5):
        apollo_hook(step, model)
    state = copy.deepcopy(model.state_dict())
    assert "unique_slots" in state
    resumed = _apollo(depth=6, stages=(2, 3, 6), switch_steps=(3, 6), seed=0)
    resumed.load_state_dict(state)
    assert resumed.slots == model.slots
    apollo_hook(5, resumed)
    apollo_hook(5, model)
    assert resumed.depth == model.depth == model.depth_at(5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in resumed.state_dict().items())
    assert resumed.flops_per_image() == model.flops_per_image()  # earlier steps recounted

    class Wrapped(torch.nn.Module):  # DDP-style .module
        def __init__(self, module):
            super().__init__()
            self.module = module
    apollo_hook(6, Wrapped(resumed))
    assert resumed.num_unique == 6


def test_flops_per_image_averages_the_sampled_depths():
    model = _apollo(depth=6, stages=(1, 6), switch_steps=(20,))
    assert model.flops_per_image() == model.vit.flops_per_image()
    for step in range(25):
        model.prepare_step(step)
    model.prepare_step(24)  # the same step again is not counted twice
    per_depth = {d: incubation.VisionTransformer(model.vit.config.replace(depth=d)).flops_per_image()
                 for d in range(1, 7)}
    expected = sum(per_depth[model.depth_at(s)] for s in range(25)) / 25
    assert model.flops_per_image() == round(expected)
    assert model.flops_per_image() < model.vit.flops_per_image()


def test_apollo_errors():
    vit = _source(dtype=torch.float32, depth=4)
    for stages, switches, message in [((), (), "stages"), ((2, 1), (5,), "increasing"), ((1, 5), (5,), "depth=4"),
                                      ((1, 2), (), "one step per stage switch"), ((1, 2), (0,), "positive"),
                                      ((1, 2.0), (3,), "integers"), ((1, 2, 4), (5, 5), "increasing")]:
        with pytest.raises(ValueError, match=message):
            ApolloViT(vit, stages, switches)
    with pytest.raises(TypeError, match="VisionTransformer"):
        ApolloViT(torch.nn.Linear(2, 2), (1,), ())
    with pytest.raises(ValueError, match="seed"):
        ApolloViT(vit, (1,), (), seed=-1)
    model = ApolloViT(vit, (1, 4), (3,)).train()
    with pytest.raises(RuntimeError, match="apollo_hook"):
        model(_images(vit, dtype=torch.float32))
    with pytest.raises(ValueError, match="step"):
        model.prepare_step(-1)
    with pytest.raises(TypeError, match="ApolloViT"):
        apollo_hook(0, vit)


def _toy_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 7, (n,), generator=g))


def test_apollo_trains_through_the_engine_and_resumes_bit_identically(tmp_path):
    from incubation.train import TrainConfig, train
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, device="cpu", progress=False, checkpoint_every=1,
                      amp=False, seed=5)
    data = _toy_data()

    def fresh():
        return _apollo(depth=4, stages=(1, 2, 4), switch_steps=(2, 4), dtype=torch.float32, seed=1)

    full = fresh()
    result = train(full, data, data, cfg, tmp_path / "full", hooks=[apollo_hook])
    assert full.num_unique == 4 and result.steps == 6 and result.eval_acc is not None

    class Killed(Exception):
        pass

    def kill_at_step_3(step, model):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        train(fresh(), data, data, cfg, tmp_path / "cut", hooks=[apollo_hook, kill_at_step_3])
    resumed = fresh()
    train(resumed, data, data, cfg, tmp_path / "cut", hooks=[apollo_hook])
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    plain = full.export().eval()
    x = data.tensors[0][:4]
    torch.testing.assert_close(_logits(plain, x), _logits(full.eval(), x), rtol=0, atol=0)
