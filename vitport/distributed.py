"""Sharded and multi-process ``embed`` / ``predict``: one JAX multi-controller job.

Every process runs this same program (``jax.distributed.initialize``; on CPU the cross-process
collectives are gloo's). The images are cut into global batches in the order a
single-process run reads them; each process decodes only its own contiguous slice of every
batch, ``jax.make_array_from_process_local_data`` joins the slices into one batch sharded over
the mesh's ``data`` axis, and the jitted model returns its outputs replicated
(``out_shardings``), so XLA's all-gather brings every row to every process. Process 0 keeps
the readable rows, in file order, and writes the same ``.npz`` (or prints the same table) a
single-process run does; the others write nothing. Which files were unreadable is gathered
with ``jax.experimental.multihost_utils.process_allgather``.

Every process must see the same files under the same paths (a shared or copied folder) and
gets the same arguments; a process that fails stops the job (the others time out in their
next collective).
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from converters.errors import InvalidArgumentError, MissingFileError

from .images import (DEFAULT_BATCH_SIZE, EmbedResult, OnSkip, Prediction, Progress, _append, collect_images,
                     eval_transform, feature_rows, prediction_setup, softmax, write_npz)
from .preprocess import ImageError, load_image

if TYPE_CHECKING:
    from .sharding import ShardedModel

_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Join the multi-controller job (``jax.distributed.initialize``) before JAX touches a device.

    Nothing to do without a coordinator; on CPU the collectives are gloo's."""
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise InvalidArgumentError("--num-processes / --process-id need --coordinator HOST:PORT (the address "
                                       "of process 0, which every process passes)")
        return
    m = _HOST_PORT.match(coordinator)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise InvalidArgumentError(f"--coordinator must be HOST:PORT (e.g. 127.0.0.1:12355 or node0:12355), "
                                   f"got {coordinator!r}")
    if num_processes is None or process_id is None:
        raise InvalidArgumentError("--coordinator needs --num-processes N and --process-id K "
                                   "(K = 0 .. N-1, a different K in each process)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise InvalidArgumentError(f"--process-id must be in 0..{num_processes - 1} and --num-processes at least "
                                   f"1; got --process-id {process_id} --num-processes {num_processes}")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need it to talk
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


# ---------------------------------------------------------------------- global batches


def _local_batch(jm: "ShardedModel", batch_size: int) -> int:
    """Rows each process contributes per step: a share of ``batch_size``, a multiple of the
    ``data`` rows its devices hold."""
    import jax

    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
    procs = jax.process_count()
    per_device = max(1, jm.data_size // procs)  # data-axis slots on one process's devices
    share = math.ceil(batch_size / procs)
    return math.ceil(share / per_device) * per_device


def _forward(jm: "ShardedModel"):
    """Jitted ``(params, x) -> (logits, pre_logits)``, both replicated on every device."""
    fn = jm.__dict__.get("_vitport_global_forward")
    if fn is None:
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        apply = jm.front_end_apply
        replicated = NamedSharding(jm.mesh, P())

        def forward(params, x):
            logits, acts = apply(params, x, return_intermediates=True)
            return logits, acts["pre_logits"]

        from . import xla_options

        fn = xla_options.jit(forward, jm.compiler_options, out_shardings=(replicated, replicated))
        jm.__dict__["_vitport_global_forward"] = fn
    return fn


def global_batches(jm: "ShardedModel", items: Sequence[tuple[Any, str]], batch_size: int = DEFAULT_BATCH_SIZE,
                   progress: Progress | None = None, on_skip: OnSkip | None = None
                   ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray, list[int]]]:
    """Per global batch, on every process: ``(indices of the readable items, logits, pre_logits,
    indices of the unreadable items)`` (rows of the readable items only, in item order).
    ``items`` are ``(image, name)``; this process decodes only its slice of each batch and
    reports its own unreadable files, with the reason, to ``on_skip``."""
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    local = _local_batch(jm, batch_size)
    procs, me = jax.process_count(), jax.process_index()
    step = local * procs
    transform = eval_transform(jm)
    shape = (*transform.input_size, 3)
    batch_sharding = NamedSharding(jm.mesh, P("data"))
    forward = _forward(jm)
    progress and progress(0, len(items))
    for start in range(0, len(items), step):
        x = np.zeros((local, *shape), np.float32)
        ok = np.zeros((local,), np.int32)
        first = start + me * local
        for row, i in enumerate(range(first, min(first + local, len(items)))):
            image, name = items[i]
            try:
                x[row] = transform(load_image(image), name)
                ok[row] = 1
            except (ImageError, MissingFileError) as e:  # reported, not fatal
                on_skip and on_skip(name, str(e))
        xg = jax.make_array_from_process_local_data(batch_sharding, x.astype(jm.input_dtype))
        logits, pre_logits = forward(jm.params, xg)
        ok_all = np.asarray(multihost_utils.process_allgather(ok, tiled=True))  # process order = item order
        keep = [r for r in range(step) if ok_all[r] and start + r < len(items)]
        bad = [start + r for r in range(step) if not ok_all[r] and start + r < len(items)]
        yield [start + r for r in keep], np.asarray(logits)[keep], np.asarray(pre_logits)[keep], bad
        progress and progress(min(start + step, len(items)), len(items))


