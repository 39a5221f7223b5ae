"""The converter layer: key tables, renamers, round trips and the errors it raises."""

from __future__ import annotations

import dataclasses
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, TINY_CASES, tiny_timm
from timm.layers import RmsNorm

import vitport
from converters import (FRAMEWORKS, CaiTSpec, ConversionError, UnsupportedArchitectureError, ViTSpec, canonical_to_framework,
                        canonical_to_timm, framework_path, framework_to_canonical, key_table,
                        spec_from_dict, spec_from_timm_model, spec_to_dict, timm_to_canonical)
from vitport.config import ModelConfig
from vitport.frontends import front_end
from vitport.timm_bridge import state_dict_to_numpy



@pytest.fixture(scope="module", params=sorted(TINY_CASES))
def tiny(request):
    arch, kwargs = TINY_CASES[request.param]
    model = tiny_timm(arch, "float32", **kwargs)
    return model, spec_from_timm_model(model), state_dict_to_numpy(model.state_dict())


def test_table_is_the_state_dict(tiny):
    """Every timm key appears exactly once in the table, with timm's shape, in timm's order."""
    model, spec, sd = tiny
    table = key_table(spec)
    assert [e.timm_key for e in table] == list(sd), "table order follows the state_dict"
    assert {e.timm_key: e.timm_shape for e in table} == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_init_tree_matches_converted_tree(tiny, framework):
    """The JAX modules create exactly the params the converter fills, with the same shapes."""
    _, spec, sd = tiny
    shapes = jax.eval_shape(functools.partial(front_end(framework).init, ModelConfig(spec)), jax.random.PRNGKey(0))
    converted = canonical_to_framework(timm_to_canonical(sd, spec), spec, framework)
    assert jax.tree.structure(shapes) == jax.tree.structure(converted)
    assert jax.tree.leaves(jax.tree.map(lambda s: s.shape, shapes)) == \
        jax.tree.leaves(jax.tree.map(lambda a: a.shape, converted))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_round_trip_is_bit_exact(tiny, framework, dtype):
    import torch

    model, spec, _ = tiny
    # as model.to(dtype) casts: floating tensors only (BatchNorm's num_batches_tracked stays int64)
    sd = state_dict_to_numpy({k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
                              for k, v in model.state_dict().items()})
    jm = vitport.from_state_dict(sd, spec, framework)
    back = jm.to_timm_state_dict()
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        assert back[k].tobytes() == sd[k].tobytes(), k
    # timm itself accepts it
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in back.items()}
                          if dtype == "bfloat16" else {k: torch.from_numpy(v) for k, v in back.items()})


def test_layouts():
    spec = ViTSpec(image_size=32, patch_size=8, dim=32, depth=1, heads=4, mlp_dim=64, num_classes=10)
    by_key = {e.timm_key: e for e in key_table(spec)}
    w = np.arange(32 * 3 * 8 * 8).reshape(32, 3, 8, 8)
    assert by_key["patch_embed.proj.weight"].to_jax(w).shape == (8, 8, 3, 32)  # OIHW -> HWIO
    assert by_key["patch_embed.proj.weight"].to_jax(w)[1, 2, 0, 5] == w[5, 0, 1, 2]
    assert by_key["blocks.0.attn.qkv.weight"].jax_shape == (32, 96)  # (out, in) -> (in, out)
    e = by_key["blocks.0.norm1.bias"]
    assert framework_path(e, spec, "haiku") == ("vit/blocks_0/norm1", "offset")
    assert framework_path(e, spec, "flax") == ("params", "blocks_0", "norm1", "bias")
    assert framework_path(by_key["cls_token"], spec, "haiku") == ("vit", "cls_token")


def test_spec_json_round_trip():
    for spec in (ViTSpec(init_values=1e-5, reg_tokens=4), CaiTSpec()):
        assert spec_from_dict(spec_to_dict(spec)) == spec


def test_checkpoint_for_another_architecture_reports_everything():
    model = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    sd = state_dict_to_numpy(model.state_dict())
    spec = dataclasses.replace(spec_from_timm_model(model), depth=3, num_classes=7)
    sd["blocks.0.attn.qkv.bias"] = sd["blocks.0.attn.qkv.bias"][:10]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as err:
        timm_to_canonical(sd, spec)
    msg = str(err.value)
    assert "missing keys" in msg and "blocks.2.norm1.weight" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg
    assert "wrong shapes" in msg and "blocks.0.attn.qkv.bias: (10,)" in msg and "head.weight: (10, 32)" in msg


