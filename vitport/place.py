"""The place stage: a checked canonical tree -> a JaxModel (resolution change, dtype cast, the
framework's own param names). Framework layouts themselves are ``converters.frameworks``'."""

from __future__ import annotations

import dataclasses

import numpy as np

from converters import CaiTSpec, Spec, canonical_to_framework
from converters.errors import InvalidArgumentError, UnsupportedArchitectureError
from converters.lazy import LazyTensor, materialize
from converters.specs import RelPosSpec
from converters.validate import check_image_size

from .api import ADDITIVE_EMBEDDINGS, JaxModel, check_framework, matmul_dtype_for, params_dtype, place_all
from .config import ModelConfig

DTYPES = ("float32", "float64", "bfloat16", "float16")


def resize_canonical(tree: dict, spec: Spec, image_size: int | tuple[int, int]) -> tuple[dict, Spec]:
    """Change the input resolution: resample ``pos_embed`` as timm does (bicubic, antialias, float32)."""
    from .ops import resample_pos_embed

    new_size = check_image_size(image_size, spec.patch_size)
    if new_size == tuple(spec.image_size):
        return tree, spec
    if any(s < spec.patch_size for s in new_size):
        raise InvalidArgumentError(f"image_size={new_size} is smaller than one {spec.patch_size}-pixel patch")
    if isinstance(spec, RelPosSpec):  # its relative-position tables are sized by the grid
        raise UnsupportedArchitectureError(
            f"changing the image size of a relative-position ViT ({spec.image_size[0]}x{spec.image_size[1]} -> "
            f"{new_size[0]}x{new_size[1]}) is not supported: its relative-position tables would need resampling; "
            "convert it at its own size")
    new_spec = dataclasses.replace(spec, image_size=new_size)
    key = ("", "pos_embed")
    if key not in tree:  # rotary position only (DINOv3): nothing is sized by the grid
        return tree, new_spec
    prefix = 0 if isinstance(spec, CaiTSpec) or spec.no_embed_class else spec.num_prefix_tokens
    pe = np.asarray(materialize(tree[key]))
    out = resample_pos_embed(pe, new_spec.grid_size, spec.grid_size, prefix)
    tree = dict(tree)
    tree[key] = np.asarray(out).astype(pe.dtype)
    return tree, new_spec


def _target(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _cast(tree: dict, dtype: str | None) -> dict:
    """Floating tensors cast to ``dtype`` as ``JaxModel.astype(dtype)`` casts them: a 16-bit
    dtype keeps the additive embeddings float32 (``ADDITIVE_EMBEDDINGS``)."""
    if dtype is None:
        return tree
    target = _target(dtype)

    def cast(a, to):
        if isinstance(a, LazyTensor):  # cast when it is read
            floating = a.dtype.kind == "f" or a.dtype.name == "bfloat16"
            return a.map(lambda x: cast(x, to), dtype=to if floating else a.dtype)
        a = np.asarray(a)
        return a.astype(to) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") else a

    keep_float32 = matmul_dtype_for(target) is not None
    return {k: cast(v, np.dtype(np.float32) if keep_float32 and k[-1] in ADDITIVE_EMBEDDINGS else target)
            for k, v in tree.items()}


def model_from_canonical(tree: dict, r, framework: str | None = None, *, image_size=None,
                         dtype: str | None = None, consume: bool = False) -> JaxModel:
    """A JaxModel from a checked canonical tree (``read_canonical``): resized, cast, renamed.

    ``dtype`` gives the model ``JaxModel.astype(dtype)`` would (a 16-bit one runs its matmuls in
    it with float32 activations), cast tensor by tensor as they are placed; without it, the
    weights keep their dtype and a vitport folder's ``matmul_dtype`` (``r.matmul_dtype``) holds.

    ``consume``: empty ``tree`` as its arrays move to the device, so the weights are never
    held twice (host and device copies) for large models; with ``read_canonical(lazy=True)``
    each tensor is read from the file only then, so the source is never held whole either."""
    framework = check_framework(framework or r.framework or "flax")
    spec, cfg = r.spec, dict(r.pretrained_cfg)
    if image_size is not None:
        tree, spec = resize_canonical(tree, spec, image_size)
        if spec is not r.spec:
            cfg["input_size"] = [spec.channels, *spec.image_size]
    tree = _cast(tree, dtype)
    tree = place_all(tree, consume)
    params = canonical_to_framework(tree, spec, framework)
    matmul_dtype = r.matmul_dtype if dtype is None else matmul_dtype_for(_target(dtype))
    config = None if matmul_dtype is None else ModelConfig(spec, param_dtype=params_dtype(params).name,
                                                           matmul_dtype=matmul_dtype)
    return JaxModel(spec, framework, params, cfg, r.architecture or None, config)


