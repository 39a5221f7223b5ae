"""Haiku's entry in ``vitport.frontends``: a transformed pair per config, ``is_training`` in apply."""

from __future__ import annotations

import functools
import sys

import haiku as hk

from ..config import ModelConfig
from ..frontends import ApplyFn, FrontEnd, example_input
from .models import CaiT, Eva, ViT, VisionTransformerRelPos


HAIKU_CLASSES = {"vit": ViT, "cait": CaiT, "eva": Eva, "relpos": VisionTransformerRelPos}


@functools.lru_cache(maxsize=64)
def _haiku_transformed(cfg: ModelConfig) -> hk.Transformed:
    cls = HAIKU_CLASSES[cfg.family]

    def forward(x, is_training: bool = False, return_intermediates: bool = False, stage: str = "all"):
        return cls.from_config(cfg)(x, is_training=is_training, return_intermediates=return_intermediates,
                                    stage=stage)

    return hk.transform(forward)


# One apply function per config (cached): jax.jit keys its traces and executables on the function,
# so every model with this config (a reload, ``to()``, ``with_params``) shares one compile.
@functools.lru_cache(maxsize=64)
def _haiku_apply(cfg: ModelConfig) -> ApplyFn:
    transformed = _haiku_transformed(cfg)

    def apply(params, x, *, train=False, rng=None, return_intermediates=False, stage="all"):
        return transformed.apply(params, rng, x, is_training=train, return_intermediates=return_intermediates,
                                 stage=stage)

    return apply


FRONT_END = FrontEnd("haiku", sys.modules[__package__],  # the package: its ViT, CaiT, Eva, ...
                     "is_training=True in apply",
                     init=lambda cfg, key: _haiku_transformed(cfg).init(key, example_input(cfg)),
                     apply=_haiku_apply, module=lambda cfg, params: _haiku_transformed(cfg))
