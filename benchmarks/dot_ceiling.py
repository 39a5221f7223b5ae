"""The ceiling XLA's kernels put on a model's speed: every matmul, attention product and
convolution of its forward pass, timed alone as the model compiles it, against torch's GEMM
at the same sizes (issue 11, goal 2).

    uv run python benchmarks/dot_ceiling.py vit_base_patch16_224 cait_s24_224 --batch 16
    uv run python benchmarks/dot_ceiling.py cait_s24_224 --batch 16 --dots default   # XLA's YNNPACK dots

The products come from the model's own jaxpr (``dot_general`` and ``conv_general_dilated``,
counted through ``lax.scan``s, so CaiT's per-image attention loop counts each product once per
image). Each distinct product is jitted alone with the model's compiler options
(``vitport.xla_options``; ``--dots``) on random inputs of its shapes, and torch times the GEMM of
the same size: ``(batch, M, K) @ (batch, K, N)``, a convolution as the GEMM its patch
embedding is. Both are timed in turn, product by product, round by round, so background load
hits them alike; each time is a median of rounds, each round enough calls in a row to take
about 20 ms (JAX dispatches them ahead, so a small product is not timed as its dispatch).

What it says: ``products alone`` is the sum of the products' times per forward pass, each timed
in its own call (so with its launch and a fresh output buffer, as a model's call pays for its
temporaries too). Its GFLOP/s, against the machine's 2048^3 matmul peak, is about the highest
fraction of the peak the model can reach on these kernels, every other op (norms, softmax, adds,
copies) aside; the same for torch's GEMMs shows what another GEMM library would allow. The
per-product rows say which kernels fall short: a model at 88 % of the peak needs its products to
run at 88 % of it or more. Models have random weights (``vitport.create_model``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

import vitport
from converters import FRAMEWORKS
from vitport import xla_options

PRODUCTS = ("dot_general", "conv_general_dilated")
BATCH_S = 0.02  # each timing runs a product this long (calls in a row), at least once


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="timm architecture names")
    p.add_argument("--framework", default="flax", choices=list(FRAMEWORKS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dots", default="vitport", choices=["vitport", "default", "eigen"],
                   help="XLA CPU options: vitport's choice (what apply_fn compiles with), XLA's defaults "
                        "(YNNPACK), or Eigen's dots")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per product and per model (median)")
    p.add_argument("--no-torch", action="store_true", help="skip torch's GEMMs")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ the products


def products(jaxpr: Any, count: int = 1) -> Iterator[tuple[Any, int]]:
    """``(equation, times it runs per call)`` for every product in ``jaxpr``, nested jaxprs
    included; a scan's body runs ``length`` times. A ``while`` loop's trip count is unknown."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in PRODUCTS:
            yield eqn, count
        if eqn.primitive.name == "while":
            raise ValueError("the model has a while loop: its products' counts are unknown")
        inner = count * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from products(sub, inner)


def gemm_size(eqn: Any) -> tuple[int, int, int, int]:
    """``(batch, M, K, N)`` of the GEMM a product is: a convolution as its im2col GEMM."""
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (lc, _), (lb, _) = eqn.params["dimension_numbers"]
        b = math.prod(lhs.shape[d] for d in lb)
        k = math.prod(lhs.shape[d] for d in lc)
        return b, lhs.size // (b * k), k, rhs.size // (b * k)
    n = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]  # output features
    return 1, out.size // n, rhs.size // n, n


def flops(eqn: Any) -> int:
    b, m, k, n = gemm_size(eqn)
    return 2 * b * m * k * n


def describe(eqn: Any) -> str:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    kind = "conv" if eqn.primitive.name == "conv_general_dilated" else "dot"
    return f"{kind} {lhs.str_short()} x {rhs.str_short()} -> {out.str_short()}"


