"""vitport: convert timm checkpoints to Haiku / Flax linen / Flax NNX, verify parity, export back to timm.

A SOURCE is a timm name (cait_s24_224, vit_base_patch16_224.augreg2_in21k_ft_in1k:
downloaded from the hub), an hf-hub: repo id, a local folder in the hub layout
(config.json + model.safetensors), a folder written by ``vitport convert``, or a single
.safetensors / .pth / .bin file together with --arch NAME.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from converters.errors import InvalidArgumentError, VitportError
from converters.frameworks import FRAMEWORKS

console = Console()
err_console = Console(stderr=True)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def progress_bars():
    """A ``vitport.hub.ProgressFn`` drawing rich progress bars (on stderr, cleared when done).

    Yields None when stderr is not a terminal: logs and pipes get no bars.
    """
    if not err_console.is_terminal:
        yield None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn)

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as bars:
        tasks: dict[str, Any] = {}
        totals: dict[str, int] = {}

        def update(description: str, done: int, total: int) -> None:
            if description not in tasks:
                for name, tid in tasks.items():  # a new step: the previous ones are done
                    bars.update(tid, total=totals[name] or 1, completed=totals[name] or 1)
                tasks[description] = bars.add_task(escape(description), total=total or None)
            totals[description] = total
            bars.update(tasks[description], completed=done, total=total or None)

        yield update


def _model_args(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"--model-args must be a JSON object, e.g. '{{\"num_classes\": 10}}' ({e})") from None
    if not isinstance(args, dict):
        raise InvalidArgumentError("--model-args must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return args


def counting_int(least: int):
    """An argparse type: an integer of at least ``least`` (argparse's usage error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def _image_size(text: str | None):
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise InvalidArgumentError(f"--img-size takes N or HxW (e.g. 384 or 384x512), got {text!r}")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _matmul_rows(matmul_dtype: str | None) -> list[tuple[str, str]]:
    return [("matmuls", f"{matmul_dtype}, accumulating in float32; float32 activations "
                        "(JaxModel.astype)")] if matmul_dtype else []


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=escape(title), title_justify="left", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(escape(k), escape(_fmt(v)))
    return table


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 8:
            return f"[{', '.join(map(_fmt, v[:4]))}, ... ({len(v)} items)]"
        return "[" + ", ".join(map(_fmt, v)) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items()) or "-"
    return "-" if v is None else str(v)


def _preprocessing_rows(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes")
    rows = [(k, cfg[k]) for k in keys if k in cfg]
    if "label_names" in cfg:
        rows.append(("label_names", cfg["label_names"]))
    return rows


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="timm name, hf-hub:REPO, hub-layout folder, vitport folder, or weights file")
    p.add_argument("--arch", help="timm architecture of a bare weights file (e.g. cait_s24_224)")
    p.add_argument("--model-args", metavar="JSON",
                   help="timm create_model kwargs as JSON, e.g. '{\"num_classes\": 10}'")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")


# ------------------------------------------------------------------------------ verify


