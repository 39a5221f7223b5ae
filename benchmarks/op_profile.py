"""Where a vitport model's forward pass spends its time, op by op (``jax.profiler`` on XLA's CPU
thunks), grouped by the model's module path: the profile to take before changing anything for
speed (issue 11).

    uv run python benchmarks/op_profile.py cait_s24_224 --batch 16
    uv run python benchmarks/op_profile.py cait_s24_224 --batch 16 --dots default    # XLA's YNNPACK dots
    uv run python benchmarks/op_profile.py cait_s24_224 --dtype bfloat16 --dots eigen
    taskset -c 0 uv run python benchmarks/op_profile.py cait_s24_224 --batch 16      # one core: which ops use two
    uv run python benchmarks/op_profile.py cait_s24_224 --batch 1 --scan-blocks --compile  # where XLA's compile goes
    uv run python benchmarks/op_profile.py vit_base_patch16_224 --batch 8 --train-step     # Trainer's step

The model has random weights (``vitport.create_model``); the timing does not depend on them.
``--dots``: ``vitport`` (what ``jm.apply_fn`` compiles with, ``vitport.xla_options``), ``default``
(XLA's own options) or ``eigen`` (XLA's Eigen dots whatever the dtype). It prints the median of
``--iters`` timed calls, then each group of ops: total time per call, how many ops, the share.

The profiler times each thunk XLA runs. YNNPACK fusions and loop fusions run inside their thunk,
so their times are whole; Eigen's dots (``--dots eigen``, and float32 under ``vitport``) are
handed to the thread pool and their events time only the launch: the title says what share of
the median call the table covers. ``--dots default`` gives the complete breakdown.

``--train-step`` profiles ``vitport.training.Trainer``'s train step instead of the forward pass
(forward, backward and AdamW at ``drop_path_rate`` 0.1, its state donated as ``Trainer`` does).

``--compile`` profiles XLA's compile of the forward pass instead (the first call's largest part
in a fresh process): XLA's own phases by name (HLO passes, each fusion's MLIR compile, LLVM),
summed over threads, and the optimized HLO's fusions by kind. ``create_model``'s random init has
compiled before it, so the compiler is warm as it is after loading a checkpoint's weights with
``vitport.load``, not colder.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

import vitport
from converters import FRAMEWORKS
from vitport import xla_options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm architecture name")
    p.add_argument("--framework", default="flax", choices=list(FRAMEWORKS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "mixed"],
                   help="bfloat16: jm.astype(jnp.bfloat16); mixed: float32 weights, bfloat16 matmuls")
    p.add_argument("--dots", default="vitport", choices=["vitport", "default", "eigen"],
                   help="XLA CPU options: vitport's choice, XLA's defaults (YNNPACK), or Eigen's dots")
    p.add_argument("--scan-blocks", action="store_true", help="jm.set_scan_blocks()")
    p.add_argument("--iters", type=int, default=5, help="timed calls before the profiled ones")
    p.add_argument("--profiled", type=int, default=2, help="calls under the profiler (times are per call)")
    p.add_argument("--top", type=int, default=30, help="groups to print")
    p.add_argument("--compile", action="store_true", help="profile XLA's compile instead of the calls")
    p.add_argument("--train-step", action="store_true",
                   help="profile Trainer's train step (forward, backward, AdamW) instead of the forward pass")
    return p.parse_args(argv)


def options_for(jm, dots: str, train_step: bool = False) -> dict:
    if dots == "vitport":  # what apply_fn, or Trainer's train step, compiles with
        return xla_options.for_model(jm, gradients=train_step)
    return {"default": {}, "eigen": xla_options.eigen_dots()}[dots]


def jitted_call(jm, x: jax.Array, dots: str, train_step: bool) -> tuple:
    """``(jitted fn, its first arguments, the next call's arguments from a call's output)``: the
    forward pass, or Trainer's train step, which donates its state as ``Trainer.train_step`` does
    (each call takes the state the call before returned)."""
    options = options_for(jm, dots, train_step)
    if not train_step:
        args = (jm.params, x)
        return jax.jit(jm.front_end_apply, compiler_options=options), args, lambda out: args
    import dataclasses

    from vitport.training import TrainConfig, Trainer

    jm = dataclasses.replace(jm, config=dataclasses.replace(jm.config, layer_dropout=0.1))
    trainer = Trainer(jm, TrainConfig(total_steps=100))
    labels = jnp.asarray(np.arange(x.shape[0]) % jm.spec.num_classes, jnp.int32)
    return (jax.jit(trainer._train_step, compiler_options=options, donate_argnums=0),
            (trainer.init(jm.params), x, labels), lambda out: (out[0], x, labels))


def op_groups(trace_dir: Path, hlo_text: str, calls: int) -> list[tuple[tuple[str, str, str], float, int]]:
    """``((op kind, result shape, module path), ms per call, ops per call)``, slowest first: each
    profiled thunk matched to its instruction in the optimized HLO, block indices folded."""
    instructions = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?(\S+) = (\S+) ", line)
        if m:
            instructions[m.group(1)] = line
    trace = next(trace_dir.rglob("*.trace.json.gz"))
    events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        line = instructions.get(e["name"])
        if line is None or re.search(r" (while|conditional|call)\(", line):  # their bodies' ops are counted
            continue
        name = re.search(r'op_name="([^"]+)"', line)
        path = re.sub(r"blocks[_.]\d+", "blocks_N", name.group(1)) if name else ""
        kind = "YNNPACK fusion" if "ynn_fusion" in e["name"] else e["name"].rsplit(".", 1)[0]
        key = (kind, line.split(" = ")[1].split(" ")[0], path.removeprefix("jit(apply)/"))
        total[key] += e["dur"]
        count[key] += 1
    return [(k, v / calls / 1e3, count[k] // calls) for k, v in total.most_common()]


def compile_phases(trace_dir: Path) -> list[tuple[str, float, int]]:
    """``(XLA event name, ms, count)`` of a profiled compile, slowest first; jax's Python frames
    (``$file:line``) are left out. Events on different threads overlap: sums exceed the wall time."""
    trace = next(trace_dir.rglob("*.trace.json.gz"))
    total, count = collections.Counter(), collections.Counter()
    for e in json.load(gzip.open(trace))["traceEvents"]:
        if e.get("ph") == "X" and not e["name"].startswith("$"):
            total[e["name"]] += e["dur"]
            count[e["name"]] += 1
    return [(name, us / 1e3, count[name]) for name, us in total.most_common()]


def profile_compile(console: Console, lowered, top: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            start = time.perf_counter()
            compiled = lowered.compile()
            wall = time.perf_counter() - start
        phases = compile_phases(Path(tmp))
    table = Table(title=f"XLA compile: {wall * 1e3:.0f} ms wall; phases summed over threads")
    for col in ("ms", "count", "phase"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for name, ms, n in phases[:top]:
        table.add_row(f"{ms:.1f}", str(n), name)
    console.print(table)
    fusions = collections.Counter(re.sub(r"\.\d+$", "", m) for m in re.findall(
        r"^\s*(?:ROOT )?%(\S+) = \S+ fusion\(", compiled.as_text(), re.M))
    console.print(f"{sum(fusions.values())} fusions in the optimized HLO: "
                  + ", ".join(f"{n} {kind}" for kind, n in fusions.most_common()), soft_wrap=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    jm = vitport.create_model(args.model, args.framework)
    if args.dtype == "bfloat16":
        jm = jm.astype(jnp.bfloat16)
    elif args.dtype == "mixed":
        jm = jm.astype(jnp.float32, matmul_dtype=jnp.bfloat16)
    if args.scan_blocks:
        jm.set_scan_blocks()
    h, w = jm.spec.image_size
    x = jax.device_put(jm.as_input(np.random.default_rng(0).standard_normal((args.batch, h, w, 3), np.float32)))
    fn, call_args, next_args = jitted_call(jm, x, args.dots, args.train_step)
    what = "train step" if args.train_step else "forward"
    if args.compile:
        console.print(f"{args.model} {what} {args.framework} {args.dtype} batch {args.batch}, dots: {args.dots}, "
                      f"{'scanned' if args.scan_blocks else 'block by block'}")
        profile_compile(console, fn.lower(*call_args), args.top)
        return
    compiled = fn.lower(*call_args).compile()
    call_args = next_args(jax.block_until_ready(compiled(*call_args)))
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        call_args = next_args(jax.block_until_ready(compiled(*call_args)))
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    console.print(f"{args.model} {what} {args.framework} {args.dtype} batch {args.batch}, dots: {args.dots} "
                  f"({compiled.as_text().count('__ynn_fusion')} YNNPACK fusions): median "
                  f"{median * 1e3:.1f} ms per call, {args.batch / median:.2f} images/s ({args.iters} calls)")
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(args.profiled):
                call_args = next_args(jax.block_until_ready(compiled(*call_args)))
        groups = op_groups(Path(tmp), compiled.as_text(), args.profiled)
    profiled = sum(ms for _, ms, _ in groups)
    table = Table(title=f"XLA ops per call, grouped: {profiled:.1f} ms per call timed, {profiled / 1e3 / median:.0%} "
                        f"of the median call")
    for col in ("ms", "share", "ops", "kind", "result", "module path"):
        table.add_column(col, justify="right" if col in ("ms", "share", "ops") else "left")
    for (kind, shape, path), ms, n in groups[:args.top]:
        table.add_row(f"{ms:.1f}", f"{ms / profiled:.0%}", str(n), kind, shape, path)
    console.print(table)


if __name__ == "__main__":
    main()
