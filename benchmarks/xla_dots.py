"""XLA's CPU dot back-ends on a model and on its attention products (issue 11).

``vitport.xla_options`` compiles float32 with Eigen's dots (``xla_cpu_experimental_ynn_fusion_type``
empty); XLA's default hands dots to YNNPACK. This script times, in one process:

1. the batched attention products at the model's shapes (``q·kᵀ`` and ``weights·v`` over
   (B, heads, N, Dh)) under each back-end, whole and with the batch split into independent dots;
2. the whole model's forward pass compiled with each ``--fusion-types`` value, interleaved round
   by round so background load hits all alike.

Run it twice, as it is and under ``taskset -c 0``, to see which products use the second core::

    uv run python benchmarks/xla_dots.py vit_base_patch16_224 --batch 16
    taskset -c 0 uv run python benchmarks/xla_dots.py vit_base_patch16_224 --batch 16 --no-model
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import vitport

OPTION = "xla_cpu_experimental_ynn_fusion_type"
# "" = no YNNPACK fusions (Eigen's dots, vitport's float32 choice); "default" = XLA's own setting;
# the rest are the option's enum names (comma-separated lists are accepted too).
FUSION_TYPES = ("", "default", "LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


def compiler_options(fusion_type: str) -> dict[str, Any]:
    return {} if fusion_type == "default" else {OPTION: fusion_type}


def label(fusion_type: str) -> str:
    return {"": "eigen", "default": "xla default (ynnpack)"}.get(fusion_type, fusion_type)


def median_ms(f: Callable, *args: Any, rounds: int) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def attention_products(spec: Any, batch: int, fusion_types: list[str], splits: list[int], rounds: int) -> None:
    heads, dim = spec.heads, spec.dim
    # CaiT's self-attention blocks see the patches only (the class token joins in class attention)
    tokens = int(np.prod(spec.grid_size)) + (0 if spec.family == "cait" else spec.num_prefix_tokens)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, heads, tokens, dim // heads), np.float32)) for _ in range(3))
    w = jnp.asarray(rng.random((batch, heads, tokens, tokens), np.float32))
    flops = 2 * batch * heads * tokens * tokens * (dim // heads)
    products = {"q·kᵀ": ("bhqd,bhkd->bhqk", q, k), "weights·v": ("bhqk,bhkd->bhqd", w, v)}
    print(f"attention products, batch {batch}, (B, heads, N, Dh) = {q.shape}: {flops / 1e9:.2f} GFLOP each")
    for name, (eq, a, b) in products.items():
        for fusion_type in fusion_types:
            for parts in splits:
                def product(a, b, parts=parts, eq=eq):
                    pieces = zip(jnp.array_split(a, parts), jnp.array_split(b, parts))
                    return jnp.concatenate([jnp.einsum(eq, x, y) for x, y in pieces])
                f = jax.jit(product, compiler_options=compiler_options(fusion_type))
                ms = median_ms(f, a, b, rounds=rounds)
                how = "whole" if parts == 1 else f"batch in {parts} dots"
                print(f"  {name:9s} {label(fusion_type):38s} {how:17s} {ms:8.2f} ms  {flops / ms / 1e6:6.1f} GFLOP/s")


def whole_model(name: str, jm: vitport.JaxModel, batch: int, fusion_types: list[str], rounds: int) -> None:
    spec = jm.spec
    x = jax.device_put(jm.as_input(np.random.default_rng(0).standard_normal(
        (batch, *spec.image_size, spec.channels)).astype(np.float32)))
    compiled = {}
    for fusion_type in fusion_types:
        f = jax.jit(jm.front_end_apply, compiler_options=compiler_options(fusion_type))  # as op_profile.py compiles
        fusions = f.lower(jm.params, x).compile().as_text().count("__ynn_fusion")
        compiled[fusion_type] = (f, fusions, np.asarray(f(jm.params, x)))
    times: dict[str, list[float]] = {t: [] for t in fusion_types}
    for _ in range(rounds):
        for fusion_type, (f, _, _) in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(f(jm.params, x))
            times[fusion_type].append(time.perf_counter() - start)
    reference = compiled[fusion_types[0]][2]
    print(f"{name}, batch {batch}, whole forward pass (Haiku), median of {rounds} interleaved rounds")
    for fusion_type, (_, fusions, out) in compiled.items():
        print(f"  {label(fusion_type):38s} {fusions:4d} YNNPACK fusions {np.median(times[fusion_type]) * 1e3:9.1f} ms"
              f"  max |Δ| vs {label(fusion_types[0])} {np.abs(out - reference).max():.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default="vit_base_patch16_224", help="timm architecture name")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fusion-types", nargs="+", default=list(FUSION_TYPES),
                   help=f'values of {OPTION} ("" = Eigen dots, "default" = XLA\'s own setting)')
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4], help="split the batch into this many dots")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-model", action="store_true", help="only the attention products")
    args = p.parse_args()
    jm = vitport.create_model(args.model, "haiku")  # random weights: the timing does not depend on them
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    attention_products(jm.spec, args.batch, args.fusion_types, args.splits, max(args.rounds, 10))
    if not args.no_model:
        whole_model(args.model, jm, args.batch, args.fusion_types, args.rounds)


if __name__ == "__main__":
    main()