# -------------------------------------------------------------------------- commands


def is_writer() -> bool:
    import jax

    return jax.process_index() == 0


def predict(jm: "ShardedModel", images: Sequence[Any], top_k: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
            progress: Progress | None = None) -> list[list[Prediction]] | None:
    """``vitport.images.predict`` as one job over every process and device; the results on
    process 0, None on the others."""
    from .preprocess import image_name

    labels, k = prediction_setup(jm, images, top_k)
    results: list[list[Prediction]] = []
    skipped: list[str] = []

    def fail(name: str, reason: str) -> None:
        skipped.append(reason)

    for _, logits, _, _ in global_batches(jm, [(im, image_name(im)) for im in images], batch_size, progress, fail):
        for p in softmax(logits):
            order = np.argsort(-p, kind="stable")[:k]
            results.append([Prediction(int(i), labels[i], float(p[i])) for i in order])
    if skipped:  # predict fails on an unreadable image, as the single-process command does
        raise ImageError(skipped[0])
    if len(results) != len(images):
        raise ImageError("an image could not be read on another process (its error is printed there)")
    return results if is_writer() else None


def write_embeddings(jm: "ShardedModel", sources: Sequence[str], out: str, *, batch_size: int = DEFAULT_BATCH_SIZE,
                     force: bool = False, progress: Progress | None = None,
                     on_skip: OnSkip | None = None, reading: Sequence[str | os.PathLike] = ()) -> EmbedResult | None:
    """``vitport.images.write_embeddings`` as one job: the same ``.npz``, written by process 0
    (its result; None on the others). Rows stream to a temporary file as batches finish."""
    import tempfile

    from converters.checkpoint_io import atomic_file, check_output

    writer = is_writer()
    reading = [*sources, *reading]
    out_path = check_output(out, force, kind="file", reading=reading) if writer else Path(out)
    files = collect_images(sources)
    dtype = np.float64 if np.dtype(jm.dtype) == np.float64 else np.float32
    names: list[str] = []
    skipped: list[tuple[str, str]] = []
    dim = 0
    start = time.perf_counter()

    reasons: dict[str, str] = {}

    def skip(name: str, reason: str) -> None:  # this process's files; the others report theirs
        reasons[name] = reason
        on_skip and on_skip(name, reason)

    rows_file = feature_rows(out_path) if writer else tempfile.TemporaryFile()  # only process 0's rows are kept
    with rows_file as rows:
        for indices, _, pre_logits, bad in global_batches(jm, files, batch_size, progress, skip):
            skipped += [(files[i][1], reasons.get(files[i][1], "not readable (reported by another process)"))
                        for i in bad]
            dim = int(np.prod(pre_logits.shape[1:]))
            if writer and indices:
                _append(rows, pre_logits, len(indices), dim, dtype)
            names.extend(files[i][1] for i in indices)
        if not names:
            raise ImageError(f"none of the {len(files)} files in {', '.join(map(str, sources))} "
                             "is an image Pillow can read")
        if not writer:
            return None
        rows.seek(0)
        with atomic_file(out_path, force, reading=reading) as tmp:
            write_npz(tmp, np.array(names, dtype=str), rows, (len(names), dim), dtype)
    return EmbedResult(out_path, len(names), dim, time.perf_counter() - start, skipped)
