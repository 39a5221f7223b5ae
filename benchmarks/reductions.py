"""XLA's CPU reductions with and without its tree-reduction rewrite, at a ViT's shapes (issue 11).

XLA's CPU pipeline rewrites a reduction over an axis longer than 32 into a ``reduce-window`` of
32-wide chunks and a second reduce (``tree_reduction_rewriter``, for precision over long sums).
vitport turns the rewrite off in forward passes and keeps it in train steps
(``vitport.xla_options.keep_barriers``). This script times, in one process, interleaved round by
round, each reduction of a sum of squares compiled both ways, and its relative error against
numpy's float64 sum:

- ``rows``: LayerNorm's statistics, (B, N, D) summed over D;
- ``softmax rows``: the attention softmax's sums, (B, heads, N, N) over the keys;
- ``columns``: a bias gradient, (B*N, width) summed over the rows (width D, 3D, the MLP's), also
  as a matrix-vector dot with a ones vector (``dot``);
- ``whole``: a gradient norm's sum over a (4D, D) weight::

    uv run python benchmarks/reductions.py --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vitport import xla_options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=197, help="N (ViT-B/16 at 224: 197)")
    p.add_argument("--dim", type=int, default=768, help="D")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--rounds", type=int, default=15)
    return p.parse_args(argv)


def cases(a: argparse.Namespace) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """name: (shape, axis summed; None: every axis)."""
    rows = a.batch * a.tokens
    return {
        f"rows {(a.batch, a.tokens, a.dim)}": ((a.batch, a.tokens, a.dim), -1),
        f"softmax rows {(a.batch, a.heads, a.tokens, a.tokens)}": ((a.batch, a.heads, a.tokens, a.tokens), -1),
        **{f"columns {(rows, w)}": ((rows, w), 0) for w in (a.dim, 3 * a.dim, 4 * a.dim)},
        f"whole {(4 * a.dim, a.dim)}": ((4 * a.dim, a.dim), None),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    options = {"plain (forward passes)": xla_options.float32_cpu(tree_reductions=False),
               "tree (train steps)": xla_options.float32_cpu(tree_reductions=True)}
    rng = np.random.default_rng(0)
    print(f"sum of squares, float32, median of {args.rounds} calls; relative error against float64")
    for name, (shape, axis) in cases(args).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        exact = np.sum(np.square(x, dtype=np.float64), axis=axis)
        xd = jax.device_put(x)
        compiled = {k: jax.jit(lambda v: jnp.sum(v * v, axis=axis), compiler_options=o).lower(xd).compile()
                    for k, o in options.items()}
        if axis == 0:  # a column sum as a matrix-vector dot, onesᵀ · x (how a custom_jvp bias add would take it)
            compiled["dot"] = jax.jit(lambda v: jnp.ones((v.shape[0],), v.dtype) @ (v * v),
                                      compiler_options=options["tree (train steps)"]).lower(xd).compile()
        times: dict[str, list[float]] = {k: [] for k in compiled}
        for _ in range(args.rounds):
            for k, f in compiled.items():
                start = time.perf_counter()
                jax.block_until_ready(f(xd))
                times[k].append(time.perf_counter() - start)
        line = []
        for k, f in compiled.items():
            err = float(np.max(np.abs(np.asarray(f(xd), np.float64) - exact) / np.abs(exact)))
            text = f.as_text()
            windows = "reduce-window" if "reduce-window(" in text else "dot" if " dot(" in text else "reduce"
            line.append(f"{k}: {statistics.median(times[k]) * 1e3:7.2f} ms, {windows}, rel. error {err:.1e}")
        print(f"{name:32s} " + " | ".join(line))


if __name__ == "__main__":
    main()
