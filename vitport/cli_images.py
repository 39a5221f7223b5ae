"""``vitport predict`` and ``vitport embed``: the image commands of the ``vitport`` CLI.

Registered by ``vitport.cli.build_parser``; errors are VitportErrors, which ``cli.main``
prints as one paragraph.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from rich.markup import escape
from rich.table import Table

from converters import FRAMEWORKS

from . import cli, cli_scale


def _load(args: argparse.Namespace):
    from .hub import load_resolved, memory_line, resolve

    r = resolve(args.source, arch=args.arch, model_args=cli._model_args(args.model_args), revision=args.revision)
    cli.err_console.print(escape(memory_line(r)), soft_wrap=True)
    with cli.progress_bars() as bar:
        return load_resolved(r, args.framework, progress=bar)


@contextlib.contextmanager
def image_progress(description: str) -> Iterator[Any]:
    """A ``(done, total)`` callback drawing a rich bar with images/s (on stderr, cleared when
    done); None when stderr is not a terminal."""
    if not cli.err_console.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "- img/s", style="progress.data.speed")

    with Progress(SpinnerColumn(), TextColumn(escape(description)), BarColumn(), MofNCompleteColumn(), Rate(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=cli.err_console, transient=True) as bars:
        task = bars.add_task(description, total=None)
        yield lambda done, total: bars.update(task, completed=done, total=total)


# ----------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from .images import predict
    from .preprocess import load_image

    if cli_scale.wanted(args):  # --shard / multi-process: one JAX job over every device
        return cli_scale.cmd_predict(args)
    for image in args.images:  # a missing file or a folder fails before the model loads
        if not Path(image).is_file():
            load_image(image)  # raises the error that names it
    jm = _load(args)
    with image_progress("classifying") as bar:
        results = predict(jm, args.images, top_k=args.top_k, batch_size=args.batch_size, progress=bar)
    if args.json:
        rows = [{"image": image, "top_k": [{"index": p.index, "label": p.label, "probability": p.probability}
                                           for p in preds]} for image, preds in zip(args.images, results)]
        sys.stdout.write(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
        return 0
    for image, preds in zip(args.images, results):
        cli.console.print(f"[bold]{escape(image)}[/]", soft_wrap=True)  # a long path stays one line
        table = Table()
        for col, justify in (("#", "right"), ("class", "right"), ("label", "left"), ("probability", "right")):
            table.add_column(col, justify=justify)
        for rank, p in enumerate(preds, 1):
            table.add_row(str(rank), str(p.index), escape(p.label), f"{p.probability:.4f}")
        cli.console.print(table)
    return 0


# ------------------------------------------------------------------------------- embed


def cmd_embed(args: argparse.Namespace) -> int:
    from converters.checkpoint_io import check_output

    from .hub import sources_read
    from .images import collect_images, write_embeddings

    if cli_scale.wanted(args):
        return cli_scale.cmd_embed(args)
    reading = [*args.inputs, *sources_read(args.source)]  # the model's own files too
    check_output(args.out, args.force, kind="file", reading=reading)  # refuse before loading anything
    collect_images(args.inputs)  # a missing or empty input fails before the model loads
    jm = _load(args)

    def skipped(name: str, reason: str) -> None:
        cli.err_console.print(f"[yellow]skipped[/] {escape(reason)}")

    with image_progress("embedding") as bar:
        result = write_embeddings(jm, args.inputs, args.out, batch_size=args.batch_size, force=args.force,
                                  progress=bar, on_skip=skipped, reading=reading)
    cli.console.print(
        f"wrote {escape(str(result.out))}: {result.num_images} images x {result.dim} features "
        f"(pre-logits of {escape(jm.architecture or jm.spec.family)}) in {result.seconds:.1f} s "
        f"({result.images_per_second:.1f} images/s)"
        + (f"; skipped {len(result.skipped)} unreadable file(s)" if result.skipped else ""))
    return 0


# ------------------------------------------------------------------------------ parser


def add_image_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify images: top-k classes with labels and probabilities",
                       description="Preprocess IMAGEs exactly as timm's evaluation transform does for the "
                                   "checkpoint (resize, crop, normalise), run the model and print each "
                                   "image's top-k classes. Labels come from the checkpoint's label_names, "
                                   "else ImageNet class names when its class count is an ImageNet subset's, "
                                   "else 'class N'.")
    cli._add_source_args(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help='print [{"image": PATH, "top_k": [{"index", "label", "probability"}]}] instead of tables')
    p.add_argument("--framework", choices=list(FRAMEWORKS),
                   help="default: a converted folder's own framework, else flax")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: %(default)s")
    cli_scale.add_scale_args(p)
    p.set_defaults(func=cmd_predict)

    e = sub.add_parser("embed", help="pre-logit features of a folder of images, into one .npz",
                       description="Walk FOLDERs recursively (and take FILEs as given), preprocess each image "
                                   "as timm's evaluation transform does, and write an .npz with `paths` "
                                   "(relative to the folder when one folder is given) and `features` "
                                   "(pre-logits, timm's forward_head(x, pre_logits=True)). Files that are "
                                   "not readable images are reported and skipped. Features stream to disk, "
                                   "so memory stays flat; --out appears only when complete.")
    cli._add_source_args(e)
    e.add_argument("inputs", nargs="+", metavar="FOLDER_OR_FILE", help="folders (searched recursively) or image files")
    e.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    e.add_argument("--batch-size", type=int, default=32, metavar="N", help="default: %(default)s")
    e.add_argument("--framework", choices=list(FRAMEWORKS),
                   help="default: a converted folder's own framework, else flax")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    cli_scale.add_scale_args(e)
    e.set_defaults(func=cmd_embed)
