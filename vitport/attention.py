"""Where a model looks: attention rollout / last-block attention over the patch grid, as a heat map.

``patch_attention`` turns ``jm.attention_maps`` (timm's weights that multiply the values, one
``(B, heads, queries, keys)`` array per block) into one map per image over the patch grid;
``attention_image`` draws it over the image the model saw; ``write_attention_image`` writes
that picture atomically (``vitport attention``).

Methods
-------
``rollout`` (default): Abnar & Zuidema's attention rollout, as the ViT paper (Dosovitskiy et
al., appendix D.8) uses it: per block average the heads, add the identity for the residual
connection and re-normalise each row to sum 1, multiply the blocks' matrices from the first to
the last, then read the row(s) the classifier reads (see "Read-out") and drop the prefix
(class / register / distillation) tokens from the key axis.

CaiT: the self-attention blocks see the patches only and are rolled out as above (their
talking-heads weights, after ``proj_w``, are what multiplies the values; their rows need not
sum to 1 before the re-normalisation). Each class-attention block then updates the class token
alone: its row becomes ``normalise(mean_heads(attn) + e_cls)`` over ``[cls, patches]`` applied
to ``[class token's rollout so far, patch rollout]``; patch tokens pass through unchanged, as
they do in timm. The class token's row over the patch keys is the map.

``last``: the last block's attention from the read-out rows over the patch keys (CaiT: the last
class-attention block's single query, whose keys are ``[cls, patches]``).

Read-out
--------
- class-token pooling: the class token's row (distilled DeiT: the mean of the class and
  distillation tokens' rows, as its evaluation logits average their two heads);
- ``avg`` pooling: the mean of the rows of the tokens the pool averages (the patch tokens, or
  every token with ``pool_include_prefix``);
- ``map`` pooling or no pooling: the mean over every query row (the attention-pooling head's own
  attention is not part of ``attention_maps``, so it is not included).

``heads=True`` keeps one map per head of the last block (``rollout``: the earlier blocks are
head-averaged and only the last block is split by head, since head ``h`` of one block has
nothing to do with head ``h`` of another).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from converters.errors import InvalidArgumentError, VitportError
from converters.specs import CaiTSpec, grid_for

from .preprocess import ImageSource, image_name, load_image

if TYPE_CHECKING:
    from .api import JaxModel

METHODS = ("rollout", "last")
MIN_PANEL_SIDE = 224  # small inputs are shown enlarged by an integer factor to at least this
OVERLAY_ALPHA = 0.55  # weight of the colour map over the image
PANEL_GAP = 4  # pixels between the panels of a --heads grid

# matplotlib's "viridis" (perceptually uniform; entries round(k * 255 / 16) of its 256, as 8-bit RGB),
# interpolated linearly between the 17 stops.
VIRIDIS = np.array([
    (68, 1, 84), (72, 24, 106), (71, 45, 123), (66, 64, 134), (59, 82, 139), (51, 99, 141), (44, 114, 142),
    (38, 130, 142), (33, 145, 140), (31, 159, 136), (39, 173, 129), (61, 188, 116), (92, 200, 99),
    (129, 211, 77), (170, 220, 50), (213, 226, 26), (253, 231, 37)], dtype=np.float64)


class AttentionMapError(VitportError, ValueError):
    """A model's attention cannot be drawn over its patch grid."""


# ------------------------------------------------------------------------------- maths


def _residual(a: np.ndarray) -> np.ndarray:
    """``a + I`` with rows re-normalised to sum 1 (the residual connection, as the recipe has it)."""
    a = a + np.eye(a.shape[-1])
    return a / a.sum(-1, keepdims=True)


def _roll(layers: Sequence[np.ndarray], heads: bool) -> np.ndarray:
    """Rollout of self-attention blocks (each (B, H, T, T)) -> (B, T, T), or (B, H, T, T) with
    the last block split by head."""
    b, _, t, _ = layers[0].shape
    rolled = np.broadcast_to(np.eye(t), (b, t, t))
    for a in layers[:-1]:
        rolled = _residual(a.mean(1)) @ rolled
    last = layers[-1]
    return _residual(last) @ rolled[:, None] if heads else _residual(last.mean(1)) @ rolled


def _rows(spec: Any, num_tokens: int) -> tuple[np.ndarray, str]:
    """The query rows the classifier reads (averaged), and how they were chosen."""
    prefix = spec.num_prefix_tokens
    if isinstance(spec, CaiTSpec):
        if spec.pool == "avg":
            return np.arange(num_tokens), "the mean of the patch tokens' rows (CaiT with avg pooling)"
        return np.array([0]), "the class token's row"
    if spec.pool == "token":
        if spec.distilled:
            return (np.array([0, prefix - 1]),
                    "the mean of the class and distillation tokens' rows (the logits average their two heads)")
        return np.array([0]), "the class token's row"
    if spec.pool == "avg":
        if spec.pool_include_prefix:
            return np.arange(num_tokens), "the mean of every token's row (avg pooling including prefix tokens)"
        return np.arange(prefix, num_tokens), "the mean of the patch tokens' rows (avg pooling)"
    what = "'map' attention pooling, whose own attention is not included" if spec.pool == "map" else "no pooling"
    return np.arange(num_tokens), f"the mean of every token's row ({what})"


