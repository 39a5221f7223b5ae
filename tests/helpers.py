"""Shared test helpers: tiny timm twins with bug-sensitive weights."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from timm.layers import GluMlp, SwiGLU

# Small enough to run in well under a second, big enough that every path is exercised
# (several heads, >1 block, a non-trivial patch grid, a classifier).
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10)
TINY_CAIT = dict(TINY, depth_token_only=2)

def tiny_resnetv2_embed(**kwargs):
    """timm's ``HybridEmbed`` over a small timm ``ResNetV2`` built as timm's ``_resnetv2`` builds
    the hybrids' (non-pre-activation, 'same' stem, ``StdConv2dSame`` eps 1e-8, GroupNormAct), with
    two stages (1 and 2 blocks, the second strided) and 8 GroupNorm groups: every path of the R26/R50
    stems at a test's cost. A fresh backbone per model (a shared one would share its weights)."""
    from functools import partial

    from timm.layers import GroupNormAct, HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2

    backbone = ResNetV2(layers=(1, 2), channels=(64, 128), stem_chs=16, num_classes=0, global_pool="",
                        in_chans=kwargs.get("in_chans", 3), preact=False, stem_type="same",
                        conv_layer=partial(StdConv2dSame, eps=1e-8), norm_layer=partial(GroupNormAct, num_groups=8))
    return HybridEmbed(backbone, **kwargs)


def tiny_resnet_d_embed(**kwargs):
    """timm's ``HybridEmbed`` over a small timm ResNet-D built as ``resnet26d(features_only=True)``
    builds the hybrids' (deep stem, avg-down shortcuts, BatchNorm2d), with two stages (1 and 2
    blocks, the second strided, entered at an odd size so the ceil-mode avg pool has a partial
    window). A fresh backbone per model."""
    import timm
    from timm.layers import HybridEmbed

    backbone = timm.create_model("resnet26d", pretrained=False, features_only=True, out_indices=[2],
                                 layers=(1, 2), channels=(8, 16), stem_width=8,
                                 in_chans=kwargs.get("in_chans", 3))
    return HybridEmbed(backbone, **kwargs)


