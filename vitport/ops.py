"""Parameter-free jnp maths of the shared forward passes (``vitport.structure``).

Everything here follows timm's definitions exactly (attention scale, activations, pos-embed
resampling); the front-ends only own parameters and module names.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from converters.specs import pair  # noqa: F401  (re-exported for the front-ends)

# timm's activations; jax.nn.gelu defaults to the tanh approximation, timm's GELU is exact.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}



def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, N, H*Dh) -> (B, H, N, Dh)."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, H, N, Dh) -> (B, N, H*Dh)."""
    b, h, n, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * dh)


def attention_logits(q: jax.Array, k: jax.Array) -> jax.Array:
    """``(q * Dh**-0.5) @ k^T`` over (B, H, N, Dh) inputs, as timm scales before the product."""
    return jnp.einsum("bhqd,bhkd->bhqk", q * (q.shape[-1] ** -0.5), k)


def attend(weights: jax.Array, v: jax.Array) -> jax.Array:
    return jnp.einsum("bhqk,bhkd->bhqd", weights, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    return attend(jax.nn.softmax(attention_logits(q, k), axis=-1), v)


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """timm's stochastic depth: zero whole residual branches per sample, rescale the rest."""
    if rate == 0.0 or rng is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def resample_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int) -> jax.Array:
    """timm's ``resample_abs_pos_embed``: bicubic, antialiased, computed in float32.

    ``jax.image.resize(..., "cubic", antialias=True)`` matches torch's
    ``F.interpolate(mode="bicubic", antialias=True)`` up and down (docs/design.md, numerics).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).astype(jnp.float32)
    grid = jax.image.resize(grid, (1, new_grid[0], new_grid[1], d), "cubic", antialias=True)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


def embed_tokens(patches: jax.Array, pos_embed: jax.Array, prefix: Sequence[jax.Array],
                 grid_size: tuple[int, int], no_embed_class: bool) -> jax.Array:
    """timm's ``_pos_embed``: prefix tokens + patch tokens + position embedding.

    ``patches`` is the (B, h, w, D) patch grid. If it differs from ``grid_size`` (dynamic image
    size), pos_embed is resampled to it first, as timm does.
    """
    b, h, w, d = patches.shape
    num_prefix = sum(t.shape[1] for t in prefix)
    pos_embed = resample_pos_embed(pos_embed, (h, w), grid_size, 0 if no_embed_class else num_prefix)
    x = patches.reshape(b, h * w, d)
    prefix = [jnp.broadcast_to(t, (b, *t.shape[1:])).astype(x.dtype) for t in prefix]
    if no_embed_class:
        return jnp.concatenate([*prefix, x + pos_embed], axis=1)
    return jnp.concatenate([*prefix, x], axis=1) + pos_embed


def pool_tokens(x: jax.Array, pool: str, num_prefix_tokens: int, include_prefix: bool = False) -> jax.Array:
    """timm's ``global_pool_nlc`` for the pools vitport implements."""
    if pool == "token":
        return x[:, 0]
    if pool == "avg":
        return (x if include_prefix else x[:, num_prefix_tokens:]).mean(axis=1)
    return x

