"""``vitport finetune``: the command line of ``vitport.finetune``."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any, Iterator

from rich.markup import escape
from rich.table import Table

from converters.frameworks import FRAMEWORKS


@contextlib.contextmanager
def _progress() -> Iterator[Any]:
    """A ``vitport.finetune.Progress`` callback: a rich bar per epoch with loss and images/s,
    and one table row per finished epoch (printed even without a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .cli import console, err_console

    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} img/s"),
                    TimeElapsedColumn(), console=err_console, transient=True, disable=not err_console.is_terminal)
    state: dict[str, Any] = {}

    def update(event: str, **info: Any) -> None:
        if event == "epoch":
            state["task"] = bars.add_task(f"epoch {info['epoch'] + 1}/{info['epochs']}", total=info["steps"],
                                          loss="-", rate="-")
        elif event == "step":
            bars.update(state["task"], completed=info["step"], loss=f"{info['loss']:.4f}",
                        rate=f"{info['images_per_second']:.0f}")
        elif event == "val":
            bars.update(state["task"], description=f"validating {info['images']} images")
        elif event == "epoch_done":
            bars.remove_task(state["task"])
            r = info["result"]
            mark = " (best)" if r.val_accuracy == info["best"] else ""
            console.print(f"epoch {r.epoch + 1}: train loss {r.train_loss:.4f}, val loss {r.val_loss:.4f}, "
                          f"val accuracy {100 * r.val_accuracy:.2f}%{mark}, {r.images_per_second:.0f} img/s")

    with bars:
        yield update


def cmd_finetune(args: argparse.Namespace) -> int:
    from .cli import _image_size, console, err_console
    from .finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         layer_decay=args.layer_decay or None, weight_decay=args.weight_decay,
                         warmup_epochs=args.warmup_epochs, label_smoothing=args.smoothing, clip_grad=args.clip_grad,
                         drop_path_rate=args.drop_path, img_size=_image_size(args.img_size), framework=args.framework,
                         compute_dtype="bfloat16" if args.bf16 else None, seed=args.seed,
                         workers=args.workers, shard=args.shard, scan_blocks=args.scan_blocks)
    try:
        with _progress() as update:
            out = finetune(args.source, args.data_dir, args.out, cfg, resume=args.resume, progress=update)
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted[/]: the last finished epoch is checkpointed; continue with "
                          f"the same command and --resume ({escape(args.out)} does not exist yet)")
        return 130
    table = Table(show_header=False, title=f"fine-tuned model in {escape(str(out))}", title_justify="left")
    history = json.loads((out / "training.json").read_text())
    table.add_row("best val accuracy", f"{100 * history['best_val_accuracy']:.2f}%")
    table.add_row("classes", escape(", ".join(history["settings"]["classes"])))
    console.print(table)
    console.print(f"load it with [bold]vitport.load({str(out)!r})[/]; take it back to timm with "
                  f"[bold]vitport export {escape(str(out))} --out model.safetensors[/]")
    return 0


def add_finetune_command(sub: Any) -> None:
    from .cli import counting_int

    f = sub.add_parser("finetune", help="fine-tune a model on an image folder (train/ and val/ splits)",
                       description="Fine-tune SOURCE (any source `vitport convert` takes) on DATA_DIR/train/<class>/* "
                                   "with timm's recipe (AdamW, layer-wise lr decay, warm-up + cosine, label "
                                   "smoothing, RandomResizedCrop + flip), validating on DATA_DIR/val/<class>/* each "
                                   "epoch. The classifier is replaced for the class folders found. Progress is "
                                   "checkpointed each epoch in OUT.partial/ (continue with --resume); OUT, a vitport "
                                   "folder with the best model, appears only when the run is complete.")
    f.add_argument("source", help="timm name, hf-hub:REPO, hub-layout folder, vitport folder")
    f.add_argument("data_dir", metavar="DATA_DIR", help="folder with train/<class>/* and val/<class>/*")
    f.add_argument("--out", required=True, help="output folder (must not exist)")
    f.add_argument("--epochs", type=int, default=10, help="default: %(default)s")
    f.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    f.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    f.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay; 0 turns it off "
                                                                  "(default: %(default)s)")
    f.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: %(default)s)")
    f.add_argument("--warmup-epochs", type=float, default=1.0, help="default: %(default)s")
    f.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)")
    f.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: off)")
    f.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate (default: %(default)s)")
    f.add_argument("--img-size", metavar="N|HxW", help="train at this resolution (pos_embed is resampled)")
    f.add_argument("--framework", choices=FRAMEWORKS, help="default: the source's own, else flax")
    f.add_argument("--bf16", action="store_true", help="compute in bfloat16 (params stay float32)")
    f.add_argument("--scan-blocks", action="store_true",
                   help="run the blocks as one lax.scan over stacked weights: the train step compiles once "
                        "for any depth, 2-3x faster, but its steps ran slower (the saved model has timm's "
                        "per-block layout as always)")
    f.add_argument("--resume", action="store_true", help="continue the interrupted run in OUT.partial/")
    f.add_argument("--seed", type=counting_int(0), default=0, help="data order, augmentation, dropout, new head (default: 0)")
    f.add_argument("--workers", type=int, default=4, help="image loading threads (default: %(default)s)")
    f.add_argument("--shard", choices=("dp", "fsdp", "tp"), metavar="STRATEGY",
                   help="train over every local device: dp (weights replicated, batch split), fsdp (weights, "
                        "gradients and optimizer state split too), tp (tensor parallel); --batch-size must be a "
                        "multiple of the devices on the data axis. Default: one device")
    f.set_defaults(func=cmd_finetune)
