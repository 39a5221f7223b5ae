"""timm's feature API on converted models equals timm's methods, in every front-end:
forward_features, forward_head, forward_intermediates and attention maps (float64,
bug-sensitive weights)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY_CASES, images, tiny_timm

import vitport
from converters import FRAMEWORKS
from converters.errors import InvalidArgumentError

CASES = ["vit_token", "deit_distilled", "reg_tokens_avg_fc_norm", "siglip_map_gelu_tanh", "cait",
         "hybrid_resnetv2_same"]  # a hybrid: its CNN stem shrinks the image before the patch grid
TOL = 1e-10


def torch_nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def close(ours, theirs, what):
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    err = float(np.abs(ours - theirs).max()) if ours.size else 0.0
    assert err <= TOL * max(1.0, float(np.abs(theirs).max())), f"{what}: max abs {err:.3e}"


@pytest.fixture(scope="module", params=CASES)
def case(request):
    arch, kwargs = TINY_CASES[request.param]
    model = tiny_timm(arch, "float64", **kwargs)
    return request.param, model


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_forward_features_and_head(case, framework):
    import torch

    name, model = case
    jm = vitport.from_timm(model, framework)
    x = images(jm.spec, dtype="float64")
    with torch.no_grad():
        feats = model.forward_features(torch_nchw(x))
        close(jm.forward_features(x), feats, f"{name} forward_features")
        close(jm.forward_head(feats.numpy()), model.forward_head(feats), f"{name} forward_head")
        close(jm.forward_head(feats.numpy(), pre_logits=True), model.forward_head(feats, pre_logits=True),
              f"{name} forward_head(pre_logits=True)")


INTERMEDIATE_ARGS = [dict(), dict(indices=1), dict(indices=[0, -1], norm=True), dict(output_fmt="NLC"),
                     dict(indices=2, intermediates_only=True), dict(output_fmt="NHWC", norm=True)]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_forward_intermediates(case, framework):
    import torch

    name, model = case
    jm = vitport.from_timm(model, framework)
    x = images(jm.spec, dtype="float64")
    args_list = list(INTERMEDIATE_ARGS)
    if name != "cait":
        args_list.append(dict(indices=[1], return_prefix_tokens=True))
    for args in args_list:
        timm_args = dict(args, output_fmt="NCHW" if args.get("output_fmt") == "NHWC" else args.get("output_fmt", "NCHW"))
        with torch.no_grad():
            theirs = model.forward_intermediates(torch_nchw(x), **timm_args)
        ours = jm.forward_intermediates(x, **args)
        if not args.get("intermediates_only"):
            close(ours[0], theirs[0], f"{name} {args} final")
            ours, theirs = ours[1], theirs[1]
        assert len(ours) == len(theirs), args
        for o, t in zip(ours, theirs):
            if args.get("return_prefix_tokens"):
                close(o[1], t[1], f"{name} {args} prefix")
                o, t = o[0], t[0]
            if args.get("output_fmt") == "NHWC":
                t = t.permute(0, 2, 3, 1)
            close(o, t, f"{name} {args}")


def timm_attention(model, x_nchw) -> dict:
    """What timm's attention modules pass to ``attn_drop``: the weights that multiply v. For
    differential attention the weights that multiply v are ``w1 - lambda * w2`` of what attn_drop
    sees; a ParallelThingsBlock's branches are put side by side on the heads axis."""
    import numpy as np
    import torch

    captured, handles = {}, []

    def hook(module, block):
        def fn(_m, _a, out):
            if hasattr(module, "_compute_lambda"):  # DiffAttention, DiffParallelScalingBlock
                b, h2, n, _ = out.shape
                out = out.view(b, h2 // 2, 2, n, n)
                out = out[:, :, 0] - module._compute_lambda().type_as(out) * out[:, :, 1]
            out = out.detach().numpy()
            captured[block] = np.concatenate([captured[block], out], axis=1) if block in captured else out
        return fn

    for name, module in model.named_modules():
        parts = name.split(".")
        if parts[0] in ("blocks", "blocks_token_only") and len(parts) > 1 and hasattr(module, "attn_drop"):
            module.fused_attn = False
            handles.append(module.attn_drop.register_forward_hook(hook(module, ".".join(parts[:2]))))
    try:
        with torch.no_grad():
            model(x_nchw)
    finally:
        for h in handles:
            h.remove()
    return captured


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_attention_maps(case, framework):
    name, model = case
    jm = vitport.from_timm(model, framework)
    x = images(jm.spec, dtype="float64")
    ours = jm.attention_maps(x)
    theirs = timm_attention(model, torch_nchw(x))
    assert sorted(ours) == sorted(theirs)
    heads, tokens = jm.spec.heads, jm.spec.grid_size[0] * jm.spec.grid_size[1] + getattr(jm.spec, "num_prefix_tokens", 0)
    for block, weights in ours.items():
        close(weights, theirs[block], f"{name} {block} attention")
        if block.startswith("blocks_token_only"):
            assert weights.shape == (2, heads, 1, tokens)
        elif name != "cait" and not jm.spec.differential:  # differential rows sum to 1 - lambda
            np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-12)  # softmax rows


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("arch,kwargs", [
    ("vit_base_patch16_xp_224", {}),  # ParallelScalingBlock: the block's own attn_drop
    ("vit_dpwee_patch16_reg1_gap_256", {}),  # DiffParallelScalingBlock: differential weights
    ("vit_small_patch16_18x2_224", dict(attn_layer="diff")),  # two DiffAttention branches side by side
    ("vit_base_patch16_rpn_224", {}),  # ResPostBlock
])
def test_attention_maps_of_other_blocks(arch, kwargs, framework):
    from helpers import TINY

    model = tiny_timm(arch, "float64", **dict(TINY, **kwargs))
    jm = vitport.from_timm(model, framework)
    x = images(jm.spec, dtype="float64")
    ours, theirs = jm.attention_maps(x), timm_attention(model, torch_nchw(x))
    assert sorted(ours) == sorted(theirs) == [f"blocks.{i}" for i in range(jm.spec.depth)]
    tokens = jm.spec.grid_size[0] * jm.spec.grid_size[1] + jm.spec.num_prefix_tokens
    heads = jm.spec.heads * (jm.spec.num_parallel if jm.spec.block_fn == "ParallelThingsBlock" else 1)
    for block, weights in ours.items():
        assert weights.shape == (2, heads, tokens, tokens)
        close(weights, theirs[block], f"{arch} {block} attention")


def test_feature_api_bad_arguments():
    model = tiny_timm(*TINY_CASES["vit_token"][:1], "float32", **TINY_CASES["vit_token"][1])
    jm = vitport.from_timm(model, "nnx")
    x = images(jm.spec, dtype="float32")
    with pytest.raises(InvalidArgumentError, match="last-n count must be 1 to 2"):
        jm.forward_intermediates(x, indices=3)
    with pytest.raises(InvalidArgumentError, match="block index 5"):
        jm.forward_intermediates(x, indices=[5])
    with pytest.raises(InvalidArgumentError, match="output_fmt"):
        jm.forward_intermediates(x, output_fmt="NWHC")
    with pytest.raises(InvalidArgumentError, match="forward_features output"):
        jm.forward_head(np.zeros((2, 32), np.float32))
