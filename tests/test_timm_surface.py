"""The parts of timm's ViT interface on incubation.VisionTransformer, checked against timm itself:
pretrained_cfg, the classifier, optimizer grouping, grad checkpointing, intermediate features."""
import pytest
import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.models import group_parameters
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.optim import create_optimizer_v2

import incubation
from incubation import ops
from incubation.timm_compat import timm_config

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
VARIANTS = {
    "cls": TINY,
    "regs-layer-scale": dict(TINY, reg_tokens=2, init_values=0.1),
    "avg-no-cls-pre-norm": dict(TINY, class_token=False, global_pool="avg", pre_norm=True),
    "no-embed-class-nonsquare": dict(TINY, img_size=(16, 40), no_embed_class=True, reg_tokens=1),
}


def _pair(cfg, seed=0, num_classes=10):
    torch.manual_seed(seed)
    theirs = TimmViT(num_classes=num_classes, **cfg)
    with torch.no_grad():  # every parameter non-trivial (timm zero-inits biases and tokens)
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return theirs, incubation.from_timm(theirs)


def _images(cfg, n=2, dtype=torch.float32):
    h, w = cfg["img_size"] if isinstance(cfg["img_size"], tuple) else (cfg["img_size"],) * 2
    return torch.randn(n, cfg.get("in_chans", 3), h, w, dtype=dtype)


def _assert_same(a, b):
    """Equal structure (tuples, lists, dicts) and values to float64 rounding."""
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.is_contiguous() == b.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)


# -- pretrained_cfg ---------------------------------------------------------------------------
def test_pretrained_cfg_round_trips_and_resolves_like_timm():
    theirs = timm.create_model("vit_base_patch16_224.augreg_in21k_ft_in1k", pretrained=False,
                               depth=1, embed_dim=48, num_heads=3)
    ours = incubation.from_timm(theirs)
    assert ours.pretrained_cfg == theirs.pretrained_cfg and ours.pretrained_cfg is not theirs.pretrained_cfg
    assert ours.default_cfg is ours.pretrained_cfg
    back = incubation.to_timm(ours)
    assert back.pretrained_cfg == theirs.pretrained_cfg and back.default_cfg is back.pretrained_cfg
    assert back.pretrained_cfg is not ours.pretrained_cfg

    want = resolve_data_config({}, model=theirs)
    assert want["mean"] == want["std"] == (0.5, 0.5, 0.5) and want["crop_pct"] == 0.9
    assert resolve_data_config({}, model=ours) == want == resolve_data_config({}, model=back)

    ours.pretrained_cfg["crop_pct"] = 1.0   # a deep copy: the timm model is untouched
    assert theirs.pretrained_cfg["crop_pct"] == 0.9
    ours.default_cfg = {"input_size": (3, 32, 32)}
    assert ours.pretrained_cfg == {"input_size": (3, 32, 32)}


@pytest.mark.parametrize("in_chans, img_size", [(1, 28), (3, (24, 40)), (4, 16)])
def test_default_pretrained_cfg_describes_the_model(in_chans, img_size):
    model = incubation.VisionTransformer(img_size=img_size, patch_size=8 if in_chans != 1 else 4,
                                         in_chans=in_chans, embed_dim=32, depth=1, num_heads=2)
    h, w = img_size if isinstance(img_size, tuple) else (img_size, img_size)
    cfg = resolve_data_config({}, model=model)
    assert cfg["input_size"] == (in_chans, h, w)
    assert len(cfg["mean"]) == len(cfg["std"]) == in_chans
    if in_chans == 3:   # incubation.data's ImageFolder normalisation
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert resolve_data_config({}, model=incubation.to_timm(model)) == cfg
    # timm's eval transform built from it yields what the model takes
    from PIL import Image
    image = Image.new("L" if in_chans == 1 else "RGB", (50, 60))
    if in_chans == 4:
        image = Image.new("RGBA", (50, 60))
    x = create_transform(**cfg)(image)
    assert x.shape == (in_chans, h, w)
    assert model.eval()(x[None]).shape == (1, 1000)


