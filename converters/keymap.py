"""timm state_dict <-> canonical tree, driven by one table per architecture.

The canonical tree is framework-neutral: ``{(module_path, leaf): ndarray}`` where
``module_path`` is timm's dotted module name (``"blocks.3.attn.qkv"``) and arrays are already
in JAX layout (Linear ``(in, out)``, conv ``HWIO``). Leaves are ``kernel``/``bias`` for
Linear and conv, ``scale``/``bias`` for LayerNorm, and the parameter's own name for free
tensors (``cls_token``, ``gamma_1`` ...). ``converters.frameworks`` renames that tree into
Haiku or Flax params; the table below is the whole layout contract.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from .errors import ConversionError
from .lazy import LazyTensor, materialize
from .specs import CaiTSpec, EvaSpec, RelPosSpec, Spec, ViTSpec

Kind = Literal["linear", "conv", "norm", "param", "stat", "count"]
# Not trained: BatchNorm running statistics ("stat": held in the params tree, frozen by
# ``vitport.ops.batch_norm_frozen``'s stop_gradient and masked out of optimizer updates) and
# ``num_batches_tracked`` ("count": timm's int64 scalar, never in the params; written back as 0).
FROZEN_KINDS = ("stat", "count")
CanonicalKey = tuple[str, str]


@dataclass(frozen=True)
class Entry:
    """One tensor: its timm key and shape, where it lives in the canonical tree, and how."""

    timm_key: str
    module: str
    leaf: str
    kind: Kind
    timm_shape: tuple[int, ...]

    @property
    def key(self) -> CanonicalKey:
        return self.module, self.leaf

    def to_jax(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "linear" and self.leaf == "kernel":
            return a.T
        if self.kind == "conv" and self.leaf == "kernel":
            return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        return a

    def to_timm(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "linear" and self.leaf == "kernel":
            return a.T
        if self.kind == "conv" and self.leaf == "kernel":
            return a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        return a

    @property
    def jax_shape(self) -> tuple[int, ...]:
        return self.to_jax(np.empty(self.timm_shape, dtype=np.uint8)).shape


# ------------------------------------------------------------------------- table builders


def _linear(m: str, d_in: int, d_out: int, bias: bool = True) -> Iterator[Entry]:
    yield Entry(f"{m}.weight", m, "kernel", "linear", (d_out, d_in))
    if bias:
        yield Entry(f"{m}.bias", m, "bias", "linear", (d_out,))


def _norm(m: str, d: int, kind: str = "LayerNorm") -> Iterator[Entry]:
    """LayerNorm (weight, bias) or timm's ``RmsNorm`` (weight only)."""
    yield Entry(f"{m}.weight", m, "scale", "norm", (d,))
    if kind != "RmsNorm":
        yield Entry(f"{m}.bias", m, "bias", "norm", (d,))


def _param(key: str, shape: tuple[int, ...]) -> Entry:
    module, _, leaf = key.rpartition(".")
    return Entry(key, module, leaf, "param", shape)


def _mlp(m: str, d: int, hidden: int, bias: bool = True) -> Iterator[Entry]:
    yield from _linear(f"{m}.fc1", d, hidden, bias)
    yield from _linear(f"{m}.fc2", hidden, d, bias)


def _block_mlp(m: str, s: ViTSpec | EvaSpec) -> Iterator[Entry]:
    """timm's block MLP of ``s.mlp_layer``: ``Mlp`` and ``GluMlp`` have fc1 (GluMlp's packs x and
    gate, ``mlp_dim`` wide) and fc2 (from ``mlp_hidden``); ``SwiGLU`` has fc1_g, fc1_x, fc2;
    Eva's ``scale_mlp`` puts a LayerNorm over the hidden width before fc2."""
    if s.mlp_layer == "SwiGLU":
        yield from _linear(f"{m}.fc1_g", s.dim, s.mlp_dim, s.proj_bias)
        yield from _linear(f"{m}.fc1_x", s.dim, s.mlp_dim, s.proj_bias)
    else:
        yield from _linear(f"{m}.fc1", s.dim, s.mlp_dim, s.proj_bias)
    if getattr(s, "scale_mlp", False):
        yield from _norm(f"{m}.norm", s.mlp_hidden, getattr(s, "norm_layer", "LayerNorm"))
    yield from _linear(f"{m}.fc2", s.mlp_hidden, s.dim, s.proj_bias)


