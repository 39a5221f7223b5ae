"""timm's VisionTransformer (ViT, DeiT, distilled DeiT) and CaiT as Flax linen modules."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax

from converters.specs import EvaSpec, RelPosSpec

from ..config import RUNTIME_FIELDS, ModelConfig, config_from_kwargs, config_kwargs
from .layers import StoredParams, run_root

Dtype = Any


class _Root(StoredParams, nn.Module):
    """Shared by ``ViT`` and ``CaiT``: the module's fields are the constructor keywords of
    ``vitport.config``; ``config`` resolves them into the one description every layer reads."""

    family = ""

    @property
    def config(self) -> ModelConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("parent", "name")}
        return config_from_kwargs(self.family, fields)

    @classmethod
    def from_config(cls, cfg: ModelConfig, **kwargs: Any):
        return cls(**config_kwargs(cfg), **kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_intermediates: bool = False,
                 stage: str = "all") -> Any:
        """NHWC images -> logits (B, num_classes), or pooled features when ``num_classes=0``.

        ``train`` runs dropout and stochastic depth, drawing from the 'dropout' rng; with
        ``return_intermediates`` returns ``(output, {timm module name: activation})``;
        ``stage`` runs part of the model (see ``vitport.structure.STAGES``).
        """
        return run_root(self, self.config, x, train, return_intermediates, stage)


class ViT(_Root):
    """Vision Transformer, numerically identical to timm's ``VisionTransformer``.

    Keeps the seed signature ``ViT(image_size, patch_size, num_classes, dim, depth, heads,
    mlp_dim, dropout, emb_dropout)`` and adds timm's options under timm's meaning (see
    ``converters.specs.ViTSpec`` and ``vitport.config.ModelConfig``). ``pool`` takes 'cls' /
    'token', 'mean' / 'avg', 'map' or ''; ``fc_norm=None`` means "when pooling by average",
    ``patch_bias=None`` means "unless pre_norm". A distilled model in training returns
    ``(logits, logits_dist)`` when ``distilled_training=True``, their average otherwise, as timm does.
    """

    family = "vit"
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
    attn_dropout: float = 0.0
    head_dropout: float = 0.0
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
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
    mlp_layer: str = "Mlp"
    mlp_gate_last: bool = True
    block_fn: str = "Block"
    num_parallel: int = 2
    fuse_out_proj: bool = False
    attn_layer: str = "Attention"
    norm_layer: str = "LayerNorm"
    backbone: Any = None  # a hybrid CNN stem: converters.specs.HybridBackbone (or its dict form)
    dtype: Dtype = None
    param_dtype: Dtype = "float32"
    matmul_dtype: str | None = None
    distilled_training: bool = False
    scan_blocks: bool = False


class CaiT(_Root):
    """CaiT, numerically identical to timm's ``Cait``.

    Keeps the seed signature ``CaiT(image_size, patch_size, num_classes, dim, depth,
    cls_depth, heads, mlp_dim, dropout, emb_dropout, layer_dropout)``. ``layer_dropout`` is
    timm's stochastic depth (the same rate in every self-attention block); ``init_values`` is
    the LayerScale init; ``cls_mlp_dim`` (default ``mlp_dim``) the class-attention MLP width.
    """

    family = "cait"
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
    attn_dropout: float = 0.0
    head_dropout: float = 0.0
    channels: int = 3
    cls_mlp_dim: int | None = None
    pool: str = "cls"
    qkv_bias: bool = True
    init_values: float = 1e-5
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dtype: Dtype = None
    param_dtype: Dtype = "float32"
    matmul_dtype: str | None = None
    distilled_training: bool = False
    scan_blocks: bool = False


def _namespace(spec_type: type, family: str, doc: str) -> dict[str, Any]:
    """A linen root's fields: every field of ``spec_type`` and every run-time setting, with its default."""
    runtime = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in RUNTIME_FIELDS}
    fields = {f.name: f.default for f in dataclasses.fields(spec_type)} | runtime
    return {"__annotations__": {k: Any for k in fields}, **fields, "family": family, "__module__": __name__,
            "__doc__": f"{doc} as a linen module; fields: ``converters.specs.{spec_type.__name__}`` and "
                       "``vitport.config.ModelConfig``."}


Eva = type("Eva", (_Root,), _namespace(EvaSpec, "eva", "timm's ``Eva`` (EVA-02, RoPE ViTs, DINOv3, Perception Encoder)"))
VisionTransformerRelPos = type("VisionTransformerRelPos", (_Root,), _namespace(
    RelPosSpec, "relpos", "timm's ``VisionTransformerRelPos`` (relative-position ViTs)"))
