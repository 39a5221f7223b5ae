"""Flax NNX front-end: ``ViT`` and ``CaiT`` (``model.train()`` / ``model.eval()``)."""

from .models import CaiT, ViT

__all__ = ["CaiT", "ViT"]
