"""Flax linen front-end: ``ViT`` and ``CaiT`` (``train`` is a call argument)."""

from .cait import CaiT
from .vit import ViT

__all__ = ["CaiT", "ViT"]