def _attn_pool(s: ViTSpec | EvaSpec, heads_mlp_dim: int) -> Iterator[Entry]:
    d = s.dim
    yield _param("attn_pool.latent", (1, 1, d))
    yield from _linear("attn_pool.q", d, d)
    yield from _linear("attn_pool.kv", d, 2 * d)
    yield from _linear("attn_pool.proj", d, d)
    yield from _norm("attn_pool.norm", d, getattr(s, "norm_layer", "LayerNorm"))
    yield from _mlp("attn_pool.mlp", d, heads_mlp_dim)


def _patch_embed(spec: Spec, bias: bool) -> Iterator[Entry]:
    p = spec.patch_size
    yield Entry("patch_embed.proj.weight", "patch_embed.proj", "kernel", "conv",
                (spec.dim, getattr(spec, "patch_in_channels", spec.channels), p, p))
    if bias:
        yield Entry("patch_embed.proj.bias", "patch_embed.proj", "bias", "conv", (spec.dim,))


def _conv(m: str, c_in: int, c_out: int, k: int, bias: bool = False) -> Iterator[Entry]:
    yield Entry(f"{m}.weight", m, "kernel", "conv", (c_out, c_in, k, k))
    if bias:
        yield Entry(f"{m}.bias", m, "bias", "conv", (c_out,))


def _batch_norm(m: str, d: int) -> Iterator[Entry]:
    """torch ``BatchNorm2d``: affine ``weight``, ``bias``, then the buffers ``running_mean``,
    ``running_var`` (kind "stat") and ``num_batches_tracked`` (kind "count", shape ())."""
    yield from _norm(m, d)
    yield Entry(f"{m}.running_mean", m, "mean", "stat", (d,))
    yield Entry(f"{m}.running_var", m, "var", "stat", (d,))
    yield Entry(f"{m}.num_batches_tracked", m, "num_batches_tracked", "count", ())


def _resnet_d_backbone(s: ViTSpec) -> Iterator[Entry]:
    """timm ResNet-D as a ``features_only`` backbone (``FeatureListNet`` keeps the ResNet's own
    module names): the deep stem ``conv1.{0,1,3,4,6}`` (Sequential indices with the ReLUs' gaps),
    ``bn1``, then ``layerN.j`` blocks ``conv1, bn1, conv2, bn2, conv3, bn3`` and, on the first,
    ``downsample.{1,2}`` (index 0 is the parameter-free avg pool)."""
    b, root = s.backbone, "patch_embed.backbone"
    yield from _conv(f"{root}.conv1.0", s.channels, b.stem_width, 3)
    yield from _batch_norm(f"{root}.conv1.1", b.stem_width)
    yield from _conv(f"{root}.conv1.3", b.stem_width, b.stem_width, 3)
    yield from _batch_norm(f"{root}.conv1.4", b.stem_width)
    yield from _conv(f"{root}.conv1.6", b.stem_width, b.stem_chs, 3)
    yield from _batch_norm(f"{root}.bn1", b.stem_chs)
    c_in = b.stem_chs
    for i, (depth, c_out, mid) in enumerate(zip(b.layers, b.channels, b.mid_channels)):
        for j in range(depth):
            m = f"{root}.layer{i + 1}.{j}"
            yield from _conv(f"{m}.conv1", c_in, mid, 1)
            yield from _batch_norm(f"{m}.bn1", mid)
            yield from _conv(f"{m}.conv2", mid, mid, 3)
            yield from _batch_norm(f"{m}.bn2", mid)
            yield from _conv(f"{m}.conv3", mid, c_out, 1)
            yield from _batch_norm(f"{m}.bn3", c_out)
            if j == 0:
                yield from _conv(f"{m}.downsample.1", c_in, c_out, 1)
                yield from _batch_norm(f"{m}.downsample.2", c_out)
            c_in = c_out


