"""Flax linen primitives and the generic composite module (see ``vitport.structure``).

Submodules are named after timm's modules with list indices joined by an underscore
(``blocks_3``); the layout rule is ``converters.frameworks.LAYOUTS["flax"]``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from .. import ops, structure
from ..config import ModelConfig


class StoredParams:
    """Linen module mixin: on apply, ``param`` returns the stored param after checking its shape
    against the declared one, without tracing the initializer. flax's ``Scope.param`` makes that
    check with ``jax.eval_shape`` of the initializer, once per param per call: 380 traces for
    CaiT-S24 block by block, a third of linen's trace time (``benchmarks/README.md``)."""

    def param(self, name: str, init_fn: Callable, *init_args: Any, unbox: bool = True, **init_kwargs: Any) -> Any:
        shape = init_args[0] if init_args else init_kwargs.get("shape")
        scope = self.scope
        if (scope is None or not _is_shape(shape) or self.is_initializing()
                or not scope.has_variable("params", name)):
            return super().param(name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        scope.reserve(name, "params")  # a second param of the same name is refused, as by flax
        value = scope.get_variable("params", name)
        value = meta.unbox(value) if unbox else value
        if np.shape(meta.unbox(value)) != tuple(shape):
            raise flax.errors.ScopeParamShapeError(name, scope.path_text, np.shape(meta.unbox(value)), tuple(shape))
        return value


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in shape)


# flax's layers, reading their params as ``StoredParams`` does
class Dense(StoredParams, nn.Dense):
    pass


class Conv(StoredParams, nn.Conv):
    pass


class LayerNorm(StoredParams, nn.LayerNorm):
    pass


class RMSNorm(StoredParams, nn.RMSNorm):
    pass


class GroupNorm(StoredParams, nn.GroupNorm):
    pass


