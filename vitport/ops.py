"""Parameter-free jnp maths of the shared forward passes (``vitport.structure``).

Everything here follows timm's definitions exactly (attention scale, activations, pos-embed
resampling); the front-ends only own parameters and module names.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from converters.specs import pair  # noqa: F401  (re-exported for the front-ends)

_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
    """timm's exact GELU, ``x/2 * (1 + erf(x/sqrt(2)))`` as torch computes it. XLA's erf is one
    polynomial; ``jax.nn.gelu(approximate=False)`` takes ``erfc``, a piecewise exp and
    polynomial that XLA's CPU evaluates in two fusions and, in training, saves as two residuals.
    In ViT-B/16's batch-8 train step GELU's fusions took 0.21 s per step against 0.50 s
    (``benchmarks/op_profile.py vit_base_patch16_224 --batch 8 --train-step``, 2-core Intel Xeon
    VM; ``benchmarks/README.md``, session 9). float64 keeps ``erfc``: XLA's float64 erf is about
    5e-9 off torch's float64 GELU, erfc within 2e-15 (checked by hand, both against torch)."""
    if x.dtype == jnp.float64:
        return jax.nn.gelu(x, approximate=False)
    return 0.5 * x * (1 + lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


# timm's activations; jax.nn.gelu defaults to the tanh approximation, timm's GELU is exact.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
}



# -------------------------------------------------------------------- matmul precision
#
# XLA's CPU dot is fast on bfloat16 inputs only when it accumulates into float32
# (docs/design.md, section 6): ``a @ b`` with a bf16 result runs below the float32 peak,
# ``preferred_element_type=float32`` on bf16 inputs near twice it. Every matmul, attention
# product and the patch convolution go through ``dot_general`` / ``conv_general_dilated`` /
# ``einsum`` below: with 16-bit inputs (bf16 weights, or ``matmul_dtype``) they accumulate in
# float32 and cast the result back to the dtype the product would have had, so a bf16 model
# stays bf16 and a mixed one (float32 weights, ``matmul_dtype='bfloat16'``) stays float32.

LOW_PRECISION = ("bfloat16", "float16")


def _low_precision_inputs(matmul_dtype: Any, *xs: jax.Array) -> tuple[list[jax.Array], Any]:
    """``(inputs cast to matmul_dtype, result dtype)``; the result dtype is None when the
    product needs no float32 accumulation (float32 / float64 inputs, no ``matmul_dtype``)."""
    out = jnp.result_type(*xs)
    if matmul_dtype is not None and jnp.issubdtype(out, jnp.floating):
        xs = tuple(x.astype(matmul_dtype) for x in xs)
    if all(jnp.dtype(x.dtype).name in LOW_PRECISION for x in xs):
        return list(xs), out
    return list(xs), None


@functools.lru_cache(maxsize=None)
def dot_general(matmul_dtype: str | None = None) -> Callable[..., jax.Array]:
    """``lax.dot_general`` for Linear layers (linen ``Dense(dot_general=...)``, NNX
    ``Linear(dot_general=...)``, Haiku ``vitport.haiku.layers.Linear``). Cached: one function per
    dtype, so modules holding it compare equal."""

    def dg(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
        (lhs, rhs), out = _low_precision_inputs(matmul_dtype, lhs, rhs)
        lead = _linear_leading_dims(lhs, rhs, dimension_numbers)
        if lead is not None:
            lhs, dimension_numbers = lhs.reshape(-1, lhs.shape[-1]), (((1,), (0,)), ((), ()))
        if out is None:
            y = lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                preferred_element_type=preferred_element_type, **kw)
        else:
            y = lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32,
                                **kw).astype(out)
        return y if lead is None else y.reshape(*lead, y.shape[-1])

    return dg


