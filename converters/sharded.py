"""Sharded checkpoints: the hub's ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``
layout, read shard by shard, and written for vitport's own large folders.

An index is ``{"metadata": {"total_size": BYTES}, "weight_map": {key: shard file name}}`` next to
its shards (``model-00001-of-00003.safetensors``, ...); huggingface_hub's
``save_torch_state_dict(state_dict, folder, max_shard_size=...)`` and transformers write it.
Reading goes one shard at a time, so memory holds the weights once (never a shard's file
buffer and the whole state_dict twice); writing splits with huggingface_hub's own
``split_state_dict_into_shards_factory`` (the same split and names as ``save_torch_state_dict``).
``weights_nbytes`` says how much memory the weights need before any data is read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .errors import CheckpointError, InvalidArgumentError, MissingFileError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
INDEX_FILES = (SAFETENSORS_INDEX, TORCH_INDEX)
SHARD_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's default names
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_MAX_SHARD_SIZE = 2 * 10**9  # "2GB" in huggingface_hub's decimal units: larger folders are written in shards
MAX_SHARD_SIZE_ENV = "VITPORT_MAX_SHARD_SIZE"

Progress = Callable[[int, int], None]  # (done, total)


def is_index(path: str | os.PathLike) -> bool:
    return str(path).endswith(".index.json")


def read_index(path: str | os.PathLike) -> dict[str, Path]:
    """``{key: shard path}`` of an index file; every shard checked to exist."""
    from .checkpoint_io import read_json

    path = Path(path)
    data = read_json(path)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path}: 'weight_map' must be a non-empty JSON object of tensor name -> shard "
                              "file name; the index is damaged (download or write it again)")
    out = {}
    for key, name in weight_map.items():
        if Path(name).name != name or name in ("", ".", ".."):  # shards sit next to the index, nowhere else
            raise CheckpointError(f"{path}: shard {name!r} of {key!r} is not a file name in the index's folder")
        out[key] = path.parent / name
    missing = sorted({p.name for p in out.values() if not p.is_file()})
    if missing:
        raise MissingFileError(f"{path} lists shards that are not in {path.parent}: {', '.join(missing)}. "
                               "Download or copy every shard the index names (hf download REPO fetches them all)")
    return out


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The shards of an index, in their order of first appearance."""
    return list(dict.fromkeys(read_index(path).values()))


def iter_shards(path: str | os.PathLike, progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Each shard's tensors (numpy, checkpoint dtypes, wrapper prefixes stripped), one shard at
    a time. A shard holding keys its index does not give it is refused."""
    from .checkpoint_io import read_state_dict

    weight_map = read_index(path)
    shards = list(dict.fromkeys(weight_map.values()))
    for i, shard in enumerate(shards):
        tensors = read_state_dict(shard)
        stray = [k for k in tensors if weight_map.get(k) != shard]
        if stray:
            raise CheckpointError(f"{shard.name} holds tensors its index {Path(path).name} places elsewhere or "
                                  f"not at all: {', '.join(stray[:10])}; the checkpoint is inconsistent")
        if progress:
            progress(i + 1, len(shards))
        yield tensors


def read_sharded(path: str | os.PathLike, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a sharded checkpoint, read shard by shard (one copy in memory)."""
    out: dict[str, np.ndarray] = {}
    for tensors in iter_shards(path, progress):
        out.update(tensors)
    return out


def header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """``{key: (shape, dtype)}`` of a safetensors file or safetensors index, without reading data;
    None for torch files (their shapes need the data)."""
    from .checkpoint_io import safetensors_header

    path = Path(path)
    if path.name.endswith(".safetensors"):
        return safetensors_header(path)[0]
    if is_index(path) and all(p.name.endswith(".safetensors") for p in shard_files(path)):
        out: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in shard_files(path):
            out.update(safetensors_header(shard)[0])
        return out
    return None


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def weights_nbytes(path: str | os.PathLike) -> int:
    """Bytes the weights take in memory, from headers (safetensors) or file sizes (torch)."""
    path = Path(path)
    info = header(path)
    if info is not None:
        return sum(int(np.prod(s, dtype=np.int64)) * _ITEMSIZE.get(d, 4) for s, d in info.values())
    files = shard_files(path) if is_index(path) else [path]
    return sum(p.stat().st_size for p in files)


def files_of(path: str | os.PathLike) -> list[Path]:
    """Every file a weights path stands for: itself, or an index and its shards."""
    path = Path(path)
    return [path, *shard_files(path)] if is_index(path) else [path]


# ----------------------------------------------------------------------------- writing


def max_shard_bytes(max_shard_size: int | str | None = None) -> int:
    """``max_shard_size`` (bytes, or ``"2GB"``, ``"500MB"``) else ``$VITPORT_MAX_SHARD_SIZE`` else 2 GB."""
    value = max_shard_size if max_shard_size is not None else os.environ.get(MAX_SHARD_SIZE_ENV,
                                                                             DEFAULT_MAX_SHARD_SIZE)
    try:
        if isinstance(value, int) or str(value).strip().isdigit():
            n = int(value)
        else:  # imported only here: huggingface_hub.serialization takes ~20 ms to import
            from huggingface_hub.serialization._base import parse_size_to_int

            n = parse_size_to_int(str(value))
    except ValueError:
        n = 0
    if n <= 0:
        raise InvalidArgumentError(f"max shard size must be a positive number of bytes or a size such as '2GB' "
                                   f"or '500MB' (units KB, MB, GB, TB); got {value!r}")
    return n


def _nbytes(a: Any) -> int:
    return int(a.nbytes) if hasattr(a, "nbytes") else int(np.asarray(a).nbytes)


def write_shards(tensors: Mapping[str, Any], folder: str | os.PathLike, *, max_shard_size: int | str | None = None,
                 metadata: Mapping[str, str] | None = None, single_name: str = "model.safetensors") -> list[str]:
    """Write ``tensors`` into ``folder`` (not atomic: call it inside ``atomic_dir``): one
    ``single_name`` file when they fit in one shard, else shards and ``model.safetensors.index.json``
    in huggingface_hub's layout. Returns the file names written."""
    from .writer import write_json, write_safetensors

    folder = Path(folder)
    limit = max_shard_bytes(max_shard_size)
    if sum(_nbytes(a) for a in tensors.values()) <= limit:  # one shard: no split to plan
        write_safetensors(tensors, folder / single_name, metadata)
        return [single_name]
    from huggingface_hub import split_state_dict_into_shards_factory

    split = split_state_dict_into_shards_factory(
        dict(tensors), get_storage_size=_nbytes, filename_pattern=SHARD_PATTERN,
        max_shard_size=limit)
    for name, keys in split.filename_to_tensors.items():
        write_safetensors({k: tensors[k] for k in keys}, folder / name, metadata)
    write_json({"metadata": {**(metadata or {}), "total_size": split.metadata["total_size"]},
                "weight_map": split.tensor_to_filename}, folder / SAFETENSORS_INDEX)
    return [*split.filename_to_tensors, SAFETENSORS_INDEX]


def describe_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