def _hybrid_backbone(s: ViTSpec) -> Iterator[Entry]:
    """A hybrid ViT's CNN (``patch_embed.backbone.*``), in timm's state_dict order: ResNetV2's
    ``stem.{conv,norm}`` (the stem alone is the backbone itself when there are no stages), then
    per block ``downsample.{conv,norm}`` (first block), ``conv1, norm1, conv2, norm2, conv3, norm3``.
    Weight-standardised convolutions have no bias; GroupNorms are affine."""
    b = s.backbone
    if b.kind == "resnet":
        yield from _resnet_d_backbone(s)
        return
    if b.kind == "convstem":  # timm's MCi ConvStem: i.conv (bias on the last), i.bn (all but the last)
        c_in = s.channels
        for i, (c_out, k) in enumerate(zip(b.channels, b.kernel_sizes)):
            last = i == len(b.channels) - 1
            yield from _conv(f"patch_embed.backbone.{i}.conv", c_in, c_out, k, bias=last)
            if not last:
                yield from _batch_norm(f"patch_embed.backbone.{i}.bn", c_out)
            c_in = c_out
        return
    root = "patch_embed.backbone"
    stem = f"{root}.stem" if b.layers else root
    yield from _conv(f"{stem}.conv", s.channels, b.stem_chs, 7)
    yield from _norm(f"{stem}.norm", b.stem_chs)
    c_in = b.stem_chs
    for i, (depth, c_out, mid) in enumerate(zip(b.layers, b.channels, b.mid_channels)):
        for j in range(depth):
            m = f"{root}.stages.{i}.blocks.{j}"
            if j == 0:
                yield from _conv(f"{m}.downsample.conv", c_in, c_out, 1)
                yield from _norm(f"{m}.downsample.norm", c_out)
            yield from _conv(f"{m}.conv1", c_in, mid, 1)
            yield from _norm(f"{m}.norm1", mid)
            yield from _conv(f"{m}.conv2", mid, mid, 3)
            yield from _norm(f"{m}.norm2", mid)
            yield from _conv(f"{m}.conv3", mid, c_out, 1)
            yield from _norm(f"{m}.norm3", c_out)
            c_in = c_out


def _final_norm_and_head(s: Spec, attn_pool_mlp_dim: int) -> Iterator[Entry]:
    """The tensors after the blocks of timm's VisionTransformer and Eva, in state_dict order."""
    d, kind = s.dim, getattr(s, "norm_layer", "LayerNorm")
    if s.has_norm:
        yield from _norm("norm", d, kind)
    if s.pool == "map":
        yield from _attn_pool(s, attn_pool_mlp_dim)
    if s.has_fc_norm:
        yield from _norm("fc_norm", d, kind)
    if s.num_classes:
        yield from _linear("head", d, s.num_classes)
        if getattr(s, "distilled", False):
            yield from _linear("head_dist", d, s.num_classes)


def vit_table(s: ViTSpec) -> list[Entry]:
    d = s.dim
    t: list[Entry] = []
    if s.class_token:
        t.append(_param("cls_token", (1, 1, d)))
    if s.reg_tokens:
        t.append(_param("reg_token", (1, s.reg_tokens, d)))
    t.append(_param("pos_embed", (1, s.num_pos_tokens, d)))
    if s.distilled:
        t.append(_param("dist_token", (1, 1, d)))
    if s.backbone is not None:
        t += _hybrid_backbone(s)
    if s.backbone is None or s.backbone.embed_proj:  # HybridEmbed(proj=False) has no proj
        t += _patch_embed(s, s.patch_bias)
    if s.pre_norm:
        t += _norm("norm_pre", d, s.norm_layer)
    for i in range(s.depth):
        b = f"blocks.{i}"
        if s.block_fn != "Block":
            t += _vit_block(b, s)
            continue
        t += _norm(f"{b}.norm1", d, s.norm_layer)
        t += _vit_attention(f"{b}.attn", s)
        if s.has_layer_scale:
            t.append(_param(f"{b}.ls1.gamma", (d,)))
        t += _norm(f"{b}.norm2", d, s.norm_layer)
        t += _block_mlp(f"{b}.mlp", s)
        if s.has_layer_scale:
            t.append(_param(f"{b}.ls2.gamma", (d,)))
    return t + list(_final_norm_and_head(s, s.mlp_dim))


