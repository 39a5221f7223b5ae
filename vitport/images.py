"""From image files to answers: timm's preprocessing, top-k predictions, pre-logit embeddings.

``JaxModel.preprocess`` / ``predict`` / ``embed`` call these; ``vitport predict`` and
``vitport embed`` too. ``write_embeddings`` streams features to disk, so memory stays flat
however many images a folder holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from converters.errors import InvalidArgumentError, MissingFileError

from .labels import class_labels
from .preprocess import EvalTransform, ImageError, ImageSource, as_list, image_name, load_image, preprocess

if TYPE_CHECKING:
    from .api import JaxModel

DEFAULT_BATCH_SIZE = 32
Progress = Callable[[int, int], None]  # (images done, images in all)
OnSkip = Callable[[str, str], None]  # (path, reason)


class Prediction(NamedTuple):
    """One of an image's top-k classes; a plain ``(index, label, probability)`` tuple too."""

    index: int
    label: str
    probability: float


# --------------------------------------------------------------------------- per model


def eval_transform(jm: "JaxModel") -> EvalTransform:
    """timm's eval transform for a model: its pretrained_cfg at the image size it was converted
    for (``input_size`` may still name the checkpoint's default size when timm kwargs or
    ``img_size`` changed the model; timm's own transform would then not fit it)."""
    if jm.spec.channels != 3:
        raise InvalidArgumentError(f"image preprocessing needs an RGB model, this one takes {jm.spec.channels} channels")
    return EvalTransform.from_pretrained_cfg(jm.pretrained_cfg, jm.spec.image_size)


def _forward_fn(jm: "JaxModel"):
    """A jitted ``(params, x) -> (logits, pre_logits)``: predict and embed share one compile
    per batch shape, and XLA drops the other intermediates. Cached on the instance, like
    ``JaxModel.apply_fn``."""
    fn = jm.__dict__.get("_vitport_forward")
    if fn is None:
        from . import xla_options

        apply = jm.apply_fn

        def forward(params, x):
            logits, acts = apply(params, x, return_intermediates=True)
            return logits, acts["pre_logits"]

        fn = jm.__dict__["_vitport_forward"] = xla_options.jit(forward, jm.compiler_options)
    return fn


