"""Sharded models: ``JaxModel.shard(mesh=None, *, strategy="dp")``, with JAX's own sharding.

Every param's ``PartitionSpec`` is derived once, from the key table (``converters.keymap``:
timm module name + leaf + kind), and placed into each front-end's tree by the same layout
rule that places the weights (``converters.canonical_to_framework``), so Haiku, Flax linen
and Flax NNX are sharded by one rule. Placement is ``NamedSharding`` on a
``jax.sharding.Mesh``; XLA's SPMD partitioner inserts every collective.

Strategies (the batch is always split over the mesh's ``data`` axis):

- ``dp``: weights replicated on every device.
- ``fsdp``: each weight split over ``data`` along its largest dimension that the axis size
  divides (a weight no dimension of which divides stays replicated); XLA gathers a weight
  where a layer needs it whole.
- ``tp``: on a ``("data", "model")`` mesh, Megatron style. Column-parallel (output features
  split over ``model``): ``attn.qkv``, CaiT's class-attention ``q``/``k``/``v``, MAP pooling's
  ``q``/``kv`` and ``mlp.fc1`` (kernel ``(in, out)`` as ``P(None, "model")``, bias
  ``P("model")``). Row-parallel (input features split): ``attn.proj`` and ``mlp.fc2``
  (kernel ``P("model", None)``, bias replicated). Everything else is replicated, CaiT's
  talking-heads ``proj_l``/``proj_w`` included (they mix heads).

  Heads and the fused qkv: timm's ``qkv`` output is laid out ``[q | k | v]``, each head-major
  (``3 * heads * head_dim`` columns). The params must stay timm-convertible, so the columns
  are not reordered; a ``NamedSharding`` can only cut that axis into ``m`` contiguous
  blocks. When ``m`` divides ``3 * heads`` every block is a whole number of heads (no head
  is cut), but a device holds e.g. all of q and part of k rather than the same heads of q, k
  and v; XLA's partitioner then moves activations so each device attends with whole heads
  (correct, at the cost of one activation exchange per block). ``attn.proj``'s rows,
  CaiT's ``q``/``k``/``v`` and ``fc1``/``fc2`` split exactly as Megatron's. The default
  ``model`` axis size is the largest divisor of the local device count that divides
  ``heads`` (so heads stay whole), the rest of the devices form ``data``.

A dimension that the axis size does not divide is left whole (replicated on that axis)
rather than padded: ``NamedSharding`` needs even splits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from converters import Entry, Spec, canonical_to_framework, key_table, stack_blocks
from converters.errors import InvalidArgumentError

from . import xla_options
from .api import JaxModel
from .structure import scanned_lists

STRATEGIES = ("dp", "fsdp", "tp")
DATA, MODEL = "data", "model"
COLUMN_PARALLEL = frozenset({"qkv", "q", "k", "v", "kv", "fc1"})  # output features split
ROW_PARALLEL = frozenset({"proj", "fc2"})  # input features split


# ------------------------------------------------------------------------------ meshes


def _devices() -> list:
    # process-major order, so a process's devices are neighbours on the mesh (multi-process
    # jobs: the data rows of one process sit on its own devices)
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def default_mesh(strategy: str = "dp", spec: Spec | None = None) -> Mesh:
    """Every device on ``data``; for ``tp``, ``("data", "model")`` with ``model`` the largest
    divisor of the local device count that divides ``spec.heads`` (heads stay whole)."""
    devices = _devices()
    if strategy != "tp":
        return Mesh(np.array(devices), (DATA,))
    model = math.gcd(jax.local_device_count(), spec.heads if spec is not None else jax.local_device_count())
    return Mesh(np.array(devices).reshape(len(devices) // model, model), (DATA, MODEL))


def _check(mesh: Mesh, strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if not isinstance(mesh, Mesh):
        raise InvalidArgumentError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if DATA not in mesh.axis_names:
        raise InvalidArgumentError(f"the mesh needs a {DATA!r} axis (the batch is split over it); its axes are "
                                   f"{mesh.axis_names}. Build it as Mesh(devices, ('data',)) or "
                                   "Mesh(devices.reshape(d, m), ('data', 'model'))")
    if strategy == "tp" and MODEL not in mesh.axis_names:
        raise InvalidArgumentError(f"strategy 'tp' needs a mesh with a {MODEL!r} axis, e.g. "
                                   "Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model')); "
                                   f"this one has {mesh.axis_names}. Leave mesh=None for the default")


# ----------------------------------------------------------------------- the one rule


def partition_spec(e: Entry, strategy: str, axis_sizes: dict[str, int]) -> P:
    """The ``PartitionSpec`` of one canonical tensor (JAX layout: Linear kernels ``(in, out)``)."""
    shape = e.jax_shape
    if strategy == "dp":
        return P()
    if strategy == "fsdp":
        n = axis_sizes[DATA]
        dims = [i for i in np.argsort([-s for s in shape], kind="stable") if shape[i] % n == 0 and shape[i] >= n]
        if n == 1 or not dims:
            return P()
        return P(*[DATA if i == dims[0] else None for i in range(len(shape))])
    # tp
    m = axis_sizes[MODEL]
    name = e.module.rpartition(".")[2]
    if e.kind != "linear" or m == 1:
        return P()
    if name in COLUMN_PARALLEL:
        if shape[-1] % m:
            return P()
        return P(None, MODEL) if e.leaf == "kernel" else P(MODEL)
    if name in ROW_PARALLEL and e.leaf == "kernel" and shape[0] % m == 0:
        return P(MODEL, None)
    return P()


def param_shardings(spec: Spec, framework: str, mesh: Mesh, strategy: str = "dp") -> Any:
    """A tree shaped like a ``framework`` model's params, of ``NamedSharding``s."""
    _check(mesh, strategy)
    sizes = dict(mesh.shape)
    return canonical_to_framework({e.key: NamedSharding(mesh, partition_spec(e, strategy, sizes))
                                   for e in key_table(spec)}, spec, framework)