def group(eqns: list[tuple[Any, int]]) -> list[dict[str, Any]]:
    """Identical products (same primitive, input types and parameters) counted together."""
    groups: dict[str, dict[str, Any]] = {}
    for eqn, count in eqns:
        key = repr((eqn.primitive.name, [v.aval for v in eqn.invars], sorted(eqn.params.items())))
        if key in groups:
            groups[key]["count"] += count
        else:
            groups[key] = {"eqn": eqn, "count": count, "what": describe(eqn), "gemm": gemm_size(eqn),
                           "flops": flops(eqn)}
    return list(groups.values())


# ------------------------------------------------------------------------------ timing


def per_call_timer(fn: Callable[[], Any], sync: Callable[[Any], Any] = lambda out: out) -> Callable[[], float]:
    """A timer of ``fn`` (already warmed up): seconds per call over enough calls in a row to
    take about ``BATCH_S`` (JAX dispatches them ahead of the runs, so a small product is not
    timed as its dispatch), ``sync`` waiting for the last one."""
    start = time.perf_counter()
    sync(fn())
    reps = max(1, int(BATCH_S / max(time.perf_counter() - start, 1e-6)))

    def timer() -> float:
        start = time.perf_counter()
        for _ in range(reps - 1):
            fn()
        sync(fn())
        return (time.perf_counter() - start) / reps
    return timer


def xla_timer(eqn: Any, options: dict) -> Callable[[], float]:
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.standard_normal(v.aval.shape).astype(v.aval.dtype)) for v in eqn.invars]
    fn = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **eqn.params), compiler_options=options)
    fn = fn.lower(*args).compile()
    jax.block_until_ready(fn(*args))
    return per_call_timer(lambda: fn(*args), jax.block_until_ready)


def torch_timer(b: int, m: int, k: int, n: int, dtype: Any) -> Callable[[], float]:
    import torch

    t_dtype = torch.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else torch.float32
    x, w = torch.randn(b, m, k, dtype=t_dtype), torch.randn(b, k, n, dtype=t_dtype)
    fn = (lambda: torch.mm(x[0], w[0])) if b == 1 else (lambda: torch.bmm(x, w))
    fn()
    return per_call_timer(fn)


def peak_timers(options: dict, with_torch: bool) -> dict[str, Callable[[], float]]:
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    mm = jax.jit(jnp.matmul, compiler_options=options).lower(a, a).compile()
    jax.block_until_ready(mm(a, a))
    timers = {"xla": per_call_timer(lambda: mm(a, a), jax.block_until_ready)}
    if with_torch:
        timers["torch"] = torch_timer(1, n, n, n, jnp.float32)
    return timers


def measure(name: str, args: argparse.Namespace, console: Console) -> dict[str, Any]:
    jm = vitport.create_model(name, args.framework)
    h, w = jm.spec.image_size
    x = jax.device_put(jm.as_input(np.random.default_rng(0).standard_normal((args.batch, h, w, 3), np.float32)))
    options = (xla_options.for_model(jm) if args.dots == "vitport"
               else {"default": {}, "eigen": xla_options.eigen_dots()}[args.dots])
    model = jax.jit(jm.front_end_apply, compiler_options=options).lower(jm.params, x).compile()
    jax.block_until_ready(model(jm.params, x))
    groups = group(list(products(jax.make_jaxpr(jm.front_end_apply)(jm.params, x).jaxpr)))
    timers: dict[str, Callable[[], float]] = {"model": per_call_timer(lambda: model(jm.params, x),
                                                                      jax.block_until_ready)}
    for i, g in enumerate(groups):
        timers[f"xla {i}"] = xla_timer(g["eqn"], options)
        if not args.no_torch:
            timers[f"torch {i}"] = torch_timer(*g["gemm"], g["eqn"].invars[0].aval.dtype)
    timers.update({f"peak {k}": t for k, t in peak_timers(options, not args.no_torch).items()})
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(args.rounds):  # every timer once per round, in turn
        for k, timer in timers.items():
            times[k].append(timer())
    med = {k: statistics.median(v) for k, v in times.items()}

    rows = []
    for i, g in enumerate(groups):
        row = {"product": g["what"], "count": g["count"], "gemm_bmkn": list(g["gemm"]), "flops": g["flops"],
               "xla_s": med[f"xla {i}"], "xla_gflops": g["flops"] / med[f"xla {i}"] / 1e9}
        if not args.no_torch:
            row.update(torch_s=med[f"torch {i}"], torch_gflops=g["flops"] / med[f"torch {i}"] / 1e9)
        rows.append(row)
    rows.sort(key=lambda r: -r["count"] * r["xla_s"])
    total_flops = sum(r["count"] * r["flops"] for r in rows)
    result = {"model": name, "framework": args.framework, "batch": args.batch, "dots": args.dots,
              "rounds": args.rounds, "model_s": med["model"], "products_flops": total_flops,
              "xla_products_s": sum(r["count"] * r["xla_s"] for r in rows),
              "peak_xla_gflops": 2 * 2048**3 / med["peak xla"] / 1e9, "products": rows}
    if not args.no_torch:
        result["torch_products_s"] = sum(r["count"] * r["torch_s"] for r in rows)
        result["peak_torch_gflops"] = 2 * 2048**3 / med["peak torch"] / 1e9
    report(console, result)
    return result


