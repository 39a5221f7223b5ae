"""Haiku front-end: ``ViT``, ``CaiT`` and ``Eva`` (``is_training`` is a call argument)."""

from .models import CaiT, Eva, ViT

__all__ = ["CaiT", "Eva", "ViT"]
