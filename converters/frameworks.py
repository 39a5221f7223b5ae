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

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

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


def _unflatten(flat: Mapping[Path, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


# ------------------------------------------------------------------ stacked block lists
#
# A model that runs its blocks as one ``lax.scan`` (``vitport``'s ``ModelConfig.scan_blocks``)
# stores each scanned list's weights stacked on a new leading axis under the list's own name:
# ``params/blocks/attn/qkv/kernel`` of shape (depth, D, 3D) in place of ``blocks_0`` ...
# ``blocks_{depth-1}`` (linen), ``blocks/attn/...`` in place of ``blocks/0/attn/...`` (NNX),
# ``"cait/blocks/attn/qkv"`` (Haiku). It is an in-memory layout: files and the canonical tree
# keep one entry per block.


def _block_groups(spec: Spec, lists: Mapping[str, int]) -> dict[tuple[Entry, ...], Entry]:
    """``{(block 0's entry, ..., block n-1's entry): the stacked entry}`` of every tensor in the
    block lists ``lists`` (``{"blocks": depth}``)."""
    groups: dict[tuple[str, str, str], list] = {}
    for e in param_table(spec):
        prefix, _, rest = e.module.partition(".")
        index, _, below = rest.partition(".")
        if prefix in lists and index.isdigit():
            groups.setdefault((prefix, below, e.leaf), [None] * lists[prefix])[int(index)] = e
    return {tuple(entries): dataclasses.replace(entries[0], module=".".join(filter(None, (prefix, below))))
            for (prefix, below, _), entries in groups.items()}


def block_lists(spec: Spec) -> dict[str, int]:
    """Every top-level list of modules in the architecture (``blocks``, CaiT's
    ``blocks_token_only``) with its length."""
    lists: dict[str, int] = {}
    for e in param_table(spec):
        prefix, _, rest = e.module.partition(".")
        index = rest.partition(".")[0]
        if index.isdigit():
            lists[prefix] = max(lists.get(prefix, 0), int(index) + 1)
    return lists


def stack_blocks(params: Mapping, spec: Spec, framework: str, lists: Mapping[str, int],
                 stack: Callable[[Sequence[Any]], Any] = np.stack) -> dict:
    """``params`` with the block lists ``lists`` stacked (the layout above); lists already
    stacked stay as they are. ``stack`` joins one tensor's per-block values (``jnp.stack`` for
    device arrays; a tree of shardings joins shardings)."""
    rule = layout(framework)
    flat = _flatten(pure_tree(params))
    for entries, stacked in _block_groups(spec, lists).items():
        paths = [rule.path(e, spec) for e in entries]
        if all(p in flat for p in paths):
            flat[rule.path(stacked, spec)] = stack([flat.pop(p) for p in paths])
    return _unflatten(flat)


def unstack_blocks(params: Mapping, spec: Spec, framework: str, keep: Mapping[str, int] = {}) -> Any:
    """Inverse of ``stack_blocks`` for whatever lists are stacked, but those in ``keep``;
    ``params`` itself when none is."""
    rule = layout(framework)
    flat = _flatten(pure_tree(params))
    lists = {p: n for p, n in block_lists(spec).items() if p not in keep}
    groups = {rule.path(stacked, spec): entries for entries, stacked in _block_groups(spec, lists).items()}
    if not any(path in flat for path in groups):
        return params
    for path, entries in groups.items():
        if path in flat:
            values = flat.pop(path)
            flat.update({rule.path(e, spec): values[i] for i, e in enumerate(entries)})
    return _unflatten(flat)


def framework_to_canonical(params: Mapping, spec: Spec, framework: str) -> dict[CanonicalKey, Any]:
    """Inverse of ``canonical_to_framework`` (stacked block lists are split again); reports every
    missing, extra or misshapen param."""
    rule = layout(framework)
    flat = _flatten(unstack_blocks(pure_tree(params), spec, framework))
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