def _linear_leading_dims(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> tuple[int, ...] | None:
    """The leading dims of a Linear layer's (..., tokens, features) input, which ``dot_general``
    flattens into one 2D matmul; None for any other product. Same forward pass (XLA collapses
    it anyway), but the weight gradient becomes one (features, B*N) x (B*N, out) dot: from the 3D
    form XLA's CPU transposed the output gradient into a fresh buffer first (ViT-B/16's batch-8
    train step: 0.53 s of such copies; ``benchmarks/README.md``, session 9)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not tuple(lhs_batch) and not tuple(rhs_batch)):
        return lhs.shape[:-1]
    return None


@functools.lru_cache(maxsize=None)
def conv_general_dilated(matmul_dtype: str | None = None) -> Callable[..., jax.Array]:
    """``lax.conv_general_dilated`` for the patch convolution, with ``dot_general``'s rule."""

    def conv(lhs, rhs, *args, preferred_element_type=None, **kw):
        (lhs, rhs), out = _low_precision_inputs(matmul_dtype, lhs, rhs)
        if out is None:
            return lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=preferred_element_type, **kw)
        return lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=jnp.float32, **kw).astype(out)

    return conv


def einsum(subscripts: str, a: jax.Array, b: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
    """``jnp.einsum`` of two operands with ``dot_general``'s rule (the attention products)."""
    (a, b), out = _low_precision_inputs(matmul_dtype, a, b)
    if out is None:
        return jnp.einsum(subscripts, a, b)
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32).astype(out)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.softmax`` computed in at least float32 (bf16 attention keeps its dtype outside)."""
    return jax.nn.softmax(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=axis).astype(x.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """timm's activation ``name``, computed in at least float32 (XLA fuses the casts)."""
    try:
        f = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None
    return lambda x: f(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)


def split_heads(x: jax.Array, heads: int) -> jax.Array:
    """(B, N, H*Dh) -> (B, H, N, Dh)."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
    """(B, H, N, Dh) -> (B, N, H*Dh)."""
    b, h, n, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * dh)


def attention_logits(q: jax.Array, k: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
    """``(q * Dh**-0.5) @ k^T`` over (B, H, N, Dh) inputs, as timm scales before the product."""
    return einsum("bhqd,bhkd->bhqk", q * (q.shape[-1] ** -0.5), k, matmul_dtype)


def attend(weights: jax.Array, v: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
    return einsum("bhqk,bhkd->bhqd", weights, v, matmul_dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, matmul_dtype: str | None = None) -> jax.Array:
    return attend(softmax(attention_logits(q, k, matmul_dtype), axis=-1), v, matmul_dtype)


def drop_path(x: jax.Array, rate: float | jax.Array | None, rng: jax.Array | None) -> jax.Array:
    """timm's stochastic depth: zero whole residual branches per sample, rescale the rest by
    ``1 / (1 - rate)`` (``x * (mask / keep)`` in ``x``'s dtype, as timm; no rescale at rate 1).
    ``rate`` may be traced (a scanned block's, ``structure.drop_path_rate``); None: never drops."""
    if rate is None or rng is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    # The zero branch also stops the gradient of 1 / keep at keep = 0 (rate 1: every sample drops).
    scale = jnp.where(mask, 1.0 / jnp.where(keep > 0, keep, 1.0), 0.0)
    return x * scale.astype(x.dtype)


def resample_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int], old_grid: tuple[int, int],
                       num_prefix_tokens: int) -> jax.Array:
    """timm's ``resample_abs_pos_embed``: bicubic, antialiased, computed in float32.

    ``jax.image.resize(..., "cubic", antialias=True)`` matches torch's
    ``F.interpolate(mode="bicubic", antialias=True)`` up and down (docs/design.md, numerics).
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], d).astype(jnp.float32)
    grid = jax.image.resize(grid, (1, new_grid[0], new_grid[1], d), "cubic", antialias=True)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


def embed_tokens(patches: jax.Array, pos_embed: jax.Array, prefix: Sequence[jax.Array],
                 grid_size: tuple[int, int], no_embed_class: bool) -> jax.Array:
    """timm's ``_pos_embed``: prefix tokens + patch tokens + position embedding.

    ``patches`` is the (B, h, w, D) patch grid. If it differs from ``grid_size`` (dynamic image
    size), pos_embed is resampled to it first, as timm does.
    """
    b, h, w, d = patches.shape
    num_prefix = sum(t.shape[1] for t in prefix)
    pos_embed = resample_pos_embed(pos_embed, (h, w), grid_size, 0 if no_embed_class else num_prefix)
    x = patches.reshape(b, h * w, d)
    pos_embed = pos_embed.astype(x.dtype)  # kept float32 by astype's bf16 mode: the activations' dtype decides
    prefix = [jnp.broadcast_to(t, (b, *t.shape[1:])).astype(x.dtype) for t in prefix]
    if no_embed_class:
        return jnp.concatenate([*prefix, x + pos_embed], axis=1)
    return jnp.concatenate([*prefix, x], axis=1) + pos_embed


def pool_tokens(x: jax.Array, pool: str, num_prefix_tokens: int, include_prefix: bool = False) -> jax.Array:
    """timm's ``global_pool_nlc`` for the pools vitport implements."""
    if pool == "token":
        return x[:, 0]
    if pool == "avg":
        return (x if include_prefix else x[:, num_prefix_tokens:]).mean(axis=1)
    return x