def _vit_attention(a: str, s: ViTSpec) -> Iterator[Entry]:
    """timm ``Attention`` or ``DiffAttention`` at module path ``a``."""
    if s.attn_layer == "DiffAttention":
        yield from _diff_attention(a, s)
        return
    d, dh = s.dim, s.dim // s.heads
    yield from _linear(f"{a}.qkv", d, 3 * d, s.qkv_bias)
    if s.qk_norm:
        yield from _norm(f"{a}.q_norm", dh, s.norm_layer)
        yield from _norm(f"{a}.k_norm", dh, s.norm_layer)
    yield from _linear(f"{a}.proj", d, d, s.proj_bias)


def _lambdas(m: str, s: ViTSpec) -> Iterator[Entry]:
    half = s.dim // s.heads // 2  # differential attention: each head split in two halves of q and k
    for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
        yield _param(f"{m}.{name}", (half,))


def _diff_attention(a: str, s: ViTSpec) -> Iterator[Entry]:
    """timm ``DiffAttention``: its own lambda parameters come first in its state_dict, ``sub_norm``
    (RmsNorm over a head's 2 * half width) last."""
    d, half = s.dim, s.dim // s.heads // 2
    yield from _lambdas(a, s)
    yield from _linear(f"{a}.qkv", d, 3 * d, s.qkv_bias)
    if s.qk_norm:
        yield from _norm(f"{a}.q_norm", half, s.norm_layer)
        yield from _norm(f"{a}.k_norm", half, s.norm_layer)
    yield from _linear(f"{a}.proj", d, d, s.proj_bias)
    yield from _norm(f"{a}.sub_norm", 2 * half, "RmsNorm")


def _vit_block(b: str, s: ViTSpec) -> Iterator[Entry]:
    """The tensors of one block other than timm's ``Block``, in state_dict order."""
    d, kind = s.dim, s.norm_layer
    if s.block_fn == "ResPostBlock":  # attention, then its norm; MLP, then its norm
        yield from _vit_attention(f"{b}.attn", s)
        yield from _norm(f"{b}.norm1", d, kind)
        yield from _block_mlp(f"{b}.mlp", s)
        yield from _norm(f"{b}.norm2", d, kind)
    elif s.block_fn == "ParallelThingsBlock":
        for j in range(s.num_parallel):
            yield from _norm(f"{b}.attns.{j}.norm", d, kind)
            yield from _vit_attention(f"{b}.attns.{j}.attn", s)
            if s.has_layer_scale:
                yield _param(f"{b}.attns.{j}.ls.gamma", (d,))
        for j in range(s.num_parallel):
            yield from _norm(f"{b}.ffns.{j}.norm", d, kind)
            yield from _block_mlp(f"{b}.ffns.{j}.mlp", s)
            if s.has_layer_scale:
                yield _param(f"{b}.ffns.{j}.ls.gamma", (d,))
    else:  # (Diff)ParallelScalingBlock: own parameters first (mlp_bias, lambdas), then the modules
        diff = s.block_fn == "DiffParallelScalingBlock"
        qk = s.dim // s.heads // (2 if diff else 1)
        if not s.qkv_bias:
            yield _param(f"{b}.mlp_bias", (s.mlp_dim,))
        if diff:
            yield from _lambdas(b, s)
        yield from _norm(f"{b}.in_norm", d, kind)
        yield from _linear(f"{b}.in_proj", d, s.mlp_dim + 3 * d, s.qkv_bias)
        if s.qk_norm:
            yield from _norm(f"{b}.q_norm", qk, kind)
            yield from _norm(f"{b}.k_norm", qk, kind)
        if diff:
            yield from _norm(f"{b}.sub_norm", 2 * qk, "RmsNorm")
        if s.fused_out_proj:
            yield from _linear(f"{b}.out_proj", d + s.mlp_dim, d, s.proj_bias)
        else:
            yield from _linear(f"{b}.attn_out_proj", d, d, s.proj_bias)
            yield from _linear(f"{b}.mlp_out_proj", s.mlp_dim, d, s.proj_bias)
        if s.has_layer_scale:
            yield _param(f"{b}.ls.gamma", (d,))


