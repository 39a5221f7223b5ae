"""Canonical tree <-> each front-end's params: one layout rule per framework, nothing else.

Every front-end names its submodules after timm's modules; they differ only in how a list
index is written, where the tree is rooted, and what the leaves are called:

=========  ===========================  ============================  ==============================
           Flax linen                   Flax NNX                      Haiku
=========  ===========================  ============================  ==============================
module     ``params/blocks_3/attn/qkv``  ``blocks/3/attn/qkv`` (int)   ``"vit/blocks_3/attn/qkv"``
Linear     ``kernel``, ``bias``         ``kernel``, ``bias``          ``w``, ``b``
conv       ``kernel``, ``bias``         ``kernel``, ``bias``          ``w``, ``b``
LayerNorm  ``scale``, ``bias``          ``scale``, ``bias``           ``scale``, ``offset``
BatchNorm  + ``mean``, ``var``          + ``mean``, ``var``           + ``mean``, ``var`` (frozen stats)
free       its own name                 its own name                  its own name, under its module
=========  ===========================  ============================  ==============================

``LAYOUTS`` is the registry of these rules and ``FRAMEWORKS`` its keys: the only place the
list of front-ends is written (``vitport.frontends`` pairs each with its modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import ConversionError, InvalidArgumentError
from .keymap import CanonicalKey, Entry, param_table
from .specs import Spec

Path = tuple[Any, ...]  # dict keys from the root of a param tree to a leaf (str, or int for NNX lists)


def _module_segments(module: str, join_index: bool) -> list[Any]:
    """``"blocks.3.attn.qkv"`` -> ``["blocks_3", "attn", "qkv"]`` or ``["blocks", 3, "attn", "qkv"]``."""
    out: list[Any] = []
    for part in module.split(".") if module else []:
        if part.isdigit():
            if join_index:
                out[-1] = f"{out[-1]}_{part}"
            else:
                out.append(int(part))
        else:
            out.append(part)
    return out


@dataclass(frozen=True)
class Layout:
    """Where a framework keeps each canonical tensor.

    ``root``: a key above every module (linen's ``params``); ``haiku_modules``: Haiku's flat
    ``{"vit/blocks_0/attn": {"w": ...}}`` module dict; ``join_index``: ``blocks_3`` instead
    of ``blocks/3``; ``leaf_names``: renames per tensor kind.
    """

    name: str
    root: tuple[str, ...] = ()
    haiku_modules: bool = False
    join_index: bool = True
    leaf_names: Mapping[str, Mapping[str, str]] = None  # kind -> {canonical leaf: framework leaf}

    def leaf(self, e: Entry) -> str:
        return (self.leaf_names or {}).get(e.kind, {}).get(e.leaf, e.leaf)

    def path(self, e: Entry, spec: Spec) -> Path:
        segments = _module_segments(e.module, self.join_index)
        if self.haiku_modules:
            return ("/".join([spec.family, *segments]), self.leaf(e))
        return (*self.root, *segments, self.leaf(e))

    def flat_key(self, path: Path) -> str:
        """The key of a leaf in vitport's safetensors files."""
        return "/".join(map(str, path))

    def unflatten(self, flat: Mapping[str, Any]) -> dict:
        """Inverse of ``flat_key`` over a whole file. Haiku module names contain ``/``, so only
        the leaf is split off; NNX list indices come back as ints."""
        tree: dict = {}
        for key, v in flat.items():
            if self.haiku_modules:
                module, _, leaf = key.rpartition("/")
                tree.setdefault(module, {})[leaf] = v
                continue
            node = tree
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(int(p) if p.isdigit() and not self.join_index else p, {})
            node[leaf] = v
        return tree


LAYOUTS: dict[str, Layout] = {
    "haiku": Layout("haiku", haiku_modules=True,
                    leaf_names={"linear": {"kernel": "w", "bias": "b"}, "conv": {"kernel": "w", "bias": "b"},
                                "norm": {"bias": "offset"}}),
    "flax": Layout("flax", root=("params",)),
    "nnx": Layout("nnx", join_index=False),
}
FRAMEWORKS: tuple[str, ...] = tuple(LAYOUTS)


def layout(framework: str) -> Layout:
    try:
        return LAYOUTS[framework]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"framework must be one of {', '.join(FRAMEWORKS)}; got {framework!r}") from None


def framework_path(e: Entry, spec: Spec, framework: str) -> Path:
    """Where a table entry lives in a framework's param tree, as a path of dict keys."""
    return layout(framework).path(e, spec)


def canonical_to_framework(tree: Mapping[CanonicalKey, Any], spec: Spec, framework: str) -> dict:
    rule = layout(framework)
    params: dict = {}
    for e in param_table(spec):
        *parents, leaf = rule.path(e, spec)
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tree[e.key]
    return params


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, (*prefix, k)))
        else:
            flat[(*prefix, k)] = v
    return flat


def pure_tree(params: Any) -> Any:
    """An ``nnx.State`` as nested dicts of arrays; any other tree unchanged."""
    if type(params).__module__.startswith("flax.nnx"):
        from flax import nnx  # only reached when the caller already uses NNX

        return nnx.to_pure_dict(params)
    return params


def framework_to_canonical(params: Mapping, spec: Spec, framework: str) -> dict[CanonicalKey, Any]:
    """Inverse of ``canonical_to_framework``; reports every missing, extra or misshapen param."""
    rule = layout(framework)
    flat = _flatten(pure_tree(params))
    paths = {rule.path(e, spec): e for e in param_table(spec)}
    missing = [rule.flat_key(p) for p in paths if p not in flat]
    unexpected = [rule.flat_key(p) for p in flat if p not in paths]
    wrong = [f"{rule.flat_key(p)}: {tuple(np.shape(flat[p]))}, {e.jax_shape} expected"
             for p, e in paths.items() if p in flat and tuple(np.shape(flat[p])) != e.jax_shape]
    if missing or unexpected or wrong:
        raise ConversionError(f"{framework} params do not match the {spec.family} architecture",
                              {"missing params": missing, "unexpected params": unexpected,
                               "wrong shapes": wrong})
    return {e.key: flat[p] for p, e in paths.items()}


def flat_keys(params: Mapping, framework: str = "flax") -> dict[str, Any]:
    """Flatten a param tree to ``"a/b/c"`` keys (the layout of vitport's safetensors files)."""
    rule = layout(framework)
    return {rule.flat_key(p): v for p, v in _flatten(pure_tree(params)).items()}


def unflatten_keys(flat: Mapping[str, Any], framework: str) -> dict:
    """Inverse of ``flat_keys``."""
    return layout(framework).unflatten(flat)
