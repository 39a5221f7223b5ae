"""Flax linen front-end: ``ViT``, ``CaiT`` and ``Eva`` (``train`` is a call argument)."""

from .models import CaiT, Eva, ViT, VisionTransformerRelPos

__all__ = ["CaiT", "Eva", "ViT", "VisionTransformerRelPos"]
