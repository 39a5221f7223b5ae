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


def _haiku_init(init: Callable) -> Callable:
    """A ``jax.nn.initializers`` function as a Haiku initializer ``(shape, dtype)``."""
    return lambda shape, dtype: init(hk.next_rng_key(), shape, dtype)


WEIGHT_INIT = _haiku_init(structure.WEIGHT_INIT)


def _dropout(rate: float, is_training: bool) -> Callable[[jax.Array], jax.Array]:
    if not is_training or rate == 0.0:
        return lambda x: x
    return lambda x: hk.dropout(hk.next_rng_key(), rate, x)


def _drop_path(rate: float, is_training: bool) -> Callable[[jax.Array], jax.Array]:
    def drop(x):
        step_rate = structure.drop_path_rate(rate)  # a scanned block's own (a scan input)
        return x if step_rate is None else ops.drop_path(x, step_rate, hk.next_rng_key())

    return drop if is_training else lambda x: x


class Linear(hk.Module):
    """``hk.Linear`` (params ``w`` (in, out) and ``b``, created in the inputs' dtype) whose product
    goes through ``ops.dot_general``: hk.Linear takes only ``precision``, not the float32
    accumulation that makes bf16 fast on CPU."""

    def __init__(self, output_size: int, with_bias: bool, matmul_dtype: str | None, name: str):
        super().__init__(name=name)
        self.output_size, self.with_bias, self.matmul_dtype = output_size, with_bias, matmul_dtype

    def weights(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(w, b)`` as a call on ``x`` uses them (b None without bias)."""
        w = hk.get_parameter("w", [x.shape[-1], self.output_size], x.dtype, init=WEIGHT_INIT)
        return w, hk.get_parameter("b", [self.output_size], x.dtype, init=jnp.zeros) if self.with_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w, b = self.weights(x)
        y = ops.dot_general(self.matmul_dtype)(x, w, (((x.ndim - 1,), (0,)), ((), ())))
        return y if b is None else y + b


class PatchConv(hk.Module):
    """``hk.Conv2D`` with kernel = stride = patch, VALID (params ``w`` HWIO and ``b``), through
    ``ops.conv_general_dilated``."""

    def __init__(self, decl: structure.PatchConv, matmul_dtype: str | None, name: str):
        super().__init__(name=name)
        self.decl, self.matmul_dtype = decl, matmul_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        d, p = self.decl, self.decl.patch_size
        w = hk.get_parameter("w", [p, p, x.shape[-1], d.out_channels], x.dtype, init=WEIGHT_INIT)
        y = ops.conv_general_dilated(self.matmul_dtype)(x, w, (p, p), "VALID",
                                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if d.bias:
            y = y + hk.get_parameter("b", [d.out_channels], x.dtype, init=jnp.zeros)
        return y


class Conv(hk.Module):
    """A general 2-D convolution (``structure.Conv``; params ``w`` HWIO and ``b``) through
    ``ops.conv_general_dilated``, or ``ops.std_conv_general_dilated`` for timm's weight-standardised
    ``StdConv2d``."""

    def __init__(self, decl: structure.Conv, matmul_dtype: str | None, name: str):
        super().__init__(name=name)
        self.decl, self.matmul_dtype = decl, matmul_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        d, k = self.decl, self.decl.kernel_size
        w = hk.get_parameter("w", [k, k, d.in_channels // d.groups, d.out_channels], x.dtype, init=WEIGHT_INIT)
        conv = (ops.conv_general_dilated(self.matmul_dtype) if d.std_eps is None
                else ops.std_conv_general_dilated(self.matmul_dtype, d.std_eps))
        y = conv(x, w, (d.stride, d.stride), ops.conv_padding(d.padding), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                 feature_group_count=d.groups)
        if d.bias:
            y = y + hk.get_parameter("b", [d.out_channels], x.dtype, init=jnp.zeros)
        return y


class BatchNorm(hk.Module):
    """torch ``BatchNorm2d`` in evaluation mode (``structure.BatchNorm``): params ``scale``,
    ``offset`` and the frozen running statistics ``mean``, ``var`` (plain parameters here so that
    one params tree carries the checkpoint; ``ops.batch_norm_frozen`` stops their gradient)."""

    def __init__(self, decl: structure.BatchNorm, name: str):
        super().__init__(name=name)
        self.decl = decl

    def __call__(self, x: jax.Array) -> jax.Array:
        n = [self.decl.features]
        dt = jnp.promote_types(x.dtype, jnp.float32)
        return ops.batch_norm_frozen(x, hk.get_parameter("mean", n, dt, init=jnp.zeros),
                                     hk.get_parameter("var", n, dt, init=jnp.ones),
                                     hk.get_parameter("scale", n, dt, init=jnp.ones),
                                     hk.get_parameter("offset", n, dt, init=jnp.zeros), self.decl.eps)


class Layers(structure.LazyLayers):
    """``structure.Layers`` inside a Haiku module's ``__call__`` (Haiku names the submodules
    built here under the module being called); ``train`` is Haiku's ``is_training``."""

    def has(self, name: str) -> bool:
        return name in self.declarations

    def linear(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        return self(name).weights(x)

    def scan(self, prefix: str, count: int, x: jax.Array, *extra: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        block = structure.scannable(self.declarations, self.cfg, prefix, count)
        if hk.running_init():
            return None
        params, scope = hk.get_params(), hk.current_name()
        stacked_name = f"{scope}/{prefix}"
        # Stored stacked (JaxModel.set_scan_blocks): {"blocks/attn/qkv": {"w": (depth, ...)}}.
        stacked = {module[len(scope) + 1:]: leaves for module, leaves in params.items()
                   if module == stacked_name or module.startswith(stacked_name + "/")}
        if stacked:
            if block is None:
                raise structure.stacked_unscanned(repr(prefix))
            x = structure.carry(x, stacked, self.cfg)
            # Each step applies a block of its own transform to its slice: the slices are named
            # as that block's params, and this frame's params hold no block to fetch. Its rng key
            # is the step's (split from one of this frame's sequence).
            one_block = hk.transform(lambda *inputs: Node(block, name=prefix)(*inputs, is_training=self.train))

            def run(weights, key, x):
                return one_block.apply(weights, key, *extra, x)

            key = hk.maybe_next_rng_key() if self.train else None
            xs = structure.scan_inputs(self.declarations, prefix, count, stacked, self.train, key)
            return jax.lax.scan(structure.scan_step(prefix, run), x, xs)
        if block is None or self.train:
            return None
        # Block i's params, keyed by their full name below the block ("/attn/qkv/w"); block 0's
        # module runs in the scan with a getter that hands it the slice of the step's block.
        names = [f"{scope}/{prefix}_{i}" for i in range(count)]
        per_block = [{f"{module[len(name):]}/{leaf}": v for module, leaves in params.items()
                      if module == name or module.startswith(name + "/") for leaf, v in leaves.items()}
                     for name in names]
        stacked, x = structure.stack_blocks(per_block, x, self.cfg)

        def run(weights, _, x):
            def getter(next_getter, value, context):
                return next_getter(weights[context.full_name[len(names[0]):]])

            with hk.custom_getter(getter):
                return Node(block, name=f"{prefix}_0")(*extra, x, is_training=False)

        return hk.scan(structure.scan_step(prefix, run), x, structure.scan_inputs(self.declarations, prefix, count,
                                                                                   stacked, False))

    def param(self, name: str) -> jax.Array:
        decl = self.declarations[name]
        return hk.get_parameter(name, decl.shape, jnp.dtype(self.cfg.param_dtype),
                                init=_haiku_init(structure.initializer(decl)))

    def build(self, name: str, decl: Any) -> Callable:
        if isinstance(decl, structure.Linear):
            return Linear(decl.out_features, decl.bias, self.cfg.matmul_dtype, name=name)
        if isinstance(decl, structure.Norm):
            # Haiku's default eps is 1e-5; timm's models say their own.
            scale_init = None if decl.scale_init == 1.0 else hk.initializers.Constant(decl.scale_init)
            if decl.kind == "RmsNorm":  # timm RmsNorm: x * rsqrt(mean(x**2) + eps) * weight, no offset
                norm = hk.RMSNorm(axis=-1, eps=decl.eps, scale_init=scale_init, create_scale=True, name=name)
            else:
                norm = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=decl.eps,
                                    scale_init=scale_init, name=name)
            # statistics in float32 for 16-bit inputs, as linen's and NNX's LayerNorm compute them
            return lambda x: norm(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)
        if isinstance(decl, structure.PatchConv):
            return PatchConv(decl, self.cfg.matmul_dtype, name=name)
        if isinstance(decl, structure.Conv):
            return Conv(decl, self.cfg.matmul_dtype, name=name)
        if isinstance(decl, structure.GroupNorm):
            gn = hk.GroupNorm(decl.groups, axis=slice(1, None), create_scale=True, create_offset=True, eps=decl.eps,
                              data_format="channels_last", name=name)
            return lambda x: gn(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)
        if isinstance(decl, structure.BatchNorm):
            return BatchNorm(decl, name=name)
        if isinstance(decl, structure.Dropout):
            return _dropout(decl.rate, self.train)
        if isinstance(decl, structure.DropPath):
            return _drop_path(decl.rate, self.train)
        if isinstance(decl, structure.TrainKey):  # Haiku has one key sequence for every stream
            return lambda: hk.next_rng_key() if self.train else None
        if isinstance(decl, structure.Node):
            return functools.partial(Node(decl, name=name), is_training=self.train)
        raise TypeError(f"no Haiku layer for {decl!r}")


class Node(hk.Module):
    """A composite timm module (``node.kind``): its children and wiring come from ``structure``."""

    def __init__(self, node: structure.Node, name: str | None = None):
        super().__init__(name=name)
        self.node = node

    def __call__(self, *inputs: jax.Array, is_training: bool = False) -> Any:
        m = Layers(self.node.children(), self.node.cfg, is_training)
        return structure.FORWARD[self.node.kind](m, self.node.cfg, *inputs)
