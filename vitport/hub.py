"""Checkpoints in and out: ``load``, ``convert``, ``save``, ``export_timm``, ``describe``.

Every one of them is the same pipeline, one module per stage, each stage the one place that
enforces its guarantees:

1. **locate** (``converters.locate``): a timm name, ``hf-hub:`` repo, folder or file -> a
   ``Resolved`` (spec, preprocessing, weights path); config values checked; the hub reached
   through huggingface_hub's cache, failing fast and with offline instructions without network;
2. **read** (``converters.checkpoint_io``): the weights file -> a timm state_dict (safetensors
   with numpy, ``.pth`` only through ``torch.load(weights_only=True)``, wrapper prefixes
   stripped as timm does);
3. **map** (``converters.keymap``): state_dict -> canonical tree, every key and shape checked,
   with the ``model_args`` that would fit a checkpoint made for another configuration;
4. **place** (``vitport.place``): canonical tree -> JaxModel (resolution, dtype, framework names);
5. **write** (``converters.writer``): atomic, signal-safe output; ``--force`` replaces only
   what vitport wrote; usual permissions; disk errors reported with nothing left behind.

``converters.locate`` documents the sources; this module re-exports the names callers used to
import from here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from converters import (ConversionError, Spec, canonical_to_timm, flat_keys, framework_to_canonical, unflatten_keys,
                        unstack_blocks)
from converters.architectures import arch_spec
from converters.checkpoint_io import check_shapes, preprocessing, read_canonical, read_state_dict, safetensors_header
from converters.errors import (CheckpointError, HubError, HubUnreachableError,  # noqa: F401  (re-exported)
                               InvalidArgumentError, MissingFileError, UnsupportedArchitectureError)
from converters.locate import (CONFIG_NAME, FORMAT, FORMAT_VERSION, HUB_PREFIX,  # noqa: F401  (re-exported)
                               SAFETENSORS_DTYPES, WEIGHTS_NAME, ProgressFn, Resolved, SourceKind,
                               _looks_like_path, hub_download, hub_reachable, resolve)
from converters.sharded import files_of, header as weights_header, weights_nbytes, write_shards
from converters.specs import spec_to_dict, timm_model_args
from converters.validate import expand_user
from converters.writer import (atomic_dir, check_output, write_json, write_safetensors,  # noqa: F401
                               write_safetensors_atomic)

from .api import ADDITIVE_EMBEDDINGS, JaxModel, check_framework
from .place import DTYPES, model_from_canonical, resize_canonical  # noqa: F401  (re-exported)


def sources_read(r: Resolved | str | os.PathLike) -> list[Path]:
    """The local paths a conversion of ``r`` (located, or as given) reads: the output may be
    none of them. A folder counts with every file in it (config.json, the weights, an index and
    its shards), so ``--force`` never replaces one; a new file may still go in it."""
    if isinstance(r, Resolved):
        path = r.weights.parent if r.kind in ("hub-dir", "vitport") else r.weights
        return [r.weights, *_with_files(path)]
    path = expand_user(r)
    return _with_files(path) if os.path.lexists(path) else []


def _with_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    try:
        return [path, *(p for p in path.iterdir() if p.is_file())]
    except OSError:  # unreadable: whatever reads it next reports that
        return [path]


def load_resolved(r: Resolved, framework: str | None = None, *, image_size=None, dtype: str | None = None,
                  progress: ProgressFn | None = None) -> JaxModel:
    return model_from_canonical(read_canonical(r, progress, lazy=True), r, framework, image_size=image_size,
                                dtype=dtype, consume=True)


def load(source: str | os.PathLike, framework: str | None = None, *, arch: str | None = None,
         model_args: Mapping[str, Any] | None = None, image_size: int | tuple[int, int] | None = None,
         revision: str | None = None, dtype: str | None = None,
         progress: ProgressFn | None = None) -> JaxModel:
    """Load a checkpoint into JAX: a timm name, ``hf-hub:`` repo, local folder or file.

    ``framework`` is ``"flax"`` or ``"haiku"`` (default: a converted folder's own framework,
    else flax). ``arch`` names the architecture of a bare weights file; ``model_args`` are
    timm ``create_model`` kwargs; ``image_size`` resamples ``pos_embed`` to a new resolution;
    ``dtype`` gives what ``.astype(dtype)`` gives: ``"bfloat16"`` is bf16 weights and matmuls with
    float32 activations (default: keep the checkpoint's dtypes, and a converted folder's
    ``matmul_dtype``, as saved). Folders written by
    ``convert`` load without torch.
    """
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    return load_resolved(r, framework, image_size=image_size, dtype=dtype, progress=progress)


def memory_needed(source: Resolved | str | os.PathLike, *, dtype: str | None = None, **resolve_kw: Any) -> int:
    """Bytes the weights of ``source`` take in memory once loaded (``dtype``: after a cast), from
    the safetensors headers where there are any: nothing is read or converted."""
    r = source if isinstance(source, Resolved) else resolve(source, **resolve_kw)
    n = weights_nbytes(r.weights)
    if dtype is not None:
        header = weights_header(r.weights)
        if header is not None:
            item = 2 if dtype in ("bfloat16", "float16") else np.dtype(dtype).itemsize
            n = sum(int(np.prod(s, dtype=np.int64)) * (4 if item == 2 and _additive_embedding(k) else item)
                    for k, (s, _) in header.items())
    return n


def _additive_embedding(key: str) -> bool:
    """A file key naming one of ``ADDITIVE_EMBEDDINGS`` (kept float32 by a 16-bit cast), in
    timm's dotted or a framework's slashed form."""
    return re.split(r"[./]", key)[-1] in ADDITIVE_EMBEDDINGS


def memory_line(r: Resolved, dtype: str | None = None) -> str:
    """The CLI's line before loading: how much memory the weights need."""
    from converters.sharded import describe_bytes, shard_files

    n = memory_needed(r, dtype=dtype)
    shards = f" in {len(shard_files(r.weights))} shards, read one at a time" if r.weights.name.endswith(
        ".index.json") else ""
    return f"the weights need {'about ' if weights_header(r.weights) is None else ''}{describe_bytes(n)} of memory ({r.description}{shards})"


