"""Canonical tree <-> Haiku / Flax params: two renaming rules, nothing else.

Both JAX front-ends name their submodules after timm's modules, with list indices joined by
an underscore (``blocks.3.attn.qkv`` -> ``blocks_3`` / ``attn`` / ``qkv``), so the rules are:

=========  ===============================  ==============================
           Flax linen                       Haiku
=========  ===============================  ==============================
module     nested dicts under ``params``    ``"vit/blocks_3/attn/qkv"``
Linear     ``kernel``, ``bias``             ``w``, ``b``
conv       ``kernel``, ``bias``             ``w``, ``b``
LayerNorm  ``scale``, ``bias``              ``scale``, ``offset``
free       its own name (``cls_token``)     its own name, under its module
=========  ===============================  ==============================
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import numpy as np

from .errors import InvalidArgumentError, ConversionError
from .keymap import CanonicalKey, Entry, key_table
from .specs import Spec

Framework = Literal["haiku", "flax"]
FRAMEWORKS = ("haiku", "flax")
HAIKU_ROOT = {"vit": "vit", "cait": "cait"}


def _module_segments(module: str) -> list[str]:
    """``"blocks.3.attn.qkv"`` -> ``["blocks_3", "attn", "qkv"]``."""
    out: list[str] = []
    for part in module.split(".") if module else []:
        if part.isdigit():
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return out


def _haiku_leaf(e: Entry) -> str:
    if e.kind in ("linear", "conv"):
        return {"kernel": "w", "bias": "b"}[e.leaf]
    if e.kind == "norm":
        return {"scale": "scale", "bias": "offset"}[e.leaf]
    return e.leaf


def framework_path(e: Entry, spec: Spec, framework: Framework) -> tuple[str, ...]:
    """Where a table entry lives in a framework's param tree, as a path of dict keys."""
    segments = _module_segments(e.module)
    if framework == "flax":
        return ("params", *segments, e.leaf)
    if framework == "haiku":
        module = "/".join([HAIKU_ROOT[spec.family], *segments])
        return (module, _haiku_leaf(e))
    raise InvalidArgumentError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def canonical_to_framework(tree: Mapping[CanonicalKey, Any], spec: Spec, framework: Framework) -> dict:
    params: dict = {}
    for e in key_table(spec):
        *parents, leaf = framework_path(e, spec, framework)
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tree[e.key]
    return params


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def framework_to_canonical(params: Mapping, spec: Spec, framework: Framework) -> dict[CanonicalKey, Any]:
    """Inverse of ``canonical_to_framework``; reports every missing, extra or misshapen param."""
    flat = _flatten(params)
    table = key_table(spec)
    paths = {framework_path(e, spec, framework): e for e in table}
    missing = ["/".join(p) for p in paths if p not in flat]
    unexpected = ["/".join(p) for p in flat if p not in paths]
    wrong = [f"{'/'.join(p)}: {tuple(np.shape(flat[p]))}, {e.jax_shape} expected"
             for p, e in paths.items() if p in flat and tuple(np.shape(flat[p])) != e.jax_shape]
    if missing or unexpected or wrong:
        raise ConversionError(f"{framework} params do not match the {spec.family} architecture",
                              {"missing params": missing, "unexpected params": unexpected,
                               "wrong shapes": wrong})
    return {e.key: flat[p] for p, e in paths.items()}


def flat_keys(params: Mapping) -> dict[str, Any]:
    """Flatten a param tree to ``"a/b/c"`` keys (the layout of vitport's safetensors files)."""
    return {"/".join(p): v for p, v in _flatten(params).items()}


def unflatten_keys(flat: Mapping[str, Any], framework: Framework) -> dict:
    """Inverse of ``flat_keys``. Haiku module names contain ``/``, so split only the leaf off."""
    tree: dict = {}
    for key, v in flat.items():
        if framework == "haiku":
            module, _, leaf = key.rpartition("/")
            tree.setdefault(module, {})[leaf] = v
        else:
            node = tree
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
    return tree
