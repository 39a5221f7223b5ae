"""Flax linen building blocks, named after timm's modules (see ``converters.frameworks``)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import ops

Dtype = Any
trunc_normal = nn.initializers.truncated_normal(0.02)


def dense(features: int, name: str, use_bias: bool = True, dtype: Dtype = None,
          param_dtype: Dtype = jnp.float32) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=trunc_normal, dtype=dtype,
                    param_dtype=param_dtype, name=name)


def layer_norm(eps: float, name: str, dtype: Dtype = None, param_dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    # Two-pass variance like torch; flax's default fast variance loses digits in float32.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, name=name)


class DropPath(nn.Module):
    """Stochastic depth (timm ``DropPath``): per sample, training only, rng stream 'dropout'."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        return ops.drop_path(x, self.rate, self.make_rng("dropout"))


class Mlp(nn.Module):
    hidden_dim: int
    activation: str = "gelu"
    dropout: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        x = dense(self.hidden_dim, "fc1", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = ops.activation(self.activation)(x)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = dense(d, "fc2", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class LayerScale(nn.Module):
    init_values: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(self.init_values), (x.shape[-1],), self.param_dtype)
        return x * gamma


class PatchEmbed(nn.Module):
    """Non-overlapping patchify conv; returns the (B, h, w, D) grid."""

    dim: int
    patch_size: int
    use_bias: bool = True
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"image size {x.shape[1:3]} is not divisible by patch_size={p}")
        return nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", use_bias=self.use_bias,
                       kernel_init=trunc_normal, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="proj")(x)


class Attention(nn.Module):
    """timm ``Attention``: fused qkv, optional per-head q/k LayerNorm."""

    heads: int
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = dense(3 * d, "qkv", use_bias=self.qkv_bias, **kw)(x)
        q, k, v = (ops.split_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
        if self.qk_norm:
            q = layer_norm(self.norm_eps, "q_norm", **kw)(q)
            k = layer_norm(self.norm_eps, "k_norm", **kw)(k)
        x = ops.merge_heads(ops.dot_product_attention(q, k, v))
        x = dense(d, "proj", **kw)(x)
        return nn.Dropout(self.dropout, deterministic=not train)(x)


class Block(nn.Module):
    """timm ``Block``: pre-norm attention and MLP, optional LayerScale, stochastic depth."""

    heads: int
    mlp_dim: int
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path: float = 0.0
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = layer_norm(self.norm_eps, "norm1", **kw)(x)
        y = Attention(self.heads, self.qkv_bias, self.qk_norm, self.norm_eps, self.dropout, name="attn", **kw)(y, train)
        if self.init_values is not None:
            y = LayerScale(self.init_values, self.param_dtype, name="ls1")(y)
        x = x + DropPath(self.drop_path, name="drop_path1")(y, train)
        y = layer_norm(self.norm_eps, "norm2", **kw)(x)
        y = Mlp(self.mlp_dim, self.activation, self.dropout, name="mlp", **kw)(y, train)
        if self.init_values is not None:
            y = LayerScale(self.init_values, self.param_dtype, name="ls2")(y)
        return x + DropPath(self.drop_path, name="drop_path2")(y, train)


class AttentionPoolLatent(nn.Module):
    """timm ``AttentionPoolLatent`` (the 'map' head of SigLIP-style ViTs), one latent query."""

    heads: int
    mlp_dim: int
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        latent = self.param("latent", trunc_normal, (1, 1, d), self.param_dtype)
        q = dense(d, "q", **kw)(jnp.broadcast_to(latent, (b, 1, d)).astype(x.dtype))
        k, v = jnp.split(dense(2 * d, "kv", **kw)(x), 2, axis=-1)
        q, k, v = (ops.split_heads(t, self.heads) for t in (q, k, v))
        x = dense(d, "proj", **kw)(ops.merge_heads(ops.dot_product_attention(q, k, v)))
        x = x + Mlp(self.mlp_dim, self.activation, name="mlp", **kw)(layer_norm(self.norm_eps, "norm", **kw)(x))
        return x[:, 0]
