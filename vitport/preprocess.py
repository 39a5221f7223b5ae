"""timm's evaluation transform in Pillow + numpy (no torch): the same pixels timm feeds its models.

``timm.data.create_transform(**timm.data.resolve_data_config(...))`` on a checkpoint's
``pretrained_cfg`` does, for ``is_training=False`` (``timm/data/transforms_factory.py``,
``transforms_imagenet_eval``)::

    scale = floor(size / crop_pct) per side
    crop_mode 'center'  Resize(shortest side -> scale) (square target) or ResizeKeepRatio(scale)
                        (non-square target), then CenterCrop(size)
    crop_mode 'squash'  Resize(both sides -> scale), then CenterCrop(size)
    crop_mode 'border'  ResizeKeepRatio(scale, longest=1), then CenterCropOrPad(size, fill=255*mean)
    ToTensor (/255), Normalize(mean, std)

and timm's datasets call ``img.convert('RGB')`` first. torchvision resizes a PIL image with
PIL's own ``Image.resize`` and the same filter, so calling Pillow here gives the very pixels
timm gets; crops and pads only move pixels, so they are done in numpy. The size arithmetic
below copies torchvision's and timm's line by line (``int()`` truncation, Python's ``round``).
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np
from PIL import Image

from converters.errors import InvalidArgumentError, MissingFileError, VitportError
from converters.validate import INTERPOLATIONS, preprocessing_problems

ImageSource = Union[str, os.PathLike, Image.Image]

# timm.data.constants and resolve_data_config's defaults for keys a pretrained_cfg lacks.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875
DEFAULT_CROP_MODE = "center"
DEFAULT_INTERPOLATION = "bicubic"

# timm's interpolation names -> torchvision InterpolationMode -> the PIL filter torchvision uses
# (the same name in upper case).
PIL_FILTERS = {name: Image.Resampling[name.upper()] for name in INTERPOLATIONS}


class ImageError(VitportError, ValueError):
    """An image cannot be used: corrupt, not an image, a mode Pillow cannot convert, or too thin
    to resize. The message names the file."""


# ------------------------------------------------------------------------------ reading


def image_name(source: Any) -> str:
    """How an input is named in messages and outputs: its path, or a PIL image's file name."""
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or f"<PIL image {source.mode} {source.width}x{source.height}>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path or a PIL image, converted as timm's datasets do
    (``img.convert('RGB')``: greyscale is repeated, alpha dropped, palettes looked up, CMYK
    converted, 16-bit values above 255 saturate). Any failure is an ``ImageError`` (or
    ``MissingFileError``) naming the file."""
    name = image_name(source)
    if isinstance(source, Image.Image):
        try:
            return source.convert("RGB")
        except Exception as e:  # Pillow raises ValueError/OSError/... for modes it cannot convert
            raise ImageError(f"{name}: cannot convert image mode {source.mode!r} to RGB ({e})") from None
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidArgumentError(f"expected an image path or a PIL image, got {type(source).__name__}; "
                                   "arrays that are already preprocessed go straight to jm(x)")
    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"{name}: no such file")
    if path.is_dir():
        raise ImageError(f"{name} is a folder, not an image")
    kind = _special_file(path)
    if kind:  # opening a FIFO would wait for a writer forever
        raise ImageError(f"{name} is {kind}, not an image file")
    try:
        img = Image.open(path)  # reads the header only
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file Pillow can read") from None
    except Exception as e:  # unreadable file, decompression bomb, a plugin's own error type
        raise ImageError(f"{name}: cannot open the image ({type(e).__name__}: {e})") from None
    with img:
        try:
            return img.convert("RGB")  # decodes the pixels: truncated or corrupt data fails here
        except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error, ...
            raise ImageError(f"{name}: cannot decode this {img.format} image (mode {img.mode}) as RGB "
                             f"({type(e).__name__}: {e})") from None


def _special_file(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (after links): a FIFO, a socket, a device."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # Image.open reports it
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return None


# ---------------------------------------------------------------------------- transform


@dataclass(frozen=True)
class EvalTransform:
    """timm's evaluation transform for one set of preprocessing settings.

    ``EvalTransform.from_pretrained_cfg(cfg)`` resolves the settings as
    ``timm.data.resolve_data_config(pretrained_cfg=cfg)`` does; calling the transform on an
    image gives the float32 (H, W, 3) array that timm's transform gives as (3, H, W).
    """

    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    crop_pct: float = DEFAULT_CROP_PCT
    crop_mode: str = DEFAULT_CROP_MODE
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self):
        settings = {"mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct,
                    "crop_mode": self.crop_mode, "interpolation": self.interpolation}
        bad = preprocessing_problems(settings, self.input_size)
        if not self.crop_pct or not self.crop_mode or not self.interpolation or not (self.mean and self.std):
            bad.append("every setting needs a value (pretrained_cfg's falsy ones fall back to timm's defaults "
                       "in from_pretrained_cfg)")
        if bad:
            raise InvalidArgumentError("invalid preprocessing settings: " + "; ".join(bad))

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any],
                            image_size: Sequence[int] | None = None) -> "EvalTransform":
        """Settings from a pretrained_cfg with resolve_data_config's defaults (falsy values fall
        back, as there). ``image_size`` (H, W) overrides ``input_size``, e.g. with the size the
        converted model actually takes."""
        size = image_size if image_size is not None else (cfg.get("input_size") or (3, 224, 224))[-2:]
        bad = preprocessing_problems(cfg, tuple(size))
        if bad:  # checked before the conversions below, which would fail on them with Python's words
            raise InvalidArgumentError("invalid preprocessing values in the model's pretrained_cfg: " + "; ".join(bad))
        return cls(
            input_size=(int(size[0]), int(size[1])),
            mean=tuple(float(v) for v in (cfg.get("mean") or IMAGENET_DEFAULT_MEAN)),
            std=tuple(float(v) for v in (cfg.get("std") or IMAGENET_DEFAULT_STD)),
            crop_pct=float(cfg.get("crop_pct") or DEFAULT_CROP_PCT),
            crop_mode=cfg.get("crop_mode") or DEFAULT_CROP_MODE,
            interpolation=cfg.get("interpolation") or DEFAULT_INTERPOLATION,
        )

    @property
    def scale_size(self) -> tuple[int, int]:
        return tuple(math.floor(s / self.crop_pct) for s in self.input_size)  # type: ignore[return-value]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the image is resized to before the crop, as torchvision / timm compute it."""
        scale = self.scale_size
        if self.crop_mode == "squash":
            return scale
        if self.crop_mode == "border":
            return _keep_ratio_size(height, width, scale, longest=1.0)
        if scale[0] == scale[1]:  # torchvision Resize(int): shortest side, long side truncated
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = scale[0], int(scale[0] * long / short)
            return (new_long, new_short) if width <= height else (new_short, new_long)
        return _keep_ratio_size(height, width, scale, longest=0.0)

    def pixels(self, img: Image.Image, name: str = "image") -> np.ndarray:
        """Resized and cropped uint8 (H, W, 3) pixels of an RGB image (before /255 and Normalize)."""
        if img.width < 1 or img.height < 1:
            raise ImageError(f"{name}: the image is empty ({img.width}x{img.height} pixels)")
        h, w = self.resized_size(img.height, img.width)
        if h < 1 or w < 1:
            raise ImageError(f"{name}: a {img.width}x{img.height} image is too thin to resize to "
                             f"{self.input_size[1]}x{self.input_size[0]} (a side would be 0 pixels)")
        if (h, w) != (img.height, img.width):  # torchvision skips a resize to the same size
            img = img.resize((w, h), PIL_FILTERS[self.interpolation])
        fill = [round(255 * v) for v in self.mean] if self.crop_mode == "border" else [0, 0, 0]
        return center_crop_or_pad(np.asarray(img, dtype=np.uint8), self.input_size, fill)

    def __call__(self, img: Image.Image, name: str = "image") -> np.ndarray:
        """float32 (H, W, 3): ToTensor's ``/ 255`` then Normalize, both in float32 as torch does."""
        x = self.pixels(img, name).astype(np.float32) / np.float32(255)
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def _keep_ratio_size(height: int, width: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """timm.data.transforms.ResizeKeepRatio.get_params without its random parts."""
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(height / ratio), round(width / ratio)


def center_crop_or_pad(pixels: np.ndarray, size: tuple[int, int], fill: Sequence[int]) -> np.ndarray:
    """torchvision's CenterCrop / timm's CenterCropOrPad on an (H, W, C) array: pad with
    ``fill`` where the image is smaller (left/top get the smaller half), then crop the centre
    (offsets rounded with Python's ``round``, as there)."""
    crop_h, crop_w = size
    h, w = pixels.shape[:2]
    if crop_w > w or crop_h > h:
        top, left = max(crop_h - h, 0) // 2, max(crop_w - w, 0) // 2
        padded = np.empty((max(h, crop_h), max(w, crop_w), pixels.shape[2]), pixels.dtype)
        padded[...] = np.asarray(fill, pixels.dtype)
        padded[top:top + h, left:left + w] = pixels
        pixels, (h, w) = padded, padded.shape[:2]
    top, left = int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0))
    return pixels[top:top + crop_h, left:left + crop_w]


def as_list(images: ImageSource | Iterable[ImageSource]) -> list[ImageSource]:
    """One image (path or PIL image) or an iterable of them, as a list."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, np.ndarray):
        raise InvalidArgumentError("expected image paths or PIL images, got a numpy array; arrays that are "
                                   "already preprocessed go straight to jm(x)")
    if isinstance(images, (bytes, bytearray, memoryview)) or hasattr(images, "read") or not isinstance(images, Iterable):
        raise InvalidArgumentError(f"expected image paths or PIL images, got {type(images).__name__}; open "
                                   "bytes or a file object with PIL.Image.open first")
    return list(images)


def preprocess(images: ImageSource | Iterable[ImageSource], transform: EvalTransform) -> np.ndarray:
    """A float32 NHWC batch of one or more images (paths or PIL images)."""
    items = as_list(images)
    if not items:
        raise InvalidArgumentError("no images given")
    return np.stack([transform(load_image(item), image_name(item)) for item in items])
