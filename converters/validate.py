"""Values from outside (config.json, --model-args, a converted folder's spec) checked before use.

timm's ``create_model`` would fail on ``"depth": "12"`` or ``"num_heads": 0`` deep inside
PyTorch, or not at all until a forward pass; vitport checks every value it reads against
the type and range timm's constructors need, and reports all problems in one error that
names the file (or flag), the key and the value.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import Any, Mapping

from .errors import InvalidArgumentError
from .specs import Activation

# Generous ceilings: real checkpoints are far below them; above them, vitport would spend
# minutes or gigabytes building tables for a model no file can hold.
MAX_SIZE = 1 << 16
MAX_DEPTH = 4096
MAX_CLASSES = 1 << 24


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_in(lo: int, hi: int):
    def check(v: Any) -> str | None:
        if not _is_int(v):
            return f"an integer from {lo} to {hi}"
        return None if lo <= v <= hi else f"an integer from {lo} to {hi}"
    return check


def _size(v: Any) -> str | None:
    """An int or an [H, W] pair of ints, each at least 1 (timm's ``to_2tuple``)."""
    want = f"a positive integer or a [height, width] pair of them (at most {MAX_SIZE})"
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if isinstance(v, (list, tuple)) and len(items) != 2:
        return want
    return None if all(_is_int(x) and 1 <= x <= MAX_SIZE for x in items) else want


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) or v in (0, 1) and _is_int(v) else "true or false"


def _optional_bool(v: Any) -> str | None:
    return None if v is None else _bool(v)


def _positive_number(v: Any) -> str | None:
    return None if _is_number(v) and 0 < v <= 64 else "a number greater than 0 (e.g. 4.0)"


def _optional_number(v: Any) -> str | None:
    return None if v is None or _is_number(v) else "a number or null"


def _optional_str(v: Any) -> str | None:
    return None if v is None or isinstance(v, str) else "a string or null"


