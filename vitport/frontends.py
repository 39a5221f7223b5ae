"""The registry of front-ends: one entry per JAX framework.

Each entry knows how to build, initialise and apply a model from a ``ModelConfig``
(evaluation and training), and which layout rule (``converters.frameworks.LAYOUTS``) says
where each canonical tensor lives in its params. The API, CLI, parity code, tests and
benchmark iterate over ``FRONT_ENDS``; a fourth framework is one entry here, one layout rule
and one package of primitives.

==========  ======================  ===================================  ==================================
framework   modules                 training mode                        params (``JaxModel.params``)
==========  ======================  ===================================  ==================================
``haiku``   ``vitport.haiku.ViT``   ``apply(..., is_training=True)``     ``{"vit/blocks_0/attn/qkv": {"w"}}``
``flax``    ``vitport.flax.ViT``    ``apply(..., train=True)``           ``{"params": {"blocks_0": ...}}``
``nnx``     ``vitport.nnx.ViT``     ``model.train()`` / ``model.eval()``  ``{"blocks": {0: {...}}}`` (pure)
==========  ======================  ===================================  ==================================
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
from flax import nnx

from converters.errors import InvalidArgumentError
from converters.frameworks import FRAMEWORKS, layout

from . import flax as vflax
from . import haiku as vhaiku
from . import nnx as vnnx
from . import structure
from .config import ModelConfig
from .nnx import layers as nnx_layers

# apply(params, images, *, train=False, rng=None, return_intermediates=False, stage="all")
ApplyFn = Callable[..., Any]


@dataclass(frozen=True)
class FrontEnd:
    """How one framework builds, initialises and runs a model.

    ``module(cfg, params)`` is the framework's own model object (Haiku's transformed pair,
    the linen module, or the NNX module holding ``params``).
    """

    name: str
    package: Any
    training: str
    init: Callable[[ModelConfig, jax.Array], Any]
    apply: Callable[[ModelConfig], ApplyFn]
    module: Callable[[ModelConfig, Any], Any]

    def model_class(self, cfg: ModelConfig) -> type:
        return {"vit": self.package.ViT, "cait": self.package.CaiT, "eva": self.package.Eva,
                "relpos": self.package.VisionTransformerRelPos}[cfg.family]

    @property
    def layout(self):
        return layout(self.name)


# A framework's own init (``FrontEnd.init``) runs eagerly, not under one jit: jitted, every param's
# threefry draw is its own kernel to compile (20-23 s for cait_s24_224 here), while eagerly jax
# compiles each draw once per shape and reuses it across blocks and models (6-13 s; measured with a
# fresh process per model). ``vitport.init_params`` and ``create_model`` use neither: they draw one
# canonical tree for all front-ends (``vitport.random_init``).
def _example(cfg: ModelConfig) -> jax.Array:
    return jnp.zeros((1, *cfg.spec.image_size, cfg.spec.channels), jnp.dtype(cfg.param_dtype))


# ------------------------------------------------------------------------------ Haiku


HAIKU_CLASSES = {"vit": vhaiku.ViT, "cait": vhaiku.CaiT, "eva": vhaiku.Eva, "relpos": vhaiku.VisionTransformerRelPos}


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


HAIKU = FrontEnd("haiku", vhaiku, "is_training=True in apply",
                 init=lambda cfg, key: _haiku_transformed(cfg).init(key, _example(cfg)),
                 apply=_haiku_apply, module=lambda cfg, params: _haiku_transformed(cfg))


# ------------------------------------------------------------------------------- linen


@functools.lru_cache(maxsize=64)
def _linen_module(cfg: ModelConfig):
    return {"vit": vflax.ViT, "cait": vflax.CaiT, "eva": vflax.Eva,
            "relpos": vflax.VisionTransformerRelPos}[cfg.family].from_config(cfg)


@functools.lru_cache(maxsize=64)
def _linen_apply(cfg: ModelConfig) -> ApplyFn:
    module = _linen_module(cfg)

    def apply(params, x, *, train=False, rng=None, return_intermediates=False, stage="all"):
        return module.apply(params, x, train=train, return_intermediates=return_intermediates, stage=stage,
                            rngs={} if rng is None else {"dropout": rng, "rope": rng})

    return apply


FLAX = FrontEnd("flax", vflax, "train=True in apply",
                init=lambda cfg, key: _linen_module(cfg).init(key, _example(cfg)),
                apply=_linen_apply, module=lambda cfg, params: _linen_module(cfg))


# --------------------------------------------------------------------------------- NNX


def _nnx_build(cfg: ModelConfig, rngs: nnx.Rngs):
    return {"vit": vnnx.ViT, "cait": vnnx.CaiT, "eva": vnnx.Eva,
            "relpos": vnnx.VisionTransformerRelPos}[cfg.family].from_config(cfg, rngs=rngs)


@functools.lru_cache(maxsize=64)
def _nnx_graph(cfg: ModelConfig):
    """The model's graph and non-param state, built without weights (the rng state is real; the
    ``rng`` given to apply overrides it)."""
    # Eagerly even when first asked inside a jit trace: the cached graph must hold no tracers,
    # and traced rng counters made each new layer ask jax for a costly error message.
    with jax.ensure_compile_time_eval(), nnx_layers.abstract_weights():
        model = _nnx_build(cfg, nnx_layers.graph_rngs())
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


NNX = FrontEnd("nnx", vnnx, "model.train() / model.eval()", init=_nnx_init, apply=_nnx_apply, module=nnx_module)


FRONT_ENDS: dict[str, FrontEnd] = {fe.name: fe for fe in (HAIKU, FLAX, NNX)}
assert tuple(FRONT_ENDS) == FRAMEWORKS, "every layout rule needs a front-end, and vice versa"


def front_end(framework: str) -> FrontEnd:
    layout(framework)  # the one error message for an unknown framework
    return FRONT_ENDS[framework]
