"""Flax NNX primitives and the generic composite module (see ``vitport.structure``).

Attributes are named after timm's modules; lists are ``nnx.List`` so paths read
``blocks/3/attn/qkv/kernel``, the layout rule ``converters.frameworks.LAYOUTS["nnx"]``.
Dropout and stochastic depth are off until ``model.train()`` and draw from the ``dropout``
rng stream (the one given at construction, or ``rngs=`` at call time).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import ops, structure
from ..config import ModelConfig


_ABSTRACT_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("vitport_nnx_abstract", default=False)


@contextlib.contextmanager
def abstract_weights() -> Iterator[None]:
    """Within: Linear and conv kernels and free params are built as ``jax.ShapeDtypeStruct``s, not
    drawn: a model's graph without its weights (``vitport.frontends``). Cheaper than
    ``nnx.eval_shape``, whose cost grows with the square of the param count here: each new
    ``nnx.Param`` asks its traced value for ``.sharding``, and jax answers with an error message
    that walks the whole trace (5.6 s for a 36-block CaiT-S24, against 1.4 s this way)."""
    token = _ABSTRACT_WEIGHTS.set(True)
    try:
        yield
    finally:
        _ABSTRACT_WEIGHTS.reset(token)


def _weight_init(init: Callable) -> Callable:
    def init_or_shape(key, shape, dtype=jnp.float32):
        if _ABSTRACT_WEIGHTS.get():
            return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
        return init(key, shape, dtype)

    return init_or_shape


WEIGHT_INIT = _weight_init(structure.WEIGHT_INIT)


class _GraphStream(nnx.RngStream):
    """The one rng stream of a graph built under ``abstract_weights``, where weights are shapes and
    no key is drawn: ``params()`` hands out the seed as it is, and each ``fork()`` (a Dropout's or
    DropPath's own stream, kept in the graph) gets a distinct key made from numpy. So building runs
    no XLA computation; jax.random's eager seed, fold_in and counter add compiled five programs
    (about 0.3 s) on a process's first NNX graph. The keys are threefry keys whatever jax's
    default PRNG (``jax.random.key(n)`` where that default is threefry)."""

    def __init__(self, *, tag: str = "default"):
        super().__init__(self._key(0), tag=tag)
        self._forks = itertools.count(1)

    @staticmethod
    def _key(n: int) -> jax.Array:
        return jax.random.wrap_key_data(np.array([0, n], np.uint32), impl="threefry2x32")

    def __call__(self) -> jax.Array:
        return self.key[...]

    def fork(self, *, split: Any = None) -> nnx.RngStream:
        if split is not None:
            raise NotImplementedError("a graph-only rng stream does not split")
        return nnx.RngStream(self._key(next(self._forks)), tag=self.tag)


def graph_rngs() -> nnx.Rngs:
    """Rngs for building a model's graph under ``abstract_weights`` (see ``_GraphStream``)."""
    rngs = nnx.Rngs()
    rngs.default = _GraphStream()
    return rngs


# Set while block 0 of a stacked list is built: it stands for every block, so its DropPaths keep
# an rng stream even at block 0's rate of 0 (a scan draws the steps' keys from it).
_STACKED_BLOCK: contextvars.ContextVar[bool] = contextvars.ContextVar("vitport_nnx_stacked_block", default=False)


def _stream(rngs: nnx.Rngs | None, rate: float):
    """Layers that never drop keep no rng state (converted models carry none)."""
    return rngs if rate > 0.0 else None


class DropPath(nnx.Module):
    """Stochastic depth (timm ``DropPath``): per sample, rescaled, only when not deterministic."""

    def __init__(self, rate: float, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        self.rate, self.deterministic = rate, deterministic
        self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)

    def __call__(self, x: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        rate = structure.drop_path_rate(self.rate)  # a scanned block's own (a scan input)
        if self.deterministic or rate is None:
            return x
        stream = rngs["dropout"] if rngs is not None else self.rngs
        if stream is None:
            raise ValueError("DropPath in training mode needs rngs: build the model with rngs=nnx.Rngs(...) "
                             "or pass rngs= when calling it")
        return ops.drop_path(x, rate, stream())


class TrainKey(nnx.Module):
    """``structure.TrainKey``: a key from rng stream ``stream`` after ``model.train()``, None before."""

    def __init__(self, stream: str, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        self.stream, self.deterministic = stream, deterministic
        self.rngs = rngs[stream].fork() if rngs is not None else nnx.data(None)

    def __call__(self, *, rngs: nnx.Rngs | None = None) -> jax.Array | None:
        if self.deterministic:
            return None
        stream = rngs[self.stream] if rngs is not None else self.rngs
        if stream is None:
            raise ValueError(f"training mode needs rngs for the {self.stream!r} stream: build the model with "
                             "rngs=nnx.Rngs(...) or pass rngs= when calling it")
        return stream()


class BatchNorm(nnx.Module):
    """torch ``BatchNorm2d`` in evaluation mode (``structure.BatchNorm``): ``nnx.Param``s ``scale``,
    ``bias`` and the frozen running statistics ``mean``, ``var`` (Params so that ``JaxModel.params``
    carries the checkpoint; ``ops.batch_norm_frozen`` stops their gradient and ``vitport.training``
    masks them)."""

    def __init__(self, decl: structure.BatchNorm, param_dtype: Any):
        n, self.eps = (decl.features,), decl.eps
        self.mean, self.var = nnx.Param(jnp.zeros(n, param_dtype)), nnx.Param(jnp.ones(n, param_dtype))
        self.scale, self.bias = nnx.Param(jnp.ones(n, param_dtype)), nnx.Param(jnp.zeros(n, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.batch_norm_frozen(x, self.mean[...], self.var[...], self.scale[...], self.bias[...], self.eps)


class _Gap(nnx.Module):
    """A stateless placeholder at a timm Sequential index without parameters (a ReLU or pool),
    so ``nnx.List`` indices are timm's (``conv1.3``, ``downsample.1``)."""


ZEROS, ONES = _weight_init(jax.nn.initializers.zeros), _weight_init(jax.nn.initializers.ones)


def _build(decl: Any, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    kw = dict(dtype=cfg.dtype, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
    if isinstance(decl, structure.Linear):
        return nnx.Linear(decl.in_features, decl.out_features, use_bias=decl.bias, kernel_init=WEIGHT_INIT,
                          bias_init=ZEROS, dot_general=ops.dot_general(cfg.matmul_dtype), **kw)
    if isinstance(decl, structure.Norm):
        scale_init = ONES if decl.scale_init == 1.0 else _weight_init(jax.nn.initializers.constant(decl.scale_init))
        if decl.kind == "RmsNorm":  # timm RmsNorm: x * rsqrt(mean(x**2) + eps) * weight, no bias
            return nnx.RMSNorm(decl.features, epsilon=decl.eps, scale_init=scale_init, **kw)
        # Two-pass variance like torch; the fast variance loses digits in float32.
        return nnx.LayerNorm(decl.features, epsilon=decl.eps, use_fast_variance=False, scale_init=scale_init,
                             bias_init=ZEROS, **kw)
    if isinstance(decl, structure.PatchConv):
        p = decl.patch_size
        return nnx.Conv(decl.in_channels, decl.out_channels, (p, p), strides=(p, p), padding="VALID",
                        use_bias=decl.bias, kernel_init=WEIGHT_INIT, bias_init=ZEROS,
                        conv_general_dilated=ops.conv_general_dilated(cfg.matmul_dtype), **kw)
    if isinstance(decl, structure.Conv):
        k = decl.kernel_size
        conv = (ops.conv_general_dilated(cfg.matmul_dtype) if decl.std_eps is None
                else ops.std_conv_general_dilated(cfg.matmul_dtype, decl.std_eps))
        return nnx.Conv(decl.in_channels, decl.out_channels, (k, k), strides=(decl.stride, decl.stride),
                        padding=ops.conv_padding(decl.padding), feature_group_count=decl.groups, use_bias=decl.bias,
                        kernel_init=WEIGHT_INIT, bias_init=ZEROS, conv_general_dilated=conv, **kw)
    if isinstance(decl, structure.GroupNorm):
        return nnx.GroupNorm(decl.features, num_groups=decl.groups, epsilon=decl.eps, use_fast_variance=False, **kw)
    if isinstance(decl, structure.BatchNorm):
        return BatchNorm(decl, jnp.dtype(cfg.param_dtype))
    if isinstance(decl, structure.Dropout):
        return nnx.Dropout(decl.rate, deterministic=True, rngs=_stream(rngs, decl.rate))
    if isinstance(decl, structure.DropPath):
        return DropPath(decl.rate, rngs=rngs if _STACKED_BLOCK.get() else _stream(rngs, decl.rate))
    if isinstance(decl, structure.TrainKey):
        return TrainKey(decl.stream, rngs=rngs)
    if isinstance(decl, structure.Node):
        return Node(decl, rngs=rngs)
    raise TypeError(f"no NNX layer for {decl!r}")


class Layers:
    """``structure.Layers`` over an NNX module's attributes; ``rngs`` given at call time go to
    every layer that draws randomness."""

    def __init__(self, module: "Node", rngs: nnx.Rngs | None):
        self.module, self.rngs = module, rngs

    def __call__(self, name: str) -> Callable:
        attr, _, index = name.partition(".")
        layer = getattr(self.module, attr)
        if index:
            layer = layer[int(index)]
        if isinstance(layer, (nnx.Dropout, DropPath, TrainKey, Node)):
            return functools.partial(layer, rngs=self.rngs)
        return layer

    def has(self, name: str) -> bool:
        return hasattr(self.module, name.partition(".")[0])

    def linear(self, name: str, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        layer = self(name)
        return layer.kernel[...], (layer.bias[...] if layer.bias is not None else None)

    def scan(self, prefix: str, count: int, x: jax.Array, *extra: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        blocks = getattr(self.module, prefix, None)
        if blocks is None:
            return None
        train = any(getattr(layer, "deterministic", True) is False for _, layer in nnx.iter_modules(blocks))
        node = self.module.node
        block = structure.scannable(node.children(), node.cfg, prefix, count)
        if isinstance(blocks, nnx.List):
            if block is None or train:
                return None
            # Block 0's graph and non-parameter state, each step's slice of the weights stacked here.
            graph, _, rest = nnx.split(blocks[0], nnx.Param, ...)
            stacked, x = structure.stack_blocks([nnx.state(b, nnx.Param) for b in blocks], x, node.cfg)
        else:  # one module holding every block's weights stacked (JaxModel.set_scan_blocks)
            if block is None:
                raise structure.stacked_unscanned(repr(prefix))
            graph, stacked, rest = nnx.split(blocks, nnx.Param, ...)
            x = structure.carry(x, stacked, node.cfg)

        def run(weights, keys, x):
            return nnx.merge(graph, weights, rest)(*extra, x, rngs=None if keys is None else nnx.Rngs(**keys))

        keys = self._step_keys(blocks) if train else None
        xs = structure.scan_inputs(node.children(), prefix, count, stacked, train, keys)
        return jax.lax.scan(structure.scan_step(prefix, run), x, xs)

    def _step_keys(self, blocks: nnx.Module) -> dict[str, jax.Array] | None:
        """One key per rng stream for a scanned training call: from the call's ``rngs``, else
        from the stacked block's own stream (advanced here, outside the scan, so that the next
        call draws new masks); None without either."""
        if self.rngs is not None:
            return {s: self.rngs[s]() for s in structure.RNG_STREAMS if s in self.rngs} or None
        own = [v for _, v in nnx.iter_graph(blocks) if isinstance(v, nnx.RngStream)]
        if not own:
            return None
        key = own[0]()
        return {s: jax.random.fold_in(key, i) for i, s in enumerate(structure.RNG_STREAMS)}

    def param(self, name: str) -> jax.Array:
        return getattr(self.module, name)[...]


def _stacked(blocks: list[nnx.Module], count: int) -> nnx.Module:
    """Block 0 holding the weights of ``count`` blocks stacked on a leading axis: the module a
    scan-mode model (``ModelConfig.scan_blocks``) keeps in place of the list, as ``nnx.scan``
    models do. Under ``abstract_weights`` only block 0 is built."""
    def stack(*values):
        if isinstance(values[0], jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((count, *values[0].shape), values[0].dtype)
        return jnp.stack(values)

    nnx.update(blocks[0], jax.tree.map(stack, *[nnx.state(b, nnx.Param) for b in blocks]))
    return blocks[0]


class Node(nnx.Module):
    """A composite timm module (``node.kind``): its children and wiring come from ``structure``."""

    def __init__(self, node: structure.Node, *, rngs: nnx.Rngs):
        self.node = node
        lists: dict[str, dict[int, Any]] = {}
        stacked = structure.scanned_lists(node.cfg) if node.cfg.scan_blocks and node == structure.root(node.cfg) else {}
        for name, decl in node.children().items():
            if isinstance(decl, structure.Param):
                init = _weight_init(structure.initializer(decl))
                setattr(self, name, nnx.Param(init(rngs.params(), decl.shape, jnp.dtype(node.cfg.param_dtype))))
                continue
            attr, _, index = name.partition(".")
            if attr in stacked and int(index) > 0 and _ABSTRACT_WEIGHTS.get():
                continue  # a graph needs one block of a stack (its shapes say how many)
            token = _STACKED_BLOCK.set(True) if attr in stacked and index == "0" else None
            try:
                layer = _build(decl, node.cfg, rngs)
            finally:
                if token is not None:
                    _STACKED_BLOCK.reset(token)
            if index:
                lists.setdefault(attr, {})[int(index)] = layer
            else:
                setattr(self, attr, layer)
        for attr, layers in lists.items():
            if attr in stacked:
                setattr(self, attr, _stacked([layers[i] for i in sorted(layers)], stacked[attr]))
            else:
                setattr(self, attr, nnx.List([layers.get(i, _Gap()) for i in range(max(layers) + 1)]))

    def __call__(self, *inputs: jax.Array, rngs: nnx.Rngs | None = None) -> Any:
        return structure.FORWARD[self.node.kind](Layers(self, rngs), self.node.cfg, *inputs)
