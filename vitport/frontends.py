"""The registry of front-ends: one entry per JAX framework.

Each entry knows how to build, initialise and apply a model from a ``ModelConfig``
(evaluation and training), and which layout rule (``converters.frameworks.LAYOUTS``) says
where each canonical tensor lives in its params. The API, CLI, parity code, tests and
benchmark iterate over ``FRONT_ENDS``; a fourth framework is one more package with a
``front_end.py`` module holding its ``FRONT_END``, one layout rule and its name in
``converters.FRAMEWORKS``. Each framework's entry is imported on first use, so loading,
converting or running a linen model never imports Haiku or NNX (nor they it).

==========  ======================  ===================================  ==================================
framework   modules                 training mode                        params (``JaxModel.params``)
==========  ======================  ===================================  ==================================
``haiku``   ``vitport.haiku.ViT``   ``apply(..., is_training=True)``     ``{"vit/blocks_0/attn/qkv": {"w"}}``
``flax``    ``vitport.flax.ViT``    ``apply(..., train=True)``           ``{"params": {"blocks_0": ...}}``
``nnx``     ``vitport.nnx.ViT``     ``model.train()`` / ``model.eval()``  ``{"blocks": {0: {...}}}`` (pure)
==========  ======================  ===================================  ==================================
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp

from converters.frameworks import FRAMEWORKS, layout

from .config import ModelConfig

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
def example_input(cfg: ModelConfig) -> jax.Array:
    return jnp.zeros((1, *cfg.spec.image_size, cfg.spec.channels), jnp.dtype(cfg.param_dtype))


class _FrontEnds(Mapping):
    """``FRONT_ENDS``: ``converters.FRAMEWORKS`` in order, each entry imported from
    ``vitport.<framework>.front_end`` when first asked for."""

    def __getitem__(self, framework: str) -> FrontEnd:
        if framework not in FRAMEWORKS:
            raise KeyError(framework)
        return importlib.import_module(f"vitport.{framework}.front_end").FRONT_END

    def __iter__(self) -> Iterator[str]:
        return iter(FRAMEWORKS)

    def __len__(self) -> int:
        return len(FRAMEWORKS)


FRONT_ENDS: Mapping[str, FrontEnd] = _FrontEnds()


def front_end(framework: str) -> FrontEnd:
    layout(framework)  # the one error message for an unknown framework
    return FRONT_ENDS[framework]
