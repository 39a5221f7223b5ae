"""timm's VisionTransformer (ViT, DeiT, distilled DeiT) and CaiT as native Flax NNX modules.

    model = ViT(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16,
                mlp_dim=2048, dropout=0.1, emb_dropout=0.1, rngs=nnx.Rngs(0))
    logits = model(images)          # evaluation: deterministic, no rng needed
    model.train(); model(images)    # dropout and stochastic depth on ('dropout' stream)
    model.eval()
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx

from .. import structure
from ..config import ModelConfig, config_from_kwargs, config_kwargs
from .layers import Layers, Node


class _Root(Node):
    family = ""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(structure.root(config), rngs=rngs)
        self.deterministic = True  # flipped by model.train() / model.eval() like every dropout layer

    @property
    def config(self) -> ModelConfig:
        return self.node.cfg

    @classmethod
    def from_config(cls, cfg: ModelConfig, *, rngs: nnx.Rngs):
        return cls(**config_kwargs(cfg), rngs=rngs)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None, return_intermediates: bool = False,
                 stage: str = "all") -> Any:
        """NHWC images -> logits (B, num_classes), or pooled features when ``num_classes=0``.

        With ``return_intermediates`` returns ``(output, {timm module name: activation})``.
        """
        train = not self.deterministic
        result, out = structure.FORWARD[self.node.kind](Layers(self, rngs), self.config, x, train, stage)
        return (result, out) if return_intermediates else result


class ViT(_Root):
    """Vision Transformer, numerically identical to timm's ``VisionTransformer``.

    The seed signature ``ViT(image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
    dropout, emb_dropout)`` plus timm's options as keywords (the fields of
    ``converters.specs.ViTSpec`` and ``vitport.config.ModelConfig``; see ``vitport.flax.ViT``),
    and ``rngs=nnx.Rngs(...)``.
    """

    family = "vit"

    def __init__(self, image_size: int | Sequence[int] = 224, patch_size: int = 16, num_classes: int = 1000,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.0,
                 emb_dropout: float = 0.0, *, rngs: nnx.Rngs, **options: Any):
        cfg = config_from_kwargs("vit", dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                                             dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
                                             emb_dropout=emb_dropout, **options))
        super().__init__(cfg, rngs=rngs)


class CaiT(_Root):
    """CaiT, numerically identical to timm's ``Cait``: the seed signature ``CaiT(image_size,
    patch_size, num_classes, dim, depth, cls_depth, heads, mlp_dim, dropout, emb_dropout,
    layer_dropout)`` plus timm's options as keywords, and ``rngs=nnx.Rngs(...)``."""

    family = "cait"

    def __init__(self, image_size: int | Sequence[int] = 224, patch_size: int = 16, num_classes: int = 1000,
                 dim: int = 384, depth: int = 24, cls_depth: int = 2, heads: int = 8, mlp_dim: int = 1536,
                 dropout: float = 0.0, emb_dropout: float = 0.0, layer_dropout: float = 0.0, *,
                 rngs: nnx.Rngs, **options: Any):
        cfg = config_from_kwargs("cait", dict(image_size=image_size, patch_size=patch_size,
                                              num_classes=num_classes, dim=dim, depth=depth, cls_depth=cls_depth,
                                              heads=heads, mlp_dim=mlp_dim, dropout=dropout, emb_dropout=emb_dropout,
                                              layer_dropout=layer_dropout, **options))
        super().__init__(cfg, rngs=rngs)


class Eva(_Root):
    """timm's ``Eva`` (EVA-02, RoPE ViTs, DINOv3, Perception Encoder): keywords are the fields of
    ``converters.specs.EvaSpec`` and ``vitport.config.ModelConfig``, plus ``rngs=nnx.Rngs(...)``."""

    family = "eva"

    def __init__(self, *, rngs: nnx.Rngs, **options: Any):
        super().__init__(config_from_kwargs("eva", options), rngs=rngs)


class VisionTransformerRelPos(_Root):
    """timm's ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``): keywords are the fields
    of ``converters.specs.RelPosSpec`` and ``vitport.config.ModelConfig``, plus ``rngs=nnx.Rngs(...)``."""

    family = "relpos"

    def __init__(self, *, rngs: nnx.Rngs, **options: Any):
        super().__init__(config_from_kwargs("relpos", options), rngs=rngs)