# --------------------------------------------------------------------- rotary embeddings
#
# timm computes its rotary tables (``timm/layers/pos_embed_sincos.py``) from the settings, as
# non-persistent buffers; they are rebuilt here with timm's dtype chain, in numpy, at trace time
# (the grid is static). 'cat' (``RotaryEmbeddingCat`` with ``in_pixels=False``): float32 bands
# ``1 / T ** (arange(n) / n)``, an index grid (+ offset, rescaled to ``ref_feat_shape``), angles
# in the bands' dtype, sin/cos cast to float32. 'dinov3' (``RotaryEmbeddingDinoV3``): float32
# periods ``T ** (2 arange(n) / (dh / 2))``, 0.5-centred coordinates normalised to [-1, 1],
# angles ``2 pi coords / periods`` kept in the periods' dtype. timm's float64 model holds float64
# bands / periods (copies of the float32 values), so ``dtype`` float64 reproduces its float64
# run exactly; its cached table for a fixed grid is computed once in float32 (torch's float32
# sin, which may differ from numpy's in the last bit).


def _rope_grid(shape: tuple[int, int], indexing: str, offset: float, ref: tuple[int, int] | None,
               centered: bool, normalize: str = "separate"):
    import numpy as np

    shape = list(shape)
    if ref is not None:
        ref = list(ref)
    if indexing == "xy":
        shape = shape[::-1]
        ref = ref[::-1] if ref is not None else None
    if centered:
        denom = {"max": [float(max(shape))] * 2, "min": [float(min(shape))] * 2}.get(normalize, [float(s) for s in shape])
        t = [((np.arange(0.5, s, dtype=np.float32) + np.float32(offset)) / np.float32(dn)).astype(np.float32)
             for s, dn in zip(shape, denom)]
    else:
        t = [np.arange(s).astype(np.float32) + np.float32(offset) for s in shape]
    if ref is not None:
        t = [(x / np.float32(f) * np.float32(r)).astype(np.float32) for x, f, r in zip(t, shape, ref)]
    grid = np.stack(np.meshgrid(*t, indexing=indexing), axis=-1).astype(np.float32)
    if centered:
        grid = (np.float32(2.0) * grid - np.float32(1.0)).astype(np.float32)
    return grid