# ------------------------------------------------------------------------------ output


def model_args_for_timm(spec: Spec, architecture: str | None) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``spec`` (only those that differ from the factory)."""
    if not architecture:
        return timm_model_args(spec)
    try:
        base = timm_model_args(arch_spec(architecture))
    except UnsupportedArchitectureError:
        return timm_model_args(spec)
    ours = timm_model_args(spec)
    return {k: v for k, v in ours.items() if base.get(k) != v}


def vitport_config(jm: JaxModel, source: str | None = None) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT, "version": FORMAT_VERSION, "vitport_version": __version__,
        "framework": jm.framework, "architecture": jm.architecture,
        "matmul_dtype": jm.config.matmul_dtype,  # load() runs the model as saved (JaxModel.astype)
        "spec": spec_to_dict(jm.spec), "pretrained_cfg": preprocessing(jm.pretrained_cfg),
        "timm_model_args": model_args_for_timm(jm.spec, jm.architecture),
        "source": source,
    }


def save(jm: JaxModel, out: str | os.PathLike, *, force: bool = False, source: str | None = None,
         progress: ProgressFn | None = None, reading: list[Path] | tuple = (),
         max_shard_size: int | str | None = None) -> Path:
    """Write a converted folder (``model.safetensors`` + ``config.json``), all or nothing.

    ``reading``: paths the output must not replace (the source of a conversion).
    Weights over ``max_shard_size`` (default 2 GB or ``$VITPORT_MAX_SHARD_SIZE``) are written
    as ``model-0000K-of-0000N.safetensors`` shards with ``model.safetensors.index.json``.
    """
    per_block = unstack_blocks(jm.params, jm.spec, jm.framework)  # files keep timm's one entry per block
    tensors = {k: np.asarray(v) for k, v in flat_keys(per_block, jm.framework).items()}
    with atomic_dir(out, force, reading=reading) as tmp:
        if progress:
            progress(f"writing {Path(out).name}", 0, 0)
        write_shards(tensors, tmp, max_shard_size=max_shard_size, single_name=WEIGHTS_NAME,
                     metadata={"format": FORMAT, "framework": jm.framework})
        write_json(vitport_config(jm, source), tmp / CONFIG_NAME)
    return Path(out)


def convert(source: str | os.PathLike, out: str | os.PathLike, framework: str = "flax", *,
            force: bool = False, arch: str | None = None, model_args: Mapping[str, Any] | None = None,
            image_size=None, revision: str | None = None, dtype: str | None = None,
            progress: ProgressFn | None = None, max_shard_size: int | str | None = None) -> JaxModel:
    """Convert ``source`` into a folder at ``out``; returns the converted model.

    An existing ``out`` is refused before anything is read (unless ``force``); an error or an
    interrupt leaves no partial output.
    """
    check_framework(framework)
    check_output(out, force, reading=sources_read(source))  # refuse before downloading or reading anything
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    check_output(out, force, reading=sources_read(r))
    jm = load_resolved(r, framework, image_size=image_size, dtype=dtype, progress=progress)
    save(jm, out, force=force, source=r.description, progress=progress, reading=sources_read(r),
         max_shard_size=max_shard_size)
    return jm


def export_timm(source: str | os.PathLike, out_file: str | os.PathLike, *, force: bool = False,
                arch: str | None = None, model_args: Mapping[str, Any] | None = None,
                revision: str | None = None, progress: ProgressFn | None = None) -> tuple[Path, Resolved]:
    """Write ``source``'s weights as a timm state_dict in a safetensors file (atomic).

    The file loads with ``timm.create_model(arch, pretrained=True,
    pretrained_cfg_overlay=dict(file=out_file))`` (plus the model's non-default kwargs).
    """
    if not str(out_file).endswith(".safetensors"):
        raise InvalidArgumentError(f"--out must name a .safetensors file, got {out_file}")
    check_output(out_file, force, kind="file", reading=sources_read(source))
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    check_output(out_file, force, kind="file", reading=sources_read(r))
    tree = read_canonical(r, progress)
    state_dict = canonical_to_timm(tree, r.spec)
    if progress:
        progress(f"writing {Path(out_file).name}", 0, 0)
    write_safetensors_atomic(state_dict, out_file, force=force, metadata={"format": "pt"},
                             reading=sources_read(r))
    return Path(out_file), r


def timm_snippet(architecture: str, spec: Spec, file: str | os.PathLike) -> str:
    """The timm call that loads an exported file."""
    args = model_args_for_timm(spec, architecture)
    kwargs = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in args.items())
    return (f"timm.create_model({architecture!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes={spec.num_classes}){kwargs})")


# -------------------------------------------------------------------------------- info


class _Shape:
    """Stands in for an array when only its shape is known (header-only checks)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def describe(source: str | os.PathLike, *, arch: str | None = None, model_args: Mapping[str, Any] | None = None,
             revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint holds, read from its header where possible (safetensors data is not read)."""
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    header = weights_header(r.weights)  # safetensors, sharded or not: the data is not read
    if header is not None:
        shapes = {k: s for k, (s, _) in header.items()}
        dtypes = [SAFETENSORS_DTYPES.get(d, d) for _, d in header.values()]
    else:
        sd = read_state_dict(r.weights)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        dtypes = [str(v.dtype) for v in sd.values()]
    if r.kind == "vitport":
        try:
            framework_to_canonical(unflatten_keys({k: _Shape(s) for k, s in shapes.items()}, r.framework),
                                   r.spec, r.framework)
            problems: dict[str, list[str]] = {}
        except ConversionError as e:
            problems = e.problems
    else:
        problems = {k: v for k, v in check_shapes(shapes, r.spec).items() if v}
    counts: dict[str, int] = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    return {
        "resolved": r,
        "num_tensors": len(shapes),
        "num_params": int(sum(int(np.prod(s)) for s in shapes.values())),
        "dtypes": counts,
        "file_size": sum(p.stat().st_size for p in files_of(r.weights)),
        "memory": weights_nbytes(r.weights),
        "problems": problems,
    }
