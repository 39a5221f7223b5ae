"""Flax linen primitives and the generic composite module (see ``vitport.structure``).

Submodules are named after timm's modules with list indices joined by an underscore
(``blocks_3``); the layout rule is ``converters.frameworks.LAYOUTS["flax"]``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import ops, structure
from ..config import ModelConfig


class DropPath(nn.Module):
    """Stochastic depth (timm ``DropPath``): per sample, training only, rng stream 'dropout'."""

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        rate = structure.drop_path_rate(self.rate)  # a scanned block's own (a scan input)
        if not train or rate is None:
            return x
        return ops.drop_path(x, rate, self.make_rng("dropout"))


class BatchNorm(nn.Module):
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
        return self.module.param(name, self._init(structure.initializer(decl)), decl.shape,
                                 jnp.dtype(self.cfg.param_dtype))

    def _init(self, init: Callable) -> Callable:
        """``init`` when params are being made; else a shape-only stand-in. On apply, linen's
        ``param`` traces the initializer (``jax.eval_shape``) only to check the stored param's
        shape, and tracing timm's truncated normal once per Linear was most of linen's lead in
        trace time over Haiku."""
        if self.module.is_initializing() or self.module.is_mutable_collection("params"):
            return init
        return jax.nn.initializers.zeros

    def build(self, name: str, decl: Any) -> Callable:
        kw = dict(dtype=self.cfg.dtype, param_dtype=jnp.dtype(self.cfg.param_dtype), name=name)
        if isinstance(decl, structure.Linear):
            return nn.Dense(decl.out_features, use_bias=decl.bias, kernel_init=self._init(structure.WEIGHT_INIT),
                            dot_general=ops.dot_general(self.cfg.matmul_dtype), **kw)
        if isinstance(decl, structure.Norm):
            if decl.scale_init != 1.0:
                kw["scale_init"] = jax.nn.initializers.constant(decl.scale_init)
            if decl.kind == "RmsNorm":  # timm RmsNorm: x * rsqrt(mean(x**2) + eps) * weight, no bias
                return nn.RMSNorm(epsilon=decl.eps, **kw)
            # Two-pass variance like torch; flax's default fast variance loses digits in float32.
            return nn.LayerNorm(epsilon=decl.eps, use_fast_variance=False, **kw)
        if isinstance(decl, structure.PatchConv):
            p = decl.patch_size
            return nn.Conv(decl.out_channels, (p, p), strides=(p, p), padding="VALID", use_bias=decl.bias,
                           kernel_init=self._init(structure.WEIGHT_INIT),
                           conv_general_dilated=ops.conv_general_dilated(self.cfg.matmul_dtype), **kw)
        if isinstance(decl, structure.Conv):
            k = decl.kernel_size
            conv = (ops.conv_general_dilated(self.cfg.matmul_dtype) if decl.std_eps is None
                    else ops.std_conv_general_dilated(self.cfg.matmul_dtype, decl.std_eps))
            return nn.Conv(decl.out_channels, (k, k), strides=(decl.stride, decl.stride),
                           padding=ops.conv_padding(decl.padding), feature_group_count=decl.groups,
                           use_bias=decl.bias, kernel_init=self._init(structure.WEIGHT_INIT),
                           conv_general_dilated=conv, **kw)
        if isinstance(decl, structure.GroupNorm):
            return nn.GroupNorm(num_groups=decl.groups, epsilon=decl.eps, use_fast_variance=False, **kw)
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


class Node(nn.Module):
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
