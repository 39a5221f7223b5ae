"""Flax NNX's entry in ``vitport.frontends``: a module built without weights per config, the params merged in."""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
from flax import nnx

from converters.errors import InvalidArgumentError

from .. import structure
from ..config import ModelConfig
from ..frontends import ApplyFn, FrontEnd
from . import layers
from .models import CaiT, Eva, ViT, VisionTransformerRelPos


def _nnx_build(cfg: ModelConfig, rngs: nnx.Rngs):
    return {"vit": ViT, "cait": CaiT, "eva": Eva,
            "relpos": VisionTransformerRelPos}[cfg.family].from_config(cfg, rngs=rngs)


@functools.lru_cache(maxsize=64)
def _nnx_graph(cfg: ModelConfig):
    """The model's graph and non-param state, built without weights (the rng state is real; the
    ``rng`` given to apply overrides it)."""
    # Eagerly even when first asked inside a jit trace: the cached graph must hold no tracers,
    # and traced rng counters made each new layer ask jax for a costly error message.
    with jax.ensure_compile_time_eval(), layers.abstract_weights():
        model = _nnx_build(cfg, layers.graph_rngs())
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, rest


def nnx_module(cfg: ModelConfig, params: Any) -> nnx.Module:
    """An NNX model holding ``params``, without initialising one at random first."""
    graphdef, rest = _nnx_graph(cfg)
    # Fresh Variables for the rng state: merged modules must not share (and advance) the cached
    # graph's counters, which were made in whatever trace first asked for the graph.
    return nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))


def _nnx_init(cfg: ModelConfig, key: jax.Array) -> Any:
    return nnx.to_pure_dict(nnx.state(_nnx_build(cfg, nnx.Rngs(key)), nnx.Param))


@functools.lru_cache(maxsize=64)
def _nnx_apply(cfg: ModelConfig) -> ApplyFn:
    def apply(params, x, *, train=False, rng=None, return_intermediates=False, stage="all"):
        if train and rng is None and structure.draws_in_training(cfg):
            # The module's own rng state lives only in this call: every call would draw alike.
            raise InvalidArgumentError("training with dropout or stochastic depth needs rng= (a fresh key per step)")
        model = nnx_module(cfg, params)
        if train:
            model.train()
        rngs = None if rng is None else nnx.Rngs(dropout=rng, rope=jax.random.fold_in(rng, 1))
        return model(x, rngs=rngs, return_intermediates=return_intermediates, stage=stage)

    return apply


FRONT_END = FrontEnd("nnx", sys.modules[__package__],  # the package: its ViT, CaiT, Eva, ...
                     "model.train() / model.eval()", init=_nnx_init, apply=_nnx_apply, module=nnx_module)