# -- classifier -------------------------------------------------------------------------------
def test_reset_classifier_matches_timm_and_updates_the_config():
    theirs, ours = _pair(TINY)
    assert ours.get_classifier() is ours.head
    x = _images(TINY)
    for args in [(5,), (0, "avg"), (7, "max"), (3, "token"), (0, "")]:
        theirs.reset_classifier(*args)
        ours.reset_classifier(*args)
        assert isinstance(ours.get_classifier(), type(theirs.get_classifier()))
        assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
               [(k, v.shape) for k, v in theirs.state_dict().items()]
        assert ours.config == timm_config(theirs)   # the config describes the new head and pooling
        assert ours.num_classes == args[0] and ours.global_pool == (args[1] if len(args) > 1 else "token")
        rebuilt = incubation.VisionTransformer(ours.config)
        assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == \
               [(k, v.shape) for k, v in ours.state_dict().items()]
        with ops.use_backend("eager"):
            got = ours.eval()(x)
        assert got.shape == theirs.eval()(x).shape
        if args[0] == 0:   # no head: the pooled features themselves
            torch.testing.assert_close(got, theirs(x), atol=2e-5, rtol=1e-4)
    assert ours.config.fc_norm is False and isinstance(ours.norm, incubation.nn.LayerNorm)  # norm stayed put


def test_new_head_is_initialised_like_ours_on_the_models_device_and_dtype():
    model = incubation.VisionTransformer(**TINY, num_classes=0).double().train()
    model.reset_classifier(500)
    head = model.get_classifier()
    assert head.weight.dtype == torch.float64 and head.training
    assert torch.all(head.bias == 0) and 0.018 < head.weight.std().item() < 0.022
    assert model(_images(TINY, dtype=torch.float64)).shape == (2, 500)


def test_reset_classifier_rejects_bad_pooling_and_changes_nothing():
    model = incubation.VisionTransformer(**TINY, class_token=False, global_pool="avg")
    head, config = model.head, model.config
    for bad in ["token", "map"]:
        with pytest.raises(ValueError, match="class_token|global_pool"):
            model.reset_classifier(3, bad)
        assert model.head is head and model.config == config and model.global_pool == "avg"


# -- optimizer grouping -------------------------------------------------------------------------
def _groups(model, **kwargs):
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, **kwargs)
    return sorted((g["weight_decay"], g.get("lr_scale", 1.0), sorted(names[id(p)] for p in g["params"]))
                  for g in opt.param_groups)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_no_weight_decay_and_group_matcher_match_timm(name):
    theirs, ours = _pair(VARIANTS[name])
    present = {n for n in ("pos_embed", "cls_token", "reg_token") if getattr(theirs, n) is not None}
    assert ours.no_weight_decay() == present <= theirs.no_weight_decay()
    assert ours.group_matcher() == theirs.group_matcher() == ours.group_matcher(coarse=True)
    assert group_parameters(ours, ours.group_matcher()) == group_parameters(theirs, theirs.group_matcher())
    # what timm's optimizer factory does with them: the same weight decay and layer-decay groups
    assert _groups(ours) == _groups(theirs)
    assert _groups(ours, layer_decay=0.75) == _groups(theirs, layer_decay=0.75)