def _run(jm: "JaxModel", x: np.ndarray, what: str):
    """Logits or pre-logits of a float32 NHWC batch (cast to the params' dtype), as a device
    array that is not waited for (JAX dispatches asynchronously)."""
    import jax.numpy as jnp

    logits, pre_logits = _forward_fn(jm)(jm.params, jnp.asarray(x, dtype=jm.input_dtype))
    return logits if what == "logits" else pre_logits


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """Pad a short last batch with zero images so every call has one shape (one compile)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])


def _outputs(jm: "JaxModel", images: list[ImageSource], what: str, batch_size: int,
             progress: Progress | None = None) -> Iterator[np.ndarray]:
    """Model outputs per batch of images; while the model runs on one batch the next is decoded."""
    transform = eval_transform(jm)
    size = min(batch_size, len(images))
    pending = None
    done = 0
    progress and progress(0, len(images))
    for batch in _batches(images, size):
        x = preprocess(batch, transform)
        result = _run(jm, _padded(x, size), what)
        if pending is not None:
            yield np.asarray(pending[0])[:pending[1]]
            done += pending[1]
            progress and progress(done, len(images))
        pending = (result, len(batch))
    if pending is not None:
        yield np.asarray(pending[0])[:pending[1]]
        progress and progress(len(images), len(images))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def prediction_setup(jm: "JaxModel", items: Sequence[Any], top_k: int) -> tuple[list[str], int]:
    """Check a predict call (images given, a classifier head, top_k >= 1); return the class
    labels and how many classes to report."""
    if not items:
        raise InvalidArgumentError("predict needs at least one image")
    num_classes = jm.spec.num_classes
    if num_classes < 1:
        raise InvalidArgumentError("this model has no classifier head (num_classes=0); use embed for features")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidArgumentError(f"top_k must be an integer of at least 1, got {top_k!r}")
    return class_labels(jm.pretrained_cfg, num_classes), min(top_k, num_classes)


def predict(jm: "JaxModel", images: ImageSource | Iterable[ImageSource], top_k: int = 5,
            batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress | None = None) -> list[list[Prediction]]:
    """For each image (a path or PIL image; one or a list), its ``top_k`` classes as
    ``Prediction(index, label, probability)`` sorted by probability (softmax of the logits)."""
    items = as_list(images)
    labels, k = prediction_setup(jm, items, top_k)
    results = []
    for logits in _outputs(jm, items, "logits", batch_size, progress):
        for p in softmax(logits):
            order = np.argsort(-p, kind="stable")[:k]  # ties: lower index first
            results.append([Prediction(int(i), labels[i], float(p[i])) for i in order])
    return results


def embed(jm: "JaxModel", images: ImageSource | Iterable[ImageSource],
          batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    """Pre-logit features (timm's ``forward_head(x, pre_logits=True)``), one row per image."""
    items = as_list(images)
    if not items:
        raise InvalidArgumentError("embed needs at least one image")
    return np.concatenate(list(_outputs(jm, items, "pre_logits", batch_size)))


# ------------------------------------------------------------------- folders to a file


def collect_images(sources: Sequence[str | os.PathLike]) -> list[tuple[Path, str]]:
    """``(file, name)`` for every file under the folders (recursively, sorted) and every file
    given. ``name`` is relative to the folder when a single folder is given, else the path as
    given (so names from several folders cannot collide)."""
    if not sources:
        raise InvalidArgumentError("no folder or image files given")
    single_folder = len(sources) == 1 and Path(sources[0]).is_dir()
    found: list[tuple[Path, str]] = []
    for source in sources:
        root = Path(source)
        if not root.exists():
            raise MissingFileError(f"{source}: no such file or folder")
        if not root.is_dir():
            found.append((root, os.fspath(source)))
            continue
        under = sorted((Path(folder, f).relative_to(root) for folder, _, files in os.walk(root) for f in files),
                       key=lambda rel: rel.parts)  # a/b/x before a/y before z, as a file browser lists them
        found += [(root / rel, rel.as_posix() if single_folder else (Path(source) / rel).as_posix()) for rel in under]
    if not found:
        raise ImageError(f"no files found in {', '.join(map(os.fspath, sources))}")
    return found


@contextlib.contextmanager
def feature_rows(out: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``out`` that the feature rows stream into (gone when closed). A
    failed write to it (a full disk, a folder that cannot be written) raises the error a failed
    write of ``out`` itself gives."""
    from converters.writer import write_error

    try:
        rows = tempfile.TemporaryFile(dir=out.parent, prefix=f".{out.name}.features-")
    except OSError as e:
        raise write_error(out, e) from None
    with rows:
        try:
            yield rows
        except OSError as e:  # only the rows' writes raise OSError here: images fail as ImageError
            raise write_error(out, e) from None


def _append(rows: BinaryIO, result: Any, n: int, dim: int, dtype: Any) -> None:
    rows.write(np.ascontiguousarray(np.asarray(result)[:n].reshape(n, dim), dtype=dtype).tobytes())


def write_npz(path: str | os.PathLike, paths: np.ndarray, rows: BinaryIO, shape: tuple[int, int],
              dtype: Any) -> None:
    """The .npz ``np.savez`` would write for ``paths`` and ``features``, with the features'
    C-order bytes copied from the file ``rows`` in chunks rather than from an array in memory."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("paths.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, paths, allow_pickle=False)
        with zf.open("features.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            shutil.copyfileobj(rows, f, 16 << 20)


@dataclass
class EmbedResult:
    out: Path
    num_images: int
    dim: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else float("inf")


def write_embeddings(jm: "JaxModel", sources: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                     batch_size: int = DEFAULT_BATCH_SIZE, force: bool = False,
                     progress: Progress | None = None, on_skip: OnSkip | None = None,
                     reading: Sequence[str | os.PathLike] = ()) -> EmbedResult:
    """Embed every image under ``sources`` into ``out`` (.npz with ``paths`` and ``features``).

    Files that are not readable images are skipped (``on_skip(name, reason)``) and listed in
    the result. Features stream into a temporary file next to ``out`` as batches finish, and
    are copied into the ``.npz`` in chunks at the end: memory holds one batch of images and
    features, however many there are. ``out`` appears only complete (written to a temporary
    file, then renamed); on any error or Ctrl-C nothing is left behind. ``reading``: other paths
    ``out`` may not replace (the model's own files, ``vitport.hub.sources_read``).
    """
    import jax

    from converters.checkpoint_io import atomic_file, check_output

    reading = [*sources, *reading]
    out = check_output(out, force, kind="file", reading=reading)  # refuse before reading anything
    files = collect_images(sources)
    transform = eval_transform(jm)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    size = min(batch_size, len(files))
    shape = jax.eval_shape(_forward_fn(jm), jm.params,
                           jax.ShapeDtypeStruct((size, *transform.input_size, 3), jm.input_dtype))[1].shape
    dim = int(np.prod(shape[1:]))
    dtype = np.float64 if np.dtype(jm.dtype) == np.float64 else np.float32  # bf16/f16 stored as float32
    skipped: list[tuple[str, str]] = []
    names: list[str] = []
    start = time.perf_counter()

    # Rows are appended to a raw temporary file as batches finish (written, not mapped, so
    # they do not stay resident), then copied into the .npz's features.npy in chunks.
    with feature_rows(out) as rows:
        pending = None  # (device array, rows) of the batch in flight
        done = 0
        progress and progress(0, len(files))
        for batch in _batches(files, size):
            pixels, batch_names = [], []
            for path, name in batch:
                try:
                    pixels.append(transform(load_image(path), name))
                    batch_names.append(name)
                except (ImageError, MissingFileError) as e:  # reported, not fatal
                    skipped.append((name, str(e)))
                    on_skip and on_skip(name, str(e))
            result = _run(jm, _padded(np.stack(pixels), size), "pre_logits") if pixels else None
            if pending is not None:  # store the previous batch while this one runs
                _append(rows, *pending, dim, dtype)
                pending = None
            if result is not None:
                pending = (result, len(batch_names))
                names.extend(batch_names)
            done += len(batch)
            progress and progress(done, len(files))
        if pending is not None:
            _append(rows, *pending, dim, dtype)
        if not names:
            raise ImageError(f"none of the {len(files)} files in {', '.join(map(os.fspath, sources))} "
                             "is an image Pillow can read")
        rows.seek(0)
        with atomic_file(out, force, reading=reading) as tmp:
            write_npz(tmp, np.array(names, dtype=str), rows, (len(names), dim), dtype)
    return EmbedResult(out, len(names), dim, time.perf_counter() - start, skipped)