def _blocks(maps: Mapping[str, Any], prefix: str) -> list[np.ndarray]:
    names = sorted((k for k in maps if k.startswith(prefix + ".") and k[len(prefix) + 1:].isdigit()),
                   key=lambda k: int(k[len(prefix) + 1:]))
    return [np.asarray(maps[k], dtype=np.float64) for k in names]


def patch_weights(maps: Mapping[str, Any], spec: Any, method: str = "rollout",
                  heads: bool = False) -> tuple[np.ndarray, str]:
    """From ``jm.attention_maps(x)``: ``(B, K, patches)`` weights over the patch tokens (K = 1,
    or the number of heads with ``heads``), in float64, and a sentence saying which rows were
    read. Prefix tokens are dropped from the key axis after the rollout; nothing is rescaled."""
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    blocks = _blocks(maps, "blocks")
    if not blocks:
        raise AttentionMapError("the model has no attention blocks to map")
    if isinstance(spec, CaiTSpec):
        return _cait(blocks, _blocks(maps, "blocks_token_only"), spec, method, heads)
    tokens = blocks[0].shape[-1]
    prefix = spec.num_prefix_tokens
    rows, read = _rows(spec, tokens)
    if method == "rollout":
        rolled = _roll(blocks, heads)
    else:
        rolled = blocks[-1] if heads else blocks[-1].mean(1)
    if not heads:
        rolled = rolled[:, None]
    return rolled[:, :, rows, prefix:].mean(2), read


def _cait(blocks: list[np.ndarray], cls_blocks: list[np.ndarray], spec: CaiTSpec, method: str,
          heads: bool) -> tuple[np.ndarray, str]:
    rows, read = _rows(spec, blocks[0].shape[-1])
    if spec.pool == "avg" or not cls_blocks:  # the patch tokens are what is pooled
        if not cls_blocks and spec.pool != "avg":
            raise AttentionMapError("this CaiT has no class-attention blocks, so no class token to read")
        rolled = _roll(blocks, heads) if method == "rollout" else (blocks[-1] if heads else blocks[-1].mean(1))
        if not heads:
            rolled = rolled[:, None]
        return rolled[:, :, rows, :].mean(2), read
    last = cls_blocks[-1][:, :, 0, :]  # (B, H, 1 + N): the single query over [cls, patches]
    if method == "last":
        picked = last if heads else last.mean(1, keepdims=True)
        return picked[..., 1:], "the last class-attention block's query (the class token)"
    patches = _roll(blocks, False)  # (B, N, N)
    b, n = patches.shape[0], patches.shape[-1]
    cls = np.zeros((b, 1, 1 + n))
    cls[..., 0] = 1.0  # the class token joins as itself

    def update(cls_row: np.ndarray, a: np.ndarray) -> np.ndarray:  # a: (B, K, 1 + N), rows sum 1
        a = a.copy()
        a[..., 0] += 1.0
        a /= a.sum(-1, keepdims=True)
        through_patches = np.concatenate([np.zeros((*a.shape[:2], 1)), a[..., 1:] @ patches], axis=-1)
        return a[..., :1] * cls_row + through_patches

    for c in cls_blocks[:-1]:
        cls = update(cls, c[:, :, 0, :].mean(1, keepdims=True))
    cls = update(cls, last if heads else last.mean(1, keepdims=True))
    return cls[..., 1:], read


# --------------------------------------------------------------------------- per model


def _grid(jm: "JaxModel", x: np.ndarray) -> tuple[int, int]:
    return grid_for(jm.spec, x.shape[1], x.shape[2])


def patch_attention(jm: "JaxModel", x: Any, method: str = "rollout",
                    heads: bool = False) -> np.ndarray:
    """``(B, K, grid_h, grid_w)`` attention over the patch grid for a preprocessed NHWC batch
    (K = 1, or one map per head with ``heads``); see the module's docstring for the methods."""
    return _patch_attention(jm, x, method, heads)[0]


def _patch_attention(jm: "JaxModel", x: Any, method: str, heads: bool) -> tuple[np.ndarray, str]:
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    x = jm.as_input(x)
    weights, read = patch_weights(jm.attention_maps(x), jm.spec, method, heads)
    gh, gw = _grid(jm, x)
    if weights.shape[-1] != gh * gw:
        raise AttentionMapError(f"the attention covers {weights.shape[-1]} patch tokens, which do not form "
                                f"the {gh}x{gw} patch grid of a {x.shape[1]}x{x.shape[2]} input")
    return weights.reshape(*weights.shape[:2], gh, gw), read


# ------------------------------------------------------------------------------ drawing


