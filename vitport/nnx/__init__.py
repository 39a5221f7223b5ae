"""Flax NNX front-end: ``ViT``, ``CaiT`` and ``Eva`` (``model.train()`` / ``model.eval()``)."""

from .models import CaiT, Eva, ViT, VisionTransformerRelPos

__all__ = ["CaiT", "Eva", "ViT", "VisionTransformerRelPos"]