# (timm architecture, extra kwargs) covering every option vitport implements.
TINY_CASES = {
    "vit_token": ("vit_base_patch16_224", TINY),
    "deit_distilled": ("deit_base_distilled_patch16_224", TINY),
    "deit3_layerscale_no_embed_class": ("deit3_base_patch16_224", TINY),
    "clip_pre_norm_quick_gelu": ("vit_base_patch32_clip_quickgelu_224", TINY),
    "siglip_map_gelu_tanh": ("vit_base_patch16_siglip_224", TINY),
    "reg_tokens_avg_fc_norm": ("vit_base_patch16_reg4_gap_256", TINY),
    "qk_norm": ("vit_base_patch16_224", dict(TINY, qk_norm=True)),
    "no_proj_bias": ("vit_base_patch16_224", dict(TINY, proj_bias=False)),
    "no_qkv_bias_no_class_token": ("vit_base_patch16_224", dict(TINY, qkv_bias=False, class_token=False,
                                                                global_pool="avg")),
    "dynamic_img_size": ("vit_base_patch16_224", dict(TINY, dynamic_img_size=True)),
    "img_size_not_a_patch_multiple": ("vit_base_patch16_224", dict(TINY, img_size=36)),  # timm floors the grid
    "cait": ("cait_s24_224", TINY_CAIT),
    # SwiGLUPacked (GluMlp, gate first, SiLU), LayerScale; fc1 170 wide from mlp_ratio 2.66667 * 2.
    "swiglu_packed_dinov2_giant": ("vit_giant_patch14_dinov2", TINY),
    "swiglu": ("vit_base_patch16_224", dict(TINY, mlp_layer=SwiGLU, act_layer="silu", proj_bias=False)),
    "glu_mlp_gate_last_sigmoid": ("vit_base_patch16_224", dict(TINY, mlp_layer=GluMlp, act_layer="sigmoid")),
    # timm Eva. dynamic_img_size: timm then builds its rotary tables per call at the model's
    # dtype, so float64 parity is exact (a fixed grid's table is built once in float32: test_parity).
    "eva_rope_cat_ape_xy": ("vit_small_patch16_rope_ape_224", dict(TINY, dynamic_img_size=True)),
    "eva_pe_core_map_pre_norm": ("vit_pe_core_tiny_patch16_384", dict(TINY, dynamic_img_size=True)),
    "eva_dinov3_swiglu_reg": ("vit_small_plus_patch16_dinov3", TINY),
    "eva_attn_bias_qk_norm_scale_norms": ("vit_medium_patch16_rope_reg1_gap_256", dict(
        TINY, dynamic_img_size=True, qk_norm=True, scale_attn_inner=True, swiglu_mlp=True, scale_mlp=True)),
    "eva_unfused_swiglu_packed_attn_only_ls": ("vit_base_patch16_rope_224", dict(
        TINY, dynamic_img_size=True, qkv_fused=False, swiglu_mlp=True, attn_only_layer_scale=True)),
    # timm VisionTransformerRelPos. Per-block RelPosMlp ('cr' log coordinates, zero bias on the
    # class token's row and column), ResPostRelPosBlock, class token, token pool.
    "relpos_mlp_res_post_cls_token": ("vit_relpos_base_patch32_plus_rpn_256", dict(
        TINY, class_token=True, global_pool="token", rel_pos_dim=16)),
    # Shared RelPosBias (with BEiT's three class-token rows), LayerScale, qk_norm, avg pool + fc_norm.
    "srelpos_shared_bias_cls_avg_fc_norm": ("vit_srelpos_small_patch16_224", dict(
        TINY, rel_pos_type="bias", class_token=True, fc_norm=True, qk_norm=True)),
    # Mixed RoPE: learned per-block, per-head frequencies (rope.freqs), absolute pos_embed too. timm
    # builds its tables in float32 in every dtype: float64 parity is bounded by torch's float32
    # sin/cos (vitport.parity.tolerance; test_parity.test_eva_rope_mixed_tables shows the rest exact).
    "eva_rope_mixed_ape": ("vit_small_patch16_rope_mixed_ape_224", TINY),
    # ParallelScalingBlock (fused in_proj, mlp_bias as qkv_bias=False, qk_norm), RmsNorm everywhere, pre_norm.
    "parallel_scaling_rmsnorm_xp": ("vit_base_patch16_xp_224", TINY),
    # Block with DiffAttention (lambda_init from the block index, sub_norm), LayerScale, register token.
    "diff_attention_reg": ("vit_dwee_patch16_reg1_gap_256", TINY),
    # A hybrid ViT over a small timm ResNetV2 (same code path as vit_small_r26_s32_224's R26 stem).
    "hybrid_resnetv2_same": ("vit_small_r26_s32_224", dict(TINY, img_size=48, patch_size=2,
                                                           embed_layer=tiny_resnetv2_embed)),
    # Sapiens2: RmsNorm everywhere (blocks, q/k norm, norm), grouped-query attention in one block
    # (2 k/v heads for 4 query heads, unfused q/k/v), DINOv3 RoPE with train-time rescale_coords=2.
    "eva_sapiens2_rmsnorm_gqa": ("vit_base_patch16_sapiens2", dict(TINY, num_kv_heads=(2, 4), num_reg_tokens=2)),
    # A hybrid ViT over a small timm ResNet-D (vit_small_resnet26d_224's stem: BatchNorm, avg-down).
    "hybrid_resnet_d": ("vit_small_resnet26d_224", dict(TINY, img_size=44, patch_size=2,
                                                        embed_layer=tiny_resnet_d_embed)),
}

# Cases timm's own hub writer (``save_for_hf``) can write: a class-valued kwarg (``mlp_layer``)
# is not JSON and timm refuses it.
HUB_WRITABLE_CASES = sorted(c for c, (_, kw) in TINY_CASES.items()
                            if all(isinstance(v, (bool, int, float, str, type(None))) for v in kw.values()))


def tiny_timm(arch: str, dtype: str = "float64", seed: int = 0, **kwargs):
    from vitport.parity import build_timm_model

    return build_timm_model(arch, dtype, seed, **kwargs)


def images(spec, batch: int = 2, dtype: str = "float64", seed: int = 1, size=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size or spec.image_size
    return rng.standard_normal((batch, h, w, spec.channels)).astype(dtype)


BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"


def env_with_test_xla_flags(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, with the tests' compile-fast XLA flags
    (conftest.py) added to XLA_FLAGS: a subprocess whose numbers a test compares with its own, bit
    for bit, must compile as the test process does."""
    env = dict(os.environ, **extra)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {os.environ.get('VITPORT_TESTS_XLA_FLAGS', '')}".strip()
    return env


def run_without_torch(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing torch or timm fails (compiling with
    the tests' XLA flags)."""
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True,
                          timeout=timeout, env=env_with_test_xla_flags())
    assert proc.returncode == 0, proc.stderr
    return proc