def colour_map(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] through viridis."""
    pos = np.clip(values, 0.0, 1.0) * (len(VIRIDIS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(VIRIDIS) - 2)
    frac = (pos - lo)[..., None]
    return np.rint(VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac).astype(np.uint8)


def _normalised(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def overlay(pixels: np.ndarray, grid_map: np.ndarray, alpha: float = OVERLAY_ALPHA) -> Image.Image:
    """``pixels`` (H, W, 3) uint8 with ``grid_map`` (gh, gw) stretched to min..max, resized
    bilinearly over it and blended in viridis."""
    h, w = pixels.shape[:2]
    heat = Image.fromarray(_normalised(np.asarray(grid_map, np.float64)).astype(np.float32), "F")
    heat = np.asarray(heat.resize((w, h), Image.Resampling.BILINEAR), np.float64)
    blended = (1 - alpha) * pixels.astype(np.float64) + alpha * colour_map(heat).astype(np.float64)
    return Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8), "RGB")


def _label(img: Image.Image, text: str) -> None:
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((3, 2), text)
    draw.rectangle((0, 0, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))


@dataclass
class AttentionPicture:
    image: Image.Image  # the picture: one panel, or a grid of one panel per head
    maps: np.ndarray  # (K, grid_h, grid_w) float64 weights over the patch grid, as computed
    method: str
    read_out: str  # which query rows were read
    panel_size: tuple[int, int]  # (height, width) of one panel
    scale: int  # each model pixel is scale x scale picture pixels


def attention_image(jm: "JaxModel", image: ImageSource, method: str = "rollout",
                    heads: bool = False) -> AttentionPicture:
    """The image as the model sees it (timm's eval resize and crop, before normalisation) with
    its attention as a heat map. Small inputs are enlarged by an integer factor (nearest
    neighbour) so a panel's shorter side is at least ``MIN_PANEL_SIDE`` pixels; with ``heads``
    the panels (one per head, each stretched to its own min..max) form a labelled grid."""
    from .images import eval_transform

    transform = eval_transform(jm)
    name = image_name(image)
    pixels = transform.pixels(load_image(image), name)  # exactly what is normalised and fed to the model
    x = _normalise(transform, pixels)  # = transform(image): /255 and Normalize as timm does
    maps, read = _patch_attention(jm, x[None], method, heads)
    maps = maps[0]
    h, w = pixels.shape[:2]
    scale = max(1, math.ceil(MIN_PANEL_SIDE / min(h, w)))
    if scale > 1:
        pixels = np.asarray(Image.fromarray(pixels).resize((w * scale, h * scale), Image.Resampling.NEAREST))
    panels = [overlay(pixels, m) for m in maps]
    if not heads:
        return AttentionPicture(panels[0], maps, method, read, pixels.shape[:2], scale)
    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    ph, pw = pixels.shape[:2]
    grid = Image.new("RGB", (cols * pw + (cols - 1) * PANEL_GAP, rows * ph + (rows - 1) * PANEL_GAP),
                     (255, 255, 255))
    for i, panel in enumerate(panels):
        _label(panel, f"head {i}")
        grid.paste(panel, ((i % cols) * (pw + PANEL_GAP), (i // cols) * (ph + PANEL_GAP)))
    return AttentionPicture(grid, maps, method, read, (ph, pw), scale)


def _normalise(transform: Any, pixels: np.ndarray) -> np.ndarray:
    """The transform's ``/ 255`` and Normalize on already resized and cropped pixels."""
    x = pixels.astype(np.float32) / np.float32(255)
    return (x - np.asarray(transform.mean, np.float32)) / np.asarray(transform.std, np.float32)


# Formats that store an RGB picture of any size as it is (ICO caps it at 256 pixels, XBM is 1-bit,
# BLP, MSP, PALM and others refuse RGB or write nothing useful)
PICTURE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")


def image_format(out: str | os.PathLike) -> str:
    """The Pillow format ``out``'s suffix names (PNG when it has none); refuses any other than
    ``PICTURE_FORMATS``."""
    suffix = Path(out).suffix.lower()
    if not suffix:
        return "PNG"
    fmt = Image.registered_extensions().get(suffix)
    if fmt not in PICTURE_FORMATS:
        known = sorted(e for e, f in Image.registered_extensions().items() if f in PICTURE_FORMATS)
        raise InvalidArgumentError(f"--out {out}: vitport writes attention pictures as {', '.join(known)}, "
                                   f"not {suffix}; use .png")
    return fmt


def write_attention_image(jm: "JaxModel", image: ImageSource, out: str | os.PathLike, *,
                          method: str = "rollout", heads: bool = False, force: bool = False,
                          reading: Sequence[str | os.PathLike] = ()) -> AttentionPicture:
    """``attention_image`` written to ``out`` all or nothing: a temporary file next to it,
    renamed when complete; an existing ``out`` is refused unless ``force`` (and never a link, a
    folder or the image being read)."""
    from converters.checkpoint_io import atomic_file, check_output

    sources = [*reading, *([image] if isinstance(image, (str, os.PathLike)) else [])]
    check_output(out, force, kind="file", reading=sources)
    fmt = image_format(out)
    picture = attention_image(jm, image, method, heads)
    with atomic_file(out, force, reading=sources) as tmp:
        picture.image.save(tmp, format=fmt)
    return picture
