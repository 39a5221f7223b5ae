"""timm's VisionTransformer (and DeiT distilled) in Haiku."""

from __future__ import annotations

from typing import Any, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from .. import ops
from .layers import AttentionPoolLatent, Block, PatchEmbed, dropout, layer_norm, linear, param, trunc_normal


class ViT(hk.Module):
    """Vision Transformer, numerically identical to timm's ``VisionTransformer``.

    Same arguments as ``vitport.flax.ViT`` (the seed signature ``ViT(image_size, patch_size,
    num_classes, dim, depth, heads, mlp_dim, dropout, emb_dropout)`` plus timm's options);
    see its docstring. Use inside ``hk.transform``; inputs are NHWC images.

    ``__call__(x, is_training=False, return_intermediates=False)``: dropout and stochastic
    depth run only when ``is_training`` (they need an rng). Returns logits, or
    ``(output, intermediates)`` with timm-named activations.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        num_classes: int = 1000,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.0,
        emb_dropout: float = 0.0,
        channels: int = 3,
        pool: str = "cls",
        layer_dropout: float = 0.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        distilled: bool = False,
        no_embed_class: bool = False,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        pool_include_prefix: bool = False,
        patch_bias: bool | None = None,
        activation: str = "gelu",
        norm_eps: float = 1e-6,
        dynamic_img_size: bool = False,
        param_dtype: Any = jnp.float32,
        name: str = "vit",
    ):
        super().__init__(name=name)
        self.image_size = ops.pair(image_size)
        self.patch_size, self.num_classes, self.dim, self.depth = patch_size, num_classes, dim, depth
        self.heads, self.mlp_dim, self.dropout, self.emb_dropout = heads, mlp_dim, dropout, emb_dropout
        self.channels, self.pool, self.layer_dropout = channels, ops.canonical_pool(pool), layer_dropout
        self.qkv_bias, self.qk_norm, self.init_values = qkv_bias, qk_norm, init_values
        self.class_token, self.reg_tokens, self.distilled = class_token, reg_tokens, distilled
        self.no_embed_class, self.pre_norm, self.final_norm = no_embed_class, pre_norm, final_norm
        self.fc_norm = (self.pool == "avg") if fc_norm is None else fc_norm
        self.pool_include_prefix = pool_include_prefix
        self.patch_bias = (not pre_norm) if patch_bias is None else patch_bias
        self.activation, self.norm_eps, self.dynamic_img_size = activation, norm_eps, dynamic_img_size
        self.param_dtype = param_dtype
        self.grid_size = (self.image_size[0] // patch_size, self.image_size[1] // patch_size)

    def __call__(self, x: jax.Array, is_training: bool = False, return_intermediates: bool = False) -> Any:
        if not self.dynamic_img_size and tuple(x.shape[1:3]) != self.image_size:
            raise ValueError(f"input is {x.shape[1]}x{x.shape[2]}, the model expects "
                             f"{self.image_size[0]}x{self.image_size[1]} (build it with dynamic_img_size=True "
                             "to accept other sizes)")
        out: dict[str, jax.Array] = {}
        d = self.dim
        patches = PatchEmbed(d, self.patch_size, self.patch_bias)(x)
        out["patch_embed"] = patches.reshape(patches.shape[0], -1, d)
        prefix = []
        if self.class_token:
            prefix.append(param("cls_token", (1, 1, d), hk.initializers.RandomNormal(1e-6), self.param_dtype))
        if self.reg_tokens:
            prefix.append(param("reg_token", (1, self.reg_tokens, d), hk.initializers.RandomNormal(1e-6),
                                self.param_dtype))
        if self.distilled:
            prefix.append(param("dist_token", (1, 1, d), trunc_normal, self.param_dtype))
        num_prefix = sum(t.shape[1] for t in prefix)
        num_pos = self.grid_size[0] * self.grid_size[1] + (0 if self.no_embed_class else num_prefix)
        pos_embed = param("pos_embed", (1, num_pos, d), trunc_normal, self.param_dtype)
        x = ops.embed_tokens(patches, pos_embed, prefix, self.grid_size, self.no_embed_class)
        x = dropout(x, self.emb_dropout, is_training)
        if self.pre_norm:
            x = layer_norm(self.norm_eps, "norm_pre")(x)

        for i, rate in enumerate(ops.drop_path_rates(self.layer_dropout, self.depth)):
            x = Block(self.heads, self.mlp_dim, self.qkv_bias, self.qk_norm, self.init_values, self.activation,
                      self.norm_eps, self.dropout, rate, self.param_dtype, name=f"blocks_{i}")(x, is_training)
            out[f"blocks.{i}"] = x
        if self.final_norm and not self.fc_norm:
            x = out["norm"] = layer_norm(self.norm_eps, "norm")(x)

        if self.distilled:
            pooled = (x[:, 0], x[:, 1])
        elif self.pool == "map":
            tokens = x if self.pool_include_prefix else x[:, num_prefix:]
            pooled = AttentionPoolLatent(self.heads, self.mlp_dim, self.activation, self.norm_eps,
                                         self.param_dtype)(tokens)
        else:
            pooled = ops.pool_tokens(x, self.pool, num_prefix, self.pool_include_prefix)
        if self.final_norm and self.fc_norm and not self.distilled:
            pooled = layer_norm(self.norm_eps, "fc_norm")(pooled)

        if self.distilled:
            out["pre_logits"] = (pooled[0] + pooled[1]) / 2
            if self.num_classes:
                logits = out["head"] = linear(self.num_classes, "head")(pooled[0])
                logits_dist = out["head_dist"] = linear(self.num_classes, "head_dist")(pooled[1])
                result = (logits, logits_dist) if is_training else (logits + logits_dist) / 2
            else:
                result = out["pre_logits"]
        else:
            out["pre_logits"] = pooled
            result = out["head"] = linear(self.num_classes, "head")(pooled) if self.num_classes else pooled
        return (result, out) if return_intermediates else result
