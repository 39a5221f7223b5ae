"""Haiku front-end: ``ViT``, ``CaiT`` and ``Eva`` (``is_training`` is a call argument)."""

from .models import CaiT, Eva, ViT, VisionTransformerRelPos

__all__ = ["CaiT", "Eva", "ViT", "VisionTransformerRelPos"]
