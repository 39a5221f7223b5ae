"""Haiku front-end: ``ViT`` and ``CaiT`` (``is_training`` is a call argument)."""

from .models import CaiT, ViT

__all__ = ["CaiT", "ViT"]
