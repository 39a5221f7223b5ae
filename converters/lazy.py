"""Tensors read on demand from safetensors files.

A conversion that reads the whole checkpoint before moving it to the device holds it twice at
its peak (the host copy and the device copy). ``lazy_state_dict`` instead gives each tensor as a
``LazyTensor``: its shape and dtype come from the file's header (so keys and shapes are checked
before any data is read), and its bytes are read with one ``pread`` when the tensor is placed,
then dropped. Safetensors' own parser validates every header first, so a corrupt file gives the
same error as an eager read.

The layout read here is the documented safetensors format: an 8-byte little-endian header
length, a JSON header of ``{name: {dtype, shape, data_offsets: [begin, end]}}``, then the data,
offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .errors import CheckpointError


def _dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    return {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
            "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
            "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_)}


class LazyTensor:
    """A tensor computed on first use: ``shape`` and ``dtype`` are known, ``load()`` reads it.

    ``map(fn)`` gives another lazy tensor, ``fn`` applied after the read (a transpose, a cast)."""

    __slots__ = ("shape", "dtype", "_load")

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: np.dtype):
        self._load, self.shape, self.dtype = load, tuple(shape), np.dtype(dtype)

    def load(self) -> np.ndarray:
        return self._load()

    def map(self, fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...] | None = None,
            dtype: Any = None) -> "LazyTensor":
        return LazyTensor(lambda: fn(self._load()), self.shape if shape is None else shape,
                          self.dtype if dtype is None else dtype)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


def materialize(value: Any) -> Any:
    """``value`` itself, or the array a ``LazyTensor`` stands for."""
    return value.load() if isinstance(value, LazyTensor) else value


# XLA's CPU client takes a host array of this alignment as the device buffer itself instead of
# copying it (jax.device_put); numpy's own allocations are only 16-byte aligned.
DEVICE_ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a ``DEVICE_ALIGNMENT`` boundary."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + DEVICE_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % DEVICE_ALIGNMENT
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray) -> np.ndarray:
    """``a`` copied once into an ``aligned_empty`` array (a transpose is laid out here too)."""
    out = aligned_empty(a.shape, a.dtype)
    np.copyto(out, a)
    return out


def _reader(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        a = aligned_empty(shape, dtype)  # read straight into a buffer the device can take as it is
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(memoryview(a.reshape(-1).view(np.uint8))) if a.nbytes else 0
        if got != a.nbytes:
            raise CheckpointError(f"{path} is shorter than its header says (truncated); download or copy it again")
        return a

    return load


def tensor_refs(path: str | Path) -> dict[str, LazyTensor] | None:
    """Every tensor of one safetensors file, lazily; None when a dtype is one numpy cannot
    hold (the caller then reads the file eagerly)."""
    from .checkpoint_io import _corrupt, safetensors_header

    path = Path(path)
    info, _ = safetensors_header(path)  # safetensors' own validation of the header
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise _corrupt(path, e) from None
    dtypes, base, size = _dtypes(), 8 + n, path.stat().st_size
    refs = {}
    for key, (shape, dtype) in info.items():
        if dtype not in dtypes:
            return None
        begin, end = header[key]["data_offsets"]
        if end - begin != math.prod(shape) * dtypes[dtype].itemsize or base + end > size:
            raise _corrupt(path, ValueError(f"tensor {key}: data offsets do not match its shape"))
        refs[key] = LazyTensor(_reader(path, base + begin, shape, dtypes[dtype]), shape, dtypes[dtype])
    return refs


def lazy_state_dict(path: str | Path) -> dict[str, LazyTensor] | None:
    """A ``.safetensors`` file or a ``model.safetensors.index.json`` checkpoint as lazy tensors
    (wrapper prefixes stripped, as ``read_state_dict`` does); None for anything else (torch
    files are read whole)."""
    from .checkpoint_io import strip_wrapper_prefixes
    from .sharded import is_index, read_index

    path = Path(path)
    if is_index(path):
        weight_map = read_index(path)
        if not all(p.name.endswith(".safetensors") for p in weight_map.values()):
            return None
        refs: dict[str, LazyTensor] = {}
        for shard in dict.fromkeys(weight_map.values()):
            tensors = tensor_refs(shard)
            if tensors is None:
                return None
            stray = [k for k in tensors if weight_map.get(k) != shard]
            if stray:
                raise CheckpointError(f"{shard.name} holds tensors its index {path.name} places elsewhere or "
                                      f"not at all: {', '.join(stray[:10])}; the checkpoint is inconsistent")
            refs.update(tensors)
        return strip_wrapper_prefixes(refs)
    if path.name.lower().endswith(".safetensors"):
        refs = tensor_refs(path)
        return None if refs is None else strip_wrapper_prefixes(refs)
    return None


def shapes_of(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(n) for n in np.shape(v)) for k, v in tree.items()}
