"""``vitport attention``: the attention of a model over an image, drawn as a heat map.

Registered by ``vitport.cli.build_parser``; errors are VitportErrors, which ``cli.main``
prints as one paragraph.
"""

from __future__ import annotations

import argparse

from rich.markup import escape

from converters import FRAMEWORKS

from . import cli


def cmd_attention(args: argparse.Namespace) -> int:
    from converters.checkpoint_io import check_output

    from .attention import image_format, write_attention_image
    from .cli_images import _load
    from .hub import sources_read
    from .preprocess import load_image

    reading = [args.image, *sources_read(args.source)]
    check_output(args.out, args.force, kind="file", reading=reading)  # refuse before loading anything
    image_format(args.out)
    load_image(args.image)  # a missing or corrupt image fails before the model loads
    jm = _load(args)
    with cli.err_console.status("computing attention"):
        pic = write_attention_image(jm, args.image, args.out, method=args.method, heads=args.heads,
                                    force=args.force, reading=reading)
    what = {"rollout": "attention rollout", "last": "last block's attention"}[args.method]
    k, gh, gw = pic.maps.shape
    ph, pw = pic.panel_size
    cli.console.print(
        f"wrote {escape(str(args.out))} ({pic.image.width}x{pic.image.height}): {what} of "
        f"{escape(jm.architecture or jm.spec.family)} over its {gh}x{gw} patch grid"
        + (f", one panel per head ({k})" if args.heads else ", heads averaged")
        + f", read from {escape(pic.read_out)}; drawn over the {pw // pic.scale}x{ph // pic.scale} "
          "input after timm's resize and crop"
        + (f", enlarged {pic.scale}x" if pic.scale > 1 else ""), soft_wrap=True)
    return 0


def add_attention_command(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("attention", help="draw where a model attends in an image, as a heat map",
                       description="Preprocess IMAGE as timm's evaluation transform does for the checkpoint, "
                                   "run the model and write the image as the model sees it (after resize and "
                                   "crop) with its attention over the patch grid overlaid as a heat map "
                                   "(viridis, each panel stretched to its own min..max). 'rollout' is Abnar "
                                   "and Zuidema's attention rollout (heads averaged, identity added for the "
                                   "residual, rows re-normalised, multiplied through the blocks) read from the "
                                   "class token's row (the mean of the pooled tokens' rows for avg pooling, "
                                   "of every row without a class token); 'last' is the last block's attention "
                                   "from those rows (CaiT: the last class-attention block). --out appears only "
                                   "when complete; an existing one is refused unless --force.")
    cli._add_source_args(a)
    a.add_argument("image", metavar="IMAGE", help="an image file (any format Pillow reads)")
    a.add_argument("--out", required=True, metavar="FILE.png", help="output picture")
    a.add_argument("--method", choices=["rollout", "last"], default="rollout", help="default: %(default)s")
    a.add_argument("--heads", action="store_true",
                   help="one panel per head of the last block (a grid) instead of the head average")
    a.add_argument("--framework", choices=list(FRAMEWORKS),
                   help="default: a converted folder's own framework, else flax")
    a.add_argument("--force", action="store_true", help="replace --out if it exists")
    a.set_defaults(func=cmd_attention)