def test_non_finite_weights_are_named():
    model = tiny_timm("cait_s24_224", "float32", **dict(TINY, depth_token_only=1))
    sd = state_dict_to_numpy(model.state_dict())
    sd["blocks.1.gamma_2"] = sd["blocks.1.gamma_2"].copy()
    sd["blocks.1.gamma_2"][3] = np.nan
    sd["head.bias"] = np.full_like(sd["head.bias"], np.inf)
    with pytest.raises(ConversionError, match=r"NaN or Inf[\s\S]*blocks\.1\.gamma_2 \(1 of 32[\s\S]*head\.bias"):
        vitport.from_state_dict(sd, spec_from_timm_model(model), "flax")


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_wrong_params_tree_is_reported(framework):
    spec = ViTSpec(image_size=32, patch_size=8, dim=32, depth=1, heads=4, mlp_dim=64, num_classes=10)
    params = vitport.init_params(spec, framework)
    with pytest.raises(ConversionError, match=r"missing params[^\n]*fc_norm[\s\S]*unexpected params[^\n]*\bnorm/"):
        framework_to_canonical(params, dataclasses.replace(spec, pool="avg", fc_norm=True), framework)


def resnet_embed(name: str, out_indices=(2,)):
    """An ``embed_layer`` over a timm ``features_only`` backbone other than the hybrids' own."""
    def embed(**kwargs):
        import timm
        from timm.layers import HybridEmbed

        backbone = timm.create_model(name, pretrained=False, features_only=True, out_indices=list(out_indices))
        return HybridEmbed(backbone, **kwargs)
    return embed


@pytest.mark.parametrize("arch,kwargs,named", [
    ("vit_base_patch16_224", dict(global_pool="avgmax"), "avgmax"),
    ("vit_base_patch16_224", dict(scale_attn_norm=True), "scale_attn_norm"),
    ("vit_base_patch16_224", dict(norm_layer="simplenorm"), "SimpleNorm"),
    ("vit_base_patch16_224", dict(act_layer="relu"), "ReLU"),
    ("vit_base_patch16_224", dict(pos_embed="none"), "pos_embed='none'"),
    ("vit_base_patch16_224", dict(dynamic_img_pad=True), "dynamic_img_pad"),
    ("vit_base_patch16_xp_224", dict(norm_layer="rmsnormfp32"), "RmsNormFp32"),
    ("vit_small_resnet26d_224", dict(embed_layer=resnet_embed("resnet26")), "only the deep ResNet-D stem"),
    ("vit_small_resnet26d_224", dict(embed_layer=resnet_embed("convnext_atto", out_indices=[2])),
     "hybrid CNN stems other than timm's ResNetV2, ResNet-D and ConvStem"),
    ("vit_base_mci_224", dict(dynamic_img_size=True), "dynamic_img_size with a hybrid CNN stem"),
    ("vit_base_r50_s16_224", dict(dynamic_img_size=True), "dynamic_img_size with a hybrid CNN stem"),
    ("vit_giant_patch14_dinov2", dict(scale_mlp_norm=True), "scale_mlp_norm"),
    ("vit_base_patch16_rope_224", dict(rope_type="mrope", rope_grid_indexing="ij"), "rope_type='mrope'"),
    ("vit_base_patch16_sapiens2", dict(norm_layer=functools.partial(RmsNorm, affine=False)), "RmsNorm without weight"),
    ("vit_base_patch16_rope_224", dict(rope_rescale_coords=2.0), "rope coordinate augmentation .*'cat'"),
    ("vit_base_patch16_rope_224", dict(use_post_norm=True), "EvaBlockPostNorm"),
])
def test_unsupported_timm_options_are_refused_by_name(arch, kwargs, named):
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedArchitectureError, match=named):
        vitport.from_timm(model, "flax")


def test_relpos_options_not_implemented_are_refused_by_name():
    """VisionTransformerRelPos reads every module; an activation vitport lacks is named."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model("vit_relpos_base_patch16_224", pretrained=False, act_layer=torch.nn.ReLU)
    with pytest.raises(UnsupportedArchitectureError, match="VisionTransformerRelPos.*\n.*ReLU"):
        vitport.from_timm(model, "flax")


def test_unknown_architecture_suggests_a_name():
    with pytest.raises(UnsupportedArchitectureError, match="did you mean vit_base_patch16_224"):
        vitport.create_model("vit_bsae_patch16_224")


def test_zero_dim_tensors_keep_their_shape(tmp_path):
    """timm's BatchNorm ``num_batches_tracked`` is an int64 scalar: written as shape (), not (1,)."""
    from safetensors.numpy import load_file

    from converters.writer import write_safetensors

    write_safetensors({"n": np.zeros((), np.int64), "w": np.ones((2, 3), np.float32)[:, ::2]},
                      tmp_path / "t.safetensors")
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back["n"].shape == () and back["n"].dtype == np.int64 and back["w"].shape == (2, 2)
