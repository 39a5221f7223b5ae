"""timm's VisionTransformer (and DeiT distilled) in Flax linen."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import ops
from .layers import AttentionPoolLatent, Block, Dtype, PatchEmbed, dense, layer_norm, trunc_normal


class ViT(nn.Module):
    """Vision Transformer, numerically identical to timm's ``VisionTransformer``.

    The constructor keeps the original vitport (seed) signature, ``ViT(image_size,
    patch_size, num_classes, dim, depth, heads, mlp_dim, dropout, emb_dropout)``, and adds
    timm's options under timm's meaning. Inputs are NHWC images.

    Attributes:
      image_size: int or (H, W) the pos_embed was trained for.
      patch_size: square patch side.
      num_classes: classifier width; 0 returns pooled features.
      dim, depth, heads, mlp_dim: width, blocks, attention heads, MLP hidden width.
      dropout: dropout after attention projection and in the MLP (timm ``proj_drop_rate``).
      emb_dropout: dropout on the embedded tokens (timm ``pos_drop_rate``).
      channels: input channels.
      pool: 'cls' / 'token', 'mean' / 'avg', 'map' (attention pooling) or '' (no pooling).
      layer_dropout: stochastic depth rate (timm ``drop_path_rate``, linear decay over depth).
      qkv_bias, qk_norm, init_values (LayerScale), class_token, reg_tokens, distilled,
      no_embed_class, pre_norm, final_norm, fc_norm (None: on for 'mean' pooling),
      pool_include_prefix, patch_bias (None: not pre_norm), activation ('gelu' exact,
      'gelu_tanh', 'quick_gelu'), norm_eps, dynamic_img_size: as in timm.
      dtype, param_dtype: computation and parameter dtypes.

    ``__call__(x, train=False, return_intermediates=False)``: dropout and stochastic depth
    run only when ``train`` (they draw from the 'dropout' rng). Returns logits (B, K); a
    distilled model in training returns ``(logits, logits_dist)`` as timm does. With
    ``return_intermediates`` it returns ``(output, dict)`` holding timm-named activations:
    'patch_embed', 'blocks.i', 'norm', 'pre_logits', 'head'.
    """

    image_size: int | Sequence[int] = 224
    patch_size: int = 16
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    dropout: float = 0.0
    emb_dropout: float = 0.0
    channels: int = 3
    pool: str = "cls"
    layer_dropout: float = 0.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None
    class_token: bool = True
    reg_tokens: int = 0
    distilled: bool = False
    no_embed_class: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool | None = None
    pool_include_prefix: bool = False
    patch_bias: bool | None = None
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    dtype: Dtype = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_intermediates: bool = False) -> Any:
        pool = ops.canonical_pool(self.pool)
        use_fc_norm = (pool == "avg") if self.fc_norm is None else self.fc_norm
        patch_bias = (not self.pre_norm) if self.patch_bias is None else self.patch_bias
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        image_size = ops.pair(self.image_size)
        grid = (image_size[0] // self.patch_size, image_size[1] // self.patch_size)
        if not self.dynamic_img_size and tuple(x.shape[1:3]) != image_size:
            raise ValueError(f"input is {x.shape[1]}x{x.shape[2]}, the model expects {image_size[0]}x{image_size[1]}"
                             " (build it with dynamic_img_size=True to accept other sizes)")
        out: dict[str, jax.Array] = {}

        patches = PatchEmbed(self.dim, self.patch_size, patch_bias, name="patch_embed", **kw)(x)
        out["patch_embed"] = patches.reshape(patches.shape[0], -1, self.dim)
        prefix = []
        if self.class_token:
            prefix.append(self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.dim), self.param_dtype))
        if self.reg_tokens:
            prefix.append(self.param("reg_token", nn.initializers.normal(1e-6), (1, self.reg_tokens, self.dim),
                                     self.param_dtype))
        if self.distilled:
            prefix.append(self.param("dist_token", trunc_normal, (1, 1, self.dim), self.param_dtype))
        num_prefix = sum(t.shape[1] for t in prefix)
        num_pos = grid[0] * grid[1] + (0 if self.no_embed_class else num_prefix)
        pos_embed = self.param("pos_embed", trunc_normal, (1, num_pos, self.dim), self.param_dtype)
        x = ops.embed_tokens(patches, pos_embed, prefix, grid, self.no_embed_class)
        x = nn.Dropout(self.emb_dropout, deterministic=not train)(x)
        if self.pre_norm:
            x = layer_norm(self.norm_eps, "norm_pre", **kw)(x)

        for i, rate in enumerate(ops.drop_path_rates(self.layer_dropout, self.depth)):
            x = Block(self.heads, self.mlp_dim, self.qkv_bias, self.qk_norm, self.init_values, self.activation,
                      self.norm_eps, self.dropout, rate, name=f"blocks_{i}", **kw)(x, train)
            out[f"blocks.{i}"] = x
        if self.final_norm and not use_fc_norm:
            x = out["norm"] = layer_norm(self.norm_eps, "norm", **kw)(x)

        if self.distilled:
            pooled = (x[:, 0], x[:, 1])
        elif pool == "map":
            tokens = x if self.pool_include_prefix else x[:, num_prefix:]
            pooled = AttentionPoolLatent(self.heads, self.mlp_dim, self.activation, self.norm_eps,
                                         name="attn_pool", **kw)(tokens)
        else:
            pooled = ops.pool_tokens(x, pool, num_prefix, self.pool_include_prefix)
        if self.final_norm and use_fc_norm and not self.distilled:
            pooled = layer_norm(self.norm_eps, "fc_norm", **kw)(pooled)

        if self.distilled:
            out["pre_logits"] = (pooled[0] + pooled[1]) / 2
            if self.num_classes:
                logits = dense(self.num_classes, "head", **kw)(pooled[0])
                logits_dist = dense(self.num_classes, "head_dist", **kw)(pooled[1])
                out["head"], out["head_dist"] = logits, logits_dist
                result = (logits, logits_dist) if train else (logits + logits_dist) / 2
            else:
                result = out["pre_logits"]
        else:
            out["pre_logits"] = pooled
            result = out["head"] = dense(self.num_classes, "head", **kw)(pooled) if self.num_classes else pooled
        return (result, out) if return_intermediates else result
