"""High-level API: a converted model bundled with its spec, framework and preprocessing."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from converters import (FRAMEWORKS, Spec, canonical_to_framework, canonical_to_timm, framework_to_canonical,
                        stack_blocks, timm_to_canonical, unstack_blocks)
from converters.errors import InvalidArgumentError
from converters.frameworks import layout, pure_tree as _pure
from converters.lazy import LazyTensor, aligned_copy, materialize

from . import features, xla_options
from .config import ModelConfig
from .frontends import FrontEnd, front_end
from .structure import scanned_lists

Framework = str  # one of converters.FRAMEWORKS


def params_dtype(params: Any) -> jnp.dtype:
    """The weights' dtype: that of the largest floating tensor (``JaxModel.astype``'s bf16 mode
    keeps the small additive embeddings in float32)."""
    leaves = jax.tree.leaves(params)
    floating = [a for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)]
    return jnp.dtype(max(floating or leaves, key=lambda a: a.size).dtype)


def input_dtype(config: ModelConfig, params: Any) -> jnp.dtype:
    """The dtype images (and features) are cast to when called: the params' dtype, or at least
    float32 when the matmuls run in 16 bits (``ModelConfig.matmul_dtype``), so that the
    activations between them, norms and softmax stay float32, as under ``torch.autocast``."""
    if config.matmul_dtype is not None:
        return jnp.promote_types(params_dtype(params), jnp.float32)
    return params_dtype(params)


def matmul_dtype_for(dtype: Any) -> str | None:
    """The ``matmul_dtype`` that goes with weights cast to ``dtype`` (``JaxModel.astype``'s
    default): a 16-bit dtype itself, None for float32 and float64."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.itemsize == 2 else None


def check_framework(framework: str) -> str:
    layout(framework)  # raises InvalidArgumentError naming the choices
    return framework


# Params added to the activations as they are (timm's names; every front-end's leaf names):
# astype's bf16 mode keeps them float32, as the activations they join.
ADDITIVE_EMBEDDINGS = frozenset({"pos_embed", "cls_token", "dist_token", "reg_token"})
PLACE_THREADS = 4  # tensors read and placed at once (each holds its read buffer until placed)


def to_jax_array(a: Any, owned: bool = False) -> jax.Array:
    """``a`` on the default device. On CPU, XLA takes a contiguous host array of suitable
    alignment (``converters.lazy.DEVICE_ALIGNMENT``) as the device buffer itself: an ``owned``
    one (read for this model and held nowhere else, ``converters.lazy``) goes over without a
    copy; any other contiguous one (a torch tensor's memory, a caller's array) is copied first,
    so that later writes to it never reach the params. Strided arrays (transposed kernels) are
    always copied by ``device_put``."""
    a = np.asarray(a)
    if a.dtype == np.float64 and not jax.config.jax_enable_x64:
        raise InvalidArgumentError("the weights are float64 but jax_enable_x64 is off: call "
                                   "jax.config.update('jax_enable_x64', True) first (for the vitport command: "
                                   "JAX_ENABLE_X64=1 vitport ...), or load them as float32 (dtype='float32', "
                                   "--dtype float32)")
    if not owned and a.flags.c_contiguous and jax.default_backend() == "cpu":
        a = aligned_copy(a)
    return jax.device_put(a)  # jnp.asarray would dispatch a primitive per tensor