def cait_table(s: CaiTSpec) -> list[Entry]:
    d, h = s.dim, s.heads
    t: list[Entry] = [_param("cls_token", (1, 1, d)), _param("pos_embed", (1, s.grid_size[0] * s.grid_size[1], d))]
    t += _patch_embed(s, True)
    for i in range(s.depth):
        b = f"blocks.{i}"
        t += [_param(f"{b}.gamma_1", (d,)), _param(f"{b}.gamma_2", (d,))]
        t += _norm(f"{b}.norm1", d)
        t += _linear(f"{b}.attn.qkv", d, 3 * d, s.qkv_bias)
        t += _linear(f"{b}.attn.proj", d, d)
        t += _linear(f"{b}.attn.proj_l", h, h)
        t += _linear(f"{b}.attn.proj_w", h, h)
        t += _norm(f"{b}.norm2", d)
        t += _mlp(f"{b}.mlp", d, s.mlp_dim)
    for j in range(s.cls_depth):
        b = f"blocks_token_only.{j}"
        t += [_param(f"{b}.gamma_1", (d,)), _param(f"{b}.gamma_2", (d,))]
        t += _norm(f"{b}.norm1", d)
        for qkv in ("q", "k", "v"):
            t += _linear(f"{b}.attn.{qkv}", d, d, s.qkv_bias)
        t += _linear(f"{b}.attn.proj", d, d)
        t += _norm(f"{b}.norm2", d)
        t += _mlp(f"{b}.mlp", d, s.cls_mlp_dim)
    t += _norm("norm", d)
    if s.num_classes:
        t += _linear("head", d, s.num_classes)
    return t