# ------------------------------------------------------------------------------ output


def report(console: Console, r: dict[str, Any]) -> None:
    with_torch = "torch_products_s" in r
    peak = max(r["peak_xla_gflops"], r.get("peak_torch_gflops", 0.0))
    table = Table(title=f"{r['model']} {r['framework']} batch {r['batch']}, dots: {r['dots']}: each product per "
                        f"forward pass, median of {r['rounds']}", title_justify="left")
    for col in ("product", "count", "GFLOP", "XLA ms", "XLA GFLOP/s", *(("torch GEMM GFLOP/s", "XLA / torch")
                                                                      if with_torch else ())):
        table.add_column(col, justify="left" if col == "product" else "right")
    for p in r["products"]:
        cells = [p["product"], str(p["count"]), f"{p['count'] * p['flops'] / 1e9:.2f}",
                 f"{p['count'] * p['xla_s'] * 1e3:.1f}", f"{p['xla_gflops']:.0f}"]
        if with_torch:
            cells += [f"{p['torch_gflops']:.0f}", f"{p['torch_s'] / p['xla_s']:.2f}x"]
        table.add_row(*cells)
    console.print(table)
    gf = r["products_flops"] / 1e9
    xla_rate = gf / r["xla_products_s"]
    console.print(f"whole forward pass: {r['model_s'] * 1e3:.1f} ms ({gf / r['model_s']:.0f} GFLOP/s, "
                  f"{gf / r['model_s'] / peak:.0%} of the peak)")
    console.print(f"products alone on XLA's kernels, each in its own call: {r['xla_products_s'] * 1e3:.1f} ms "
                  f"({r['xla_products_s'] / r['model_s']:.0%} of the forward pass), {xla_rate:.0f} GFLOP/s, "
                  f"{xla_rate / peak:.0%} of the peak")
    if with_torch:
        rate = gf / r["torch_products_s"]
        console.print(f"the same GEMMs in torch: {r['torch_products_s'] * 1e3:.1f} ms, {rate:.0f} GFLOP/s "
                      f"({rate / peak:.0%} of the peak)")
    console.print(f"2048^3 matmul peak, GFLOP/s: XLA {r['peak_xla_gflops']:.0f}"
                  + (f", torch {r['peak_torch_gflops']:.0f}" if with_torch else "") + f"; the peak used: {peak:.0f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if not args.no_torch:
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    results = [measure(name, args, console) for name in args.models]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": vitport_machine(), "results": results}, f, indent=1)
        console.print(f"results written to {args.json}")


def vitport_machine() -> dict[str, Any]:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "jax": jax.__version__}


if __name__ == "__main__":
    main()