def place_all(tree: dict, consume: bool = False) -> dict:
    """``{key: to_jax_array(value)}`` for a tree of host arrays or ``converters.lazy.LazyTensor``
    values (read here, each a fresh buffer the device may take as it is), a few at a time in
    threads. A third of a conversion's time was the kernel's page faults on the first write to
    the converted weights' fresh memory (one per 4 KiB), and faults on two cores overlap
    (``benchmarks/README.md``, 2026-12-03 session 7).
    ``consume``: empty ``tree`` as its tensors are taken, so the host copies are not all held."""
    from concurrent.futures import ThreadPoolExecutor

    def place(value):
        return to_jax_array(materialize(value), owned=isinstance(value, LazyTensor))

    keys = list(tree)
    workers = max(1, min(PLACE_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="vitport-place") as pool:
        futures = [pool.submit(place, tree.pop(k) if consume else tree[k]) for k in keys]
        try:
            return {k: f.result() for k, f in zip(keys, futures)}
        except BaseException:
            for f in futures:  # an error (a non-finite tensor, a truncated file) stops the reads
                f.cancel()
            raise


@dataclass
class JaxModel:
    """A timm architecture in one JAX framework, with its params and preprocessing.

    ``jm(images_nhwc)`` runs the jitted model in evaluation mode and returns logits.
    ``params`` is the framework's own tree (see ``vitport.frontends``); ``apply_fn`` the
    matching pure function; ``module`` the framework's own model object.
    """

    spec: Spec
    framework: Framework
    params: Any
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None
    config: ModelConfig | None = None  # dropout rates and dtypes; default: the spec, no dropout

    def __post_init__(self):
        check_framework(self.framework)
        if self.config is None:
            self.config = ModelConfig(self.spec)
        elif self.config.spec != self.spec:
            raise InvalidArgumentError("config.spec differs from spec")
        self.params = self.in_layout(_pure(self.params))

    @property
    def front_end(self) -> FrontEnd:
        return front_end(self.framework)

    @functools.cached_property
    def apply_fn(self):
        """``apply_fn(params, x, *, train=False, rng=None, return_intermediates=False)``, jitted.

        ``train=True`` runs dropout and stochastic depth from ``rng``; with every rate at zero
        it is the same function as evaluation.
        """
        return xla_options.jit(self.front_end.apply(self.config), self.compiler_options,
                               static_argnames=("train", "return_intermediates", "stage"))

    @functools.cached_property
    def compiler_options(self) -> dict:
        """The XLA options this model's jits compile with (``vitport.xla_options``): on the CPU,
        Eigen's dots for float32 and for bfloat16 where the CPU lacks bf16 dot instructions,
        XLA's default dots otherwise, and the block barriers kept through fusion; ``{}`` off the CPU."""
        return xla_options.for_model(self)

    def set_distilled_training(self, enable: bool = True) -> "JaxModel":
        """timm's ``set_distilled_training``: a distilled DeiT in training returns
        ``(logits, logits_dist)`` when enabled, their average otherwise (evaluation always
        averages). Changes this model in place and returns it."""
        if not getattr(self.spec, "distilled", False):
            raise InvalidArgumentError("set_distilled_training is for distilled models (two heads); "
                                       f"this {self.spec.family} model has one")
        return self._set_config(distilled_training=enable)

    def set_scan_blocks(self, enable: bool = True) -> "JaxModel":
        """Run the blocks as one ``lax.scan`` (``ModelConfig.scan_blocks``), their
        weights stored stacked on a leading axis (``params["params"]["blocks"]`` in linen; see
        ``converters.frameworks.stack_blocks``): the blocks are traced and compiled once, so the
        first call hardly grows with depth, and steady calls run as fast as block by block.
        Training scans too: each step runs at its block's stochastic-depth rate with its own rng
        key (``vitport.training.Trainer`` scales ``layer_decay`` slice by slice).
        ``canonical()``, ``to_timm_state_dict()``, ``save`` and ``to()`` give timm's per-block
        layout as always. Changes this model in place and returns it."""
        self._set_config(scan_blocks=bool(enable))
        self.params = self.in_layout(self.params)
        return self

    def in_layout(self, tree: Any) -> Any:
        """A tree shaped like ``params`` in either layout, in this model's: the scanned block
        lists stacked when ``config.scan_blocks`` is on, one subtree per block otherwise."""
        if not isinstance(tree, Mapping):  # no params (a template for a Trainer)
            return tree
        if not self.config.scan_blocks:
            return unstack_blocks(tree, self.spec, self.framework)
        # Lists already stacked are kept as they are (and where they are: a sharded model's); a
        # list this config no longer scans is split again.
        lists = scanned_lists(self.config)
        tree = unstack_blocks(tree, self.spec, self.framework, keep=lists)
        return stack_blocks(tree, self.spec, self.framework, lists, stack=jnp.stack)

    def _set_config(self, **settings: Any) -> "JaxModel":
        self.config = dataclasses.replace(self.config, **settings)
        for built_for_old_config in ("apply_fn", "front_end_apply", "compiler_options"):
            self.__dict__.pop(built_for_old_config, None)
        return self

    @property
    def module(self) -> Any:
        """The framework's own model: Haiku's transformed pair, the linen module, or the NNX
        module holding these weights."""
        return self.front_end.module(self.config, self.params)

    def with_params(self, tree: Any) -> "JaxModel":
        """The same model with another tree shaped like ``params`` (new weights, gradients,
        optimizer moments): ``jm.with_params(grads).to_timm_state_dict()`` names them with
        timm's keys."""
        tree = self.in_layout(_pure(tree))
        if jax.tree.structure(tree) != jax.tree.structure(self.params):
            framework_to_canonical(tree, self.spec, self.framework)  # names what differs
            raise InvalidArgumentError("the tree is not shaped like this model's params")
        return dataclasses.replace(self, params=tree)

    @property
    def dtype(self):
        return params_dtype(self.params)

    @property
    def input_dtype(self):
        return input_dtype(self.config, self.params)

    def astype(self, dtype: Any, *, matmul_dtype: Any = "same") -> "JaxModel":
        """The same model with its floating params cast to ``dtype``.

        ``jm.astype(jnp.bfloat16)``: bf16 weights and bf16 matmuls, every matmul, attention
        product and the patch convolution accumulating in float32 (the fast form of XLA's CPU
        dot); the activations between them, norms and softmax stay float32, as under
        ``torch.autocast`` (a bf16 residual stream alone moved ViT-B's logits by 1.2-1.4 % of the
        largest, ``benchmarks/README.md``).
        ``jm.astype(jnp.float32, matmul_dtype=jnp.bfloat16)``: the mixed mode, float32 weights,
        bf16 matmuls (``ModelConfig.matmul_dtype``). ``matmul_dtype=None`` with a 16-bit
        ``dtype``: everything in that dtype, the residual stream included. The default
        ``'same'``: ``dtype`` itself for 16-bit dtypes, None otherwise.

        With float32 activations (a ``matmul_dtype`` set), the additive embeddings
        (``ADDITIVE_EMBEDDINGS``: position embedding, class, distillation and register tokens)
        stay float32: they are added to float32 activations, so rounding them buys no speed, and
        it moved a tiny CLIP twin's logits (``norm_pre`` right after the position embedding)
        from 0.66 % to 1.00 % of the largest (``tests/test_speed_modes.py``)."""
        dtype = jnp.dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise InvalidArgumentError(f"astype takes a floating dtype; got {dtype}")
        if isinstance(matmul_dtype, str) and matmul_dtype == "same":
            matmul_dtype = matmul_dtype_for(dtype)
        md = None if matmul_dtype is None else jnp.dtype(matmul_dtype).name
        keep_float32 = md is not None and dtype.itemsize < 4

        def cast(path, a):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                return a
            if keep_float32 and getattr(path[-1], "key", None) in ADDITIVE_EMBEDDINGS:
                return a.astype(jnp.float32)
            return a.astype(dtype)

        params = jax.tree_util.tree_map_with_path(cast, self.params)
        config = dataclasses.replace(self.config, param_dtype=dtype.name, matmul_dtype=md)
        return dataclasses.replace(self, params=params, config=config)

    @functools.cached_property
    def front_end_apply(self):
        """The un-jitted ``apply`` (stable per model, so callers can cache jitted wrappers)."""
        return self.front_end.apply(self.config)

    def __call__(self, images: Any, return_intermediates: bool = False) -> Any:
        return self.apply_fn(self.params, self.as_input(images), return_intermediates=return_intermediates)

    def as_input(self, images: Any) -> jax.Array:
        """Check NHWC float images and cast them to ``input_dtype``."""
        arr = images if isinstance(images, jax.Array) else np.asarray(images)
        if arr.dtype.kind not in "fc" and arr.dtype.name != "bfloat16":
            raise InvalidArgumentError(
                f"images are {arr.dtype} pixels; the model takes normalised float NHWC arrays. Use "
                "jm.preprocess(...) (timm's evaluation transform) or scale and normalise them yourself")
        if arr.ndim != 4 or arr.shape[-1] != self.spec.channels:
            raise InvalidArgumentError(f"expected NHWC images with {self.spec.channels} channels, "
                                       f"got shape {tuple(arr.shape)}")
        return jnp.asarray(arr, dtype=self.input_dtype)

    # timm's feature API (vitport.features)
    def forward_features(self, images: Any) -> jax.Array:
        """timm ``forward_features``: tokens after the final norm, (B, tokens, D)."""
        return features.forward_features(self, images)

    def forward_head(self, features_: Any, pre_logits: bool = False) -> Any:
        """timm ``forward_head`` on ``forward_features`` output."""
        return features.forward_head(self, features_, pre_logits)

    def forward_intermediates(self, images: Any, indices: Any = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False) -> Any:
        """timm ``forward_intermediates`` (inputs NHWC); see ``vitport.features``."""
        return features.forward_intermediates(self, images, indices, norm, output_fmt, intermediates_only,
                                              return_prefix_tokens)

    def attention_maps(self, images: Any) -> dict[str, jax.Array]:
        """``{timm block name: (B, heads, queries, keys)}`` attention weights."""
        return features.attention_maps(self, images)

    def shard(self, mesh: Any = None, *, strategy: str = "dp") -> "JaxModel":
        """This model with its params placed on a ``jax.sharding.Mesh`` (default: every device
        on a ``data`` axis) by ``strategy`` ``dp`` / ``fsdp`` / ``tp``; calls split the batch over
        ``data``. See ``vitport.sharding``."""
        from .sharding import shard

        return shard(self, mesh, strategy=strategy)

    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))

    def canonical(self) -> dict:
        return framework_to_canonical(self.params, self.spec, self.framework)

    def to_timm_state_dict(self) -> dict[str, np.ndarray]:
        """timm-layout numpy arrays; ``timm_model.load_state_dict`` accepts them (via torch.from_numpy)."""
        return canonical_to_timm({k: np.asarray(v) for k, v in self.canonical().items()}, self.spec)

    def to(self, framework: Framework) -> "JaxModel":
        """The same weights in another framework."""
        params = canonical_to_framework(self.canonical(), self.spec, check_framework(framework))
        return dataclasses.replace(self, framework=framework, params=params)

    # Images in, answers out (vitport/images.py): timm's eval transform, top-k, pre-logits.
    def preprocess(self, images: Any) -> np.ndarray:
        """A path, PIL image or list of them -> float32 NHWC batch, as timm's eval transform."""
        from .images import eval_transform
        from .preprocess import preprocess

        return preprocess(images, eval_transform(self))

    def predict(self, images: Any, top_k: int = 5, batch_size: int = 32) -> list:
        """Per image, ``[(class_index, label, probability), ...]`` for the ``top_k`` classes."""
        from .images import predict

        return predict(self, images, top_k=top_k, batch_size=batch_size)

    def embed(self, images: Any, batch_size: int = 32) -> np.ndarray:
        """Pre-logit features (timm's ``forward_head(x, pre_logits=True)``), one row per image."""
        from .images import embed

        return embed(self, images, batch_size=batch_size)


def from_state_dict(state_dict: Mapping[str, Any], spec: Spec, framework: Framework = "flax", *,
                    source: str = "checkpoint", **meta: Any) -> JaxModel:
    """Convert a timm state_dict of numpy arrays into a JaxModel (no torch needed)."""
    check_framework(framework)
    canonical = timm_to_canonical(state_dict, spec, source=source)
    params = canonical_to_framework(place_all(canonical), spec, framework)
    return JaxModel(spec, framework, params, **meta)


def init_params(spec_or_config: Spec | ModelConfig, framework: Framework, rng: int | jax.Array = 0) -> Any:
    """Random (timm-style) init of a model's params in one framework: the same numbers in every
    framework for the same ``rng`` (``vitport.random_init``), stacked where ``scan_blocks`` is on."""
    from .random_init import init_params as canonical_init_params

    cfg = spec_or_config if isinstance(spec_or_config, ModelConfig) else ModelConfig(spec_or_config)
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    return canonical_init_params(cfg, check_framework(framework), key)


__all__ = ["FRAMEWORKS", "JaxModel", "from_state_dict", "init_params"]
