"""The model, written once: which submodules each timm module has, and how they are wired.

A front-end (Haiku, Flax linen, Flax NNX) supplies only primitives (Linear, LayerNorm, the
patch conv, a free parameter, dropout, stochastic depth) and one generic composite module.
Everything else is here, framework-free:

- ``children(kind, cfg, ...)`` declares a timm module's submodules and parameters, under
  timm's names and in timm's order (``{"norm1": Norm(...), "attn": Node("Attention"), ...}``);
- ``FORWARD[kind](m, cfg, *inputs)`` wires them. ``m`` is a front-end's ``Layers`` view of
  the module: ``m("norm1")`` is the callable submodule, ``m.param("cls_token")`` the array.

So a timm option is a spec field, a key-table entry, and a branch here; a front-end learns
about it only if it needs a new primitive. ``docs/design.md`` has the checklist.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from converters.errors import InvalidArgumentError
from converters.specs import CaiTSpec, EvaSpec, RelPosSpec, Spec, ViTSpec, diff_lambda_init

from . import ops
from .config import ModelConfig

# ------------------------------------------------------------------------ declarations


@dataclass(frozen=True)
class Linear:
    in_features: int
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class PatchConv:
    """Non-overlapping patchify convolution (timm ``PatchEmbed.proj``)."""

    in_channels: int
    out_channels: int
    patch_size: int
    bias: bool = True


@dataclass(frozen=True)
class Norm:
    """Affine LayerNorm with the model's own eps (two-pass variance, as torch computes it), or with
    ``kind="RmsNorm"`` timm's ``RmsNorm`` (``x * rsqrt(mean(x**2) + eps) * weight``, no bias).
    ``scale_init``: the weight's init (timm's ResPostBlock starts its norms at ``init_values``)."""

    features: int
    eps: float
    kind: str = "LayerNorm"
    scale_init: float = 1.0


@dataclass(frozen=True)
class Conv:
    """A general 2-D convolution (timm's ``nn.Conv2d``, ``StdConv2d``, ``StdConv2dSame``): HWIO
    kernel, ``padding`` 'SAME' (TF's rule) or a symmetric pixel count, ``groups``; with
    ``std_eps`` the kernel is weight-standardised before use (``ops.standardize_weight``)."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: str | int = 0
    groups: int = 1
    bias: bool = False
    std_eps: float | None = None


@dataclass(frozen=True)
class GroupNorm:
    """Affine GroupNorm over NHWC channels (timm ``GroupNormAct``'s norm; the activation is wired
    in the forward): ``groups`` contiguous channel groups, two-pass variance, eps ``eps``."""

    features: int
    groups: int
    eps: float


@dataclass(frozen=True)
class BatchNorm:
    """torch ``BatchNorm2d`` over NHWC channels, always in evaluation mode (``ops.batch_norm_frozen``):
    affine ``scale`` / ``bias`` (trained) and the running statistics ``mean`` / ``var`` (timm's
    ``running_mean`` / ``running_var``), which are held next to them in the params tree but frozen:
    no gradient reaches them and ``vitport.training`` masks them out of the optimizer. Training mode
    does not switch to batch statistics (as is usual when fine-tuning a hybrid ViT's CNN stem)."""

    features: int
    eps: float


@dataclass(frozen=True)
class Param:
    """A free tensor. ``init``: 'trunc_normal' (std 0.02), 'small_normal' (std 1e-6, timm's
    cls/reg tokens), 'normal' (std ``value``: DiffAttention's lambdas), 'constant' (``value``:
    LayerScale) or 'rope_mixed' (timm's ``init_random_2d_freqs``, ``value``: the temperature)."""

    shape: tuple[int, ...]
    init: str = "trunc_normal"
    value: float = 0.0


@dataclass(frozen=True)
class Dropout:
    rate: float


@dataclass(frozen=True)
class DropPath:
    """timm's stochastic depth: drop whole residual branches per sample."""

    rate: float


@dataclass(frozen=True)
class TrainKey:
    """A fresh PRNG key from the rng stream ``stream`` in training, ``None`` in evaluation: the
    random draw of a timm module that is random only in training (Eva's RoPE coordinate
    augmentation, stream 'rope'). Front-ends: Haiku's key sequence, linen's ``make_rng``, NNX's
    ``rngs[stream]``."""

    stream: str


@dataclass(frozen=True)
class Node:
    """A composite timm module of ``kind`` (a key of ``FORWARD``) built from ``cfg``.

    ``args`` are the extra declaration arguments of ``children(kind, cfg, *args)``.
    """

    kind: str
    cfg: ModelConfig
    args: tuple = ()

    def children(self) -> dict[str, Any]:
        return children(self.kind, self.cfg, *self.args)


def initializer(p: Param) -> Callable[[jax.Array, tuple[int, ...], Any], jax.Array]:
    """``init(key, shape, dtype)`` for a free parameter (timm's inits for these tensors)."""
    if p.init == "trunc_normal":
        return jax.nn.initializers.truncated_normal(0.02)
    if p.init == "small_normal":
        return jax.nn.initializers.normal(1e-6)
    if p.init == "rope_mixed":
        return _rope_mixed_init(p.value)
    if p.init == "normal":
        return jax.nn.initializers.normal(p.value)
    return jax.nn.initializers.constant(p.value)


def _rope_mixed_init(temperature: float) -> Callable[[jax.Array, tuple[int, ...], Any], jax.Array]:
    """timm's ``init_random_2d_freqs`` for (2, depth, heads, head_dim // 2): magnitudes
    ``1 / T ** (arange(0, head_dim, 4) / head_dim)`` rotated by one random angle per block and head;
    x frequencies ``[m cos a | m cos(a + pi/2)]``, y frequencies ``[m sin a | m sin(a + pi/2)]``."""
    def init(key, shape, dtype=jnp.float32):
        _, depth, heads, half = shape
        head_dim = 2 * half
        mag = 1.0 / temperature ** (jnp.arange(0, head_dim, 4, dtype=dtype) / head_dim)
        a = jax.random.uniform(key, (depth, heads, 1), dtype) * 2 * jnp.pi
        fx = jnp.concatenate([mag * jnp.cos(a), mag * jnp.cos(a + jnp.pi / 2)], -1)
        fy = jnp.concatenate([mag * jnp.sin(a), mag * jnp.sin(a + jnp.pi / 2)], -1)
        return jnp.stack([fx, fy]).astype(dtype)
    return init


WEIGHT_INIT = jax.nn.initializers.truncated_normal(0.02)  # Linear and conv weights, as timm's ViT init


Declaration = Linear | PatchConv | Conv | GroupNorm | BatchNorm | Norm | Param | Dropout | DropPath | TrainKey | Node


class Layers(Protocol):
    """A front-end's view of one module for the shared forward passes."""

    def __call__(self, name: str) -> Callable[..., Any]:
        """The submodule ``name`` (timm's name, e.g. ``"attn"`` or ``"blocks.3"``), ready to call
        on its inputs: training mode and rngs are the front-end's business."""

    def param(self, name: str) -> jax.Array:
        """The free parameter ``name`` (e.g. ``"cls_token"``)."""

    def has(self, name: str) -> bool:
        """Whether the module declares ``name`` (an optional submodule, e.g. ``Mlp.norm``)."""

    def linear(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """The ``(in, out)`` kernel and the bias (None without) of ``Linear`` submodule ``name``
        as arrays, created as a call on ``x`` would create them: for maths that applies the
        layer inside a jax transform, where a front-end's module cannot be called."""

    def scan(self, prefix: str, count: int, x: jax.Array, *extra: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        """Blocks ``prefix.0`` ... ``prefix.{count-1}`` (each called as ``block(*extra, x)``) as one
        ``lax.scan`` of ``scan_step`` over their stacked weights: ``(output, scan_step's stacked
        outputs)``, or None when they must run one by one (``scannable`` says no, or params are
        being created)."""


class LazyLayers:
    """``Layers`` for front-ends that create submodules inside the parent's call (Haiku, linen):
    each is built on first use from its declaration, named with list indices joined by an
    underscore (``blocks_3``), and cached so a second use shares its weights."""

    def __init__(self, declarations: dict[str, Any], cfg: ModelConfig, train: bool):
        self.declarations, self.cfg, self.train = declarations, cfg, train
        self.built: dict[str, Callable] = {}

    def __call__(self, name: str) -> Callable:
        if name not in self.built:
            self.built[name] = self.build(name.replace(".", "_"), self.declarations[name])
        return self.built[name]

    def build(self, name: str, decl: Any) -> Callable:
        raise NotImplementedError


# --------------------------------------------------------------------------- children


def _mlp(cfg: ModelConfig, hidden: int, drop: float, bias: bool = True, norm: bool = False) -> Node:
    return Node("Mlp", cfg, (hidden, drop, bias, norm))


def _norm(s: Spec, features: int, scale_init: float = 1.0) -> Norm:
    """A norm of the spec's ``norm_layer`` (LayerNorm unless the spec says RmsNorm)."""
    return Norm(features, s.norm_eps, getattr(s, "norm_layer", "LayerNorm"), scale_init)


def _block_mlp(cfg: ModelConfig) -> Node:
    """A block's MLP, of the spec's ``mlp_layer`` (timm's ``mlp_layer``); Eva's ``scale_mlp``
    adds a LayerNorm over the hidden width."""
    s = cfg.spec
    norm = getattr(s, "scale_mlp", False)
    if getattr(s, "mlp_layer", "Mlp") == "Mlp":
        return _mlp(cfg, s.mlp_dim, cfg.dropout, s.proj_bias, norm)
    return Node(s.mlp_layer, cfg, (cfg.dropout, norm))


def _vit_children(cfg: ModelConfig) -> dict[str, Any]:
    s: ViTSpec = cfg.spec
    d = s.dim
    c: dict[str, Any] = {"patch_embed": Node("PatchEmbed" if s.backbone is None else "HybridEmbed", cfg)}
    inits = {"cls_token": ((1, 1, d), "small_normal"), "reg_token": ((1, s.reg_tokens, d), "small_normal"),
             "dist_token": ((1, 1, d), "trunc_normal")}
    for name in s.prefix_tokens:
        c[name] = Param(*inits[name])
    c["pos_embed"] = Param((1, s.num_pos_tokens, d))
    c["pos_drop"] = Dropout(cfg.emb_dropout)
    if s.pre_norm:
        c["norm_pre"] = _norm(s, d)
    for i in range(s.depth):
        c[f"blocks.{i}"] = Node(s.block_fn, cfg, (cfg.drop_path_rate(i),))
    return {**c, **_final_norm_and_head(cfg)}


def _final_norm_and_head(cfg: ModelConfig) -> dict[str, Any]:
    """What follows the blocks in timm's VisionTransformer and Eva: final norm, pooling head,
    fc_norm, head dropout and classifier (plus DeiT's distillation head)."""
    s = cfg.spec
    d = s.dim
    c: dict[str, Any] = {}
    if s.has_norm:
        c["norm"] = _norm(s, d)
    if s.pool == "map":
        c["attn_pool"] = Node("AttentionPoolLatent", cfg)
    if s.has_fc_norm:
        c["fc_norm"] = _norm(s, d)
    c["head_drop"] = Dropout(cfg.head_dropout)
    if s.num_classes:
        c["head"] = Linear(d, s.num_classes)
        if getattr(s, "distilled", False):
            c["head_dist"] = Linear(d, s.num_classes)
    return c


def _eva_children(cfg: ModelConfig) -> dict[str, Any]:
    s: EvaSpec = cfg.spec
    d = s.dim
    c: dict[str, Any] = {"patch_embed": Node("PatchEmbed", cfg)}
    for name in s.prefix_tokens:
        c[name] = Param((1, 1 if name == "cls_token" else s.reg_tokens, d))
    if s.abs_pos_embed:
        c["pos_embed"] = Param((1, s.num_pos_tokens, d))
    c["pos_drop"] = Dropout(cfg.emb_dropout)
    if s.rope_type == "mixed":  # the only rotary embedding with parameters (learned frequencies)
        c["rope"] = Node("RotaryEmbeddingMixed", cfg)
    elif s.rope_type and s.rope_aug_active:  # timm's rope draws its coordinate augmentation in training
        c["rope"] = TrainKey("rope")
    if s.pre_norm:
        c["norm_pre"] = _norm(s, d)
    for i in range(s.depth):  # each block with its own k/v heads (timm's per-block num_kv_heads)
        c[f"blocks.{i}"] = Node("EvaBlock", cfg, (cfg.drop_path_rate(i), s.kv_heads(i)))
    return {**c, **_final_norm_and_head(cfg)}


def _relpos_children(cfg: ModelConfig) -> dict[str, Any]:
    """timm ``VisionTransformerRelPos``: no absolute position embedding and no embedding dropout."""
    s: RelPosSpec = cfg.spec
    c: dict[str, Any] = {"patch_embed": Node("PatchEmbed", cfg)}
    if s.shared_rel_pos:
        c["shared_rel_pos"] = _rel_pos_node(cfg)
    if s.class_token:
        c["cls_token"] = Param((1, 1, s.dim), "small_normal")
    for i in range(s.depth):
        c[f"blocks.{i}"] = Node(s.block_fn, cfg, (cfg.drop_path_rate(i),))
    return {**c, **_final_norm_and_head(cfg)}


def _rel_pos_node(cfg: ModelConfig) -> Node:
    return Node("RelPosBias" if cfg.spec.rel_pos_type == "bias" else "RelPosMlp", cfg)


def _relpos_module_children(kind: str, cfg: ModelConfig, *args: Any) -> dict[str, Any]:
    """The modules of timm's VisionTransformerRelPos below the root."""
    s: RelPosSpec = cfg.spec
    d = s.dim
    if kind == "RelPosBlock":
        (drop_path,) = args
        c = {"norm1": Norm(d, s.norm_eps), "attn": Node("RelPosAttention", cfg)}
        if s.has_layer_scale:
            c["ls1"] = Node("LayerScale", cfg)
        c.update(drop_path1=DropPath(drop_path), norm2=Norm(d, s.norm_eps), mlp=_mlp(cfg, s.mlp_dim, cfg.dropout))
        if s.has_layer_scale:
            c["ls2"] = Node("LayerScale", cfg)
        return {**c, "drop_path2": DropPath(drop_path)}
    if kind == "ResPostRelPosBlock":
        (drop_path,) = args
        return {"attn": Node("RelPosAttention", cfg), "norm1": Norm(d, s.norm_eps), "drop_path1": DropPath(drop_path),
                "mlp": _mlp(cfg, s.mlp_dim, cfg.dropout), "norm2": Norm(d, s.norm_eps),
                "drop_path2": DropPath(drop_path)}
    if kind == "RelPosAttention":
        c = {"qkv": Linear(d, 3 * d, s.qkv_bias)}
        if s.qk_norm:
            c["q_norm"] = Norm(d // s.heads, s.norm_eps)
            c["k_norm"] = Norm(d // s.heads, s.norm_eps)
        if not s.shared_rel_pos:
            c["rel_pos"] = _rel_pos_node(cfg)
        return {**c, "attn_drop": Dropout(cfg.attn_dropout), "proj": Linear(d, d), "proj_drop": Dropout(cfg.dropout)}
    if kind == "RelPosBias":
        return {"relative_position_bias_table": Param((s.num_rel_distances, s.heads))}
    if kind == "RelPosMlp":
        return {"mlp": Node("RelPosCoordMlp", cfg)}
    if kind == "RelPosCoordMlp":  # timm's Mlp(2, rel_pos_dim, num_heads, ReLU, drop=(0.125, 0)); no fc2 bias in 'swin'
        return {"fc1": Linear(2, s.rel_pos_dim), "drop1": Dropout(s.rel_pos_mlp_drop),
                "fc2": Linear(s.rel_pos_dim, s.heads, s.rel_pos_mlp_mode != "swin"), "drop2": Dropout(0.0)}
    raise KeyError(f"unknown module kind {kind!r}")


RELPOS_KINDS = ("RelPosBlock", "ResPostRelPosBlock", "RelPosAttention", "RelPosBias", "RelPosMlp", "RelPosCoordMlp")


def _cait_children(cfg: ModelConfig) -> dict[str, Any]:
    s: CaiTSpec = cfg.spec
    d = s.dim
    c: dict[str, Any] = {"patch_embed": Node("PatchEmbed", cfg), "cls_token": Param((1, 1, d)),
                         "pos_embed": Param((1, s.num_pos_tokens, d)), "pos_drop": Dropout(cfg.emb_dropout)}
    for i in range(s.depth):
        c[f"blocks.{i}"] = Node("LayerScaleBlock", cfg, (cfg.drop_path_rate(i),))
    for j in range(s.cls_depth):
        c[f"blocks_token_only.{j}"] = Node("LayerScaleBlockClassAttn", cfg)
    c["norm"] = Norm(d, s.norm_eps)
    c["head_drop"] = Dropout(cfg.head_dropout)
    if s.num_classes:
        c["head"] = Linear(d, s.num_classes)
    return c


def _std_conv(b, c_in: int, c_out: int, k: int, stride: int = 1) -> Conv:
    """timm's ``StdConv2dSame`` ('SAME' padding) or ``StdConv2d`` (``get_padding``: symmetric
    ``(stride - 1 + k - 1) // 2``), without bias."""
    padding = "SAME" if b.same_padding else (stride - 1 + k - 1) // 2
    return Conv(c_in, c_out, k, stride, padding, std_eps=b.std_conv_eps)


def _hybrid_children(kind: str, cfg: ModelConfig, *args: Any) -> dict[str, Any] | None:
    """A hybrid ViT's ``HybridEmbed`` and its CNN (``ViTSpec.backbone``), by timm's module names;
    None for other kinds."""
    s: ViTSpec = cfg.spec
    b = s.backbone
    if kind == "HybridEmbed" and b.kind == "resnet":  # timm ResNet-D as a features_only FeatureListNet
        return {"backbone": Node("ResNet", cfg),
                "proj": PatchConv(s.patch_in_channels, s.dim, s.patch_size, s.patch_bias)}
    if kind in ("ResNet", "ResNetBottleneck"):
        return _resnet_d_children(kind, cfg, *args)
    if kind == "HybridEmbed" and b.kind == "convstem":  # timm ConvStem (an nn.Sequential) as backbone.i
        c = {f"backbone.{i}": Node("ConvNormAct", cfg, (i,)) for i in range(len(b.channels))}
        if b.embed_proj:
            c["proj"] = PatchConv(s.patch_in_channels, s.dim, s.patch_size, s.patch_bias)
        return c
    if kind == "ConvNormAct":  # timm ConvNormAct in a ConvStem: conv, bn (BatchNormAct2d) but on the last
        (i,) = args
        last = i == len(b.channels) - 1
        c_in = b.channels[i - 1] if i else s.channels
        c = {"conv": Conv(c_in, b.channels[i], b.kernel_sizes[i], b.strides[i], b.paddings[i], bias=last)}
        return c if last else {**c, "bn": BatchNorm(b.channels[i], b.bn_eps)}
    if kind == "HybridEmbed":  # timm's ResNetV2, or (no stages) its stem alone as the backbone
        return {"backbone": Node("ResNetV2" if b.layers else "ResNetV2Stem", cfg),
                "proj": PatchConv(s.patch_in_channels, s.dim, s.patch_size, s.patch_bias)}
    if kind == "ResNetV2":
        return {"stem": Node("ResNetV2Stem", cfg),
                **{f"stages.{i}": Node("ResNetStage", cfg, (i,)) for i in range(len(b.layers))}}
    if kind == "ResNetV2Stem":
        return {"conv": _std_conv(b, s.channels, b.stem_chs, 7, 2), "norm": GroupNorm(b.stem_chs, b.norm_groups,
                                                                                        b.norm_eps)}
    if kind == "ResNetStage":
        (i,) = args
        return {f"blocks.{j}": Node("ResNetV2Bottleneck", cfg, (i, j)) for j in range(b.layers[i])}
    if kind == "ResNetV2Bottleneck":  # timm resnetv2.Bottleneck (non-pre-activation)
        i, j = args
        c_out, mid = b.channels[i], b.mid_channels[i]
        c_in = c_out if j else (b.channels[i - 1] if i else b.stem_chs)
        stride = b.strides[i] if j == 0 else 1
        c: dict[str, Any] = {}
        if j == 0:
            c["downsample"] = Node("DownsampleConv", cfg, (c_in, c_out, stride))

        def gn(n: int) -> GroupNorm:
            return GroupNorm(n, b.norm_groups, b.norm_eps)

        return {**c, "conv1": _std_conv(b, c_in, mid, 1), "norm1": gn(mid),
                "conv2": _std_conv(b, mid, mid, 3, stride), "norm2": gn(mid),
                "conv3": _std_conv(b, mid, c_out, 1), "norm3": gn(c_out)}
    if kind == "DownsampleConv":
        c_in, c_out, stride = args
        return {"conv": _std_conv(b, c_in, c_out, 1, stride), "norm": GroupNorm(c_out, b.norm_groups, b.norm_eps)}
    return None


def _resnet_d_children(kind: str, cfg: ModelConfig, *args: Any) -> dict[str, Any]:
    """timm ResNet-D (``resnet.ResNet``, deep stem, avg-down) by its module names, Sequential
    indices included: ``conv1.{0,1,3,4,6}`` skip the ReLUs (2, 5) and ``downsample.{1,2}`` the avg
    pool (0), so parameter paths read exactly like timm's keys."""
    b = cfg.spec.backbone

    def bn(n: int) -> BatchNorm:
        return BatchNorm(n, b.bn_eps)

    if kind == "ResNet":
        c: dict[str, Any] = {"conv1.0": Conv(cfg.spec.channels, b.stem_width, 3, 2, 1), "conv1.1": bn(b.stem_width),
                             "conv1.3": Conv(b.stem_width, b.stem_width, 3, 1, 1), "conv1.4": bn(b.stem_width),
                             "conv1.6": Conv(b.stem_width, b.stem_chs, 3, 1, 1), "bn1": bn(b.stem_chs)}
        for i, depth in enumerate(b.layers):
            c.update({f"layer{i + 1}.{j}": Node("ResNetBottleneck", cfg, (i, j)) for j in range(depth)})
        return c
    i, j = args  # ResNetBottleneck: timm resnet.Bottleneck, stride in conv2
    c_out, mid = b.channels[i], b.mid_channels[i]
    c_in = c_out if j else (b.channels[i - 1] if i else b.stem_chs)
    stride = b.strides[i] if j == 0 else 1
    c = {"conv1": Conv(c_in, mid, 1), "bn1": bn(mid), "conv2": Conv(mid, mid, 3, stride, 1), "bn2": bn(mid),
         "conv3": Conv(mid, c_out, 1), "bn3": bn(c_out)}
    if j == 0:
        c.update({"downsample.1": Conv(c_in, c_out, 1), "downsample.2": bn(c_out)})
    return c


def children(kind: str, cfg: ModelConfig, *args: Any) -> dict[str, Any]:
    """The submodules and params of a ``kind`` module, by timm name, in timm's order."""
    s: Spec = cfg.spec
    d = s.dim
    if kind in HYBRID_KINDS:
        return _hybrid_children(kind, cfg, *args)
    if kind == "ViT":
        return _vit_children(cfg)
    if kind == "CaiT":
        return _cait_children(cfg)
    if kind == "Eva":
        return _eva_children(cfg)
    if kind == "VisionTransformerRelPos":
        return _relpos_children(cfg)
    if kind in RELPOS_KINDS:
        return _relpos_module_children(kind, cfg, *args)
    if kind == "PatchEmbed":
        return {"proj": PatchConv(s.channels, d, s.patch_size, s.patch_bias)}
    if kind == "Block":  # timm vision_transformer.Block
        (drop_path,) = args
        c = {"norm1": _norm(s, d), "attn": _attention_node(cfg)}
        if s.has_layer_scale:
            c["ls1"] = Node("LayerScale", cfg)
        c["drop_path1"] = DropPath(drop_path)
        c["norm2"] = _norm(s, d)
        c["mlp"] = _block_mlp(cfg)
        if s.has_layer_scale:
            c["ls2"] = Node("LayerScale", cfg)
        c["drop_path2"] = DropPath(drop_path)
        return c
    if kind in _OTHER_BLOCKS:
        return _other_block_children(kind, cfg, *args)
    if kind == "Attention":
        c = {"qkv": Linear(d, 3 * d, s.qkv_bias)}
        if s.qk_norm:
            c["q_norm"] = _norm(s, d // s.heads)
            c["k_norm"] = _norm(s, d // s.heads)
        return {**c, "attn_drop": Dropout(cfg.attn_dropout), "proj": Linear(d, d, s.proj_bias),
                "proj_drop": Dropout(cfg.dropout)}
    if kind == "Mlp":
        hidden, drop, bias, norm = args
        return {"fc1": Linear(d, hidden, bias), "drop1": Dropout(drop),
                **({"norm": _norm(s, hidden)} if norm else {}),
                "fc2": Linear(hidden, d, bias), "drop2": Dropout(drop)}
    if kind == "GluMlp":  # fc1 packs [x | gate] (gate_last) or [gate | x] (timm's SwiGLUPacked)
        drop, norm = args
        return {"fc1": Linear(d, s.mlp_dim, s.proj_bias), "drop1": Dropout(drop),
                **({"norm": _norm(s, s.mlp_hidden)} if norm else {}),
                "fc2": Linear(s.mlp_hidden, d, s.proj_bias), "drop2": Dropout(drop)}
    if kind == "SwiGLU":
        drop, norm = args
        return {"fc1_g": Linear(d, s.mlp_dim, s.proj_bias), "fc1_x": Linear(d, s.mlp_dim, s.proj_bias),
                "drop1": Dropout(drop), **({"norm": _norm(s, s.mlp_dim)} if norm else {}),
                "fc2": Linear(s.mlp_dim, d, s.proj_bias), "drop2": Dropout(drop)}
    if kind == "EvaBlock":
        drop_path, kv_heads = args
        c = {}
        if s.has_layer_scale:
            c["gamma_1"] = Param((d,), "constant", s.init_values)
            if not s.attn_only_layer_scale:
                c["gamma_2"] = Param((d,), "constant", s.init_values)
        return {**c, "norm1": _norm(s, d),
                "attn": Node("EvaAttention" if s.attn_type == "eva" else "AttentionRope", cfg, (kv_heads,)),
                "drop_path1": DropPath(drop_path), "norm2": _norm(s, d), "mlp": _block_mlp(cfg),
                "drop_path2": DropPath(drop_path)}
    if kind in ("EvaAttention", "AttentionRope"):
        eva = kind == "EvaAttention"  # EvaAttention has no k bias
        (kv_heads,) = args
        kv = kv_heads * (d // s.heads)  # timm's kv_dim: grouped-query attention's narrower k/v projections
        c = {}
        if s.qkv_fused:
            if eva and s.qkv_bias:
                c["q_bias"] = Param((d,), "constant", 0.0)
                c["v_bias"] = Param((d,), "constant", 0.0)
            c["qkv"] = Linear(d, 3 * d, s.qkv_bias and not eva)
        else:
            c.update(q_proj=Linear(d, d, s.qkv_bias), k_proj=Linear(d, kv, s.qkv_bias and not eva),
                     v_proj=Linear(d, kv, s.qkv_bias))
        if s.qk_norm:
            c["q_norm"] = _norm(s, d // s.heads)
            c["k_norm"] = _norm(s, d // s.heads)
        c["attn_drop"] = Dropout(cfg.attn_dropout)
        if s.scale_attn_inner:
            c["norm"] = _norm(s, d)
        return {**c, "proj": Linear(d, d), "proj_drop": Dropout(cfg.dropout)}
    if kind == "RotaryEmbeddingMixed":  # timm: freqs (2, depth, heads, head_dim // 2), [x | y] frequencies
        return {"freqs": Param((2, s.depth, s.heads, d // s.heads // 2), "rope_mixed", s.rope_temperature)}
    if kind == "LayerScale":
        return {"gamma": Param((d,), "constant", s.init_values)}
    if kind == "AttentionPoolLatent":
        return {"latent": Param((1, 1, d)), "q": Linear(d, d), "kv": Linear(d, 2 * d), "proj": Linear(d, d),
                "norm": _norm(s, d), "mlp": _mlp(cfg, getattr(s, "attn_pool_mlp_dim", s.mlp_dim), 0.0)}
    if kind == "LayerScaleBlock":  # CaiT self-attention block, talking heads
        (drop_path,) = args
        return {"gamma_1": Param((d,), "constant", s.init_values), "gamma_2": Param((d,), "constant", s.init_values),
                "norm1": Norm(d, s.norm_eps), "attn": Node("TalkingHeadAttn", cfg), "drop_path": DropPath(drop_path),
                "norm2": Norm(d, s.norm_eps), "mlp": _mlp(cfg, s.mlp_dim, cfg.dropout)}
    if kind == "TalkingHeadAttn":
        h = s.heads
        return {"qkv": Linear(d, 3 * d, s.qkv_bias), "attn_drop": Dropout(cfg.attn_dropout), "proj": Linear(d, d),
                "proj_l": Linear(h, h), "proj_w": Linear(h, h), "proj_drop": Dropout(cfg.dropout)}
    if kind == "LayerScaleBlockClassAttn":  # timm builds these without dropout or drop path
        return {"gamma_1": Param((d,), "constant", s.init_values), "gamma_2": Param((d,), "constant", s.init_values),
                "norm1": Norm(d, s.norm_eps), "attn": Node("ClassAttn", cfg), "norm2": Norm(d, s.norm_eps),
                "mlp": _mlp(cfg, s.cls_mlp_dim, 0.0)}
    if kind == "ClassAttn":
        return {"q": Linear(d, d, s.qkv_bias), "k": Linear(d, d, s.qkv_bias), "v": Linear(d, d, s.qkv_bias),
                "proj": Linear(d, d)}
    raise KeyError(f"unknown module kind {kind!r}")


# The ViT blocks other than timm's Block, and DiffAttention (timm/models/vision_transformer.py,
# timm/layers/diff_attention.py). Branch kinds name timm's nn.Sequential entries of ParallelThingsBlock.
_OTHER_BLOCKS = ("ResPostBlock", "ParallelThingsBlock", "ParallelAttnBranch", "ParallelMlpBranch",
                 "ParallelScalingBlock", "DiffParallelScalingBlock", "DiffAttention")


def _attention_node(cfg: ModelConfig) -> Node:
    """A block's attention of the spec's ``attn_layer``."""
    return Node("DiffAttention" if cfg.spec.attn_layer == "DiffAttention" else "Attention", cfg)


def _other_block_children(kind: str, cfg: ModelConfig, *args: Any) -> dict[str, Any]:
    s: ViTSpec = cfg.spec
    d = s.dim
    half = d // s.heads // 2
    # differential attention's lambda vectors, timm's init N(0, 0.1)
    lambdas = {name: Param((half,), "normal", 0.1) for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
    if kind == "DiffAttention":
        c = {**lambdas, "qkv": Linear(d, 3 * d, s.qkv_bias)}
        if s.qk_norm:
            c["q_norm"] = _norm(s, half)
            c["k_norm"] = _norm(s, half)
        return {**c, "attn_drop": Dropout(cfg.attn_dropout), "proj": Linear(d, d, s.proj_bias),
                "proj_drop": Dropout(cfg.dropout), "sub_norm": Norm(2 * half, 1e-5, "RmsNorm")}
    (drop_path,) = args
    if kind == "ResPostBlock":  # norms after attention / MLP, their weights initialised to init_values
        scale = 1.0 if s.init_values is None else s.init_values
        return {"attn": _attention_node(cfg), "norm1": _norm(s, d, scale), "drop_path1": DropPath(drop_path),
                "mlp": _block_mlp(cfg), "norm2": _norm(s, d, scale), "drop_path2": DropPath(drop_path)}
    if kind == "ParallelThingsBlock":
        return {**{f"attns.{j}": Node("ParallelAttnBranch", cfg, args) for j in range(s.num_parallel)},
                **{f"ffns.{j}": Node("ParallelMlpBranch", cfg, args) for j in range(s.num_parallel)}}
    if kind in ("ParallelAttnBranch", "ParallelMlpBranch"):
        c = {"norm": _norm(s, d)}
        c.update(attn=_attention_node(cfg)) if kind == "ParallelAttnBranch" else c.update(mlp=_block_mlp(cfg))
        if s.has_layer_scale:
            c["ls"] = Node("LayerScale", cfg)
        return {**c, "drop_path": DropPath(drop_path)}
    # (Diff)ParallelScalingBlock: in_proj = [MLP fc1 | q | k | v]; mlp_bias when qkv_bias is off
    diff = kind == "DiffParallelScalingBlock"
    qk = half if diff else d // s.heads
    c = {} if s.qkv_bias else {"mlp_bias": Param((s.mlp_dim,), "constant", 0.0)}
    if diff:
        c.update(lambdas)
    c.update(in_norm=_norm(s, d), in_proj=Linear(d, s.mlp_dim + 3 * d, s.qkv_bias))
    if s.qk_norm:
        c.update(q_norm=_norm(s, qk), k_norm=_norm(s, qk))
    c["attn_drop"] = Dropout(cfg.attn_dropout)
    if diff:
        c["sub_norm"] = Norm(2 * half, 1e-5, "RmsNorm")
    c["mlp_drop"] = Dropout(cfg.dropout)
    if s.fused_out_proj:
        c["out_proj"] = Linear(d + s.mlp_dim, d, s.proj_bias)
    else:
        c.update(attn_out_proj=Linear(d, d, s.proj_bias), mlp_out_proj=Linear(s.mlp_dim, d, s.proj_bias))
    if s.has_layer_scale:
        c["ls"] = Node("LayerScale", cfg)
    return {**c, "drop_path": DropPath(drop_path)}


# ------------------------------------------------------------------ attention capture
#
# The attention weights (what multiplies the values) are recorded while the forward pass is
# traced, under the name of the block being run, and returned with the intermediates. A trace
# is one Python call, so a context variable carries them in every front-end alike.

_CAPTURED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("vitport_captured", default=None)
_BLOCK: contextvars.ContextVar[str] = contextvars.ContextVar("vitport_block", default="")


@contextlib.contextmanager
def capturing() -> Iterator[dict[str, jax.Array]]:
    token = _CAPTURED.set({})
    try:
        yield _CAPTURED.get()
    finally:
        _CAPTURED.reset(token)


@contextlib.contextmanager
def _in_block(name: str) -> Iterator[None]:
    token = _BLOCK.set(name)
    try:
        yield
    finally:
        _BLOCK.reset(token)


def _record_attention(weights: jax.Array) -> None:
    captured = _CAPTURED.get()
    if captured is not None and _BLOCK.get():
        key = f"{_BLOCK.get()}.attn"
        # ParallelThingsBlock: the branches' weights side by side on the heads axis, in branch order.
        captured[key] = jnp.concatenate([captured[key], weights], axis=1) if key in captured else weights


def attention_maps(intermediates: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``{block name: (B, heads, queries, keys)}`` from a forward pass's intermediates."""
    return {k[: -len(".attn")]: v for k, v in intermediates.items() if k.endswith(".attn")}


# Test hook: a fixed RoPE coordinate augmentation draw (shift (2,), jitter (2,), rescale (1,))
# used instead of the random one in training, so timm can be given the same draw (parity tests).
_FORCED_ROPE_AUG: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("vitport_rope_aug", default=None)


@contextlib.contextmanager
def forced_rope_coord_aug(shift=(0.0, 0.0), jitter=(1.0, 1.0), rescale=1.0) -> Iterator[None]:
    """Within the block, a training forward pass traced here uses this augmentation draw (read at
    trace time: ``vitport.parity.same_rope_coord_aug`` clears jit caches around it)."""
    token = _FORCED_ROPE_AUG.set((jnp.asarray(shift, jnp.float32), jnp.asarray(jitter, jnp.float32),
                                  jnp.asarray([rescale], jnp.float32)))
    try:
        yield
    finally:
        _FORCED_ROPE_AUG.reset(token)


# ---------------------------------------------------------------------------- forward


def _heads(spec: Spec, *tensors: jax.Array) -> list[jax.Array]:
    return [ops.split_heads(t, spec.heads) for t in tensors]


def patch_embed(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> the (B, h, w, D) patch grid; a size that is not a multiple of the patch
    is floored, as timm's strided convolution does."""
    return m("proj")(x)


def attention(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``Attention``: fused qkv, optional per-head q/k LayerNorm, scale Dh**-0.5."""
    q, k, v = _heads(cfg.spec, *jnp.split(m("qkv")(x), 3, axis=-1))
    if cfg.spec.qk_norm:
        q, k = m("q_norm")(q), m("k_norm")(k)
    md = cfg.matmul_dtype
    weights = m("attn_drop")(ops.softmax(ops.attention_logits(q, k, md), axis=-1))
    _record_attention(weights)
    return m("proj_drop")(m("proj")(ops.merge_heads(ops.attend(weights, v, md))))


def _mlp_norm(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm's ``Mlp.norm`` (Eva's ``scale_mlp``; identity when the MLP declares none)."""
    return m("norm")(x) if m.has("norm") else x


def mlp(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    x = m("drop1")(ops.activation(cfg.spec.activation)(m("fc1")(x)))
    return m("drop2")(m("fc2")(_mlp_norm(m, cfg, x)))


def _glu_activation(spec: Spec) -> Callable[[jax.Array], jax.Array]:
    return ops.activation(getattr(spec, "glu_activation", spec.activation))


def eva_attention(m: Layers, cfg: ModelConfig, rope: jax.Array | None, x: jax.Array) -> jax.Array:
    """timm ``EvaAttention`` / ``AttentionRope``: q, k, v (fused or not; EvaAttention's fused
    bias is ``[q_bias | 0 | v_bias]``), per-head q/k norm, rotary embedding on the patch tokens
    (the prefix tokens are left as they are), softmax attention, ``norm`` (scale_attn_inner), proj."""
    s: EvaSpec = cfg.spec
    if s.qkv_fused:
        qkv = m("qkv")(x)
        if s.attn_type == "eva" and s.qkv_bias:
            q_bias = m.param("q_bias")
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), m.param("v_bias")]).astype(qkv.dtype)
        q, k, v = jnp.split(qkv, 3, axis=-1)
    else:
        q, k, v = m("q_proj")(x), m("k_proj")(x), m("v_proj")(x)
    kv_heads = k.shape[-1] // (s.dim // s.heads)  # fewer than heads: grouped-query attention
    q, (k, v) = ops.split_heads(q, s.heads), [ops.split_heads(t, kv_heads) for t in (k, v)]
    if s.qk_norm:
        q, k = m("q_norm")(q), m("k_norm")(k)
    if rope is not None:
        n = s.num_prefix_tokens
        q, k = [jnp.concatenate([t[:, :, :n], ops.apply_rope(t[:, :, n:], rope, s.rope_rotate_half)], axis=2)
                .astype(v.dtype) for t in (q, k)]
    if kv_heads != s.heads:
        # timm: k/v heads repeat_interleave'd after norm and rope, query head h uses kv head h // groups.
        k, v = (jnp.repeat(t, s.heads // kv_heads, axis=1) for t in (k, v))
    weights = m("attn_drop")(ops.softmax(ops.attention_logits(q, k, cfg.matmul_dtype), axis=-1))
    _record_attention(weights)
    x = ops.merge_heads(ops.attend(weights, v, cfg.matmul_dtype))
    if s.scale_attn_inner:
        x = m("norm")(x)
    return m("proj_drop")(m("proj")(x))


def eva_block(m: Layers, cfg: ModelConfig, rope: jax.Array | None, x: jax.Array) -> jax.Array:
    """timm ``EvaBlock``: ``x + gamma_1 * attn(norm1(x), rope)``, ``x + gamma_2 * mlp(norm2(x))``."""
    s: EvaSpec = cfg.spec
    y = m("attn")(rope, m("norm1")(x))
    if s.has_layer_scale:
        y = m.param("gamma_1") * y
    x = x + m("drop_path1")(y)
    y = m("mlp")(m("norm2")(x))
    if s.has_layer_scale and not s.attn_only_layer_scale:
        y = m.param("gamma_2") * y
    return x + m("drop_path2")(y)


def glu_mlp(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``GluMlp``: ``x1, x2 = fc1(x).chunk(2)``; ``x1 * act(x2)`` when ``gate_last``, else
    ``act(x1) * x2`` (``SwiGLUPacked``)."""
    act = _glu_activation(cfg.spec)
    x1, x2 = jnp.split(m("fc1")(x), 2, axis=-1)
    x = x1 * act(x2) if cfg.spec.mlp_gate_last else act(x1) * x2
    return m("drop2")(m("fc2")(_mlp_norm(m, cfg, m("drop1")(x))))


def swiglu(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``SwiGLU``: ``fc2(act(fc1_g(x)) * fc1_x(x))``."""
    x = _glu_activation(cfg.spec)(m("fc1_g")(x)) * m("fc1_x")(x)
    return m("drop2")(m("fc2")(_mlp_norm(m, cfg, m("drop1")(x))))


def layer_scale(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    return x * m.param("gamma")


def block(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``Block``: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""
    scale = (lambda name: m(name)) if cfg.spec.has_layer_scale else (lambda name: lambda y: y)
    x = x + m("drop_path1")(scale("ls1")(m("attn")(m("norm1")(x))))
    return x + m("drop_path2")(scale("ls2")(m("mlp")(m("norm2")(x))))


def attention_pool(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``AttentionPoolLatent`` (SigLIP's 'map' head) with one latent query."""
    b, _, d = x.shape
    q = m("q")(jnp.broadcast_to(m.param("latent"), (b, 1, d)).astype(x.dtype))
    k, v = jnp.split(m("kv")(x), 2, axis=-1)
    heads = getattr(cfg.spec, "attn_pool_heads", cfg.spec.heads)
    q, k, v = [ops.split_heads(t, heads) for t in (q, k, v)]
    x = m("proj")(ops.merge_heads(ops.dot_product_attention(q, k, v, cfg.matmul_dtype)))
    x = x + m("mlp")(m("norm")(x))
    return x[:, 0]


def talking_head_attention(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """CaiT: attention logits (``proj_l``) and weights (``proj_w``) mixed across heads."""
    qkv = m("qkv")(x)
    if cfg.attn_dropout == 0.0:
        return m("proj_drop")(m("proj")(_talking_heads_per_image(m, cfg, qkv)))
    q, k, v = _heads(cfg.spec, *jnp.split(qkv, 3, axis=-1))
    # proj_l / proj_w are Linear layers over the heads axis: move heads last and back.
    logits = m("proj_l")(ops.attention_logits(q, k, cfg.matmul_dtype).transpose(0, 2, 3, 1))
    weights = m("proj_w")(ops.softmax(logits, axis=-2)).transpose(0, 3, 1, 2)
    weights = m("attn_drop")(weights)
    _record_attention(weights)  # after proj_w, as timm's attn_drop sees them: rows need not sum to 1
    return m("proj_drop")(m("proj")(ops.merge_heads(ops.attend(weights, v, cfg.matmul_dtype))))


def _talking_heads_per_image(m: Layers, cfg: ModelConfig, qkv: jax.Array) -> jax.Array:
    """The talking-heads core (logits, ``proj_l``, softmax, ``proj_w``, weights @ v) one image at a
    time, (B, N, 3D) fused qkv -> (B, N, D): an image's (heads, N, N) maps stay in cache through
    the five passes over them, where the batch's would go to memory and back each time (2.5-3x
    faster on a 2-core EPYC at batch 16, ``benchmarks/README.md``); heads are split and merged
    inside the map too, so the batch's q, k, v and output are never transposed as a whole.
    ``proj_l`` / ``proj_w`` mix the heads as timm's Linear layers on the heads axis do:
    ``out[g] = sum_h a[h] W[g, h] + b[g]``."""
    md = cfg.matmul_dtype
    heads = jnp.zeros((1, cfg.spec.heads), qkv.dtype)  # what proj_l / proj_w see: vectors over the heads
    mixes = [m.linear(name, heads) for name in ("proj_l", "proj_w")]

    def mix(a, weights):
        # In at least float32 whatever the model's precision: 8x8 multiply-adds per element are no
        # cost, and XLA's CPU dot has no bf16-in, float32-out kernel for this contraction.
        kernel, bias = weights
        dtype = jnp.result_type(a, kernel, *([] if bias is None else [bias]))
        wide = jnp.promote_types(dtype, jnp.float32)
        a = jnp.einsum("hqk,hg->gqk", a.astype(wide), kernel.astype(wide))
        return (a if bias is None else a + bias.astype(wide)[:, None, None]).astype(dtype)

    def one_image(qkv):
        q, k, v = _heads(cfg.spec, *jnp.split(qkv[None], 3, axis=-1))
        weights = mix(ops.softmax(mix(ops.attention_logits(q, k, md)[0], mixes[0]), axis=-1), mixes[1])
        return ops.merge_heads(ops.attend(weights[None], v, md))[0], weights

    out, weights = jax.lax.map(one_image, qkv)
    _record_attention(weights)
    return out


def class_attention(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """CaiT class attention: the query is token 0 only; keys and values are all tokens."""
    q, k, v = _heads(cfg.spec, m("q")(x[:, :1]), m("k")(x), m("v")(x))
    weights = ops.softmax(ops.attention_logits(q, k, cfg.matmul_dtype), axis=-1)
    _record_attention(weights)
    return m("proj")(ops.merge_heads(ops.attend(weights, v, cfg.matmul_dtype)))


def layer_scale_block(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    x = x + m("drop_path")(m.param("gamma_1") * m("attn")(m("norm1")(x)))
    return x + m("drop_path")(m.param("gamma_2") * m("mlp")(m("norm2")(x)))


def class_attention_block(m: Layers, cfg: ModelConfig, x: jax.Array, cls: jax.Array) -> jax.Array:
    """Updates only the class token: ``cls += g1 * attn(norm1(cat(cls, x)))``, then the MLP."""
    cls = cls + m.param("gamma_1") * m("attn")(m("norm1")(jnp.concatenate([cls, x], axis=1)))
    return cls + m.param("gamma_2") * m("mlp")(m("norm2")(cls))


# ------------------------------------------------------------------ hybrid CNN stems


def hybrid_embed(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``HybridEmbed``: the backbone's last feature map, then ``proj`` (B, h, w, D)."""
    if cfg.spec.backbone.kind == "convstem":  # its layers are children of the embed (backbone.i)
        return hybrid_embed_conv_stem(m, cfg, x)
    return m("proj")(m("backbone")(x))


def resnetv2(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``ResNetV2(preact=False, num_classes=0, global_pool='')``: stem, stages; its final norm
    and head are identities there."""
    x = m("stem")(x)
    for i, depth in enumerate(cfg.spec.backbone.layers):
        x = m(f"stages.{i}")(depth, x)
    return x


def resnetv2_stem(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """``conv`` 7x7/2, ``norm`` (GroupNorm + ReLU), ``pool``: 3x3/2 max pool ('SAME': timm's
    ``MaxPool2dSame``; else ``MaxPool2d(padding=1)``)."""
    x = ops.relu(m("norm")(m("conv")(x)))
    return ops.max_pool(x, 3, 2, "SAME" if cfg.spec.backbone.same_padding else 1)


def resnet_stage(m: Layers, cfg: ModelConfig, depth: int, x: jax.Array) -> jax.Array:
    for j in range(depth):
        x = m(f"blocks.{j}")(x)
    return x


def resnetv2_bottleneck(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``resnetv2.Bottleneck``: ``relu(norm3(conv3(relu(norm2(conv2(relu(norm1(conv1(x)))))))) +
    shortcut)``, the shortcut ``downsample`` (conv + norm, no activation) on a stage's first block."""
    shortcut = m("downsample")(x) if m.has("downsample") else x
    x = ops.relu(m("norm1")(m("conv1")(x)))
    x = ops.relu(m("norm2")(m("conv2")(x)))
    return ops.relu(m("norm3")(m("conv3")(x)) + shortcut)


def downsample_conv(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    return m("norm")(m("conv")(x))


def hybrid_embed_conv_stem(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``HybridEmbed`` over a ``ConvStem`` (``backbone.0..n-1``), then ``proj`` unless
    ``proj=False`` (MCi: the stem's output is the tokens)."""
    b = cfg.spec.backbone
    for i in range(len(b.channels)):
        x = m(f"backbone.{i}")(x)
    return m("proj")(x) if b.embed_proj else x


def conv_norm_act(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``ConvNormAct``: conv, then ``BatchNormAct2d`` (frozen BN + the stem's activation)
    except on a ConvStem's last conv."""
    x = m("conv")(x)
    if not m.has("bn"):
        return x
    act = cfg.spec.backbone.act
    return (ops.relu if act == "relu" else ops.activation(act))(m("bn")(x))


def resnet_d(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``ResNet.forward_features`` up to its last stage (what ``FeatureListNet`` returns last):
    deep stem ``conv1`` (conv, BN, ReLU, conv, BN, ReLU, conv), ``bn1``, ReLU, 3x3/2 max pool
    (padding 1), the stages."""
    x = ops.relu(m("conv1.1")(m("conv1.0")(x)))
    x = ops.relu(m("conv1.4")(m("conv1.3")(x)))
    x = ops.relu(m("bn1")(m("conv1.6")(x)))
    x = ops.max_pool(x, 3, 2, 1)
    for i, depth in enumerate(cfg.spec.backbone.layers):
        for j in range(depth):
            x = m(f"layer{i + 1}.{j}")(cfg.spec.backbone.strides[i] if j == 0 else 1, x)
    return x


def resnet_bottleneck(m: Layers, cfg: ModelConfig, stride: int, x: jax.Array) -> jax.Array:
    """timm ``resnet.Bottleneck`` (``stride``: its conv2's): ``relu(bn3(conv3(relu(bn2(conv2(
    relu(bn1(conv1(x)))))))) + shortcut)``; the avg-down shortcut ``downsample`` = avg pool (2,
    stride, ceil_mode, count_include_pad=False; identity at stride 1), 1x1 conv, BN."""
    shortcut = x
    if m.has("downsample.1"):
        pooled = ops.avg_pool_ceil(x, 2, stride) if stride > 1 else x
        shortcut = m("downsample.2")(m("downsample.1")(pooled))
    x = ops.relu(m("bn1")(m("conv1")(x)))
    x = ops.relu(m("bn2")(m("conv2")(x)))
    return ops.relu(m("bn3")(m("conv3")(x)) + shortcut)


HYBRID_KINDS = ("HybridEmbed", "ResNetV2", "ResNetV2Stem", "ResNetStage", "ResNetV2Bottleneck", "DownsampleConv",
                "ResNet", "ResNetBottleneck", "ConvNormAct")


def check_input(spec: Spec, x: jax.Array) -> None:
    """timm's ``PatchEmbed`` checks: the trained size, or any multiple of the patch when
    ``dynamic_img_size``."""
    h, w = x.shape[1:3]
    if getattr(spec, "dynamic_img_size", False):
        p = spec.patch_size
        if h % p or w % p or h < p or w < p:
            raise InvalidArgumentError(f"input is {h}x{w}; with dynamic_img_size the sides must be positive "
                                       f"multiples of the patch size {p}")
    elif (h, w) != tuple(spec.image_size):
        raise InvalidArgumentError(f"input is {h}x{w}, the model expects {spec.image_size[0]}x{spec.image_size[1]} "
                                   "(build it with dynamic_img_size=True to accept other sizes, or resample "
                                   "pos_embed with image_size= when loading)")


def _head(m: Layers, spec: Spec, pooled: jax.Array) -> jax.Array:
    return m("head")(m("head_drop")(pooled)) if spec.num_classes else pooled


def scannable(declarations: dict[str, Any], cfg: ModelConfig, prefix: str, count: int) -> Node | None:
    """The declaration of block ``prefix.0`` when ``prefix.0`` ... ``prefix.{count-1}`` may run as
    one ``lax.scan`` (``ModelConfig.scan_blocks``); None when they must run one by one.

    They scan when every block is the same module but for its stochastic-depth rate (a scan
    input in training, ``scan_inputs``; Sapiens2's per-block key/value head counts, for one,
    differ), and when no module in them depends on the block's index (DiffAttention's
    ``lambda_init``).
    """
    if not cfg.scan_blocks or count < 2:
        return None
    blocks = [declarations.get(f"{prefix}.{i}") for i in range(count)]
    if not all(isinstance(b, Node) for b in blocks) or _reads_block_index(blocks[0]):
        return None
    if _drop_path_rates(blocks) is None:
        return None
    shapes = {_without_drop_path(b) for b in blocks}
    return blocks[0] if len(shapes) == 1 else None


# Modules whose maths depends on the index of the block they run in (``_block_depth``, read at
# trace time): a scan traces one block for all of them.
_READS_BLOCK_INDEX = ("DiffAttention", "DiffParallelScalingBlock")


def _reads_block_index(block: Node) -> bool:
    return block.kind in _READS_BLOCK_INDEX or any(
        isinstance(c, Node) and _reads_block_index(c) for c in block.children().values())


def _without_drop_path(node: Node) -> tuple:
    """``node``'s declarations all the way down, stochastic-depth rates left out. A node's maths
    depends only on its kind, config and children (``FORWARD`` never sees ``args``), so nested
    branches that differ only in their rate (ParallelThingsBlock's) compare equal too."""
    def normal(v):
        return DropPath(0.0) if isinstance(v, DropPath) else _without_drop_path(v) if isinstance(v, Node) else v

    return node.kind, node.cfg, tuple(sorted((k, normal(v)) for k, v in node.children().items()))


def _subtree_drop_path_rates(node: Node) -> set[float]:
    return {r for v in node.children().values()
            for r in ({v.rate} if isinstance(v, DropPath) else _subtree_drop_path_rates(v) if isinstance(v, Node)
                      else ())}


def _drop_path_rates(blocks: list[Node]) -> list[float] | None:
    """Each block's stochastic-depth rate (every ``DropPath`` in it shares one), or None when a
    block mixes rates (one scan input per step could not carry them)."""
    rates = []
    for block in blocks:
        own = _subtree_drop_path_rates(block)
        if len(own) > 1:
            return None
        rates.append(own.pop() if own else 0.0)
    return rates


# rng streams a training step draws from (linen's ``rngs`` names, NNX's ``Rngs`` streams):
# Dropout and DropPath use 'dropout', ``TrainKey('rope')`` Eva's RoPE augmentation.
RNG_STREAMS = ("dropout", "rope")

# Inside a scanned training step: the stochastic-depth rate of the block the step runs (a traced
# scalar: one traced block stands for all of them).
_STEP_DROP_PATH: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("vitport_step_drop_path",
                                                                                  default=None)


def drop_path_rate(declared: float) -> float | jax.Array | None:
    """The rate a ``DropPath`` runs at in training: the scanned step's block's inside a scan, its
    own otherwise; None when it never drops (no rng key is drawn then)."""
    step = _STEP_DROP_PATH.get()
    if step is not None:
        return step
    return declared if declared > 0.0 else None


def scan_inputs(declarations: dict[str, Any], prefix: str, count: int, stacked: Any, train: bool,
                keys: Any = None) -> tuple[Any, jax.Array | None, Any]:
    """The ``xs`` of ``scan_step``: the stacked weights, and in training each block's
    stochastic-depth rate (None when no block drops) and ``keys`` (a key or a dict of them; None
    without rngs) split into one per step, so every block draws its own masks."""
    if not train:
        return stacked, None, None
    rates = _drop_path_rates([declarations[f"{prefix}.{i}"] for i in range(count)])
    step_rates = jnp.asarray(rates, jnp.result_type(float)) if any(rates) else None
    step_keys = None if keys is None else jax.tree.map(lambda k: jax.random.split(k, count), keys)
    return stacked, step_rates, step_keys


def stack_blocks(per_block: list[Any], x: jax.Array, cfg: ModelConfig) -> tuple[Any, jax.Array]:
    """``(the blocks' param trees stacked on a new leading axis, carry(x, ...))``: the stack made
    inside the call, for params kept one subtree per block (evaluation only: training runs such
    params block by block)."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_block)
    return stacked, carry(x, stacked, cfg)


def carry(x: jax.Array, stacked: Any, cfg: ModelConfig) -> jax.Array:
    """``x`` in the dtype the blocks return: a scan's carry keeps one dtype, so 16-bit inputs to
    a float32 model are promoted up front, as the first block would promote them."""
    dtype = cfg.dtype or jnp.result_type(x.dtype, *[leaf.dtype for leaf in jax.tree.leaves(stacked)
                                                    if jnp.issubdtype(leaf.dtype, jnp.floating)])
    return x.astype(dtype)


def scanned_lists(cfg: ModelConfig) -> dict[str, int]:
    """``{prefix: count}``: the block lists that ``_blocks`` runs as one ``lax.scan`` each when
    ``cfg.scan_blocks`` is on, and that ``JaxModel.set_scan_blocks`` stores stacked
    (``converters.frameworks.stack_blocks``). Lists ``scannable`` refuses, and Eva's mixed-RoPE
    blocks (one rotary table per block), stay one subtree per block."""
    s = cfg.spec
    lists = {"blocks": s.depth}
    if cfg.family == "cait":
        lists["blocks_token_only"] = s.cls_depth
    if cfg.family == "eva" and s.rope_type == "mixed":
        del lists["blocks"]
    on = cfg if cfg.scan_blocks else dataclasses.replace(cfg, scan_blocks=True)
    declarations = root(on).children()
    return {p: n for p, n in lists.items() if scannable(declarations, on, p, n) is not None}


def stacked_unscanned(what: str) -> InvalidArgumentError:
    """The error for stacked block weights given to a model that runs those blocks one by one."""
    return InvalidArgumentError(
        f"the weights of {what} are stored stacked for a scan, but this model runs them one by one: "
        "build it with scan_blocks=True (JaxModel.set_scan_blocks()), or unstack them "
        "(converters.unstack_blocks)")


def scan_step(prefix: str, run: Callable[[Any, Any, jax.Array], jax.Array]) -> Callable:
    """The ``lax.scan`` step ``(x, (weights, rate, keys)) -> (y, (y, attention maps))`` around a
    front-end's ``run(weights, keys, x)`` of one block (``xs`` from ``scan_inputs``): the block's
    ``DropPath``s run at the step's ``rate``, and what ``capturing`` would record in the block
    comes out as a scan output (``_blocks`` files it under each block's name)."""
    def step(x, xs):
        weights, rate, keys = xs
        token = _STEP_DROP_PATH.set(rate)
        try:
            with capturing() as maps, _in_block(f"{prefix}.0"):
                # Named for rematerialisation (vitport.training, remat=True), as block by block.
                y = checkpoint_name(run(weights, keys, x), "vitport_block")
        finally:
            _STEP_DROP_PATH.reset(token)
        return y, (y, dict(maps))
    return step


def _block_output(y: jax.Array) -> jax.Array:
    """A block's output, run block by block: named for rematerialisation (vitport.training,
    remat=True) and behind an optimization barrier, whose transpose puts one on the residual
    stream's gradient. With the barriers kept through fusion (``xla_options.keep_barriers``), XLA
    materialises that gradient once per block; without them its CPU fusion inlined the later
    blocks' whole chain of gradient adds into every block's backward (fusions of up to 179
    operands for ViT-B/16), a cost quadratic in depth."""
    return checkpoint_name(jax.lax.optimization_barrier(y), "vitport_block")


def _blocks(m: Layers, prefix: str, count: int, x: jax.Array, out: dict, *extra: jax.Array) -> jax.Array:
    """Run ``prefix.0`` ... ``prefix.{count-1}``, recording each output under its timm name: as one
    ``lax.scan`` where the front-end can (``Layers.scan``, see ``scannable``), else block by block."""
    scanned = m.scan(prefix, count, x, *extra)
    if scanned is not None:
        x, (outputs, maps) = scanned
        out.update({f"{prefix}.{i}": outputs[i] for i in range(count)})
        captured = _CAPTURED.get()
        if captured is not None:
            first = f"{prefix}.0."
            captured.update({f"{prefix}.{i}.{key[len(first):]}": v[i] for key, v in maps.items() for i in range(count)})
        return x
    for i in range(count):
        name = f"{prefix}.{i}"
        with _in_block(name):
            x = out[name] = _block_output(m(name)(*extra, x) if extra else m(name)(x))
    return x


def _tokens(grid: jax.Array) -> jax.Array:
    """(B, h, w, D) -> (B, h*w, D), with explicit sizes so an empty batch keeps its shape."""
    b, h, w, d = grid.shape
    return grid.reshape(b, h * w, d)


def _vit_features(m: Layers, s: ViTSpec, x: jax.Array, out: dict) -> jax.Array:
    """timm ``forward_features``: tokens (B, prefix + patches, D) after the final norm."""
    check_input(s, x)
    patches = m("patch_embed")(x)
    out["patch_embed"] = _tokens(patches)
    prefix = [m.param(name) for name in s.prefix_tokens]
    x = ops.embed_tokens(patches, m.param("pos_embed"), prefix, s.grid_size, s.no_embed_class)
    x = m("pos_drop")(x)
    if s.pre_norm:
        x = m("norm_pre")(x)
    x = _blocks(m, "blocks", s.depth, x, out)
    if s.has_norm:
        x = out["norm"] = m("norm")(x)
    return x


def _vit_head(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool, out: dict) -> Any:
    """timm ``forward_head`` on features; ``out['pre_logits']`` is its ``pre_logits=True``."""
    s: ViTSpec = cfg.spec
    if s.distilled:
        cls, dist = x[:, 0], x[:, 1]
        out["pre_logits"] = (cls + dist) / 2
        if not s.num_classes:
            return out["pre_logits"]
        logits, logits_dist = out["head"], out["head_dist"] = _head(m, s, cls), m("head_dist")(m("head_drop")(dist))
        # timm averages the heads in training too, unless distilled training is switched on.
        return (logits, logits_dist) if train and cfg.distilled_training else (logits + logits_dist) / 2
    if s.pool == "map":
        pooled = m("attn_pool")(x if s.pool_include_prefix else x[:, s.num_prefix_tokens:])
    else:
        pooled = ops.pool_tokens(x, s.pool, s.num_prefix_tokens, s.pool_include_prefix)
    if s.has_fc_norm:
        pooled = m("fc_norm")(pooled)
    out["pre_logits"] = pooled
    result = _head(m, s, pooled)
    if s.num_classes:
        out["head"] = result
    return result


def _eva_features(m: Layers, s: EvaSpec, x: jax.Array, out: dict) -> jax.Array:
    """timm ``Eva.forward_features``: tokens, absolute and rotary position embeddings, blocks, norm."""
    check_input(s, x)
    patches = m("patch_embed")(x)
    b, h, w, d = patches.shape
    out["patch_embed"] = patches.reshape(b, -1, d)
    prefix = [m.param(name) for name in s.prefix_tokens]
    if s.abs_pos_embed:
        x = ops.embed_tokens(patches, m.param("pos_embed"), prefix, s.grid_size, s.no_embed_class)
    else:
        x = jnp.concatenate([jnp.broadcast_to(t, (b, *t.shape[1:])).astype(patches.dtype) for t in prefix]
                            + [patches.reshape(b, h * w, d)], axis=1)
    x = m("pos_drop")(x)
    rope = None
    if s.rope_type == "mixed":  # learned: (depth, heads, H*W, 2 * head_dim) from rope.freqs
        rope = m("rope")((h, w)).astype(jnp.promote_types(x.dtype, jnp.float32))
    elif s.rope_type:
        key = m("rope")() if m.has("rope") else None  # a key only in training with augmentation
        if key is not None:
            forced = _FORCED_ROPE_AUG.get()
            draw = forced if forced is not None else ops.rope_coord_aug_draw(key, s)
            table = ops.rope_table_augmented(s, (h, w), x.dtype, draw)
        else:
            table = ops.rope_table(s, (h, w), x.dtype, cached=not s.dynamic_img_size)
        rope = table.astype(jnp.promote_types(x.dtype, jnp.float32))
    if s.pre_norm:
        x = m("norm_pre")(x)
    if s.rope_type == "mixed":
        x = _mixed_rope_blocks(m, s, x, out, rope)
    else:
        x = _blocks(m, "blocks", s.depth, x, out, rope)  # rope None: a block without rotary embeddings
    if s.has_norm:
        x = out["norm"] = m("norm")(x)
    return x


def _mixed_rope_blocks(m: Layers, s: EvaSpec, x: jax.Array, out: dict, rope: jax.Array) -> jax.Array:
    """timm's ``rope_mixed`` loop: block ``i`` gets its own table ``rope[i]`` (heads, H*W, 2 * head_dim)."""
    for i in range(s.depth):
        name = f"blocks.{i}"
        with _in_block(name):
            x = out[name] = _block_output(m(name)(rope[i], x))
    return x


def rotary_embedding_mixed(m: Layers, cfg: ModelConfig, grid: tuple[int, int]) -> jax.Array:
    """timm ``RotaryEmbeddingMixed.get_embed``: the float32 tables of every block for a patch grid."""
    return ops.rope_mixed_table(m.param("freqs"), grid, cfg.spec.rope_grid_indexing)


def _eva_head(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool, out: dict) -> Any:
    """timm ``Eva.forward_head``: the attention pool over every token, or ``global_pool_nlc``."""
    s: EvaSpec = cfg.spec
    pooled = m("attn_pool")(x) if s.pool == "map" else ops.pool_tokens(x, s.pool, s.num_prefix_tokens)
    if s.has_fc_norm:
        pooled = m("fc_norm")(pooled)
    out["pre_logits"] = pooled
    result = _head(m, s, pooled)
    if s.num_classes:
        out["head"] = result
    return result


def rel_pos_attention(m: Layers, cfg: ModelConfig, shared_rel_pos: jax.Array | None, x: jax.Array) -> jax.Array:
    """timm ``RelPosAttention``: timm's ``Attention`` with a relative position bias (B=1, H, N, N)
    added to the scaled logits, its own ``rel_pos`` or the model's shared one."""
    s: RelPosSpec = cfg.spec
    q, k, v = _heads(s, *jnp.split(m("qkv")(x), 3, axis=-1))
    if s.qk_norm:
        q, k = m("q_norm")(q), m("k_norm")(k)
    bias = m("rel_pos")(x) if m.has("rel_pos") else shared_rel_pos
    logits = ops.attention_logits(q, k, cfg.matmul_dtype)
    weights = m("attn_drop")(ops.softmax(logits + bias.astype(logits.dtype), axis=-1))
    _record_attention(weights)
    return m("proj_drop")(m("proj")(ops.merge_heads(ops.attend(weights, v, cfg.matmul_dtype))))


def rel_pos_bias(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``RelPosBias.get_bias``: the table's rows at the grid's position index, (1, H, N, N)
    (``x`` only gives the dtype)."""
    s: RelPosSpec = cfg.spec
    n = s.grid_size[0] * s.grid_size[1] + s.num_prefix_tokens
    table = m.param("relative_position_bias_table")
    bias = table[ops.rel_pos_index(s.grid_size, s.class_token)].reshape(n, n, s.heads)
    return bias.transpose(2, 0, 1)[None].astype(x.dtype)


def rel_pos_mlp(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``RelPosMlp.get_bias``: the MLP over the float32 log-spaced offsets (cast to the
    model's dtype, as timm's buffer is), gathered by the position index, (1, H, N, N); 'swin'
    mode: ``16 sigmoid(.)``; prefix tokens get a zero bias (rows and columns put in front)."""
    s: RelPosSpec = cfg.spec
    a = s.grid_size[0] * s.grid_size[1]
    coords = jnp.asarray(ops.rel_pos_log_coords(s.grid_size, s.rel_pos_mlp_mode), x.dtype)
    bias = m("mlp")(coords).reshape(-1, s.heads)[ops.rel_pos_index(s.grid_size)].reshape(a, a, s.heads)
    bias = bias.transpose(2, 0, 1)
    if s.rel_pos_mlp_mode == "swin":
        bias = 16 * ops.activation("sigmoid")(bias)
    p = s.num_prefix_tokens
    return jnp.pad(bias, ((0, 0), (p, 0), (p, 0)))[None]


def rel_pos_coord_mlp(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """The ``Mlp`` inside timm's ``RelPosMlp``: fc1, ReLU, dropout (timm's fixed 0.125), fc2."""
    return m("drop2")(m("fc2")(m("drop1")(jax.nn.relu(m("fc1")(x)))))


def rel_pos_block(m: Layers, cfg: ModelConfig, shared_rel_pos: jax.Array | None, x: jax.Array) -> jax.Array:
    """timm ``RelPosBlock``: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``."""
    scale = (lambda name: m(name)) if cfg.spec.has_layer_scale else (lambda name: lambda y: y)
    x = x + m("drop_path1")(scale("ls1")(m("attn")(shared_rel_pos, m("norm1")(x))))
    return x + m("drop_path2")(scale("ls2")(m("mlp")(m("norm2")(x))))


def res_post_rel_pos_block(m: Layers, cfg: ModelConfig, shared_rel_pos: jax.Array | None,
                           x: jax.Array) -> jax.Array:
    """timm ``ResPostRelPosBlock``: the norms after the branches, ``x + norm1(attn(x))``,
    ``x + norm2(mlp(x))``."""
    x = x + m("drop_path1")(m("norm1")(m("attn")(shared_rel_pos, x)))
    return x + m("drop_path2")(m("norm2")(m("mlp")(x)))


def _relpos_features(m: Layers, s: RelPosSpec, x: jax.Array, out: dict) -> jax.Array:
    """timm ``VisionTransformerRelPos.forward_features``: patches, class token, the shared bias
    (computed once per call, as timm does), blocks, norm."""
    check_input(s, x)
    x = out["patch_embed"] = _tokens(m("patch_embed")(x))
    if s.class_token:
        cls = jnp.broadcast_to(m.param("cls_token"), (x.shape[0], 1, s.dim)).astype(x.dtype)
        x = jnp.concatenate([cls, x], axis=1)
    shared = m("shared_rel_pos")(x) if s.shared_rel_pos else None
    x = _blocks(m, "blocks", s.depth, x, out, shared)
    if s.has_norm:
        x = out["norm"] = m("norm")(x)
    return x


def _cait_features(m: Layers, s: CaiTSpec, x: jax.Array, out: dict) -> jax.Array:
    check_input(s, x)
    patches = m("patch_embed")(x)
    x = out["patch_embed"] = _tokens(patches)
    x = m("pos_drop")(x + m.param("pos_embed").astype(x.dtype))
    x = _blocks(m, "blocks", s.depth, x, out)
    cls = jnp.broadcast_to(m.param("cls_token"), (x.shape[0], 1, s.dim)).astype(x.dtype)
    cls = _blocks(m, "blocks_token_only", s.cls_depth, cls, out, x)
    x = out["norm"] = m("norm")(jnp.concatenate([cls, x], axis=1))
    return x


def _cait_head(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool, out: dict) -> Any:
    s: CaiTSpec = cfg.spec
    pooled = out["pre_logits"] = ops.pool_tokens(x, s.pool, 1)
    result = _head(m, s, pooled)
    if s.num_classes:
        out["head"] = result
    return result


STAGES = ("all", "head", "norm")


def _root(features: Callable, head: Callable, m: Layers, cfg: ModelConfig, x: jax.Array, train: bool,
          stage: str) -> tuple[Any, dict[str, jax.Array]]:
    """``stage``: 'all' (images -> output), 'head' (features -> output, timm's
    ``forward_head``) or 'norm' (the final norm on any (..., D) tokens; identity where the
    model has none). Returns ``(output, intermediates)``."""
    out: dict[str, jax.Array] = {}
    if stage == "norm":
        return (m("norm")(x) if getattr(cfg.spec, "has_norm", True) else x), out
    if stage == "head":
        return head(m, cfg, x, train, out), out
    if stage != "all":
        raise InvalidArgumentError(f"stage must be one of {STAGES}; got {stage!r}")
    with capturing() as attention:
        x = out["features"] = features(m, cfg.spec, x, out)
    out.update(attention)
    return head(m, cfg, x, train, out), out


def vit(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool = False, stage: str = "all") -> Any:
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled`` on NHWC images.

    Returns ``(output, intermediates)``; ``output`` is the logits, or for a distilled model in
    training with ``cfg.distilled_training`` ``(logits, logits_dist)`` as timm returns them.
    """
    return _root(_vit_features, _vit_head, m, cfg, x, train, stage)


def eva(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool = False, stage: str = "all") -> Any:
    """timm ``Eva`` (EVA-02, RoPE ViTs, DINOv3, Perception Encoder) on NHWC images."""
    return _root(_eva_features, _eva_head, m, cfg, x, train, stage)


def relpos(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool = False, stage: str = "all") -> Any:
    """timm ``VisionTransformerRelPos`` on NHWC images; its head is Eva's without 'map'
    (``forward_head``: avg over the patch tokens or token 0, fc_norm, head)."""
    return _root(_relpos_features, _eva_head, m, cfg, x, train, stage)


def cait(m: Layers, cfg: ModelConfig, x: jax.Array, train: bool = False, stage: str = "all") -> Any:
    """timm ``Cait`` on NHWC images: self-attention blocks over the patches, then class-attention
    blocks that update only the class token, then ``norm(cat(cls, x))``."""
    return _root(_cait_features, _cait_head, m, cfg, x, train, stage)


FORWARD: dict[str, Callable[..., Any]] = {
    "ViT": vit, "CaiT": cait, "PatchEmbed": patch_embed, "Block": block, "Attention": attention, "Mlp": mlp,
    "GluMlp": glu_mlp, "SwiGLU": swiglu, "Eva": eva, "EvaBlock": eva_block, "EvaAttention": eva_attention,
    "AttentionRope": eva_attention, "RotaryEmbeddingMixed": rotary_embedding_mixed,
    "LayerScale": layer_scale, "AttentionPoolLatent": attention_pool, "LayerScaleBlock": layer_scale_block,
    "TalkingHeadAttn": talking_head_attention, "LayerScaleBlockClassAttn": class_attention_block,
    "ClassAttn": class_attention,
    "VisionTransformerRelPos": relpos, "RelPosBlock": rel_pos_block, "ResPostRelPosBlock": res_post_rel_pos_block,
    "RelPosAttention": rel_pos_attention, "RelPosBias": rel_pos_bias, "RelPosMlp": rel_pos_mlp,
    "RelPosCoordMlp": rel_pos_coord_mlp,
    "HybridEmbed": hybrid_embed, "ResNetV2": resnetv2, "ResNetV2Stem": resnetv2_stem, "ResNetStage": resnet_stage,
    "ResNetV2Bottleneck": resnetv2_bottleneck, "DownsampleConv": downsample_conv,
    "ResNet": resnet_d, "ResNetBottleneck": resnet_bottleneck, "ConvNormAct": conv_norm_act,
}


def _diff_lambda(m: Layers, depth: int, dtype: Any) -> jax.Array:
    """timm's ``lambda_full = exp(sum(q1 * k1)) - exp(sum(q2 * k2)) + lambda_init``, in float32 as
    timm computes it (``.float()`` even in a float64 model), then in the activations' dtype."""
    def exp_dot(q: str, k: str) -> jax.Array:
        a, b = m.param(q), m.param(k)
        t = jnp.sum(a * b, axis=-1).astype(jnp.float32)
        # exp at the params' precision (float64 when it is) then rounded: closest to torch's float32 exp
        return jnp.exp(t.astype(jnp.promote_types(a.dtype, jnp.float32))).astype(jnp.float32)

    lam = exp_dot("lambda_q1", "lambda_k1") - exp_dot("lambda_q2", "lambda_k2") + jnp.float32(diff_lambda_init(depth))
    return lam.astype(dtype)


def _block_depth() -> int:
    """The index of the ViT block being run: timm passes it to each block as ``depth``
    (DiffAttention's ``lambda_init``). Every block runs inside ``_blocks``, which names it."""
    name = _BLOCK.get()
    if not name.rpartition(".")[2].isdigit():
        raise InvalidArgumentError("differential attention runs only inside a model's blocks")
    return int(name.rpartition(".")[2])


def _differential(m: Layers, cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """timm's differential attention on (B, N, D) q, k, v: 2H query/key heads of half width, H value
    heads; ``softmax(q1 k1) - lambda softmax(q2 k2)`` per head (recorded: what multiplies v), then
    ``sub_norm`` (RmsNorm) and ``* (1 - lambda_init)``."""
    h, depth = cfg.spec.heads, _block_depth()
    (q, k), v = [ops.split_heads(t, 2 * h) for t in (q, k)], ops.split_heads(v, h)
    if m.has("q_norm"):
        q, k = m("q_norm")(q), m("k_norm")(k)
    lam = _diff_lambda(m, depth, q.dtype)
    weights = m("attn_drop")(ops.softmax(ops.attention_logits(q, k, cfg.matmul_dtype), axis=-1))
    b, _, n, _ = weights.shape
    weights = weights.reshape(b, h, 2, n, n)  # head 2i + j: component j of value head i
    weights = weights[:, :, 0] - lam * weights[:, :, 1]
    _record_attention(weights)
    x = m("sub_norm")(ops.attend(weights, v, cfg.matmul_dtype))
    return ops.merge_heads(x * (1 - diff_lambda_init(depth)))


def diff_attention(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``DiffAttention``: fused qkv, differential attention, proj."""
    q, k, v = jnp.split(m("qkv")(x), 3, axis=-1)
    return m("proj_drop")(m("proj")(_differential(m, cfg, q, k, v)))


def res_post_block(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``ResPostBlock``: ``x + norm1(attn(x))``, ``x + norm2(mlp(x))``."""
    x = x + m("drop_path1")(m("norm1")(m("attn")(x)))
    return x + m("drop_path2")(m("norm2")(m("mlp")(x)))


def _branch(m: Layers, cfg: ModelConfig, x: jax.Array, inner: str) -> jax.Array:
    y = m(inner)(m("norm")(x))
    return m("drop_path")(m("ls")(y) if m.has("ls") else y)


def parallel_things_block(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``ParallelThingsBlock``: ``x + sum_j attns[j](x)``, then ``x + sum_j ffns[j](x)``, each
    branch ``drop_path(ls(f(norm(x))))``."""
    n = cfg.spec.num_parallel
    y = m("attns.0")(x)
    for j in range(1, n):
        y = y + m(f"attns.{j}")(x)
    x = x + y
    y = m("ffns.0")(x)
    for j in range(1, n):
        y = y + m(f"ffns.{j}")(x)
    return x + y


def parallel_scaling_block(m: Layers, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """timm ``ParallelScalingBlock`` / ``DiffParallelScalingBlock`` (ViT-22B): one ``in_norm``, one
    ``in_proj`` giving ``[MLP hidden | q | k | v]``, attention and MLP in parallel, their outputs
    through ``attn_out_proj + mlp_out_proj`` or one ``out_proj`` of their concatenation."""
    s: ViTSpec = cfg.spec
    d = s.dim
    y = m("in_proj")(m("in_norm")(x))
    x_mlp, q, k, v = jnp.split(y, [s.mlp_dim, s.mlp_dim + d, s.mlp_dim + 2 * d], axis=-1)
    if m.has("mlp_bias"):
        x_mlp = x_mlp + m.param("mlp_bias").astype(x_mlp.dtype)
    if m.has("sub_norm"):  # DiffParallelScalingBlock
        x_attn = _differential(m, cfg, q, k, v)
    else:
        q, k, v = _heads(s, q, k, v)
        if s.qk_norm:
            q, k = m("q_norm")(q), m("k_norm")(k)
        weights = m("attn_drop")(ops.softmax(ops.attention_logits(q, k, cfg.matmul_dtype), axis=-1))
        _record_attention(weights)
        x_attn = ops.merge_heads(ops.attend(weights, v, cfg.matmul_dtype))
    x_mlp = m("mlp_drop")(ops.activation(s.activation)(x_mlp))
    if m.has("out_proj"):
        y = m("out_proj")(jnp.concatenate([x_attn, x_mlp], axis=-1))
    else:
        y = m("attn_out_proj")(x_attn) + m("mlp_out_proj")(x_mlp)
    return x + m("drop_path")(m("ls")(y) if m.has("ls") else y)


FORWARD.update({
    "ResPostBlock": res_post_block, "ParallelThingsBlock": parallel_things_block,
    "ParallelAttnBranch": lambda m, cfg, x: _branch(m, cfg, x, "attn"),
    "ParallelMlpBranch": lambda m, cfg, x: _branch(m, cfg, x, "mlp"),
    "ParallelScalingBlock": parallel_scaling_block, "DiffParallelScalingBlock": parallel_scaling_block,
    "DiffAttention": diff_attention,
})
ROOT_KIND = {"vit": "ViT", "cait": "CaiT", "eva": "Eva", "relpos": "VisionTransformerRelPos"}


def root(cfg: ModelConfig) -> Node:
    """The whole model as a node."""
    return Node(ROOT_KIND[cfg.family], cfg)


@functools.lru_cache(maxsize=64)
def draws_in_training(cfg: ModelConfig) -> bool:
    """Whether a training forward pass draws random numbers (a Dropout or DropPath with a rate
    above zero, or a ``TrainKey``), so it needs an rng."""
    def draws(node: Node) -> bool:
        return any(isinstance(d, (Dropout, DropPath)) and d.rate > 0 or isinstance(d, TrainKey)
                   or isinstance(d, Node) and draws(d) for d in node.children().values())

    return draws(root(cfg))
