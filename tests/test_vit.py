"""incubation.nn.VisionTransformer against timm's: same keys, logits and gradients; conversions."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import incubation
from incubation import ops

CONFIGS = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3),
    "small-avgpool": dict(img_size=48, patch_size=16, embed_dim=384, depth=2, num_heads=6,
                          global_pool="avg", class_token=False),
    "base-no-qkv-bias": dict(img_size=32, patch_size=16, embed_dim=768, depth=1, num_heads=12, qkv_bias=False),
    "layer-scale-regs": dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2,
                             init_values=1e-2, reg_tokens=4),
    "non-square-no-embed-class": dict(img_size=(24, 40), patch_size=8, embed_dim=80, depth=2, num_heads=1,
                                      no_embed_class=True, reg_tokens=1, global_pool="avgmax", fc_norm=False),
    "pre-norm-no-proj-bias": dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, pre_norm=True,
                                  proj_bias=False, mlp_ratio=2.5, global_pool="max"),
}


def _pair(cfg, seed=0):
    torch.manual_seed(seed)
    theirs = TimmViT(num_classes=10, **cfg)
    with torch.no_grad():  # make every parameter non-trivial (timm zero-inits biases)
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return theirs, incubation.from_timm(theirs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match_timm(name):
    cfg = CONFIGS[name]
    theirs, ours = _pair(cfg)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    h, w = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 2
    x = torch.randn(3, cfg.get("in_chans", 3), h, w)
    with ops.use_backend("eager"):
        out_ours = ours(x)
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=2e-5, rtol=1e-4)
    target = torch.randn_like(out_theirs)
    (out_ours * target).sum().backward()
    (out_theirs * target).sum().backward()
    grads_theirs = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads_theirs[key].grad, atol=2e-5, rtol=1e-4, msg=key)


def test_float64_agreement_is_tight():
    theirs, ours = _pair(CONFIGS["layer-scale-regs"])
    theirs.double(), ours.double()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-12, rtol=1e-10)


def test_round_trip_is_lossless():
    theirs, ours = _pair(CONFIGS["tiny"])
    back = incubation.to_timm(ours)
    for (k1, a), (k2, b) in zip(theirs.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(back(x), theirs(x))
    assert incubation.from_timm(back).config == ours.config


def test_stochastic_depth_and_dropout_match_timm_with_same_rng():
    # random draws happen in timm's order (proj_drop, drop_path1, drop1, drop2, drop_path2)
    cfg = dict(CONFIGS["layer-scale-regs"], drop_path_rate=0.5, proj_drop_rate=0.2)
    theirs, ours = _pair(cfg)
    ours.train(), theirs.train()
    x = torch.randn(8, 1, 28, 28)
    torch.manual_seed(5)
    a = ours(x)
    torch.manual_seed(5)
    b = theirs(x)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(a, ours.eval()(x), atol=1e-3)  # the masks did something


def test_unsupported_timm_options_are_listed():
    model = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, qk_norm=True,
                    global_pool="map", attn_drop_rate=0.1)
    with pytest.raises(ValueError) as info:
        incubation.from_timm(model)
    msg = str(info.value)
    assert "qk_norm" in msg and "map" in msg
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        incubation.from_timm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="incubation.VisionTransformer"):
        incubation.to_timm(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=100, num_heads=3), "divisible by num_heads"),
    (dict(img_size=30, patch_size=8), "multiple of patch_size"),
    (dict(global_pool="map"), "global_pool"),
    (dict(class_token=False), "needs class_token"),
    (dict(attn_drop_rate=0.1), "attn_drop_rate"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
])
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        incubation.VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2), **kwargs})


def test_unknown_kwarg_and_bad_input_shape():
    with pytest.raises(TypeError, match="qk_norm"):
        incubation.VisionTransformer(qk_norm=True)
    model = incubation.VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28))


def test_config_round_trips_through_dict():
    cfg = incubation.ViTConfig(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2,
                               init_values=0.1)
    assert incubation.ViTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(depth=5).depth == 5
    with pytest.raises(ValueError, match="unknown ViT config keys"):
        incubation.ViTConfig.from_dict({"depth": 2, "width": 3})


@pytest.mark.parametrize("name", ["tiny", "small-avgpool", "layer-scale-regs", "non-square-no-embed-class"])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_empty_batch_matches_timm(name, backend):
    cfg = CONFIGS[name]
    theirs, ours = _pair(cfg)
    h, w = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 2
    x = torch.randn(0, cfg.get("in_chans", 3), h, w, requires_grad=True)
    for train in (False, True):
        theirs.train(train), ours.train(train)
        want = theirs(x)
        with ops.use_backend(backend):
            got = ours(x)
            got.sum().backward()   # an empty batch also trains (a zero gradient)
        assert got.shape == want.shape == (0, 10) and got.dtype == want.dtype
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(img_size="28"), "img_size must be a positive int or a pair"),
    (dict(img_size=(32, "32")), "img_size must be"),
    (dict(img_size=True), "img_size must be"),
    (dict(img_size=(32, 32, 32)), "img_size must be"),
    (dict(patch_size=8.0), "patch_size must be"),
    (dict(patch_size=0), "patch_size must be"),
    (dict(depth="2"), "depth must be a positive integer"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0"),
    (dict(num_classes=None), "num_classes must be"),
    (dict(reg_tokens=1.5), "reg_tokens must be"),
    (dict(mlp_ratio="4"), "mlp_ratio must be a finite number"),
    (dict(mlp_ratio=float("nan")), "mlp_ratio must be a finite number"),
    (dict(mlp_ratio=0.01), r"mlp_ratio 0.01 gives int\(embed_dim \* mlp_ratio\) = 0 hidden units"),
    (dict(qkv_bias="False"), "qkv_bias must be True or False"),
    (dict(fc_norm=1), "fc_norm must be None, True or False"),
    (dict(global_pool=None), "global_pool must be one of"),
    (dict(init_values="1e-5"), "init_values must be None or a finite number"),
    (dict(norm_eps=0), "norm_eps must be a finite number > 0"),
    (dict(drop_rate="0.1"), "drop_rate must be a number in"),
    (dict(drop_path_rate=float("nan")), "drop_path_rate must be a number in"),
])
def test_config_types_are_checked_and_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        incubation.ViTConfig(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2), **kwargs})


def test_config_accepts_json_lists_and_numpy_ints():
    import numpy as np
    cfg = incubation.ViTConfig(img_size=[32, 48], patch_size=np.int64(8), embed_dim=48, depth=1, num_heads=2,
                               mlp_ratio=1 / 48)   # one hidden unit is the smallest MLP
    assert cfg.img_size == (32, 48) and cfg.patch_size == (8, 8) and type(cfg.patch_size[0]) is int
    assert cfg.mlp_hidden_dim == 1
    incubation.to_timm(incubation.VisionTransformer(cfg))   # converts


@pytest.mark.parametrize("options", [
    dict(), dict(qkv_bias=False, proj_bias=False, init_values=0.1), dict(pre_norm=True, final_norm=False),
    dict(global_pool="avg", class_token=False, reg_tokens=2, num_classes=0), dict(no_embed_class=True, reg_tokens=1),
    dict(global_pool="avg", fc_norm=True, init_values=1e-5)])
def test_num_params_counts_the_built_model(options):
    cfg = incubation.ViTConfig(**{**dict(img_size=(16, 24), patch_size=(4, 8), in_chans=2, num_classes=5,
                                         embed_dim=12, depth=2, num_heads=2, mlp_ratio=1.5), **options})
    assert cfg.num_params() == sum(p.numel() for p in incubation.VisionTransformer(cfg).parameters())


def test_sizes_beyond_this_machines_memory_are_refused_before_allocating(monkeypatch):
    """issue 25: --embed-dim 1000000 ended in the allocator's traceback. On the meta device
    nothing is allocated, so any size builds there (as timm's models do)."""
    from incubation.nn import vit
    with pytest.raises(ValueError, match=r"more than this machine's memory .* most of them from embed_dim=1000000, "
                                         r"depth=12, mlp_ratio=4.0 \(the blocks\)"):
        incubation.VisionTransformer(embed_dim=1_000_000, num_heads=1)
    with pytest.raises(ValueError, match=r"most of them from num_classes=1000000000000 \(the head\)"):
        incubation.VisionTransformer(num_classes=10 ** 12)
    base = incubation.ViTConfig()   # ViT-B: 86.6 M parameters, 346 MB
    monkeypatch.setattr(vit, "memory_bytes", lambda: 4 * base.num_params() - 1)
    with pytest.raises(ValueError, match="more than this machine's memory"):
        incubation.VisionTransformer(base)
    with torch.device("meta"):
        assert incubation.VisionTransformer(base).pos_embed.is_meta
    monkeypatch.setattr(vit, "memory_bytes", lambda: 4 * base.num_params())
    incubation.VisionTransformer(base)