def _print_parity_table(title: str, rows, tol: float) -> bool:
    table = Table(title=escape(title), title_justify="left")
    for col in ("layer", "shape", "max |abs|", "max rel", "ok"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    all_ok = True
    for r in rows:
        ok = r.ok(tol)
        all_ok &= ok
        table.add_row(r.layer, "x".join(map(str, r.shape)), f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
                      "[green]yes[/]" if ok else "[red]NO[/]")
    console.print(table)
    return all_ok


def cmd_verify(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    frameworks = list(FRAMEWORKS) if args.framework == "all" else [args.framework]
    if args.checkpoint or args.pretrained:
        return _verify_checkpoint(args, frameworks, dtypes)
    if args.arch or args.model_args or args.revision:
        raise InvalidArgumentError("--arch, --model-args and --revision go with --checkpoint")
    from converters.architectures import arch_spec

    spec = arch_spec(args.name)  # an unknown or refused name fails here, by name, not inside timm
    from .parity import tolerance, verify_architecture

    all_ok = True
    for result in verify_architecture(args.name, frameworks, dtypes, batch=args.batch, seed=args.seed,
                                      status=console.status):
        tol = tolerance(spec, result.dtype)
        title = (f"{result.name} [{result.framework}, {result.dtype}] vs timm "
                 f"(tolerance {tol:g} x max(1, max|ref|))")
        all_ok &= _print_parity_table(title, result.rows, tol)
    console.print("[bold green]PASS[/]" if all_ok else "[bold red]FAIL[/]: differences over tolerance")
    return 0 if all_ok else 1


def _verify_checkpoint(args: argparse.Namespace, frameworks, dtypes) -> int:
    import numpy as np
    import torch

    from .hub import _looks_like_path, model_from_canonical, read_canonical, resolve
    from .parity import compare, compare_weights, random_images, timm_model_for, tolerance

    source = args.pretrained or args.checkpoint
    if args.pretrained and args.checkpoint:
        raise InvalidArgumentError("give --checkpoint or --pretrained, not both")
    if args.pretrained and (_looks_like_path(args.pretrained) or args.pretrained.startswith("hf-hub:")):
        raise InvalidArgumentError("--pretrained takes a timm name (e.g. cait_s24_224); use --checkpoint for files, "
                         "folders and hf-hub: repos")
    model_args = _model_args(args.model_args)
    r = resolve(source, arch=args.arch, model_args=model_args, revision=args.revision)
    with progress_bars() as bar:
        tree = read_canonical(r, bar)
    with console.status(f"loading {source} into timm"):
        timm_model = timm_model_for(r, tree, model_args)
    all_ok = True
    for dtype in dtypes:
        model = timm_model.to(getattr(torch, dtype)).eval()
        for framework in frameworks:
            with console.status(f"converting to {framework} and comparing ({dtype})"):
                jm = model_from_canonical(tree, r, framework, dtype=dtype)
                # Weights first: did timm and vitport read the same numbers from the file?
                weights, missing = compare_weights(jm, model)
                rows = [weights]
                images = random_images(jm.spec, args.batch, args.seed, dtype=np.dtype(dtype))
                rows += compare(jm, model, images)
            tol = tolerance(jm.spec, dtype)
            title = (f"{r.description} ({r.architecture}) [{framework}, {dtype}] vs timm "
                     f"(tolerance {tol:g} x max(1, max|ref|))")
            all_ok &= _print_parity_table(title, rows, tol)
            if missing:
                console.print(f"[red]keys not in both:[/] {escape(', '.join(missing[:20]))}")
    console.print("[bold green]PASS[/]" if all_ok else "[bold red]FAIL[/]: differences over tolerance")
    return 0 if all_ok else 1


# ----------------------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from converters.checkpoint_io import check_output

    from .hub import CONFIG_NAME, WEIGHTS_NAME, load_resolved, resolve, save, sources_read

    check_output(args.out, args.force, reading=sources_read(args.source))  # before downloading or reading
    r = resolve(args.source, arch=args.arch, model_args=_model_args(args.model_args), revision=args.revision)
    check_output(args.out, args.force, reading=sources_read(r))  # never the source itself
    from .hub import memory_line

    err_console.print(escape(memory_line(r, args.dtype)), soft_wrap=True)
    with progress_bars() as bar:
        jm = load_resolved(r, args.framework, image_size=_image_size(args.img_size), dtype=args.dtype,
                           progress=bar)
        out = save(jm, args.out, force=args.force, source=r.description, progress=bar, reading=sources_read(r),
                   max_shard_size=args.max_shard_size)
    files = sorted(p.name for p in out.iterdir())
    size = sum((out / n).stat().st_size for n in files)
    rows = [("source", r.description), ("architecture", jm.architecture), ("framework", jm.framework),
            ("parameters", f"{jm.num_params():,}"), ("dtype", str(jm.dtype)), *_matmul_rows(jm.config.matmul_dtype),
            ("image size", "x".join(map(str, jm.spec.image_size))),
            *_preprocessing_rows(jm.pretrained_cfg),
            ("output", f"{out}/{{{', '.join(files) if len(files) <= 3 else f'{len(files)} files'}}} ({_size(size)})")]
    console.print(_kv_table(f"converted {r.description}", rows))
    console.print(f"load it with [bold]vitport.load({str(out)!r})[/] (no torch needed)")
    return 0


# ------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int:
    from .hub import export_timm, timm_snippet

    with progress_bars() as bar:
        out, r = export_timm(args.source, args.out, force=args.force, arch=args.arch,
                             model_args=_model_args(args.model_args), revision=args.revision, progress=bar)
    console.print(f"wrote {escape(str(out))} ({_size(out.stat().st_size)}): timm state_dict of "
                  f"{escape(r.architecture)}")
    if not r.architecture:  # a folder whose config.json names none
        console.print("its config.json names no timm architecture: pass the one it was converted from to "
                      f"timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file={str(out)!r}))")
        return 0
    console.print("load it in timm with:")
    console.print("  " + escape(timm_snippet(r.architecture, r.spec, out)), soft_wrap=True)
    return 0


# -------------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses

    from .hub import describe

    info = describe(args.source, arch=args.arch, model_args=_model_args(args.model_args), revision=args.revision)
    r = info["resolved"]
    kinds = {"hub": "Hugging Face Hub (timm layout)", "hub-dir": "local folder or file (timm layout)",
             "file": "single weights file (timm state_dict)", "vitport": f"vitport folder ({r.framework} params)"}
    problems = info["problems"]
    match = "[green]yes[/]" if not problems else "[red]NO[/]: " + "; ".join(
        f"{k} ({len(v)}): {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for k, v in problems.items())
    rows = [("source", r.description), ("kind", kinds[r.kind]),
            ("weights", f"{r.weights} ({_size(info['file_size'])})"),
            ("architecture", r.architecture or "-"), ("family", r.spec.family),
            ("tensors", info["num_tensors"]), ("parameters", f"{info['num_params']:,}"),
            ("memory needed", _size(info["memory"])),
            ("dtypes", ", ".join(f"{d} ({n})" for d, n in info["dtypes"].items())),
            *_matmul_rows(r.matmul_dtype)]
    table = _kv_table(f"{r.description}", rows)
    table.add_row("matches architecture", match)
    console.print(table)
    spec = dataclasses.asdict(r.spec)
    console.print(_kv_table("architecture spec", list(spec.items())))
    if r.pretrained_cfg:
        console.print(_kv_table("preprocessing", _preprocessing_rows(r.pretrained_cfg)))
    return 0 if not problems else 1


# -------------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    from converters.architectures import architectures, list_architectures

    names = list_architectures(args.pattern, supported=None if args.all else True)
    table = Table(title=f"timm architectures matching {args.pattern!r}", title_justify="left")
    table.add_column("architecture")
    table.add_column("supported" if not args.all else "status")
    table.add_column("pretrained tags (first = default)")
    for n in names:
        entry = architectures()[n]
        status = "yes" if "spec" in entry else entry["unsupported"].splitlines()[-1].strip()
        table.add_row(n, escape(status), ", ".join(entry["tags"]) or "-")
    console.print(table)
    console.print(f"{len(names)} architectures")
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitport", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a checkpoint to a Haiku, Flax linen or Flax NNX folder",
                       description="Convert a timm checkpoint into a folder with model.safetensors (JAX params, "
                                   "flat keys) and config.json (spec and preprocessing) that vitport.load() "
                                   "reads without torch. An existing --out is refused unless --force; a failed "
                                   "or interrupted conversion leaves nothing behind.")
    _add_source_args(c)
    c.add_argument("--framework", choices=FRAMEWORKS, default="flax", help="default: %(default)s")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--img-size", metavar="N|HxW", help="input resolution; pos_embed is resampled as timm does")
    c.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"],
                   help="cast the weights (default: keep the checkpoint's)")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    c.add_argument("--max-shard-size", metavar="SIZE", help="write weights larger than this in shards with an "
                   "index (bytes or e.g. 500MB; default $VITPORT_MAX_SHARD_SIZE or 2GB)")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="prove numeric parity with timm, layer by layer",
                       description="Without --checkpoint: build the timm model NAME with bug-sensitive random "
                                   "weights (offline), convert it to every front-end (Haiku, Flax linen, Flax NNX), and print per-layer max abs "
                                   "/ max rel differences. With --checkpoint SOURCE or --pretrained NAME: timm "
                                   "loads the real weights its own way, vitport loads them its own way, and the "
                                   "weights and every layer are compared. Exits 1 if anything is over "
                                   "tolerance (float64: 1e-10, float32: 1e-4, scaled by max(1, max|ref|); "
                                   "float64 1e-6 for mixed-RoPE models, whose tables timm builds in float32).")
    v.add_argument("name", nargs="?", default="vit_base_patch16_224",
                   help="timm architecture for random-weight checks (default: %(default)s)")
    v.add_argument("--checkpoint", metavar="SOURCE", help="check real weights: any SOURCE (name, hf-hub:, folder, file)")
    v.add_argument("--pretrained", metavar="NAME", help="check timm's pretrained weights NAME[.TAG] from the hub")
    v.add_argument("--arch", help="timm architecture of a bare weights file given to --checkpoint")
    v.add_argument("--model-args", metavar="JSON", help="timm create_model kwargs as JSON")
    v.add_argument("--revision", help="hub revision")
    v.add_argument("--framework", choices=[*FRAMEWORKS, "all"], default="all")
    v.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    v.add_argument("--batch", type=counting_int(1), default=2, help="images per check (default: %(default)s)")
    v.add_argument("--seed", type=counting_int(0), default=0, help="seed of the weights and the images")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("export", help="write a checkpoint back as a timm state_dict (safetensors)",
                       description="Export SOURCE (usually a folder written by `vitport convert`) as a timm "
                                   "state_dict in a .safetensors file that timm.create_model(ARCH, "
                                   "pretrained=True, pretrained_cfg_overlay=dict(file=FILE)) loads.")
    _add_source_args(e)
    e.add_argument("--to", choices=["timm"], default="timm", help="target format (default: %(default)s)")
    e.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="what a checkpoint holds",
                       description="Show a checkpoint's architecture, spec, tensor and parameter counts, "
                                   "dtypes and preprocessing, and whether its tensors match the architecture "
                                   "(exit 1 if not). Reads only the header of safetensors files.")
    _add_source_args(i)
    i.set_defaults(func=cmd_info)

    ls = sub.add_parser("list", help="supported timm architectures and their pretrained tags",
                        description="List the timm architectures vitport converts, with their pretrained tags.")
    ls.add_argument("pattern", nargs="?", default="*", help="glob, e.g. 'cait_*'")
    ls.add_argument("--all", action="store_true", help="also list refused architectures, with the reason")
    ls.set_defaults(func=cmd_list)

    from .cli_images import add_image_commands  # predict, embed

    add_image_commands(sub)
    from .cli_attention import add_attention_command  # attention

    add_attention_command(sub)

    from .cli_finetune import add_finetune_command

    add_finetune_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from converters.writer import received_signal, signals_raise

    # SIGINT/SIGTERM/SIGHUP raise (and are remembered), so the writer's cleanup always runs.
    with signals_raise():
        try:
            args = build_parser().parse_args(argv)
            rc = args.func(args)
            if received_signal() is None:
                return rc
            raise KeyboardInterrupt  # a library swallowed the signal's exception: still a failed run
        except VitportError as e:  # a deliberate error: one paragraph, no traceback; anything else is a bug
            # soft_wrap: no line breaks inside the paths the message names (they stay copyable)
            err_console.print("[bold red]error:[/]", escape(str(e)), soft_wrap=True)
            return 2
        except KeyboardInterrupt:
            signum = received_signal()
            err_console.print("[bold red]interrupted[/]: no partial output was left behind")
            return 128 + signum if signum else 130


def command_line() -> int:
    """The ``vitport`` command: ``main`` with jax's persistent compilation cache on
    (``vitport.compile_cache``), which ``main`` called from Python leaves off."""
    from . import compile_cache

    compile_cache.enable()
    return main()


if __name__ == "__main__":
    sys.exit(command_line())
