"""timm's CaiT (Class-Attention in Image Transformers) in Flax linen."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import ops
from .layers import DropPath, Dtype, Mlp, PatchEmbed, dense, layer_norm, trunc_normal


class TalkingHeadAttn(nn.Module):
    """Self-attention whose logits (``proj_l``) and weights (``proj_w``) are mixed across heads."""

    heads: int
    qkv_bias: bool = True
    dropout: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * d, "qkv", use_bias=self.qkv_bias, **kw)(x)
        q, k, v = (ops.split_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
        # proj_l / proj_w are Linear layers over the heads axis: move heads last and back.
        logits = ops.attention_logits(q, k).transpose(0, 2, 3, 1)
        logits = dense(self.heads, "proj_l", **kw)(logits)
        weights = dense(self.heads, "proj_w", **kw)(jax.nn.softmax(logits, axis=-2))
        x = ops.merge_heads(ops.attend(weights.transpose(0, 3, 1, 2), v))
        x = dense(d, "proj", **kw)(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class ClassAttn(nn.Module):
    """Class attention: the query is token 0 only; keys and values are all tokens."""

    heads: int
    qkv_bias: bool = True
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q = dense(d, "q", use_bias=self.qkv_bias, **kw)(x[:, :1])
        k = dense(d, "k", use_bias=self.qkv_bias, **kw)(x)
        v = dense(d, "v", use_bias=self.qkv_bias, **kw)(x)
        q, k, v = (ops.split_heads(t, self.heads) for t in (q, k, v))
        return dense(d, "proj", **kw)(ops.merge_heads(ops.dot_product_attention(q, k, v)))


def _gamma(module: nn.Module, name: str, init_values: float, dim: int, dtype: Dtype) -> jax.Array:
    return module.param(name, nn.initializers.constant(init_values), (dim,), dtype)


class LayerScaleBlock(nn.Module):
    heads: int
    mlp_dim: int
    qkv_bias: bool = True
    init_values: float = 1e-5
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gamma_1 = _gamma(self, "gamma_1", self.init_values, d, self.param_dtype)
        gamma_2 = _gamma(self, "gamma_2", self.init_values, d, self.param_dtype)
        y = TalkingHeadAttn(self.heads, self.qkv_bias, self.dropout, name="attn", **kw)(
            layer_norm(self.norm_eps, "norm1", **kw)(x), train)
        x = x + DropPath(self.drop_path, name="drop_path1")(gamma_1 * y, train)
        y = Mlp(self.mlp_dim, self.activation, self.dropout, name="mlp", **kw)(
            layer_norm(self.norm_eps, "norm2", **kw)(x), train)
        return x + DropPath(self.drop_path, name="drop_path2")(gamma_2 * y, train)


class LayerScaleBlockClassAttn(nn.Module):
    """Updates only the class token: ``cls += g1 * attn(norm1(cat(cls, x)))``, then the MLP."""

    heads: int
    mlp_dim: int
    qkv_bias: bool = True
    init_values: float = 1e-5
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cls: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gamma_1 = _gamma(self, "gamma_1", self.init_values, d, self.param_dtype)
        gamma_2 = _gamma(self, "gamma_2", self.init_values, d, self.param_dtype)
        u = layer_norm(self.norm_eps, "norm1", **kw)(jnp.concatenate([cls, x], axis=1))
        cls = cls + gamma_1 * ClassAttn(self.heads, self.qkv_bias, name="attn", **kw)(u)
        y = Mlp(self.mlp_dim, self.activation, name="mlp", **kw)(layer_norm(self.norm_eps, "norm2", **kw)(cls))
        return cls + gamma_2 * y


class CaiT(nn.Module):
    """CaiT, numerically identical to timm's ``Cait``.

    Keeps the seed signature ``CaiT(image_size, patch_size, num_classes, dim, depth,
    cls_depth, heads, mlp_dim, dropout, emb_dropout, layer_dropout)``. ``layer_dropout`` is
    timm's stochastic depth (the same rate in every self-attention block, per sample, only
    when ``train``); ``init_values`` is the LayerScale init (timm uses 1e-5 or 1e-6).
    ``cls_mlp_dim`` (default ``mlp_dim``) is the class-attention blocks' MLP width.

    ``__call__(x, train=False, return_intermediates=False)`` on NHWC images returns logits;
    intermediates are 'patch_embed', 'blocks.i', 'blocks_token_only.j' (the class token),
    'norm', 'pre_logits', 'head'.
    """

    image_size: int | Sequence[int] = 224
    patch_size: int = 16
    num_classes: int = 1000
    dim: int = 384
    depth: int = 24
    cls_depth: int = 2
    heads: int = 8
    mlp_dim: int = 1536
    dropout: float = 0.0
    emb_dropout: float = 0.0
    layer_dropout: float = 0.0
    channels: int = 3
    cls_mlp_dim: int | None = None
    pool: str = "cls"
    qkv_bias: bool = True
    init_values: float = 1e-5
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_intermediates: bool = False) -> Any:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pool = ops.canonical_pool(self.pool)
        image_size = ops.pair(self.image_size)
        if tuple(x.shape[1:3]) != image_size:
            raise ValueError(f"input is {x.shape[1]}x{x.shape[2]}, the model expects {image_size[0]}x{image_size[1]}")
        out: dict[str, jax.Array] = {}
        patches = PatchEmbed(self.dim, self.patch_size, name="patch_embed", **kw)(x)
        x = out["patch_embed"] = patches.reshape(patches.shape[0], -1, self.dim)
        pos_embed = self.param("pos_embed", trunc_normal, (1, x.shape[1], self.dim), self.param_dtype)
        cls_token = self.param("cls_token", trunc_normal, (1, 1, self.dim), self.param_dtype)
        x = nn.Dropout(self.emb_dropout, deterministic=not train)(x + pos_embed)
        for i in range(self.depth):
            x = LayerScaleBlock(self.heads, self.mlp_dim, self.qkv_bias, self.init_values, self.activation,
                                self.norm_eps, self.dropout, self.layer_dropout, name=f"blocks_{i}", **kw)(x, train)
            out[f"blocks.{i}"] = x
        cls = jnp.broadcast_to(cls_token, (x.shape[0], 1, self.dim)).astype(x.dtype)
        for j in range(self.cls_depth):
            cls = LayerScaleBlockClassAttn(self.heads, self.cls_mlp_dim or self.mlp_dim, self.qkv_bias,
                                           self.init_values, self.activation, self.norm_eps,
                                           name=f"blocks_token_only_{j}", **kw)(x, cls)
            out[f"blocks_token_only.{j}"] = cls
        x = out["norm"] = layer_norm(self.norm_eps, "norm", **kw)(jnp.concatenate([cls, x], axis=1))
        pooled = out["pre_logits"] = ops.pool_tokens(x, pool, 1)
        result = out["head"] = dense(self.num_classes, "head", **kw)(pooled) if self.num_classes else pooled
        return (result, out) if return_intermediates else result