# -- gradient checkpointing -----------------------------------------------------------------------
def _loss_and_grads(model, x, target, seed):
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    torch.manual_seed(seed)
    loss = ((model(x) - target) ** 2).sum()
    loss.backward()
    return loss.detach(), x.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_checkpointing_gives_identical_loss_and_gradients(backend, dtype):
    cfg = dict(VARIANTS["regs-layer-scale"], depth=4, drop_path_rate=0.4, proj_drop_rate=0.1)
    model = incubation.VisionTransformer(**cfg, num_classes=10).to(dtype).train()
    x, target = _images(cfg, n=6, dtype=dtype), torch.randn(6, 10, dtype=dtype)
    with ops.use_backend(backend):
        loss, xgrad, grads = _loss_and_grads(model, x, target, seed=3)
        model.set_grad_checkpointing()
        assert model.grad_checkpointing
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ckpt_loss, ckpt_xgrad, ckpt_grads = _loss_and_grads(model, x, target, seed=3)
        other_seed_loss = _loss_and_grads(model, x, target, seed=4)[0]
    assert torch.equal(loss, ckpt_loss) and torch.equal(xgrad, ckpt_xgrad)
    for k in grads:
        assert torch.equal(grads[k], ckpt_grads[k]), k
    assert not torch.equal(loss, other_seed_loss)   # the drop-path masks are random, and repeated
    # the blocks' activations were not kept: only a few tensors outside the blocks were saved
    model.set_grad_checkpointing(False)
    kept = []
    with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t,
                                                                             lambda t: t):
        model(x.requires_grad_(True)).sum()
    assert 0 < len(saved) < len(kept) / 2


def test_grad_checkpointing_survives_conversion_and_no_grad():
    theirs, ours = _pair(TINY)
    theirs.set_grad_checkpointing(True)
    ours = incubation.from_timm(theirs)
    assert ours.grad_checkpointing and incubation.to_timm(ours).grad_checkpointing
    with torch.no_grad():
        assert ours.eval()(_images(TINY)).shape == (2, 10)


# -- forward_features / forward_head / forward_intermediates ----------------------------------------
COMBOS = [
    dict(),
    dict(indices=2),
    dict(indices=[0, -1], return_prefix_tokens=True, norm=True),
    dict(indices=[1], stop_early=True, output_fmt="NLC"),
    dict(indices=(2, 0, 2), intermediates_only=True),
    dict(indices=1, return_prefix_tokens=True, output_dict=True),
    dict(norm=True, intermediates_only=True, output_dict=True, output_fmt="NLC"),
]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_intermediates_and_features_match_timm(name):
    theirs, ours = _pair(VARIANTS[name])
    theirs.double().eval(), ours.double().eval()
    x = _images(VARIANTS[name], n=3, dtype=torch.float64)
    with ops.use_backend("eager"):
        _assert_same(ours.forward_features(x), theirs.forward_features(x))
        feats = theirs.forward_features(x)
        for pre_logits in (False, True):
            _assert_same(ours.forward_head(feats, pre_logits=pre_logits), theirs.forward_head(feats, pre_logits))
        for kwargs in COMBOS:
            _assert_same(ours.forward_intermediates(x, **kwargs), theirs.forward_intermediates(x, **kwargs))
        ours.set_grad_checkpointing(True)   # the same values through checkpointed blocks
        _assert_same(ours.forward_intermediates(x, indices=2), theirs.forward_intermediates(x, indices=2))


def test_forward_intermediates_bad_arguments():
    model = incubation.VisionTransformer(**TINY)
    x = _images(TINY)
    for bad in [0, 4, [3], [-4], []]:
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("indices, prune_norm, prune_head", [(1, False, True), ([0, 1], True, True),
                                                             ([-2], True, False), (3, False, False)])
@pytest.mark.parametrize("name", ["cls", "avg-no-cls-pre-norm"])
def test_prune_intermediate_layers_matches_timm(name, indices, prune_norm, prune_head):
    cfg = dict(VARIANTS[name], drop_path_rate=0.2)
    theirs, ours = _pair(cfg)
    theirs.double().eval(), ours.double().eval()
    kept = ours.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    assert kept == theirs.prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.config == timm_config(theirs)
    rebuilt = incubation.VisionTransformer(ours.config)
    assert list(rebuilt.state_dict()) == list(ours.state_dict())
    assert [b.drop_path1.drop_prob for b in rebuilt.blocks] == \
           pytest.approx([b.drop_path1.drop_prob for b in ours.blocks])
    x = _images(cfg, dtype=torch.float64)
    with ops.use_backend("eager"):
        _assert_same(ours.forward_intermediates(x, indices=kept), theirs.forward_intermediates(x, indices=kept))
        _assert_same(ours(x), theirs(x))