def _str(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


# timm constructor keyword -> what its value must be (unknown keywords are specs.py's concern).
KWARG_CHECKS = {
    "img_size": _size, "patch_size": _size, "in_chans": _int_in(1, 4096),
    "num_classes": _int_in(0, MAX_CLASSES), "embed_dim": _int_in(1, MAX_SIZE), "depth": _int_in(1, MAX_DEPTH),
    "num_heads": _int_in(1, MAX_SIZE), "mlp_ratio": _positive_number, "qkv_bias": _bool, "qk_norm": _bool,
    "init_values": _optional_number, "class_token": _bool, "reg_tokens": _int_in(0, MAX_SIZE),
    "no_embed_class": _bool, "pre_norm": _bool, "final_norm": _bool, "fc_norm": _optional_bool,
    "pool_include_prefix": _bool, "dynamic_img_size": _bool, "global_pool": _str,
    "act_layer": _optional_str, "norm_layer": _optional_str,
    "depth_token_only": _int_in(1, MAX_DEPTH), "mlp_ratio_token_only": _positive_number,
}


def check_timm_kwargs(kwargs: Any, where: str = "model_args") -> dict[str, Any]:
    """``kwargs`` as a dict, after checking each known keyword's type and range (all at once)."""
    if not isinstance(kwargs, Mapping):
        raise InvalidArgumentError(f"{where} must be a JSON object of timm create_model arguments, "
                                   f"e.g. {{\"num_classes\": 10}}; got {type(kwargs).__name__} {kwargs!r:.80}")
    bad = []
    for k, v in kwargs.items():
        if not isinstance(k, str):
            bad.append(f"{k!r} (keys must be strings)")
            continue
        check = KWARG_CHECKS.get(k)
        want = check(v) if check else None
        if want:
            bad.append(f"{k}={_show(v)} (must be {want})")
    kw = dict(kwargs)
    sizes = {k: kw[k] for k in ("img_size", "patch_size") if k in kw and _size(kw[k]) is None}
    if len(sizes) == 2 and any(p > s for p, s in zip(_pair(sizes["patch_size"]), _pair(sizes["img_size"]))):
        bad.append(f"patch_size={_show(sizes['patch_size'])} is larger than img_size={_show(sizes['img_size'])}")
    dims = [kw.get("embed_dim"), kw.get("num_heads")]
    if all(_is_int(x) and x > 0 for x in dims) and dims[0] % dims[1]:
        bad.append(f"embed_dim={dims[0]} is not divisible by num_heads={dims[1]}")
    if bad:
        raise InvalidArgumentError(f"invalid values in {where}: " + "; ".join(bad)
                                   + ". Fix them (timm's create_model keyword arguments) and run again.")
    return kw


# timm's interpolation names (vitport.preprocess maps each to the PIL filter torchvision uses) and crop modes
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
# timm's models crop 0.8-1.0 of the resized image (over 1 pads or upscales). The bounds keep a config
# from resizing each image to 1/crop_pct times the input's side: 0.05 is 20x, a 4480-pixel side for 224.
CROP_PCT_RANGE = (0.05, 20.0)


def preprocessing_problems(cfg: Mapping[str, Any], image_size: Any = None) -> list[str]:
    """What is wrong with a ``pretrained_cfg``'s preprocessing entries (``mean``, ``std``,
    ``crop_pct``, ``crop_mode``, ``interpolation``) for images of ``image_size`` (H, W; default
    the cfg's ``input_size``, else 224). Falsy values are absent: timm's ``resolve_data_config``
    falls back to its defaults for them."""
    bad = []
    for key in ("mean", "std"):
        v = cfg.get(key)
        if not v:
            continue
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v)):
            bad.append(f"{key}={_show(v)} (must be 3 finite numbers, one per RGB channel)")
        elif key == "std" and not all(x > 0 for x in v):
            bad.append(f"std={_show(v)} (must be positive: the pixels are divided by it)")
    size = image_size
    if size is None:
        given = cfg.get("input_size")
        size = given[-2:] if isinstance(given, (list, tuple)) and len(given) == 3 else (224, 224)
    crop = cfg.get("crop_pct")
    if crop:
        lo, hi = CROP_PCT_RANGE
        sizes = all(_is_int(s) and 1 <= s <= MAX_SIZE for s in size)  # else input_size's own error says it
        if not (_is_number(crop) and lo <= crop <= hi) or (sizes and not all(s / crop >= 1 for s in size)):
            bad.append(f"crop_pct={_show(crop)} (must be a number from {lo} to {hi} that resizes the {list(size)} "
                       "input to at least 1 pixel a side before the crop)")
    for key, allowed in (("crop_mode", CROP_MODES), ("interpolation", INTERPOLATIONS)):
        v = cfg.get(key)
        if v and v not in allowed:
            bad.append(f"{key}={_show(v)} (must be one of {', '.join(allowed)})")
    return bad


def check_pretrained_cfg(cfg: Any, where: str) -> dict[str, Any]:
    """The entries of a hub ``pretrained_cfg`` that shape the model (``num_classes``,
    ``input_size``) and its preprocessing (``preprocessing_problems``)."""
    if not isinstance(cfg, Mapping):
        raise InvalidArgumentError(f"{where}: 'pretrained_cfg' must be a JSON object, got {_show(cfg)}")
    bad = []
    n = cfg.get("num_classes")
    if n is not None and not (_is_int(n) and n <= MAX_CLASSES):
        bad.append(f"num_classes={_show(n)} (must be an integer)")
    size = cfg.get("input_size")
    if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 3
                                 and all(_is_int(x) and 1 <= x <= MAX_SIZE for x in size)):
        bad.append(f"input_size={_show(size)} (must be [channels, height, width], positive integers)")
    bad += preprocessing_problems(cfg)
    if bad:
        raise InvalidArgumentError(f"invalid values in {where}: " + "; ".join(bad))
    return dict(cfg)


def _pair(v: Any) -> tuple[int, int]:
    return (v[0], v[1]) if isinstance(v, (list, tuple)) else (v, v)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


