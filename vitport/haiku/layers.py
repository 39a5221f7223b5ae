"""Haiku primitives and the generic composite module (see ``vitport.structure``).

Module names follow timm's with list indices joined by an underscore, under the model's root
(``vit/blocks_3/attn/qkv``); the layout rule is ``converters.frameworks.LAYOUTS["haiku"]``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp

from .. import ops, structure
from ..config import ModelConfig


def _haiku_init(init: Callable) -> Callable:
    """A ``jax.nn.initializers`` function as a Haiku initializer ``(shape, dtype)``."""
    return lambda shape, dtype: init(hk.next_rng_key(), shape, dtype)


WEIGHT_INIT = _haiku_init(structure.WEIGHT_INIT)


def _dropout(rate: float, is_training: bool) -> Callable[[jax.Array], jax.Array]:
    if not is_training or rate == 0.0:
        return lambda x: x
    return lambda x: hk.dropout(hk.next_rng_key(), rate, x)


def _drop_path(rate: float, is_training: bool) -> Callable[[jax.Array], jax.Array]:
    if not is_training or rate == 0.0:
        return lambda x: x
    return lambda x: ops.drop_path(x, rate, hk.next_rng_key())


class Layers:
    """``structure.Layers`` inside a Haiku module's ``__call__``: submodules are created on
    first use (Haiku names them under the module being called) and cached."""

    def __init__(self, declarations: dict[str, Any], cfg: ModelConfig, is_training: bool):
        self.declarations, self.cfg, self.is_training = declarations, cfg, is_training
        self.built: dict[str, Callable] = {}

    def __call__(self, name: str) -> Callable:
        if name not in self.built:
            self.built[name] = self._build(name.replace(".", "_"), self.declarations[name])
        return self.built[name]

    def has(self, name: str) -> bool:
        return name in self.declarations

    def param(self, name: str) -> jax.Array:
        decl = self.declarations[name]
        return hk.get_parameter(name, decl.shape, jnp.dtype(self.cfg.param_dtype),
                                init=_haiku_init(structure.initializer(decl)))

    def _build(self, name: str, decl: Any) -> Callable:
        if isinstance(decl, structure.Linear):
            return hk.Linear(decl.out_features, with_bias=decl.bias, w_init=WEIGHT_INIT, name=name)
        if isinstance(decl, structure.Norm):
            # Haiku's default eps is 1e-5; timm's models say their own.
            return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=decl.eps, name=name)
        if isinstance(decl, structure.PatchConv):
            return hk.Conv2D(decl.out_channels, decl.patch_size, stride=decl.patch_size, padding="VALID",
                             with_bias=decl.bias, w_init=WEIGHT_INIT, name=name)
        if isinstance(decl, structure.Dropout):
            return _dropout(decl.rate, self.is_training)
        if isinstance(decl, structure.DropPath):
            return _drop_path(decl.rate, self.is_training)
        if isinstance(decl, structure.Node):
            return functools.partial(Node(decl, name=name), is_training=self.is_training)
        raise TypeError(f"no Haiku layer for {decl!r}")


class Node(hk.Module):
    """A composite timm module (``node.kind``): its children and wiring come from ``structure``."""

    def __init__(self, node: structure.Node, name: str | None = None):
        super().__init__(name=name)
        self.node = node

    def __call__(self, *inputs: jax.Array, is_training: bool = False) -> Any:
        m = Layers(self.node.children(), self.node.cfg, is_training)
        return structure.FORWARD[self.node.kind](m, self.node.cfg, *inputs)
