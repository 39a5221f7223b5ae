"""``--shard`` and multi-process flags of ``vitport embed`` / ``vitport predict``.

``vitport.cli_images`` adds these flags to both commands and hands a run that uses any of
them to ``cmd_embed`` / ``cmd_predict`` here (``vitport.distributed`` does the work).

``vitport finetune --shard`` (one process over its local devices) is wired in
``vitport.finetune._placement``: the model is sharded, each batch is placed split over ``data``,
and jit propagates the params' shardings to the gradients and the optax state.
"""

from __future__ import annotations

import argparse

from rich.markup import escape

from . import cli
STRATEGIES = ("dp", "fsdp", "tp")  # vitport.sharding.STRATEGIES, not imported here: that loads jax


def add_scale_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices and hosts (one JAX job; see README 'Running across devices and hosts')")
    g.add_argument("--shard", choices=STRATEGIES, metavar="STRATEGY",
                   help="split the model over every device: dp (weights replicated, batch split), fsdp (weights "
                        "split too), tp (tensor parallel on a data x model mesh). Default with --coordinator: dp")
    g.add_argument("--coordinator", metavar="HOST:PORT",
                   help="address of process 0 of a multi-process job (every process passes the same)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="K", help="this process's rank, 0 .. N-1 (0 writes the output)")


def wanted(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in ("shard", "coordinator", "num_processes", "process_id"))


def start(args: argparse.Namespace):
    """Join the job (if any), load the model and shard it; returns the sharded model."""
    from . import distributed
    from .hub import load_resolved, memory_line, resolve

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    r = resolve(args.source, arch=args.arch, model_args=cli._model_args(args.model_args), revision=args.revision)
    if distributed.is_writer():
        cli.err_console.print(escape(memory_line(r)), soft_wrap=True)
    jm = load_resolved(r, args.framework)
    return jm.shard(strategy=args.shard or "dp")


def cmd_predict(args: argparse.Namespace) -> int:
    import json
    import sys

    from rich.table import Table

    from . import distributed
    from .cli_images import image_progress

    jm = start(args)
    with image_progress("classifying") as bar:
        results = distributed.predict(jm, args.images, top_k=args.top_k, batch_size=args.batch_size,
                                      progress=bar if distributed.is_writer() else None)
    if results is None:  # not process 0: process 0 prints
        return 0
    if args.json:
        rows = [{"image": image, "top_k": [{"index": p.index, "label": p.label, "probability": p.probability}
                                           for p in preds]} for image, preds in zip(args.images, results)]
        sys.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return 0
    for image, preds in zip(args.images, results):
        cli.console.print(f"[bold]{escape(image)}[/]", soft_wrap=True)
        table = Table()
        for col, justify in (("#", "right"), ("class", "right"), ("label", "left"), ("probability", "right")):
            table.add_column(col, justify=justify)
        for rank, p in enumerate(preds, 1):
            table.add_row(str(rank), str(p.index), escape(p.label), f"{p.probability:.4f}")
        cli.console.print(table)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import jax

    from . import distributed
    from .cli_images import image_progress

    from .hub import sources_read

    reading = [*args.inputs, *sources_read(args.source)]  # the model's own files too
    if not args.process_id:  # process 0 writes: refuse an existing --out before loading anything
        from converters.checkpoint_io import check_output

        check_output(args.out, args.force, kind="file", reading=reading)
    jm = start(args)

    def skipped(name: str, reason: str) -> None:
        cli.err_console.print(f"[yellow]skipped[/] {escape(reason)}")

    with image_progress("embedding") as bar:
        result = distributed.write_embeddings(jm, args.inputs, args.out, batch_size=args.batch_size,
                                              force=args.force, progress=bar if distributed.is_writer() else None,
                                              on_skip=skipped, reading=reading)
    if result is None:
        return 0
    cli.console.print(
        f"wrote {escape(str(result.out))}: {result.num_images} images x {result.dim} features "
        f"(pre-logits of {escape(jm.architecture or jm.spec.family)}; {jm.strategy} over {jax.device_count()} "
        f"device(s), {jax.process_count()} process(es)) in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s)"
        + (f"; skipped {len(result.skipped)} unreadable file(s)" if result.skipped else ""))
    return 0