_SPEC_INTS = {"patch_size": (1, MAX_SIZE), "channels": (1, 4096), "num_classes": (0, MAX_CLASSES),
              "dim": (1, MAX_SIZE), "depth": (1, MAX_DEPTH), "heads": (1, MAX_SIZE), "mlp_dim": (1, 1 << 20),
              "reg_tokens": (0, MAX_SIZE), "cls_depth": (1, MAX_DEPTH), "cls_mlp_dim": (1, 1 << 20),
              "num_parallel": (1, MAX_DEPTH)}
_SPEC_BOOLS = ("class_token", "distilled", "no_embed_class", "pre_norm", "final_norm", "fc_norm",
               "pool_include_prefix", "patch_bias", "qkv_bias", "qk_norm", "dynamic_img_size", "fuse_out_proj")


ACTIVATIONS = typing.get_args(Activation)  # what the spec may name (SwiGLU models use silu)


def _field_problem(name: str, v: Any) -> str | None:
    """What is wrong with one spec field's value, or None."""
    if name in _SPEC_INTS:
        lo, hi = _SPEC_INTS[name]
        if not (_is_int(v) and lo <= v <= hi):
            return f"{name}={_show(v)} (must be an integer from {lo} to {hi})"
    elif name in _SPEC_BOOLS and not isinstance(v, bool):
        return f"{name}={_show(v)} (must be true or false)"
    elif name == "image_size" and _size(v):
        return f"image_size={_show(v)} (must be [height, width], positive integers)"
    elif name == "init_values" and _optional_number(v):
        return f"init_values={_show(v)} (must be a number or null)"
    elif name == "norm_eps" and not (_is_number(v) and v > 0):
        return f"norm_eps={_show(v)} (must be a positive number)"
    elif name == "activation" and v not in ACTIVATIONS:
        return f"activation={_show(v)} (must be one of {', '.join(map(repr, ACTIVATIONS))})"
    return None


def check_spec_values(values: Mapping[str, Any], where: str = "spec") -> None:
    """The fields of a spec read from a file, before the spec is built from them (its own checks
    divide by ``heads``, compare sizes, ...): every value present of the right type and range."""
    bad = [p for name, v in values.items() if (p := _field_problem(name, v))]
    if bad:
        raise InvalidArgumentError(f"invalid values in {where}: " + "; ".join(bad))


def check_spec(spec: Any, where: str = "spec") -> None:
    """A spec read from a file (a converted folder's config.json): every field of the right type."""
    import dataclasses

    bad = [p for f in dataclasses.fields(spec) if (p := _field_problem(f.name, getattr(spec, f.name)))]
    if not bad and any(spec.patch_size > s for s in spec.image_size):
        bad.append(f"patch_size={spec.patch_size} is larger than image_size={list(spec.image_size)}")
    if bad:
        raise InvalidArgumentError(f"invalid values in {where}: " + "; ".join(bad))


# Patch tokens a resampled position embedding may have: 512x512 (8192 pixels a side at patch 16), far
# beyond what attention over them fits in memory; a typo such as 99999999 must not reach XLA.
MAX_PATCHES = 1 << 18


def check_image_size(value: Any, patch_size: int) -> tuple[int, int]:
    """``image_size`` to resample a model to (an int or an (H, W) pair), as (H, W)."""
    problem = _size(value)
    if problem is None:
        h, w = _pair(value)
        if (h // patch_size) * (w // patch_size) > MAX_PATCHES:
            problem = f"at most {MAX_PATCHES} patches of {patch_size} pixels ({h}x{w} has more)"
        else:
            return h, w
    raise InvalidArgumentError(f"image_size={_show(value)}: must be {problem}")


def expand_user(path: str | os.PathLike) -> Path:
    """``Path(path).expanduser()``, with ``~name`` of no such user (or no home folder) as a clear
    error instead of pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise InvalidArgumentError(f"{os.fspath(path)}: cannot expand {str(path).split('/')[0]!r} (no such "
                                   "user or no home folder); give the path without '~'") from None
