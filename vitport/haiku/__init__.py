"""Haiku front-end: ``ViT`` and ``CaiT`` (``is_training`` is a call argument)."""

from .cait import CaiT
from .vit import ViT

__all__ = ["CaiT", "ViT"]
