"""XLA compiler options against each other on one model: compile time, run time, logits (issue 11).

Each ``--options`` value is a JSON object of XLA options added to what ``vitport.xla_options``
gives the model (``{}``: vitport's own choice; a ``null`` value drops that option, leaving XLA's
default; ``"xla"``: XLA's defaults alone). In one process,
interleaved round by round so background load hits all alike:

1. **compile**: the forward pass lowered afresh (``jax.clear_caches()`` first) and compiled,
   ``--compile-rounds`` times per value: the median wall time and the process's CPU time (XLA
   compiles on every core);
2. **run**: the compiled forward pass at each ``--batches`` size, ``--rounds`` timed calls per
   value after one untimed, and the largest logit difference from the first value's.

Weights are drawn on the host and loaded as a checkpoint's would be (``vitport.from_state_dict``),
so no random-init compile warms the compiler first::

    uv run python benchmarks/compile_options.py cait_s24_224 --scan-blocks \\
        --options '{}' '{"xla_backend_optimization_level": 1}' --batches 1 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import jax
import numpy as np

import vitport
from converters import FRAMEWORKS, key_table
from converters.architectures import arch_spec
from vitport import xla_options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm architecture name")
    p.add_argument("--framework", default="flax", choices=list(FRAMEWORKS))
    p.add_argument("--scan-blocks", action="store_true", help="jm.set_scan_blocks()")
    p.add_argument("--options", nargs="+", default=["{}", '{"xla_backend_optimization_level": 1}'],
                   help='JSON objects of XLA options added to vitport\'s own (null drops one); "xla" for '
                        "XLA's defaults alone")
    p.add_argument("--compile-rounds", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="run-time batch sizes (none: skip)")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per value and batch")
    return p.parse_args(argv)


def model(name: str, framework: str, scan: bool) -> vitport.JaxModel:
    spec = arch_spec(name)
    rng = np.random.default_rng(0)
    weights = {e.timm_key: (0.02 * rng.standard_normal(e.timm_shape)).astype(np.float32) for e in key_table(spec)}
    return vitport.from_state_dict(weights, spec, framework).set_scan_blocks(scan)


def options_of(value: str, jm: vitport.JaxModel) -> dict[str, Any]:
    if value == "xla":
        return {}
    merged = {**xla_options.for_model(jm), **json.loads(value)}
    return {k: v for k, v in merged.items() if v is not None}


def main(argv=None) -> None:
    args = parse_args(argv)
    jm = model(args.model, args.framework, args.scan_blocks)
    options = {value: options_of(value, jm) for value in args.options}
    rng = np.random.default_rng(1)
    inputs = {b: jax.device_put(jm.as_input(rng.standard_normal((b, *jm.spec.image_size, 3)).astype(np.float32)))
              for b in [1, *args.batches]}

    def lowered(opts: dict[str, Any], batch: int):
        return jax.jit(jm.front_end_apply, compiler_options=opts).lower(jm.params, inputs[batch])

    print(f"{args.model} ({args.framework}, {'scanned' if args.scan_blocks else 'block by block'}); "
          f"vitport's own options: {xla_options.for_model(jm)}")
    lowered(next(iter(options.values())), 1).compile()  # LLVM's and XLA's one-time start-up
    wall: dict[str, list[float]] = {v: [] for v in options}
    cpu: dict[str, list[float]] = {v: [] for v in options}
    for _ in range(args.compile_rounds):
        for value, opts in options.items():
            jax.clear_caches()  # jax would hand back the executable it compiled last round
            low = lowered(opts, 1)
            t, c = time.perf_counter(), time.process_time()
            low.compile()
            wall[value].append(time.perf_counter() - t)
            cpu[value].append(time.process_time() - c)
    print(f"\nXLA compile at batch 1, median of {args.compile_rounds}:")
    for value in options:
        print(f"  {value:<48} {statistics.median(wall[value]):6.3f} s wall "
              f"({min(wall[value]):.3f}-{max(wall[value]):.3f}), {statistics.median(cpu[value]):6.3f} s CPU")

    for batch in args.batches:
        compiled = {value: lowered(opts, batch).compile() for value, opts in options.items()}
        logits = {value: np.asarray(f(jm.params, inputs[batch])) for value, f in compiled.items()}
        times: dict[str, list[float]] = {v: [] for v in options}
        for _ in range(args.rounds):
            for value, f in compiled.items():
                t = time.perf_counter()
                jax.block_until_ready(f(jm.params, inputs[batch]))
                times[value].append(time.perf_counter() - t)
        first = logits[args.options[0]]
        print(f"\nrun at batch {batch}, median of {args.rounds} calls:")
        for value in options:
            diff = float(np.abs(logits[value] - first).max())
            print(f"  {value:<48} {statistics.median(times[value]) * 1e3:9.1f} ms "
                  f"({min(times[value]) * 1e3:.1f}-{max(times[value]) * 1e3:.1f}), max |Δlogit| {diff:.2e}")


if __name__ == "__main__":
    main()