def _dinov3_periods(spec):
    """timm's ``RotaryEmbeddingDinoV3._compute_periods`` (temperature form), float32: periods
    ``T ** (2 arange(Dh/4) / (Dh/2))``. numpy's float32 power; torch's (SLEEF, 1 ulp) differs from
    it in the last bit for a few exponents once Dh/4 > 8 (docs/design.md, section 3)."""
    import numpy as np

    dh = spec.dim // spec.heads
    exponents = (np.float32(2.0) * np.arange(dh // 4, dtype=np.float32) / np.float32(dh // 2)).astype(np.float32)
    return (np.float32(spec.rope_temperature) ** exponents).astype(np.float32)


def rope_table(spec, grid: tuple[int, int], dtype, cached: bool) -> jax.Array:
    """timm's concatenated ``[sin | cos]`` table (H*W, 2 * head_dim) for a patch grid.

    ``cached``: timm's table for the model's own grid, built at init in float32 (fixed-size
    models); otherwise built per call at the bands' dtype (``dtype``: float64 for a float64
    model), as timm's ``get_embed(shape)`` does with ``dynamic_img_size``."""
    import numpy as np

    dh = spec.dim // spec.heads
    n = dh // 4
    work = np.float32 if cached or np.dtype(dtype) != np.float64 else np.float64
    if spec.rope_type == "dinov3":
        periods = _dinov3_periods(spec).astype(work)
        coords = _rope_grid(grid, spec.rope_grid_indexing, spec.rope_grid_offset, None, True,
                            spec.rope_normalize_coords).reshape(-1, 2, 1).astype(work)
        angles = (work(2 * np.pi) * coords / periods).reshape(coords.shape[0], -1)
        sin, cos = np.sin(angles), np.cos(angles)
    else:
        exp = (np.arange(n).astype(np.float32) / np.float32(n)).astype(np.float32)
        bands = (np.float32(1.0) / (np.float32(spec.rope_temperature) ** exp)).astype(np.float32).astype(work)
        g = _rope_grid(grid, spec.rope_grid_indexing, spec.rope_grid_offset, spec.rope_ref_feat_shape, False)
        pos = g[..., None].astype(work) * bands
        sin = np.sin(pos).astype(np.float32).reshape(g.shape[0] * g.shape[1], -1)
        cos = np.cos(pos).astype(np.float32).reshape(g.shape[0] * g.shape[1], -1)
    if spec.rope_rotate_half:
        sin, cos = np.concatenate([sin, sin], -1), np.concatenate([cos, cos], -1)
    else:
        sin, cos = np.repeat(sin, 2, -1), np.repeat(cos, 2, -1)
    return jnp.asarray(np.concatenate([sin, cos], -1))


def rope_coord_aug_draw(key: jax.Array, spec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """timm's ``_apply_coord_augs`` draw, float32, one per forward call: (shift (2,), jitter (2,),
    rescale (1,)); shift U(-s, s) per axis, jitter exp(U(-ln J, ln J)) per axis, rescale
    exp(U(-ln R, ln R)) shared. A setting that is off draws nothing and is the identity (0 / 1)."""
    import math

    k_shift, k_jitter, k_rescale = jax.random.split(key, 3)
    f32 = jnp.float32
    shift, jitter, rescale = jnp.zeros(2, f32), jnp.ones(2, f32), jnp.ones(1, f32)
    if spec.rope_shift_coords is not None:
        s = spec.rope_shift_coords
        shift = jax.random.uniform(k_shift, (2,), f32, -s, s)
    if spec.rope_jitter_coords is not None:
        j = math.log(spec.rope_jitter_coords)
        jitter = jnp.exp(jax.random.uniform(k_jitter, (2,), f32, -j, j))
    if spec.rope_rescale_coords is not None:
        r = math.log(spec.rope_rescale_coords)
        rescale = jnp.exp(jax.random.uniform(k_rescale, (1,), f32, -r, r))
    return shift, jitter, rescale


def rope_table_augmented(spec, grid: tuple[int, int], dtype, draw) -> jax.Array:
    """timm's DINOv3 ``[sin | cos]`` table in training with coordinate augmentation
    (``RotaryEmbeddingDinoV3._create_embed``): the float32 grid shifted, jittered and rescaled
    (in that order, in float32) by ``draw`` (``rope_coord_aug_draw``), then angles and sin/cos at
    the periods' dtype (float64 for a float64 model), built per call as timm does in training."""
    import numpy as np

    if spec.rope_type != "dinov3":
        raise ValueError("RoPE coordinate augmentation is implemented for rope_type='dinov3' only")
    dh = spec.dim // spec.heads
    n = dh // 4
    work = jnp.float64 if np.dtype(dtype) == np.float64 else jnp.float32
    periods = jnp.asarray(_dinov3_periods(spec), work)
    coords = jnp.asarray(_rope_grid(grid, spec.rope_grid_indexing, spec.rope_grid_offset, None, True,
                                    spec.rope_normalize_coords).reshape(-1, 2))
    shift, jitter, rescale = (jnp.asarray(t, jnp.float32) for t in draw)
    coords = ((coords + shift[None, :]) * jitter[None, :]) * rescale
    coords = coords.astype(work)[:, :, None]
    angles = (jnp.asarray(2 * np.pi, work) * coords / periods).reshape(coords.shape[0], -1)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    if spec.rope_rotate_half:
        sin, cos = jnp.concatenate([sin, sin], -1), jnp.concatenate([cos, cos], -1)
    else:
        sin, cos = jnp.repeat(sin, 2, -1), jnp.repeat(cos, 2, -1)
    return jnp.concatenate([sin, cos], -1)


def rope_mixed_table(freqs: jax.Array, grid: tuple[int, int], indexing: str) -> jax.Array:
    """timm's mixed RoPE table (``RotaryEmbeddingMixed.get_embed`` -> ``get_mixed_freqs``), float32,
    (depth, heads, H*W, 2 * head_dim): ``[sin | cos]`` of ``t_x * freqs[0] + t_y * freqs[1]``, each
    value repeated twice (interleaved layout), ``t_x, t_y`` the patch grid (``get_mixed_grid``).

    timm computes the angles and sin/cos in float32 whatever the model's dtype (the table is then
    cast to the frequencies' dtype). With float64 frequencies each float32 operation is done in
    float64 and rounded to float32, which is exact for a product or a sum of float32 values, so the
    angles are timm's bit for bit; sin/cos are then correctly rounded, where torch's float32 sin/cos
    differ in the last bit for about 5% of arguments (docs/design.md, section 3)."""
    import numpy as np

    t = _rope_grid(grid, indexing, 0.0, None, False).reshape(-1, 2)
    exact = freqs.dtype == jnp.float64
    work = jnp.float64 if exact else jnp.float32

    def f32(a):
        return a.astype(jnp.float32).astype(work) if exact else a

    f = f32(freqs.astype(work))
    t_x, t_y = (jnp.asarray(np.ascontiguousarray(t[:, i, None]), work) for i in (0, 1))
    angles = f32(f32(t_x * f[0][..., None, :]) + f32(t_y * f[1][..., None, :]))
    sin, cos = jnp.sin(angles).astype(jnp.float32), jnp.cos(angles).astype(jnp.float32)
    return jnp.concatenate([jnp.repeat(sin, 2, -1), jnp.repeat(cos, 2, -1)], -1)


def apply_rope(x: jax.Array, table: jax.Array, rotate_half: bool) -> jax.Array:
    """timm's ``apply_rot_embed_cat`` on (B, H, N, Dh): ``x * cos + rot(x) * sin`` in the
    promoted dtype, cast back to ``x``'s."""
    sin, cos = jnp.split(table, 2, axis=-1)
    if rotate_half:
        x1, x2 = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
    else:
        rotated = jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return (x * cos + rotated * sin).astype(x.dtype)


# ------------------------------------------------------------- relative position bias
#
# timm's ``RelPosBias`` / ``RelPosMlp`` (``timm/layers/pos_embed_rel.py``) index their bias by
# non-persistent buffers built from the patch grid; they are rebuilt here in numpy.


@functools.lru_cache(maxsize=None)
def rel_pos_index(grid: tuple[int, int], class_token: bool = False):
    """timm's ``gen_relative_position_index``, flattened: for query i and key j of the grid
    (row-major), ``(dy + h - 1) * (2w - 1) + (dx + w - 1)`` with ``(dy, dx) = pos_i - pos_j``.
    With a class token (BEiT's scheme) one row and column are put in front: cls->token reads
    entry ``(2h-1)(2w-1)``, token->cls the next, cls->cls the one after."""
    import numpy as np

    h, w = grid
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    index = (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)
    if class_token:
        n = (2 * h - 1) * (2 * w - 1)
        index = np.pad(index, ((1, 0), (1, 0)))
        index[0, :] = n
        index[:, 0] = n + 1
        index[0, 0] = n + 2
    index = index.reshape(-1)
    index.setflags(write=False)
    return index


@functools.lru_cache(maxsize=None)
def rel_pos_log_coords(grid: tuple[int, int], mode: str):
    """timm's ``gen_relative_log_coords`` (``RelPosMlp.rel_coords_log``), (2h-1, 2w-1, 2): the
    offsets ``(dy, dx)``, in float32 as timm computes them whatever the model's dtype ('cr':
    ``sign(c) log(1 + |c|)``; 'swin': ``c / (side - 1) * 8``, then ``sign(c) log2(1 + |c|) / 3``).
    numpy's float32 log equals torch's for 'cr' on every grid (w, w + 3), w <= 55, tried (timm
    1.0.31 / torch 2.15 on an AMD EPYC); on an Intel AVX-512 Xeon torch's own log is one ulp off
    on some entries (log(7)), where numpy's is correctly rounded. 'swin''s log2 differs in the
    last bit on a few grids (14: 108 of 1458 entries), like the RoPE tables (docs/design.md)."""
    import numpy as np

    h, w = grid
    c = np.stack(np.meshgrid(np.arange(-(h - 1), h, dtype=np.float32), np.arange(-(w - 1), w, dtype=np.float32),
                             indexing="ij"), axis=-1)
    if mode == "swin":
        with np.errstate(divide="ignore", invalid="ignore"):  # a 1-wide side divides by 0, as in timm
            c = c / np.array([h - 1, w - 1], np.float32) * np.float32(8)
        c = np.sign(c) * np.log2(np.float32(1) + np.abs(c)) / np.float32(3)  # timm: / math.log2(8)
    else:
        c = np.sign(c) * np.log(np.float32(1) + np.abs(c))
    c = c.astype(np.float32)
    c.setflags(write=False)
    return c


# ------------------------------------------------------------------ convolutional stems
#
# The parameter-free maths of timm's hybrid CNN stems (``HybridEmbed.backbone``): padding
# rules, weight standardisation and pooling. The convolution and normalisation layers that own
# parameters are front-end primitives (``vitport.structure.Conv`` / ``GroupNorm``).


def conv_padding(padding: str | int) -> str | list[tuple[int, int]]:
    """``'SAME'`` (TF's rule, which timm's ``pad_same`` reproduces: the odd pixel at the end) or a
    symmetric pixel count on both spatial axes (torch's ``padding=p``), as lax takes it."""
    if isinstance(padding, str):
        return padding.upper()
    return [(padding, padding), (padding, padding)]


def standardize_weight(w: jax.Array, eps: float) -> jax.Array:
    """timm ``StdConv2d``'s weight standardisation of an HWIO kernel: per output channel,
    ``(w - mean) / sqrt(var + eps)`` over (H, W, I), biased variance, as its
    ``F.batch_norm(weight.reshape(1, O, -1), training=True)`` computes it."""
    wf = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    mean = wf.mean(axis=(0, 1, 2), keepdims=True)
    var = jnp.square(wf - mean).mean(axis=(0, 1, 2), keepdims=True)
    return ((wf - mean) * lax.rsqrt(var + eps)).astype(w.dtype)


@functools.lru_cache(maxsize=None)
def std_conv_general_dilated(matmul_dtype: str | None, eps: float) -> Callable[..., jax.Array]:
    """``conv_general_dilated(matmul_dtype)`` on the standardised kernel (timm ``StdConv2d`` /
    ``StdConv2dSame``): the front-ends keep the raw kernel, so it converts as any conv's."""
    conv = conv_general_dilated(matmul_dtype)

    def std_conv(lhs, rhs, *args, **kw):
        return conv(lhs, standardize_weight(rhs, eps), *args, **kw)

    return std_conv


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def max_pool(x: jax.Array, kernel: int, stride: int, padding: str | int) -> jax.Array:
    """torch's ``MaxPool2d`` (padding with -inf) or timm's ``MaxPool2dSame`` ('SAME': -inf
    padding by TF's rule) over NHWC."""
    pad = conv_padding(padding)
    if not isinstance(pad, str):
        pad = [(0, 0), *pad, (0, 0)]
    # A Python scalar init lets lax pick its differentiable max-pool primitive.
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), pad)


def avg_pool_ceil(x: jax.Array, kernel: int, stride: int) -> jax.Array:
    """torch's ``AvgPool2d(kernel, stride, padding=0, ceil_mode=True, count_include_pad=False)``
    over NHWC (timm ResNet-D's avg-down shortcut): ``ceil`` output sizes, each window averaged over
    the pixels it actually covers (torch drops a last window that would start past the input)."""
    def out(n: int) -> int:
        o = -(-(n - kernel) // stride) + 1
        return o - 1 if (o - 1) * stride >= n else o

    pads = [(0, 0)] + [(0, max((out(n) - 1) * stride + kernel - n, 0)) for n in x.shape[1:3]] + [(0, 0)]
    window, strides = (1, kernel, kernel, 1), (1, stride, stride, 1)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pads)
    return total / count


def batch_norm_frozen(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
                      eps: float) -> jax.Array:
    """torch's ``BatchNorm2d`` in evaluation mode over NHWC channels: ``(x - running_mean) /
    sqrt(running_var + eps) * weight + bias``. The running statistics are frozen (docs/design.md
    section 3): ``stop_gradient`` keeps them out of every gradient, also in training mode."""
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float32 statistics for 16-bit inputs
    return ((xf - mean) * lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)
