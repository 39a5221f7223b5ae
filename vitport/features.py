"""timm's feature API on a converted model, equal to timm's methods of the same names.

``forward_features``, ``forward_head``, ``forward_intermediates`` and ``attention_maps``
all read one jitted forward pass (``JaxModel.apply_fn`` with its timm-named intermediates);
only the outputs a call asks for leave the jitted function, so XLA drops the rest.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp

from converters.errors import InvalidArgumentError
from converters.specs import CaiTSpec, grid_for

from . import structure, xla_options

if TYPE_CHECKING:
    from .api import JaxModel

OUTPUT_FORMATS = ("NCHW", "NHWC", "NLC")


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: None = every block, an int n = the last n, a sequence =
    those blocks (negative counts from the end). Returned in block order."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise InvalidArgumentError(f"indices={indices}: the last-n count must be 1 to {num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    taken = set()
    for i in indices:
        j = num_blocks + i if i < 0 else i
        if not 0 <= j < num_blocks:
            raise InvalidArgumentError(f"block index {i} is out of range for {num_blocks} blocks")
        taken.add(j)
    return sorted(taken)


@functools.lru_cache(maxsize=32)
def _selecting(apply_fn, keys: tuple[str, ...], options: tuple[tuple[str, Any], ...]):
    """A jitted forward pass that returns only ``keys`` of the intermediates."""
    return xla_options.jit(lambda params, x: {k: apply_fn(params, x, return_intermediates=True)[1][k] for k in keys},
                           dict(options))


def intermediates(jm: "JaxModel", images: Any, keys: Sequence[str]) -> dict[str, jax.Array]:
    options = tuple(sorted(jm.compiler_options.items()))
    return _selecting(jm.front_end_apply, tuple(keys), options)(jm.params, jm.as_input(images))


def forward_features(jm: "JaxModel", images: Any) -> jax.Array:
    """timm ``forward_features``: all tokens after the final norm, (B, tokens, D)."""
    return intermediates(jm, images, ["features"])["features"]


def forward_head(jm: "JaxModel", features: Any, pre_logits: bool = False) -> Any:
    """timm ``forward_head`` on ``forward_features`` output: pool, fc_norm, head. With
    ``pre_logits`` the pooled features before the classifier."""
    x = jnp.asarray(features, dtype=jm.input_dtype)
    if x.ndim != 3 or x.shape[-1] != jm.spec.dim:
        raise InvalidArgumentError(f"forward_head takes forward_features output (B, tokens, {jm.spec.dim}); "
                                   f"got shape {tuple(x.shape)}")
    result, out = jm.apply_fn(jm.params, x, stage="head", return_intermediates=True)
    return out["pre_logits"] if pre_logits else result


def forward_intermediates(jm: "JaxModel", images: Any, indices: int | Sequence[int] | None = None,
                          norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                          return_prefix_tokens: bool = False) -> Any:
    """timm ``forward_intermediates``: the outputs of the chosen blocks (timm's ``indices``),
    optionally through the final norm, patch tokens reshaped to ``output_fmt`` ('NCHW' as timm,
    'NHWC', or 'NLC' tokens), prefix tokens split off (and returned beside them with
    ``return_prefix_tokens``). Returns ``(final features, intermediates)`` or, with
    ``intermediates_only``, the list. CaiT's blocks hold patch tokens only, as in timm."""
    if output_fmt not in OUTPUT_FORMATS:
        raise InvalidArgumentError(f"output_fmt must be one of {', '.join(OUTPUT_FORMATS)}; got {output_fmt!r}")
    is_cait = isinstance(jm.spec, CaiTSpec)
    if is_cait and return_prefix_tokens:
        raise InvalidArgumentError("CaiT's blocks carry no prefix tokens (timm's Cait has no return_prefix_tokens)")
    x = jm.as_input(images)
    blocks = [f"blocks.{i}" for i in take_indices(jm.spec.depth, indices)]
    out = intermediates(jm, x, [*blocks, "features"])
    taken = [out[name] for name in blocks]
    if norm:
        taken = [jm.apply_fn(jm.params, y, stage="norm") for y in taken]
    num_prefix = 0 if is_cait else jm.spec.num_prefix_tokens
    prefix = [y[:, :num_prefix] for y in taken]
    taken = [y[:, num_prefix:] for y in taken]
    if output_fmt != "NLC":
        b, (h, w) = x.shape[0], grid_for(jm.spec, x.shape[1], x.shape[2])
        taken = [y.reshape(b, h, w, y.shape[-1]) for y in taken]
        if output_fmt == "NCHW":
            taken = [y.transpose(0, 3, 1, 2) for y in taken]
    if return_prefix_tokens and num_prefix:
        taken = list(zip(taken, prefix))
    return taken if intermediates_only else (out["features"], taken)


def attention_maps(jm: "JaxModel", images: Any) -> dict[str, jax.Array]:
    """``{timm block name: (B, heads, queries, keys)}``: the weights that multiply the values
    (softmax output; after ``proj_w`` for CaiT's talking heads; one query in CaiT's
    class-attention blocks ``blocks_token_only.j``)."""
    s = jm.spec
    names = [f"blocks.{i}" for i in range(s.depth)]
    names += [f"blocks_token_only.{j}" for j in range(getattr(s, "cls_depth", 0))]
    return structure.attention_maps(intermediates(jm, images, [f"{n}.attn" for n in names]))
