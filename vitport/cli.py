"""``vitport`` command line: verify parity, list architectures (and convert/export/info)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()

TOLERANCES = {"float64": 1e-10, "float32": 1e-4}


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
    from .parity import verify_architecture

    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    frameworks = ["haiku", "flax"] if args.framework == "both" else [args.framework]
    all_ok = True
    for result in verify_architecture(args.name, frameworks, dtypes, batch=args.batch, seed=args.seed,
                                      status=console.status):
        tol = TOLERANCES[result.dtype]
        title = (f"{result.name} [{result.framework}, {result.dtype}] vs timm "
                 f"(tolerance {tol:g} x max(1, max|ref|))")
        all_ok &= _print_parity_table(title, result.rows, tol)
    console.print("[bold green]PASS[/]" if all_ok else "[bold red]FAIL[/]: differences over tolerance")
    return 0 if all_ok else 1


def cmd_list(args: argparse.Namespace) -> int:
    from converters.architectures import architectures, list_architectures

    names = list_architectures(args.pattern, supported=None if args.all else True)
    table = Table(title=f"timm architectures matching {args.pattern!r}", title_justify="left")
    table.add_column("architecture")
    table.add_column("supported" if not args.all else "status")
    table.add_column("pretrained tags")
    for n in names:
        entry = architectures()[n]
        status = "yes" if "spec" in entry else entry["unsupported"].splitlines()[-1].strip()
        table.add_row(n, status, ", ".join(entry["tags"]) or "-")
    console.print(table)
    console.print(f"{len(names)} architectures")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitport", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="prove numeric parity with timm, layer by layer",
                       description="Build the timm model with bug-sensitive random weights (offline), convert "
                                   "it to Haiku and Flax, and print per-layer max abs / max rel differences. "
                                   "Exits 1 if any layer is over tolerance (float64: 1e-10, float32: 1e-4, "
                                   "scaled by max(1, max|ref|)).")
    v.add_argument("name", nargs="?", default="vit_base_patch16_224", help="timm architecture (default: %(default)s)")
    v.add_argument("--framework", choices=["haiku", "flax", "both"], default="both")
    v.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    v.add_argument("--batch", type=int, default=2)
    v.add_argument("--seed", type=int, default=0, help="seed of the weights and the images")
    v.set_defaults(func=cmd_verify)

    ls = sub.add_parser("list", help="supported timm architectures and their pretrained tags")
    ls.add_argument("pattern", nargs="?", default="*", help="glob, e.g. 'cait_*'")
    ls.add_argument("--all", action="store_true", help="also list refused architectures, with the reason")
    ls.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # ConversionError / UnsupportedArchitectureError are ValueErrors
        console.print("[bold red]error:[/]", escape(str(e)))
        return 2


if __name__ == "__main__":
    sys.exit(main())
