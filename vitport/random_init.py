"""Random init, framework-free: one canonical tree drawn from the declarations
(``vitport.structure``), then laid out by each framework's rule (``converters.frameworks``).

So the three front-ends start from the same numbers for the same key, and init is quick. The
frameworks' own inits stay (``FrontEnd.init``; the linen and Haiku modules' ``init``), but they
are slow: Haiku's and linen's run the forward pass eagerly to create their params (one XLA
compile per op and shape), NNX's draws each param eagerly (one per shape). Here one jitted
program draws fixed-size chunks of a unit distribution for every tensor of every shape (the
chunks are joined and scaled after), and constants (biases, norm scales, LayerScale, frozen
statistics) are made on the host without XLA. ``benchmarks/benchmark.py --init`` times both.

The distributions are the front-ends': ``structure.WEIGHT_INIT`` (jax's truncated_normal(0.02),
timm's std) for every Linear and conv kernel, zero biases, norm scales at their declared
``scale_init``, and each free ``Param``'s own ``structure.initializer``. Each tensor's key is
``fold_in(key, crc32(its timm key))``: a tensor's draw does not depend on which others the
architecture has.
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from converters import canonical_to_framework
from converters.frameworks import stack_blocks
from converters.keymap import Entry, param_table

from . import structure
from .config import ModelConfig


def declarations(cfg: ModelConfig) -> dict[str, Any]:
    """Every leaf declaration of the model by its timm path (``"blocks.3.attn.qkv"``,
    ``"blocks.3.ls1.gamma"``, ``"cls_token"``); composite nodes are walked, not listed."""
    found: dict[str, Any] = {}

    def walk(node: structure.Node, prefix: str) -> None:
        for name, decl in node.children().items():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(decl, structure.Node):
                walk(decl, path)
            else:
                found[path] = decl

    walk(structure.root(cfg), "")
    return found


Rule = tuple[str, Any]


def init_rule(e: Entry, decls: dict[str, Any]) -> Rule:
    """How the canonical tensor ``e`` starts, from its module's declaration: ``("constant",
    value)``, ``("unit", (draw, std))`` (``std`` times a unit draw, ``draw`` one of
    ``UNIT_DRAWS``) or ``("param", p)`` (a ``structure.Param``'s own initializer)."""
    if e.kind == "param":
        p = decls[f"{e.module}.{e.leaf}" if e.module else e.leaf]
        if p.init == "constant":
            return ("constant", p.value)
        if p.init in _UNIT_PARAMS:
            return ("unit", _UNIT_PARAMS[p.init](p.value))
        return ("param", p)
    decl = decls[e.module]
    if e.leaf == "kernel":
        return ("unit", WEIGHT_DRAW)
    if e.leaf == "scale":
        return ("constant", getattr(decl, "scale_init", 1.0))
    if e.leaf == "var":
        return ("constant", 1.0)
    return ("constant", 0.0)  # biases and running means


# Every jax.random program costs an XLA compile (threefry) whatever its size
# (``benchmark.py --init`` reports the compiles and their seconds). So one program draws
# fixed-size chunks of a unit distribution for every tensor of every shape, and the chunks are
# joined and scaled after.
CHUNK = 1 << 18
UNIT_DRAWS = ("truncated_normal", "normal")  # truncated to [-2, 2] (jax's initializer), plain
# jax.nn.initializers.truncated_normal(std) scales a [-2, 2] truncated unit normal by std / its own
# standard deviation (so the result's is std): structure.WEIGHT_INIT, std 0.02.
_TRUNCATED_STD = 0.87962566103423978
WEIGHT_DRAW = ("truncated_normal", 0.02 / _TRUNCATED_STD)
_UNIT_PARAMS = {"trunc_normal": lambda value: WEIGHT_DRAW, "small_normal": lambda value: ("normal", 1e-6),
                "normal": lambda value: ("normal", value)}


@jax.jit
def _unit_chunk(key: jax.Array, salt: Any, index: Any, which: Any) -> jax.Array:
    k = jax.random.fold_in(jax.random.fold_in(key, salt), index)
    return jax.lax.switch(which, [lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (CHUNK,)),
                                  lambda k: jax.random.normal(k, (CHUNK,))], k)


def _unit_draw(key: jax.Array, salt: np.uint32, draw: str, shape: tuple[int, ...]) -> Any:
    """``shape`` values of the unit ``draw``, float32: numpy when ``key`` is concrete, a traced
    array under a trace (``jax.eval_shape``, a user's jit); the same numbers either way."""
    n = math.prod(shape)
    which = np.int32(UNIT_DRAWS.index(draw))
    chunks = [_unit_chunk(key, salt, np.uint32(i), which) for i in range(-(-n // CHUNK))]
    if isinstance(key, jax.core.Tracer):
        return jnp.concatenate(chunks)[:n].reshape(shape) if n else jnp.zeros(shape, jnp.float32)
    return np.concatenate([np.asarray(c) for c in chunks])[:n].reshape(shape) if n else np.zeros(shape, np.float32)


def _scaled(a: Any, std: float, dtype: np.dtype) -> jax.Array:
    if isinstance(a, jax.Array):  # traced
        return (a * np.float32(std)).astype(dtype)
    a *= np.float32(std)  # a fresh host array: scaled in place, cast (when needed) once, copied to the device once
    return jax.device_put(a.astype(dtype, copy=False))


@functools.lru_cache(maxsize=None)
def _param_sampler(p: structure.Param, dtype: str) -> Callable[[jax.Array, Any], jax.Array]:
    """A jit for a free parameter with an initializer of its own (RoPE's mixed frequencies)."""
    init = structure.initializer(p)
    return jax.jit(lambda key, salt: init(jax.random.fold_in(key, salt), p.shape, jnp.dtype(dtype)))


def canonical_init(cfg: ModelConfig, key: jax.Array) -> dict:
    """A random canonical tree for ``cfg``'s architecture (``converters`` layout: jax-layout
    arrays keyed by ``(module, leaf)``), in ``cfg.param_dtype``."""
    dtype = jnp.dtype(cfg.param_dtype)
    decls = declarations(cfg)
    tree = {}
    for e in param_table(cfg.spec):
        kind, what = init_rule(e, decls)
        salt = np.uint32(zlib.crc32(e.timm_key.encode()))
        if kind == "unit":
            draw, std = what
            tree[e.key] = _scaled(_unit_draw(key, salt, draw, e.jax_shape), std, dtype)
        elif kind == "param":
            tree[e.key] = _param_sampler(what, dtype.name)(key, salt)
        else:
            tree[e.key] = jax.device_put(np.full(e.jax_shape, what, dtype))
    return tree


def init_params(cfg: ModelConfig, framework: str, key: jax.Array) -> Any:
    """``canonical_init`` in ``framework``'s param tree; the scanned block lists stacked when
    ``cfg.scan_blocks`` is on, as that framework's own init would give them."""
    params = canonical_to_framework(canonical_init(cfg, key), cfg.spec, framework)
    if cfg.scan_blocks:
        params = stack_blocks(params, cfg.spec, framework, structure.scanned_lists(cfg), stack=jnp.stack)
    return params