def eva_table(s: EvaSpec) -> list[Entry]:
    """timm ``Eva``. The rotary tables (``rope.*``) and ``EvaAttention``'s zero ``k_bias`` are
    non-persistent buffers that timm computes from the settings: vitport computes them too
    (``vitport.ops.rope_table``), so no tensor of theirs is read or written. Mixed RoPE's learned
    frequencies ``rope.freqs`` (2, depth, heads, head_dim // 2) are a parameter: an entry."""
    d, dh = s.dim, s.dim // s.heads
    t: list[Entry] = []
    if s.class_token:
        t.append(_param("cls_token", (1, 1, d)))
    if s.reg_tokens:
        t.append(_param("reg_token", (1, s.reg_tokens, d)))
    if s.abs_pos_embed:
        t.append(_param("pos_embed", (1, s.num_pos_tokens, d)))
    t += _patch_embed(s, s.patch_bias)
    if s.rope_type == "mixed":  # timm registers rope after patch_embed, before norm_pre
        t.append(_param("rope.freqs", (2, s.depth, s.heads, dh // 2)))
    if s.pre_norm:
        t += _norm("norm_pre", d, s.norm_layer)
    for i in range(s.depth):
        b = f"blocks.{i}"
        if s.has_layer_scale:
            t.append(_param(f"{b}.gamma_1", (d,)))
            if not s.attn_only_layer_scale:
                t.append(_param(f"{b}.gamma_2", (d,)))
        t += _norm(f"{b}.norm1", d, s.norm_layer)
        a = f"{b}.attn"
        eva = s.attn_type == "eva"  # EvaAttention: no k bias (a zero buffer when fused)
        if s.qkv_fused:
            if eva and s.qkv_bias:
                t += [_param(f"{a}.q_bias", (d,)), _param(f"{a}.v_bias", (d,))]
            t += _linear(f"{a}.qkv", d, 3 * d, s.qkv_bias and not eva)
        else:
            t += _linear(f"{a}.q_proj", d, d, s.qkv_bias)
            kv = s.kv_heads(i) * dh  # grouped-query attention: narrower k / v projections
            t += _linear(f"{a}.k_proj", d, kv, s.qkv_bias and not eva)
            t += _linear(f"{a}.v_proj", d, kv, s.qkv_bias)
        if s.qk_norm:
            t += _norm(f"{a}.q_norm", dh, s.norm_layer)
            t += _norm(f"{a}.k_norm", dh, s.norm_layer)
        if s.scale_attn_inner:
            t += _norm(f"{a}.norm", d, s.norm_layer)
        t += _linear(f"{a}.proj", d, d)
        t += _norm(f"{b}.norm2", d, s.norm_layer)
        t += _block_mlp(f"{b}.mlp", s)
    return t + list(_final_norm_and_head(s, s.attn_pool_mlp_dim))


def _rel_pos(m: str, s: RelPosSpec) -> Iterator[Entry]:
    """timm ``RelPosBias`` (its table) or ``RelPosMlp`` (its MLP, fc2 without bias in 'swin'
    mode). Their ``relative_position_index`` and ``rel_coords_log`` are non-persistent buffers
    computed from the grid (``vitport.ops.rel_pos_index`` / ``rel_pos_log_coords``)."""
    if s.rel_pos_type == "bias":
        yield _param(f"{m}.relative_position_bias_table", (s.num_rel_distances, s.heads))
    else:
        yield from _linear(f"{m}.mlp.fc1", 2, s.rel_pos_dim)
        yield from _linear(f"{m}.mlp.fc2", s.rel_pos_dim, s.heads, s.rel_pos_mlp_mode != "swin")


def relpos_table(s: RelPosSpec) -> list[Entry]:
    """timm ``VisionTransformerRelPos``: ``cls_token`` (a parameter of the root, so first),
    ``patch_embed``, ``shared_rel_pos``, the blocks (``RelPosBlock``: norm1, attn, ls1, norm2,
    mlp, ls2; ``ResPostRelPosBlock``: attn, norm1, mlp, norm2), norm / fc_norm, head."""
    d, dh = s.dim, s.dim // s.heads
    t: list[Entry] = []
    if s.class_token:
        t.append(_param("cls_token", (1, 1, d)))
    t += _patch_embed(s, True)
    if s.shared_rel_pos:
        t += _rel_pos("shared_rel_pos", s)
    for i in range(s.depth):
        b = f"blocks.{i}"
        a: list[Entry] = list(_linear(f"{b}.attn.qkv", d, 3 * d, s.qkv_bias))
        if s.qk_norm:
            a += _norm(f"{b}.attn.q_norm", dh)
            a += _norm(f"{b}.attn.k_norm", dh)
        if not s.shared_rel_pos:
            a += _rel_pos(f"{b}.attn.rel_pos", s)
        a += _linear(f"{b}.attn.proj", d, d)
        mlp = list(_mlp(f"{b}.mlp", d, s.mlp_dim))
        if s.block_fn == "ResPostRelPosBlock":
            t += a + list(_norm(f"{b}.norm1", d)) + mlp + list(_norm(f"{b}.norm2", d))
            continue
        t += list(_norm(f"{b}.norm1", d)) + a
        if s.has_layer_scale:
            t.append(_param(f"{b}.ls1.gamma", (d,)))
        t += list(_norm(f"{b}.norm2", d)) + mlp
        if s.has_layer_scale:
            t.append(_param(f"{b}.ls2.gamma", (d,)))
    return t + list(_final_norm_and_head(s, 0))


def key_table(spec: Spec) -> list[Entry]:
    """The full tensor table of an architecture, in timm's state_dict order."""
    if isinstance(spec, EvaSpec):
        return eva_table(spec)
    if isinstance(spec, RelPosSpec):
        return relpos_table(spec)
    return cait_table(spec) if isinstance(spec, CaiTSpec) else vit_table(spec)


# ------------------------------------------------------------------------------ conversion


def _shape_of(a) -> tuple[int, ...]:
    return tuple(int(n) for n in a.shape)


FLOATING = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(a: Any) -> str:
    """A numpy, torch or lazy tensor's dtype as numpy names it (``torch.float32`` -> ``float32``)."""
    return str(getattr(a, "dtype", type(a).__name__)).removeprefix("torch.")


def _non_finite(a: np.ndarray) -> int:
    if a.dtype.kind == "f":
        return int(np.size(a) - np.count_nonzero(np.isfinite(a)))  # no copy: this runs on every tensor read
    if a.dtype.name == "bfloat16":  # all exponent bits set: Inf or NaN
        return int(np.count_nonzero((a.view(np.uint16) & 0x7F80) == 0x7F80))
    return 0


def check_finite(tree: Mapping[str, Any], what: str) -> None:
    """Raise one ConversionError naming every tensor that holds NaN or Inf (lazy tensors are
    read one at a time)."""
    bad = []
    for k, a in tree.items():
        a = np.asarray(materialize(a))
        n = _non_finite(a)
        if n:
            bad.append(f"{k} ({n} of {a.size} values)")
    if bad:
        raise ConversionError(f"{what} holds NaN or Inf values", {"non-finite tensors": bad})


def checked_on_load(tree: Mapping[str, LazyTensor], what: str) -> dict[str, LazyTensor]:
    """``tree`` with the finiteness check moved to each tensor's read: the first non-finite
    tensor read raises ``check_finite``'s error over the whole tree (every bad tensor named)."""
    def checked(a: np.ndarray) -> np.ndarray:
        if _non_finite(a):
            check_finite(tree, what)
        return a

    return {k: v.map(checked) for k, v in tree.items()}


def timm_to_canonical(state_dict: Mapping[str, np.ndarray], spec: Spec, *,
                      source: str = "checkpoint") -> dict[CanonicalKey, np.ndarray]:
    """Map a timm state_dict (numpy arrays) to the canonical tree.

    Every source key must be consumed exactly once and every table entry filled with the
    right shape; all mismatches are collected into one ConversionError.
    """
    table = key_table(spec)
    expected = {e.timm_key: e for e in table}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: {_shape_of(state_dict[k])} in {source}, {expected[k].timm_shape} expected"
             for k in expected if k in state_dict and _shape_of(state_dict[k]) != expected[k].timm_shape]
    not_float = [f"{k}: {_dtype_name(state_dict[k])} in {source}, a floating-point tensor expected"
                 for k in expected if k in state_dict and expected[k].kind != "count"
                 and _dtype_name(state_dict[k]) not in FLOATING]
    if not_float and not (missing or unexpected or wrong):  # integers would be narrowed on the way, silently
        raise ConversionError(f"{source} holds weights that are not floating-point numbers (timm's "
                              "load_state_dict would cast them to float; cast them yourself if they are meant "
                              "to be weights)", {"wrong dtypes": not_float})
    if missing or unexpected or wrong:
        fit = fitting_model_args({k: _shape_of(v) for k, v in state_dict.items()}, spec)
        hint = ""
        if fit:
            hint = (f". It fits with other model_args: --model-args '{json.dumps(fit)}' "
                    f"(model_args={fit!r} in Python)")
            if "num_classes" in fit:
                hint += f", or a pretrained tag with {fit['num_classes']} classes (e.g. an in21k tag)"
        err = ConversionError(
            f"{source} does not match the {spec.family} architecture it is converted for "
            f"(dim={spec.dim}, depth={spec.depth}, heads={spec.heads}, num_classes={spec.num_classes}, "
            f"image_size={list(spec.image_size)}){hint}",
            {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": wrong})
        err.fitting_model_args = fit
        raise err
    if any(isinstance(v, LazyTensor) for v in state_dict.values()):  # read when placed, one at a time
        lazy = checked_on_load({e.timm_key: state_dict[e.timm_key] for e in table}, source)
        return {e.key: lazy[e.timm_key].map(e.to_jax, e.jax_shape) for e in table}
    check_finite(state_dict, source)
    # num_batches_tracked ("count") only counts BatchNorm updates, which vitport never makes.
    return {e.key: e.to_jax(np.asarray(state_dict[e.timm_key])) for e in table if e.kind != "count"}


def param_table(spec: Spec) -> list[Entry]:
    """The entries held in a front-end's params (every one but ``num_batches_tracked``)."""
    return [e for e in key_table(spec) if e.kind != "count"]


def _mismatches(shapes: Mapping[str, tuple[int, ...]], spec: Spec) -> int:
    expected = {e.timm_key: e.timm_shape for e in key_table(spec)}
    return (sum(k not in shapes or tuple(shapes[k]) != s for k, s in expected.items())
            + sum(k not in expected for k in shapes))


def fitting_model_args(shapes: Mapping[str, tuple[int, ...]], spec: Spec) -> dict[str, Any]:
    """timm ``model_args`` (classes, image size) under which a state_dict's shapes fit ``spec``
    exactly; ``{}`` when changing them would not make it fit."""
    args: dict[str, Any] = {}
    head = shapes.get("head.weight")
    if head is not None and len(head) == 2 and head[0] != spec.num_classes:
        args["num_classes"] = int(head[0])
    elif head is None and "head.bias" not in shapes and spec.num_classes:
        args["num_classes"] = 0
    pos = shapes.get("pos_embed")
    if pos is not None and len(pos) == 3:
        prefix = 0 if isinstance(spec, CaiTSpec) or spec.no_embed_class else spec.num_prefix_tokens
        side = math.isqrt(max(pos[1] - prefix, 0))
        if side and side * side == pos[1] - prefix and (side, side) != tuple(spec.grid_size):
            args["img_size"] = side * spec.patch_size
    if not args:
        return {}
    try:
        fitted = dataclasses.replace(spec, num_classes=args.get("num_classes", spec.num_classes),
                                     image_size=args.get("img_size", spec.image_size))
    except (TypeError, ValueError):
        return {}
    return args if _mismatches(shapes, fitted) == 0 else {}


def canonical_to_timm(tree: Mapping[CanonicalKey, np.ndarray], spec: Spec) -> dict[str, np.ndarray]:
    """Inverse of ``timm_to_canonical``: exact (only transposes); fresh, writable, C-ordered
    arrays, so ``torch.from_numpy`` can take them."""
    table = key_table(spec)
    expected = {e.key: e for e in table if e.kind != "count"}
    missing = [".".join(filter(None, k)) for k in expected if k not in tree]
    unexpected = [".".join(filter(None, k)) for k in tree if k not in expected]
    wrong = [f"{'.'.join(filter(None, k))}: {_shape_of(tree[k])}, {e.jax_shape} expected"
             for k, e in expected.items() if k in tree and _shape_of(tree[k]) != e.jax_shape]
    if missing or unexpected or wrong:
        raise ConversionError(f"params do not match the {spec.family} architecture",
                              {"missing params": missing, "unexpected params": unexpected,
                               "wrong shapes": wrong})
    return {e.timm_key: (np.zeros((), np.int64) if e.kind == "count"  # timm's value for an untrained BatchNorm
                         else np.array(e.to_timm(np.asarray(tree[e.key])), order="C", copy=True)) for e in table}
