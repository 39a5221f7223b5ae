"""Haiku building blocks, named after timm's modules (see ``converters.frameworks``)."""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from .. import ops

trunc_normal = hk.initializers.TruncatedNormal(0.02)


def linear(features: int, name: str, with_bias: bool = True) -> hk.Linear:
    return hk.Linear(features, with_bias=with_bias, w_init=trunc_normal, name=name)


def layer_norm(eps: float, name: str) -> hk.LayerNorm:
    # Haiku's default eps is 1e-5; timm's ViT/CaiT use 1e-6: always pass the model's own.
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=eps, name=name)


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
    return hk.dropout(hk.next_rng_key(), rate, x) if is_training and rate > 0 else x


def drop_path(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
    return ops.drop_path(x, rate, hk.next_rng_key()) if is_training and rate > 0 else x


def param(name: str, shape, init, dtype: Any) -> jax.Array:
    return hk.get_parameter(name, shape, dtype, init=init)


class Mlp(hk.Module):
    def __init__(self, hidden_dim: int, activation: str = "gelu", dropout: float = 0.0, name: str = "mlp"):
        super().__init__(name=name)
        self.hidden_dim, self.activation, self.dropout = hidden_dim, activation, dropout

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        d = x.shape[-1]
        x = ops.activation(self.activation)(linear(self.hidden_dim, "fc1")(x))
        x = dropout(x, self.dropout, is_training)
        return dropout(linear(d, "fc2")(x), self.dropout, is_training)


class LayerScale(hk.Module):
    def __init__(self, init_values: float, param_dtype: Any = jnp.float32, name: str = "ls"):
        super().__init__(name=name)
        self.init_values, self.param_dtype = init_values, param_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * param("gamma", (x.shape[-1],), hk.initializers.Constant(self.init_values), self.param_dtype)


class PatchEmbed(hk.Module):
    """Non-overlapping patchify conv; returns the (B, h, w, D) grid."""

    def __init__(self, dim: int, patch_size: int, with_bias: bool = True, name: str = "patch_embed"):
        super().__init__(name=name)
        self.dim, self.patch_size, self.with_bias = dim, patch_size, with_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch_size={p}")
        return hk.Conv2D(self.dim, p, stride=p, padding="VALID", with_bias=self.with_bias,
                         w_init=trunc_normal, name="proj")(x)


class Attention(hk.Module):
    """timm ``Attention``: fused qkv, optional per-head q/k LayerNorm."""

    def __init__(self, heads: int, qkv_bias: bool = True, qk_norm: bool = False, norm_eps: float = 1e-6,
                 dropout: float = 0.0, name: str = "attn"):
        super().__init__(name=name)
        self.heads, self.qkv_bias, self.qk_norm, self.norm_eps, self.dropout = heads, qkv_bias, qk_norm, norm_eps, dropout

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        d = x.shape[-1]
        qkv = linear(3 * d, "qkv", self.qkv_bias)(x)
        q, k, v = (ops.split_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
        if self.qk_norm:
            q = layer_norm(self.norm_eps, "q_norm")(q)
            k = layer_norm(self.norm_eps, "k_norm")(k)
        x = linear(d, "proj")(ops.merge_heads(ops.dot_product_attention(q, k, v)))
        return dropout(x, self.dropout, is_training)


class Block(hk.Module):
    """timm ``Block``: pre-norm attention and MLP, optional LayerScale, stochastic depth."""

    def __init__(self, heads: int, mlp_dim: int, qkv_bias: bool = True, qk_norm: bool = False,
                 init_values: float | None = None, activation: str = "gelu", norm_eps: float = 1e-6,
                 dropout: float = 0.0, drop_path: float = 0.0, param_dtype: Any = jnp.float32,
                 name: str | None = None):
        super().__init__(name=name)
        self.heads, self.mlp_dim, self.qkv_bias, self.qk_norm = heads, mlp_dim, qkv_bias, qk_norm
        self.init_values, self.activation, self.norm_eps = init_values, activation, norm_eps
        self.dropout, self.drop_path, self.param_dtype = dropout, drop_path, param_dtype

    def __call__(self, x: jax.Array, is_training: bool = False) -> jax.Array:
        y = layer_norm(self.norm_eps, "norm1")(x)
        y = Attention(self.heads, self.qkv_bias, self.qk_norm, self.norm_eps, self.dropout)(y, is_training)
        if self.init_values is not None:
            y = LayerScale(self.init_values, self.param_dtype, name="ls1")(y)
        x = x + drop_path(y, self.drop_path, is_training)
        y = Mlp(self.mlp_dim, self.activation, self.dropout)(layer_norm(self.norm_eps, "norm2")(x), is_training)
        if self.init_values is not None:
            y = LayerScale(self.init_values, self.param_dtype, name="ls2")(y)
        return x + drop_path(y, self.drop_path, is_training)


class AttentionPoolLatent(hk.Module):
    """timm ``AttentionPoolLatent`` (the 'map' head of SigLIP-style ViTs), one latent query."""

    def __init__(self, heads: int, mlp_dim: int, activation: str = "gelu", norm_eps: float = 1e-6,
                 param_dtype: Any = jnp.float32, name: str = "attn_pool"):
        super().__init__(name=name)
        self.heads, self.mlp_dim, self.activation, self.norm_eps = heads, mlp_dim, activation, norm_eps
        self.param_dtype = param_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        latent = param("latent", (1, 1, d), trunc_normal, self.param_dtype)
        q = linear(d, "q")(jnp.broadcast_to(latent, (b, 1, d)).astype(x.dtype))
        k, v = jnp.split(linear(2 * d, "kv")(x), 2, axis=-1)
        q, k, v = (ops.split_heads(t, self.heads) for t in (q, k, v))
        x = linear(d, "proj")(ops.merge_heads(ops.dot_product_attention(q, k, v)))
        x = x + Mlp(self.mlp_dim, self.activation)(layer_norm(self.norm_eps, "norm")(x))
        return x[:, 0]
