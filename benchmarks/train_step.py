"""One training step, vitport's ``Trainer.train_step`` against timm's eager PyTorch step, in one
process on the same weights (issue 11): steady time per step, images/s, the ratio to timm, and the
minor page faults per step (first touches of fresh memory: XLA allocates each call's temporaries
afresh).

    uv run python benchmarks/train_step.py vit_base_patch16_224 --batches 1 8
    uv run python benchmarks/train_step.py cait_s24_224 --blocks scanned --batches 8
    uv run python benchmarks/train_step.py vit_base_patch16_224 --blocks unrolled --compute-dtypes float32 bfloat16 \
        --dots vitport default   # bf16 compute, vitport's XLA options against XLA's defaults

Both sides take the same step: cross-entropy with label smoothing 0.1, AdamW (lr 1e-4, weight
decay 0.05), ``drop_path_rate`` 0.1, train mode. timm runs ``zero_grad``, forward, backward and
``optimizer.step()`` with torch's default threads (one per core); vitport runs ``Trainer.train_step``,
which donates its state, with the blocks one by one (``unrolled``) and/or as one ``lax.scan``
(``scanned``, ``set_scan_blocks()``). After one untimed call each (vitport's compiles, and its
compile time is printed), ``--steps`` rounds call every implementation in turn, so background load
hits them alike; the median per implementation is reported. ``--compute-dtypes bfloat16`` adds
vitport steps computing in bfloat16 on float32 params (``TrainConfig.compute_dtype``; timm's row
stays float32), ``--dots default`` steps compiled with XLA's default options instead of
vitport's (``vitport.xla_options``).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

import vitport
from converters import FRAMEWORKS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="timm architecture name")
    p.add_argument("--framework", default="flax", choices=list(FRAMEWORKS))
    p.add_argument("--blocks", nargs="+", default=["unrolled", "scanned"], choices=["unrolled", "scanned"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=3, help="timed steps per implementation and batch")
    p.add_argument("--depth", type=int, help="blocks (default: the architecture's own)")
    p.add_argument("--compute-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="vitport's compute dtype (TrainConfig.compute_dtype; params stay float32)")
    p.add_argument("--dots", nargs="+", default=["vitport"], choices=["vitport", "default"],
                   help="XLA options: vitport's (vitport.xla_options) or XLA's defaults")
    return p.parse_args(argv)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timm_step(model, batch: int, rng: np.random.Generator):
    """A closure running one eager timm training step on a fixed batch."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.from_numpy(rng.standard_normal((batch, 3, *model.pretrained_cfg["input_size"][1:]), np.float32))
    y = torch.from_numpy(rng.integers(0, model.num_classes, batch))

    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step


def vitport_step(jm: vitport.JaxModel, batch: int, rng: np.random.Generator, compute_dtype: str = "float32",
                 dots: str = "vitport"):
    """``(step, compile_s)``: a closure running one donated ``Trainer.train_step`` (each call takes
    the state the call before returned), compiled and run once already. ``dots="default"``: the
    same step compiled with XLA's default options."""
    from vitport.training import TrainConfig, Trainer

    trainer = Trainer(jm, TrainConfig(total_steps=100, lr=1e-4, weight_decay=0.05, label_smoothing=0.1,
                                      compute_dtype=None if compute_dtype == "float32" else compute_dtype))
    train_step = trainer.train_step if dots == "vitport" else jax.jit(trainer._train_step, donate_argnums=0)
    h, w = jm.spec.image_size
    x = jax.device_put(rng.standard_normal((batch, h, w, jm.spec.channels)).astype(np.float32))
    y = jax.device_put(rng.integers(0, jm.spec.num_classes, batch).astype(np.int32))
    state = [trainer.init(jm.params)]
    t = time.perf_counter()
    compiled = train_step.lower(state[0], x, y).compile()
    compile_s = time.perf_counter() - t

    def step():
        state[0], metrics = compiled(state[0], x, y)
        jax.block_until_ready((state[0], metrics))
    step()
    return step, compile_s


def main(argv=None) -> None:
    import timm
    import torch

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    kwargs = {} if args.depth is None else {"depth": args.depth}
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, drop_path_rate=0.1, **kwargs).train()
    jm = vitport.from_timm(model, args.framework)
    jm = dataclasses.replace(jm, config=dataclasses.replace(jm.config, layer_dropout=0.1))
    console.print(f"{args.model}: {jax.device_count()} {jax.default_backend()} device(s), torch threads "
                  f"{torch.get_num_threads()}, vitport {args.framework}, float32 params")
    table = Table(title=f"train step, median of {args.steps} (implementations called in turn)")
    for col in ("batch", "implementation", "compile (s)", "step (ms)", "images/s", "vs timm eager", "faults/step"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    for batch in args.batches:
        rng = np.random.default_rng(batch)
        steps, compile_s = {"timm eager": timm_step(model, batch, rng)}, {}
        steps["timm eager"]()  # its first step allocates the optimizer state
        for blocks in args.blocks:
            for dtype in args.compute_dtypes:
                for dots in args.dots:
                    name = " ".join(["vitport", blocks] + [dtype] * (args.compute_dtypes != ["float32"])
                                    + ["xla-default-dots"] * (dots == "default"))
                    steps[name], compile_s[name] = vitport_step(jm.set_scan_blocks(blocks == "scanned"), batch,
                                                                rng, dtype, dots)
        times = {name: [] for name in steps}
        faults = {name: [] for name in steps}
        for _ in range(args.steps):
            for name, step in steps.items():
                f, t = minor_faults(), time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
                faults[name].append(minor_faults() - f)
        timm_s = statistics.median(times["timm eager"])
        for name in steps:
            s = statistics.median(times[name])
            table.add_row(str(batch), name, f"{compile_s[name]:.2f}" if name in compile_s else "",
                          f"{s * 1e3:.0f}", f"{batch / s:.2f}", f"{timm_s / s:.2f}x",
                          f"{statistics.median(faults[name]):.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