def model_shardings(jm: JaxModel, mesh: Mesh, strategy: str) -> Any:
    """``param_shardings`` in ``jm``'s layout: a stacked block list (``set_scan_blocks``) takes
    each tensor's sharding with its leading block axis unsplit."""
    shardings = param_shardings(jm.spec, jm.framework, mesh, strategy)
    if not jm.config.scan_blocks:
        return shardings
    return stack_blocks(shardings, jm.spec, jm.framework, scanned_lists(jm.config),
                        stack=lambda per_block: NamedSharding(mesh, P(None, *per_block[0].spec)))


def place(tree: Any, shardings: Any) -> Any:
    """Put every array of ``tree`` on its sharding. ``make_array_from_callback`` hands each
    device only its slice, and works in multi-process jobs too (every process holds the same
    host values; each fills its own devices)."""
    def put(a, s: NamedSharding):
        if isinstance(a, jax.Array) and a.sharding == s:
            return a
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


# ------------------------------------------------------------------------------- model


def _batch_split(apply, mesh: Mesh):
    """``apply`` with the batch padded to a multiple of the ``data`` axis, split over it, and
    the padding trimmed from every output again."""
    n = mesh.shape[DATA]
    batch = NamedSharding(mesh, P(DATA))

    def sharded_apply(params, x, *, train=False, rng=None, return_intermediates=False, stage="all"):
        b = x.shape[0]
        pad = (-b) % n
        if pad:
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        x = jax.lax.with_sharding_constraint(x, batch)
        out = apply(params, x, train=train, rng=rng, return_intermediates=return_intermediates, stage=stage)
        if not pad:
            return out
        return jax.tree.map(lambda a: a[:b] if a.ndim and a.shape[0] == b + pad else a, out)

    return sharded_apply


@dataclass
class ShardedModel(JaxModel):
    """A ``JaxModel`` whose params are placed on ``mesh`` by ``strategy``; calls split the
    batch over the mesh's ``data`` axis (``apply_fn`` too, and the feature API)."""

    mesh: Mesh | None = None
    strategy: str = "dp"

    @functools.cached_property
    def front_end_apply(self):
        return _batch_split(self.front_end.apply(self.config), self.mesh)

    @functools.cached_property
    def apply_fn(self):
        return xla_options.jit(self.front_end_apply, self.compiler_options,
                               static_argnames=("train", "return_intermediates", "stage"))

    @property
    def data_size(self) -> int:
        return self.mesh.shape[DATA]

    def with_params(self, tree: Any) -> "ShardedModel":
        out = super().with_params(tree)
        return dataclasses.replace(out, params=place(out.params, model_shardings(out, self.mesh, self.strategy)))

    def set_scan_blocks(self, enable: bool = True) -> "ShardedModel":
        """``JaxModel.set_scan_blocks``, the stacked (or unstacked) weights placed again by the
        strategy: stacking sharded arrays would leave them wherever ``jnp.stack`` puts them."""
        super().set_scan_blocks(enable)
        self.params = place(self.params, model_shardings(self, self.mesh, self.strategy))
        return self

    def to(self, framework: str) -> "ShardedModel":
        out = super().to(framework)
        return dataclasses.replace(out, params=place(out.params, model_shardings(out, self.mesh, self.strategy)))

    def unshard(self) -> JaxModel:
        """The same model on one device (numpy weights gathered from every shard)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(JaxModel)}
        fields["params"] = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), self.params)
        return JaxModel(**fields)


def shard(jm: JaxModel, mesh: Mesh | None = None, *, strategy: str = "dp") -> ShardedModel:
    """``jm`` with its params placed on ``mesh`` by ``strategy`` (module docstring)."""
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    mesh = default_mesh(strategy, jm.spec) if mesh is None else mesh
    _check(mesh, strategy)
    fields = {f.name: getattr(jm, f.name) for f in dataclasses.fields(JaxModel)}
    fields["params"] = place(jm.params, model_shardings(jm, mesh, strategy))
    return ShardedModel(**fields, mesh=mesh, strategy=strategy)


def memory_per_device(jm: JaxModel) -> dict[Any, int]:
    """Bytes of params each addressable device holds."""
    out: dict[Any, int] = {}
    for a in jax.tree.leaves(jm.params):
        for s in a.addressable_shards:
            out[s.device] = out.get(s.device, 0) + s.data.nbytes
    return out
