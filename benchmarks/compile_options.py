"""XLA compiler options against each other on one model: compile time, run time, logits (issue 11).

Each ``--options`` value is a JSON object of XLA options added to what ``vitport.xla_options``
gives the model (``{}``: vitport's own choice; a ``null`` value drops that option, leaving XLA's
default; ``"xla"``: XLA's defaults alone). In one process,
interleaved round by round so background load hits all alike:

1. **compile**: the forward pass lowered afresh (``jax.clear_caches()`` first) and compiled,
   ``--compile-rounds`` times per value: the median wall time and the process's CPU time (XLA
   compiles on every core);
2. **run**: the compiled forward pass at each ``--batches`` size, ``--rounds`` timed calls per
   value after one untimed: median wall time, median CPU time of the process (on a VM whose
   hypervisor steals time the CPU time moves less than the wall time), and the largest logit
   difference from the first value's.

``--train-step`` times ``vitport.training.Trainer``'s train step instead (forward, backward and
AdamW at ``drop_path_rate`` 0.1, not donating its state so every call takes the same one), and
compares each value's loss and updated params with the first value's.

Weights are drawn on the host and loaded as a checkpoint's would be (``vitport.from_state_dict``),
so no random-init compile warms the compiler first::

    uv run python benchmarks/compile_options.py cait_s24_224 --scan-blocks \\
        --options '{}' '{"xla_backend_optimization_level": 1}' --batches 1 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from typing import Any, Callable

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
    p.add_argument("--depth", type=int, help="blocks (default: the architecture's own)")
    p.add_argument("--options", nargs="+", default=["{}", '{"xla_backend_optimization_level": 1}'],
                   help='JSON objects of XLA options added to vitport\'s own (null drops one); "xla" for '
                        "XLA's defaults alone")
    p.add_argument("--compile-rounds", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16], help="run-time batch sizes (none: skip)")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per value and batch")
    p.add_argument("--train-step", action="store_true",
                   help="time Trainer's train step (forward, backward, AdamW) instead of the forward pass")
    return p.parse_args(argv)


def model(name: str, framework: str, scan: bool, depth: int | None = None,
          drop_path_rate: float = 0.0) -> vitport.JaxModel:
    spec = arch_spec(name) if depth is None else arch_spec(name, depth=depth)
    rng = np.random.default_rng(0)
    weights = {e.timm_key: (0.02 * rng.standard_normal(e.timm_shape)).astype(np.float32) for e in key_table(spec)}
    jm = vitport.from_state_dict(weights, spec, framework)
    jm = dataclasses.replace(jm, config=dataclasses.replace(jm.config, layer_dropout=drop_path_rate))
    return jm.set_scan_blocks(scan)


def forward(jm: vitport.JaxModel, rng: np.random.Generator) -> tuple[Callable, Callable]:
    """``(fn, args_at)``: the forward pass and its arguments at a batch size."""
    def args_at(batch: int) -> tuple:
        x = rng.standard_normal((batch, *jm.spec.image_size, 3)).astype(np.float32)
        return jm.params, jax.device_put(jm.as_input(x))
    return jm.front_end_apply, args_at


def train_step(jm: vitport.JaxModel, rng: np.random.Generator) -> tuple[Callable, Callable]:
    """``(fn, args_at)``: Trainer's step, undonated (every call takes the same state)."""
    from vitport.training import TrainConfig, Trainer

    trainer = Trainer(jm, TrainConfig(total_steps=100))
    state = trainer.init(jm.params)

    def args_at(batch: int) -> tuple:
        x = rng.standard_normal((batch, *jm.spec.image_size, 3)).astype(np.float32)
        labels = rng.integers(0, jm.spec.num_classes, batch).astype(np.int32)
        return state, jax.device_put(x), jax.device_put(labels)
    return trainer._train_step, args_at


def outputs(out: Any) -> np.ndarray:
    """The forward pass's logits, or the train step's loss and updated params, as one vector."""
    return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(out)])


def options_of(value: str, jm: vitport.JaxModel, train_step: bool) -> dict[str, Any]:
    if value == "xla":
        return {}
    merged = {**xla_options.for_model(jm, gradients=train_step), **json.loads(value)}
    return {k: v for k, v in merged.items() if v is not None}


def main(argv=None) -> None:
    args = parse_args(argv)
    jm = model(args.model, args.framework, args.scan_blocks, args.depth, 0.1 if args.train_step else 0.0)
    options = {value: options_of(value, jm, args.train_step) for value in args.options}
    fn, args_at = (train_step if args.train_step else forward)(jm, np.random.default_rng(1))
    inputs = {b: args_at(b) for b in [1, *args.batches]}

    def lowered(opts: dict[str, Any], batch: int):
        return jax.jit(fn, compiler_options=opts).lower(*inputs[batch])

    what = "Trainer's train step" if args.train_step else "forward pass"
    print(f"{args.model} {what} ({args.framework}, {'scanned' if args.scan_blocks else 'block by block'}); "
          f"vitport's own options: {xla_options.for_model(jm, gradients=args.train_step)}")
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
        results = {value: outputs(f(*inputs[batch])) for value, f in compiled.items()}
        times: dict[str, list[float]] = {v: [] for v in options}
        cpu_times: dict[str, list[float]] = {v: [] for v in options}
        for _ in range(args.rounds):
            for value, f in compiled.items():
                t, c = time.perf_counter(), time.process_time()
                jax.block_until_ready(f(*inputs[batch]))
                times[value].append(time.perf_counter() - t)
                cpu_times[value].append(time.process_time() - c)
        first = results[args.options[0]]
        print(f"\nrun at batch {batch}, median of {args.rounds} calls:")
        for value in options:
            diff = float(np.abs(results[value] - first).max())
            print(f"  {value:<48} {statistics.median(times[value]) * 1e3:9.1f} ms "
                  f"({min(times[value]) * 1e3:.1f}-{max(times[value]) * 1e3:.1f}), "
                  f"{statistics.median(cpu_times[value]) * 1e3:9.1f} ms CPU, "
                  f"max |Δ{'loss, params' if args.train_step else 'logit'}| {diff:.2e}")


if __name__ == "__main__":
    main()
