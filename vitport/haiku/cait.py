"""timm's CaiT (Class-Attention in Image Transformers) in Haiku."""

from __future__ import annotations

from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from .. import ops
from .layers import Mlp, PatchEmbed, drop_path, dropout, layer_norm, linear, param, trunc_normal


class TalkingHeadAttn(hk.Module):
    """Self-attention whose logits (``proj_l``) and weights (``proj_w``) are mixed across heads."""

    def __init__(self, heads: int, qkv_bias: bool = True, dropout: float = 0.0, name: str = "attn"):
        super().__init__(name=name)
        self.heads, self.qkv_bias, self.dropout = heads, qkv_bias, dropout

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        d = x.shape[-1]
        qkv = linear(3 * d, "qkv", self.qkv_bias)(x)
        q, k, v = (ops.split_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
        # proj_l / proj_w are Linear layers over the heads axis: move heads last and back.
        logits = linear(self.heads, "proj_l")(ops.attention_logits(q, k).transpose(0, 2, 3, 1))
        weights = linear(self.heads, "proj_w")(jax.nn.softmax(logits, axis=-2))
        x = ops.merge_heads(ops.attend(weights.transpose(0, 3, 1, 2), v))
        return dropout(linear(d, "proj")(x), self.dropout, is_training)


class ClassAttn(hk.Module):
    """Class attention: the query is token 0 only; keys and values are all tokens."""

    def __init__(self, heads: int, qkv_bias: bool = True, name: str = "attn"):
        super().__init__(name=name)
        self.heads, self.qkv_bias = heads, qkv_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        q = linear(d, "q", self.qkv_bias)(x[:, :1])
        k = linear(d, "k", self.qkv_bias)(x)
        v = linear(d, "v", self.qkv_bias)(x)
        q, k, v = (ops.split_heads(t, self.heads) for t in (q, k, v))
        return linear(d, "proj")(ops.merge_heads(ops.dot_product_attention(q, k, v)))


def _gammas(init_values: float, dim: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    init = hk.initializers.Constant(init_values)
    return param("gamma_1", (dim,), init, dtype), param("gamma_2", (dim,), init, dtype)


class LayerScaleBlock(hk.Module):
    def __init__(self, heads: int, mlp_dim: int, qkv_bias: bool = True, init_values: float = 1e-5,
                 activation: str = "gelu", norm_eps: float = 1e-6, dropout: float = 0.0,
                 drop_path: float = 0.0, param_dtype: Any = jnp.float32, name: str | None = None):
        super().__init__(name=name)
        self.heads, self.mlp_dim, self.qkv_bias, self.init_values = heads, mlp_dim, qkv_bias, init_values
        self.activation, self.norm_eps, self.dropout, self.drop_path = activation, norm_eps, dropout, drop_path
        self.param_dtype = param_dtype

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        gamma_1, gamma_2 = _gammas(self.init_values, x.shape[-1], self.param_dtype)
        y = TalkingHeadAttn(self.heads, self.qkv_bias, self.dropout)(layer_norm(self.norm_eps, "norm1")(x), is_training)
        x = x + drop_path(gamma_1 * y, self.drop_path, is_training)
        y = Mlp(self.mlp_dim, self.activation, self.dropout)(layer_norm(self.norm_eps, "norm2")(x), is_training)
        return x + drop_path(gamma_2 * y, self.drop_path, is_training)


class LayerScaleBlockClassAttn(hk.Module):
    """Updates only the class token: ``cls += g1 * attn(norm1(cat(cls, x)))``, then the MLP."""

    def __init__(self, heads: int, mlp_dim: int, qkv_bias: bool = True, init_values: float = 1e-5,
                 activation: str = "gelu", norm_eps: float = 1e-6, param_dtype: Any = jnp.float32,
                 name: str | None = None):
        super().__init__(name=name)
        self.heads, self.mlp_dim, self.qkv_bias, self.init_values = heads, mlp_dim, qkv_bias, init_values
        self.activation, self.norm_eps, self.param_dtype = activation, norm_eps, param_dtype

    def __call__(self, x: jax.Array, cls: jax.Array) -> jax.Array:
        gamma_1, gamma_2 = _gammas(self.init_values, x.shape[-1], self.param_dtype)
        u = layer_norm(self.norm_eps, "norm1")(jnp.concatenate([cls, x], axis=1))
        cls = cls + gamma_1 * ClassAttn(self.heads, self.qkv_bias)(u)
        return cls + gamma_2 * Mlp(self.mlp_dim, self.activation)(layer_norm(self.norm_eps, "norm2")(cls))


class CaiT(hk.Module):
    """CaiT, numerically identical to timm's ``Cait``.

    Same arguments as ``vitport.flax.CaiT`` (seed signature ``CaiT(image_size, patch_size,
    num_classes, dim, depth, cls_depth, heads, mlp_dim, dropout, emb_dropout,
    layer_dropout)``); see its docstring. ``__call__(x, is_training=False,
    return_intermediates=False)``.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        num_classes: int = 1000,
        dim: int = 384,
        depth: int = 24,
        cls_depth: int = 2,
        heads: int = 8,
        mlp_dim: int = 1536,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        layer_dropout: float = 0.0,
        channels: int = 3,
        cls_mlp_dim: int | None = None,
        pool: str = "cls",
        qkv_bias: bool = True,
        init_values: float = 1e-5,
        activation: str = "gelu",
        norm_eps: float = 1e-6,
        param_dtype: Any = jnp.float32,
        name: str = "cait",
    ):
        super().__init__(name=name)
        self.image_size = ops.pair(image_size)
        self.patch_size, self.num_classes, self.dim, self.depth = patch_size, num_classes, dim, depth
        self.cls_depth, self.heads, self.mlp_dim = cls_depth, heads, mlp_dim
        self.dropout, self.emb_dropout, self.layer_dropout = dropout, emb_dropout, layer_dropout
        self.channels, self.cls_mlp_dim, self.pool = channels, cls_mlp_dim or mlp_dim, ops.canonical_pool(pool)
        self.qkv_bias, self.init_values, self.activation, self.norm_eps = qkv_bias, init_values, activation, norm_eps
        self.param_dtype = param_dtype

    def __call__(self, x: jax.Array, is_training: bool = False, return_intermediates: bool = False) -> Any:
        if tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"input is {x.shape[1]}x{x.shape[2]}, the model expects "
                             f"{self.image_size[0]}x{self.image_size[1]}")
        out: dict[str, jax.Array] = {}
        d = self.dim
        patches = PatchEmbed(d, self.patch_size)(x)
        x = out["patch_embed"] = patches.reshape(patches.shape[0], -1, d)
        pos_embed = param("pos_embed", (1, x.shape[1], d), trunc_normal, self.param_dtype)
        cls_token = param("cls_token", (1, 1, d), trunc_normal, self.param_dtype)
        x = dropout(x + pos_embed, self.emb_dropout, is_training)
        for i in range(self.depth):
            x = LayerScaleBlock(self.heads, self.mlp_dim, self.qkv_bias, self.init_values, self.activation,
                                self.norm_eps, self.dropout, self.layer_dropout, self.param_dtype,
                                name=f"blocks_{i}")(x, is_training)
            out[f"blocks.{i}"] = x
        cls = jnp.broadcast_to(cls_token, (x.shape[0], 1, d)).astype(x.dtype)
        for j in range(self.cls_depth):
            cls = LayerScaleBlockClassAttn(self.heads, self.cls_mlp_dim, self.qkv_bias, self.init_values,
                                           self.activation, self.norm_eps, self.param_dtype,
                                           name=f"blocks_token_only_{j}")(x, cls)
            out[f"blocks_token_only.{j}"] = cls
        x = out["norm"] = layer_norm(self.norm_eps, "norm")(jnp.concatenate([cls, x], axis=1))
        pooled = out["pre_logits"] = ops.pool_tokens(x, self.pool, 1)
        result = out["head"] = linear(self.num_classes, "head")(pooled) if self.num_classes else pooled
        return (result, out) if return_intermediates else result