class DropPath(nn.Module):
    """Stochastic depth (timm ``DropPath``): per sample, training only, rng stream 'dropout'."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        rate = structure.drop_path_rate(self.rate)  # a scanned block's own (a scan input)
        if not train or rate is None:
            return x
        return ops.drop_path(x, rate, self.make_rng("dropout"))


class BatchNorm(StoredParams, nn.Module):
    """torch ``BatchNorm2d`` in evaluation mode (``structure.BatchNorm``): params ``scale``,
    ``bias`` and the frozen running statistics ``mean``, ``var``, held in the ``params`` collection
    (one tree carries the checkpoint; ``ops.batch_norm_frozen`` stops their gradient and
    ``vitport.training`` masks them)."""

    features: int
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, dt = (self.features,), self.param_dtype
        return ops.batch_norm_frozen(x, self.param("mean", jax.nn.initializers.zeros, n, dt),
                                     self.param("var", jax.nn.initializers.ones, n, dt),
                                     self.param("scale", jax.nn.initializers.ones, n, dt),
                                     self.param("bias", jax.nn.initializers.zeros, n, dt), self.eps)


class Layers(structure.LazyLayers):
    """``structure.Layers`` for a linen module inside its compact ``__call__`` (linen binds the
    submodules built here to the module being called)."""

    def __init__(self, module: nn.Module, declarations: dict[str, Any], cfg: ModelConfig, train: bool):
        super().__init__(declarations, cfg, train)
        self.module = module

    def has(self, name: str) -> bool:
        return name in self.declarations

    def linear(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        if self.module.is_initializing():
            self(name)(x)  # creates the layer's params
        params = self.module.variables["params"][name.replace(".", "_")]
        return params["kernel"], params.get("bias")

    def scan(self, prefix: str, count: int, x: jax.Array, *extra: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        block = structure.scannable(self.declarations, self.cfg, prefix, count)
        params = {} if self.module.is_initializing() else self.module.variables["params"]
        if prefix in params:  # stored stacked (JaxModel.set_scan_blocks)
            if block is None:
                raise structure.stacked_unscanned(repr(prefix))
            stacked, x = params[prefix], structure.carry(x, params[prefix], self.cfg)
        elif block is None or not params or self.train:
            return None
        else:
            stacked, x = structure.stack_blocks([params[f"{prefix}_{i}"] for i in range(count)], x, self.cfg)
        node = Node(block, parent=None)  # unbound: applied to each step's slice of the weights
        keys = {s: self.module.make_rng(s) for s in structure.RNG_STREAMS if self.train and self.module.has_rng(s)}

        def run(weights, step_keys, x):
            return node.apply({"params": weights}, *extra, x, train=self.train, rngs=step_keys or {})

        xs = structure.scan_inputs(self.declarations, prefix, count, stacked, self.train, keys or None)
        return jax.lax.scan(structure.scan_step(prefix, run), x, xs)

    def param(self, name: str) -> jax.Array:
        decl = self.declarations[name]
        return self.module.param(name, structure.initializer(decl), decl.shape, jnp.dtype(self.cfg.param_dtype))

    def build(self, name: str, decl: Any) -> Callable:
        kw = dict(dtype=self.cfg.dtype, param_dtype=jnp.dtype(self.cfg.param_dtype), name=name)
        if isinstance(decl, structure.Linear):
            return Dense(decl.out_features, use_bias=decl.bias, kernel_init=structure.WEIGHT_INIT,
                            dot_general=ops.dot_general(self.cfg.matmul_dtype), **kw)
        if isinstance(decl, structure.Norm):
            if decl.scale_init != 1.0:
                kw["scale_init"] = jax.nn.initializers.constant(decl.scale_init)
            if decl.kind == "RmsNorm":  # timm RmsNorm: x * rsqrt(mean(x**2) + eps) * weight, no bias
                return RMSNorm(epsilon=decl.eps, **kw)
            # Two-pass variance like torch; flax's default fast variance loses digits in float32.
            return LayerNorm(epsilon=decl.eps, use_fast_variance=False, **kw)
        if isinstance(decl, structure.PatchConv):
            p = decl.patch_size
            return Conv(decl.out_channels, (p, p), strides=(p, p), padding="VALID", use_bias=decl.bias,
                           kernel_init=structure.WEIGHT_INIT,
                           conv_general_dilated=ops.conv_general_dilated(self.cfg.matmul_dtype), **kw)
        if isinstance(decl, structure.Conv):
            k = decl.kernel_size
            conv = (ops.conv_general_dilated(self.cfg.matmul_dtype) if decl.std_eps is None
                    else ops.std_conv_general_dilated(self.cfg.matmul_dtype, decl.std_eps))
            return Conv(decl.out_channels, (k, k), strides=(decl.stride, decl.stride),
                           padding=ops.conv_padding(decl.padding), feature_group_count=decl.groups,
                           use_bias=decl.bias, kernel_init=structure.WEIGHT_INIT,
                           conv_general_dilated=conv, **kw)
        if isinstance(decl, structure.GroupNorm):
            return GroupNorm(num_groups=decl.groups, epsilon=decl.eps, use_fast_variance=False, **kw)
        if isinstance(decl, structure.BatchNorm):
            return BatchNorm(decl.features, decl.eps, jnp.dtype(self.cfg.param_dtype), name=name)
        if isinstance(decl, structure.Dropout):
            return nn.Dropout(decl.rate, deterministic=not self.train, name=name)
        if isinstance(decl, structure.DropPath):
            return functools.partial(DropPath(decl.rate, name=name), train=self.train)
        if isinstance(decl, structure.TrainKey):
            return lambda: self.module.make_rng(decl.stream) if self.train else None
        if isinstance(decl, structure.Node):
            return functools.partial(Node(decl, name=name), train=self.train)
        raise TypeError(f"no linen layer for {decl!r}")


class Node(StoredParams, nn.Module):
    """A composite timm module (``node.kind``): its children and wiring come from ``structure``."""

    node: structure.Node

    @nn.compact
    def __call__(self, *inputs: jax.Array, train: bool = False) -> Any:
        m = Layers(self, self.node.children(), self.node.cfg, train)
        return structure.FORWARD[self.node.kind](m, self.node.cfg, *inputs)


def run_root(module: nn.Module, cfg: ModelConfig, x: jax.Array, train: bool, return_intermediates: bool,
             stage: str) -> Any:
    """The body of ``ViT.__call__`` / ``CaiT.__call__``: the root's children live directly under it."""
    node = structure.root(cfg)
    layers = Layers(module, node.children(), cfg, train)
    result, out = structure.FORWARD[node.kind](layers, cfg, x, train, stage)
    return (result, out) if return_intermediates else result
