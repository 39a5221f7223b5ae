"""Flax linen front-end: ``ViT`` and ``CaiT`` (``train`` is a call argument)."""

from .models import CaiT, ViT

__all__ = ["CaiT", "ViT"]
