"""Flax linen's entry in ``vitport.frontends``: one module per config, ``train`` in apply."""

from __future__ import annotations

import functools
import sys

from ..config import ModelConfig
from ..frontends import ApplyFn, FrontEnd, example_input
from .models import CaiT, Eva, ViT, VisionTransformerRelPos


@functools.lru_cache(maxsize=64)
def _linen_module(cfg: ModelConfig):
    return {"vit": ViT, "cait": CaiT, "eva": Eva, "relpos": VisionTransformerRelPos}[cfg.family].from_config(cfg)


@functools.lru_cache(maxsize=64)
def _linen_apply(cfg: ModelConfig) -> ApplyFn:
    module = _linen_module(cfg)

    def apply(params, x, *, train=False, rng=None, return_intermediates=False, stage="all"):
        return module.apply(params, x, train=train, return_intermediates=return_intermediates, stage=stage,
                            rngs={} if rng is None else {"dropout": rng, "rope": rng})

    return apply


FRONT_END = FrontEnd("flax", sys.modules[__package__],  # the package: its ViT, CaiT, Eva, ...
                     "train=True in apply",
                     init=lambda cfg, key: _linen_module(cfg).init(key, example_input(cfg)),
                     apply=_linen_apply, module=lambda cfg, params: _linen_module(cfg))
