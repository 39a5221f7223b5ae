"""High-level API: a converted model bundled with its spec, framework and preprocessing."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np


from converters.errors import InvalidArgumentError
from converters import (FRAMEWORKS, CaiTSpec, Spec, canonical_to_framework, canonical_to_timm,
                        framework_to_canonical, timm_to_canonical)

from . import flax as vflax
from . import haiku as vhaiku

Framework = Literal["haiku", "flax"]


def check_framework(framework: str) -> Framework:
    if framework not in FRAMEWORKS:
        raise InvalidArgumentError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    return framework  # type: ignore[return-value]


def model_kwargs(spec: Spec) -> dict[str, Any]:
    """A spec's fields are the JAX models' constructor arguments."""
    return dataclasses.asdict(spec)


def flax_module(spec: Spec, **extra: Any):
    cls = vflax.CaiT if isinstance(spec, CaiTSpec) else vflax.ViT
    return cls(**model_kwargs(spec), **extra)


def haiku_transform(spec: Spec, **extra: Any) -> hk.Transformed:
    cls = vhaiku.CaiT if isinstance(spec, CaiTSpec) else vhaiku.ViT

    def forward(x, is_training: bool = False, return_intermediates: bool = False):
        return cls(**model_kwargs(spec), **extra)(x, is_training=is_training,
                                                   return_intermediates=return_intermediates)

    return hk.transform(forward)


def to_jax_array(a: Any) -> jax.Array:
    a = np.asarray(a)
    if a.dtype == np.float64 and not jax.config.jax_enable_x64:
        raise InvalidArgumentError("the weights are float64 but jax_enable_x64 is off; call "
                         "jax.config.update('jax_enable_x64', True) first, or convert a float32 model")
    return jnp.asarray(a)


@dataclass
class JaxModel:
    """A timm architecture in one JAX framework, with its params and preprocessing.

    ``jm(images_nhwc)`` runs the jitted model in evaluation mode and returns logits.
    ``params`` is the framework's own tree (Flax ``{'params': ...}`` or Haiku's flat
    module dict); ``apply_fn(params, images, ...)`` is the matching pure function.
    """

    spec: Spec
    framework: Framework
    params: Any
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    architecture: str | None = None

    def __post_init__(self):
        check_framework(self.framework)

    @functools.cached_property
    def apply_fn(self):
        """``apply_fn(params, x, return_intermediates=False)`` in evaluation mode (jitted)."""
        if self.framework == "flax":
            module = flax_module(self.spec)

            def apply(params, x, return_intermediates=False):
                return module.apply(params, x, return_intermediates=return_intermediates)
        else:
            transformed = hk.without_apply_rng(haiku_transform(self.spec))

            def apply(params, x, return_intermediates=False):
                return transformed.apply(params, x, return_intermediates=return_intermediates)
        return jax.jit(apply, static_argnames="return_intermediates")

    @property
    def dtype(self):
        return jax.tree.leaves(self.params)[0].dtype

    def __call__(self, images: Any, return_intermediates: bool = False) -> Any:
        x = jnp.asarray(images, dtype=self.dtype)
        if x.ndim != 4 or x.shape[-1] != self.spec.channels:
            raise InvalidArgumentError(f"expected NHWC images with {self.spec.channels} channels, got shape {tuple(x.shape)}")
        return self.apply_fn(self.params, x, return_intermediates=return_intermediates)

    def num_params(self) -> int:
        return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(self.params))

    def canonical(self) -> dict:
        return framework_to_canonical(self.params, self.spec, self.framework)

    def to_timm_state_dict(self) -> dict[str, np.ndarray]:
        """timm-layout numpy arrays; ``timm_model.load_state_dict`` accepts them (via torch.from_numpy)."""
        return canonical_to_timm({k: np.asarray(v) for k, v in self.canonical().items()}, self.spec)

    def to(self, framework: Framework) -> "JaxModel":
        """The same weights in the other framework."""
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
    params = canonical_to_framework({k: to_jax_array(v) for k, v in canonical.items()}, spec, framework)
    return JaxModel(spec, framework, params, **meta)


def init_params(spec: Spec, framework: Framework, rng: int | jax.Array = 0) -> Any:
    """Random (timm-style) init of a spec's params in one framework."""
    key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
    x = jnp.zeros((1, *spec.image_size, spec.channels), jnp.float32)
    if check_framework(framework) == "flax":
        return jax.jit(flax_module(spec).init)(key, x)
    return jax.jit(haiku_transform(spec).init)(key, x)
