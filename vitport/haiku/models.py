"""timm's VisionTransformer (ViT, DeiT, distilled DeiT) and CaiT as Haiku modules."""

from __future__ import annotations

from typing import Any, Sequence

import haiku as hk
import jax

from .. import structure
from ..config import ModelConfig, config_from_kwargs, config_kwargs
from .layers import Layers


class _Root(hk.Module):
    family = ""

    def __init__(self, config: ModelConfig, name: str | None = None):
        super().__init__(name=name or config.family)  # the root name is part of the param paths
        self.config = config

    @classmethod
    def from_config(cls, cfg: ModelConfig, name: str | None = None):
        return cls(**config_kwargs(cfg), name=name)

    def __call__(self, x: jax.Array, is_training: bool = False, return_intermediates: bool = False,
                 stage: str = "all") -> Any:
        """NHWC images -> logits (B, num_classes), or pooled features when ``num_classes=0``.

        ``is_training`` runs dropout and stochastic depth (needs an rng in ``apply``); with
        ``return_intermediates`` returns ``(output, {timm module name: activation})``.
        """
        node = structure.root(self.config)
        m = Layers(node.children(), self.config, is_training)
        result, out = structure.FORWARD[node.kind](m, self.config, x, is_training, stage)
        return (result, out) if return_intermediates else result


class ViT(_Root):
    """Vision Transformer, numerically identical to timm's ``VisionTransformer``; use inside
    ``hk.transform``.

    The seed signature ``ViT(image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
    dropout, emb_dropout)`` plus timm's options as keywords (the fields of
    ``converters.specs.ViTSpec`` and ``vitport.config.ModelConfig``; see ``vitport.flax.ViT``).
    """

    family = "vit"

    def __init__(self, image_size: int | Sequence[int] = 224, patch_size: int = 16, num_classes: int = 1000,
                 dim: int = 768, depth: int = 12, heads: int = 12, mlp_dim: int = 3072, dropout: float = 0.0,
                 emb_dropout: float = 0.0, *, name: str | None = None, **options: Any):
        cfg = config_from_kwargs("vit", dict(image_size=image_size, patch_size=patch_size, num_classes=num_classes,
                                             dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, dropout=dropout,
                                             emb_dropout=emb_dropout, **options))
        super().__init__(cfg, name)


class CaiT(_Root):
    """CaiT, numerically identical to timm's ``Cait``; use inside ``hk.transform``.

    The seed signature ``CaiT(image_size, patch_size, num_classes, dim, depth, cls_depth,
    heads, mlp_dim, dropout, emb_dropout, layer_dropout)`` plus timm's options as keywords.
    """

    family = "cait"

    def __init__(self, image_size: int | Sequence[int] = 224, patch_size: int = 16, num_classes: int = 1000,
                 dim: int = 384, depth: int = 24, cls_depth: int = 2, heads: int = 8, mlp_dim: int = 1536,
                 dropout: float = 0.0, emb_dropout: float = 0.0, layer_dropout: float = 0.0, *,
                 name: str | None = None, **options: Any):
        cfg = config_from_kwargs("cait", dict(image_size=image_size, patch_size=patch_size,
                                              num_classes=num_classes, dim=dim, depth=depth, cls_depth=cls_depth,
                                              heads=heads, mlp_dim=mlp_dim, dropout=dropout, emb_dropout=emb_dropout,
                                              layer_dropout=layer_dropout, **options))
        super().__init__(cfg, name)


class Eva(_Root):
    """timm's ``Eva`` (EVA-02, RoPE ViTs, DINOv3, Perception Encoder); use inside ``hk.transform``.
    Keywords: the fields of ``converters.specs.EvaSpec`` and ``vitport.config.ModelConfig``."""

    family = "eva"

    def __init__(self, *, name: str | None = None, **options: Any):
        super().__init__(config_from_kwargs("eva", options), name)


class VisionTransformerRelPos(_Root):
    """timm's ``VisionTransformerRelPos`` (``vit_relpos_*``, ``vit_srelpos_*``); use inside
    ``hk.transform``. Keywords: the fields of ``converters.specs.RelPosSpec`` and ``vitport.config.ModelConfig``."""

    family = "relpos"

    def __init__(self, *, name: str | None = None, **options: Any):
        super().__init__(config_from_kwargs("relpos", options), name)
