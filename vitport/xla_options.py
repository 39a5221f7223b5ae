"""XLA compiler options for vitport's jitted functions (passed per jit, never through XLA_FLAGS).

float32 on the CPU: XLA's CPU backend hands dots to YNNPACK by default, which runs the small
per-image attention products of CaiT's talking-heads map on one thread
(``benchmarks/op_profile.py`` under ``taskset -c 0`` times them as on two cores); Eigen hands its
dots to XLA's thread pool. At batch 16 Eigen ran ViT-B/16 1.07-1.18x and CaiT-S24 0.97-1.20x as
fast as YNNPACK, at batch 1 0.90-1.10x (three front-ends, 2-core AMD EPYC;
``benchmarks/README.md``; ``benchmark.py --modes float32 float32-ynnpack`` repeats it on any
machine).

bfloat16 matmuls keep XLA's default dots on a CPU with bf16 dot instructions (``avx512_bf16``,
``amx_bf16``, Arm's ``bf16``): YNNPACK's bf16-in, float32-accumulate kernel is the fast one there
(``op_profile.py --dtype bfloat16 --dots eigen`` against ``--dots vitport``). On a CPU without
them YNNPACK's bf16 kernel is slower than its own float32 and Eigen's bf16 dots are faster: on a
2-core Intel Xeon VM (AVX-512 without ``avx512_bf16``) the 2048^3 bf16 probe ran at 202 GFLOP/s
with Eigen's dots against 133 with YNNPACK's, and at batch 16 bf16 and mixed ViT-B/16 ran
1.31-1.50x and CaiT-S24 1.21-1.42x as fast with Eigen's dots, at batch 1 0.99-1.17x (three
front-ends; ``benchmark.py --modes bfloat16 bfloat16-ynnpack mixed mixed-ynnpack``;
``benchmarks/README.md``, session 9). So there bf16 gets Eigen's dots (``native_bf16_matmul``),
and bf16 stays slower than float32 all the same (no bf16 units). Where the CPU's flags cannot be
read (no ``/proc/cpuinfo``) bf16 keeps XLA's defaults. float64 and float16 keep XLA's defaults
(Eigen either way for float64); params on another backend get no options (they are CPU ones).

The same float32 CPU jits compile XLA's fused loops with LLVM at -O1
(``xla_backend_optimization_level=1``, below XLA's default): scanned CaiT-S24's XLA compile took
11-13 % less time and block by block 6 % less, while ViT-B/16 and CaiT-S24 ran as fast at batch 1
and 16, logits equal or within 2e-6 (2-core EPYC; ``benchmarks/README.md``, 2026-12-03 session 7;
``benchmarks/compile_options.py`` repeats it). A level set in XLA_FLAGS wins.

Every CPU jit, float32 or not, also keeps jax's optimization barriers through XLA's fusion
(``keep_barriers``): the one on each block's output, transposed onto the residual stream's
gradient, stops XLA's CPU fusion from recomputing every later block's gradient adds inside each
block's backward. Block by block, the
ViT-B/16 train step at batch 8 then compiled in 7.5 s against 14.2 s and ran in 7.2 s against
9.7 s, same loss and params within 2e-7; forward passes compile to the same fusions
(``benchmarks/compile_options.py --train-step``; ``benchmarks/README.md``, session 8).

``VITPORT_XLA_CPU_DOTS=default`` in the environment turns the choice off (XLA's defaults for
every model), to compare or to work around an XLA change.

jax takes ``compiler_options`` on a top-level jit only (a nested one raises ``ValueError``), and a
user's own ``jax.jit``, ``grad`` or ``vmap`` around ``apply_fn`` must keep working: ``jit`` below
compiles with the options when called at the top level and runs the plain jit under a trace
(where the outer jit's compile decides anyway).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

EIGEN_DOTS = (("xla_cpu_experimental_ynn_fusion_type", ""),)  # no YNNPACK fusions: Eigen's dots
FAST_BACKEND = (("xla_backend_optimization_level", 1),)  # LLVM -O1 for the fused loops: faster compile
# XLA passes vitport's CPU jits turn off: the one that drops jax's optimization barriers before
# fusing (see keep_barriers), and in forward passes the tree-reduction rewrite (the note after it)
BARRIER_PASS, TREE_REDUCTION_PASS = "cse_barrier_expander", "tree_reduction_rewriter"
KEEP_BARRIERS = (("xla_disable_hlo_passes", BARRIER_PASS),)
KEEP_BARRIERS_PLAIN_REDUCTIONS = (("xla_disable_hlo_passes", f"{BARRIER_PASS},{TREE_REDUCTION_PASS}"),)
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") of bf16 dot instructions: YNNPACK's fast bf16 kernel
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=None)
def _accepted(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib knows the options (they are experimental: a newer XLA may drop them)."""
    try:
        jax.jit(lambda a: a + 1, compiler_options=dict(options)).lower(jnp.zeros(1, jnp.float32)).compile()
    except Exception:  # noqa: BLE001  (XLA reports an unknown option as a generic runtime error)
        return False
    return True


class TopLevelJit:
    """``jax.jit(fun, **jit_kwargs)`` that compiles with ``options`` when called at the top level
    and runs as the plain jit under a trace. Attributes (``lower``, ``trace``, ``eval_shape``,
    ...) are the top-level jit's."""

    def __init__(self, fun: Callable, options: dict[str, Any], **jit_kwargs: Any):
        self.plain = jax.jit(fun, **jit_kwargs)
        self.top_level = jax.jit(fun, compiler_options=options, **jit_kwargs) if options else self.plain
        functools.update_wrapper(self, fun)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.top_level is self.plain or _traced(args, kwargs):
            return self.plain(*args, **kwargs)
        return self.top_level(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names the instance lacks
        try:
            top_level = self.__dict__["top_level"]
        except KeyError:  # not initialised (copy, unpickling): a plain miss
            raise AttributeError(name) from None
        return getattr(top_level, name)


def _traced(*trees: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def jit(fun: Callable, options: dict[str, Any], **jit_kwargs: Any) -> TopLevelJit:
    """``jax.jit(fun, **jit_kwargs)`` compiled with ``options`` at the top level (``TopLevelJit``)."""
    return TopLevelJit(fun, options, **jit_kwargs)


def eigen_dots() -> dict[str, Any]:
    """The options that give XLA's CPU dots to Eigen, or ``{}`` where this jaxlib lacks them."""
    return dict(EIGEN_DOTS) if _accepted(EIGEN_DOTS) else {}


def _unless_user_set(options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """``options``, or ``{}`` where XLA_FLAGS sets one of them (a per-jit option would override
    the user's choice) or this jaxlib refuses them."""
    if not options or any(name in os.environ.get("XLA_FLAGS", "") for name, _ in options):
        return {}
    return dict(options) if _accepted(options) else {}


def fast_backend() -> dict[str, Any]:
    """The option that compiles XLA's fused loops at LLVM -O1 (``_unless_user_set``)."""
    return _unless_user_set(FAST_BACKEND)


def keep_barriers(tree_reductions: bool = True) -> dict[str, Any]:
    """The option that keeps ``jax.lax.optimization_barrier`` through XLA's CPU fusion, whose
    ``cse_barrier_expander`` pass otherwise removes the barriers before fusing. vitport puts one
    on each block's output (``structure._block_output``); its transpose puts one on the residual
    stream's gradient, which XLA then materialises once per block instead of fusing the later
    blocks' whole chain of gradient adds into every block's backward. Without ``tree_reductions``
    (a forward pass) the same pass list also turns XLA's tree-reduction rewrite off (the note below;
    ``_unless_user_set``: a pass list in XLA_FLAGS wins, as a per-jit one would replace it)."""
    return _unless_user_set(KEEP_BARRIERS if tree_reductions else KEEP_BARRIERS_PLAIN_REDUCTIONS)


# Forward passes without XLA's tree-reduction rewrite (TREE_REDUCTION_PASS)
#
# XLA's CPU pipeline rewrites every reduction over an axis longer than 32 into a ``reduce-window``
# of 32-wide chunks and a second reduce, for precision over long sums. A forward pass's reductions
# are over one row (LayerNorm's 768 features, the softmax's 197 keys), where XLA's plain reduce
# keeps float32 sums as close (relative error 1-3e-7 against float64, the tree's too) and runs
# 3.4x as fast (``benchmarks/reductions.py``); the rewrite also adds two fusions per reduction
# for XLA to compile. Without it, in two runs of ``benchmarks/compile_options.py`` on a 2-core
# Intel Xeon VM (``benchmarks/README.md``, session 10), XLA's compile took 5-16 % less CPU time
# for scanned CaiT-S24 and 11-19 % less for ViT-B/16, batch-1 calls 4-6 % less and batch-16 ones
# 1-5 % less, logits within 1e-8. Gradients keep the rewrite: a bias's or LayerNorm scale's
# gradient sums down a column of (batch x tokens) rows, where XLA's plain reduce ran 2.5-5x
# slower than the rewrite, and ViT-B/16's batch-8 train step took 12.1 s of CPU time with the
# rewrite against 14.6 s without. Hybrids keep it in forward passes too (``for_model``).


def float32_cpu(tree_reductions: bool = True) -> dict[str, Any]:
    """vitport's options for float32 on the CPU: Eigen's dots, LLVM -O1 for the fused loops,
    optimization barriers kept through fusion, and without ``tree_reductions`` (a forward pass)
    XLA's plain reductions."""
    return {**eigen_dots(), **fast_backend(), **keep_barriers(tree_reductions)}


def cpu_flags(cpuinfo: str) -> frozenset[str] | None:
    """The first processor's flags in ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features``),
    or None where the text has neither."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


@functools.lru_cache(maxsize=None)
def native_bf16_matmul() -> bool | None:
    """Whether this machine's CPU has bf16 dot instructions (``NATIVE_BF16_FLAGS``); None where
    its flags cannot be read (no ``/proc/cpuinfo``: macOS, Windows)."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return None
    return None if flags is None else bool(flags & NATIVE_BF16_FLAGS)


def low_precision_cpu(matmul_dtype: Any, tree_reductions: bool = True) -> dict[str, Any]:
    """vitport's options for matmuls in ``matmul_dtype`` other than float32 on the CPU: the block
    barriers (``keep_barriers``, with ``tree_reductions``' pass list) in every dtype, and for bfloat16
    on a CPU without bf16 dot instructions Eigen's dots, faster there than YNNPACK's (module
    docstring)."""
    if jnp.dtype(matmul_dtype) == jnp.bfloat16 and native_bf16_matmul() is False:
        return {**eigen_dots(), **keep_barriers(tree_reductions)}
    return keep_barriers(tree_reductions)


def _on_cpu(leaf: Any) -> bool:
    devices = getattr(leaf, "devices", None)
    if devices is None:  # a numpy array or an abstract value: placed on the default backend
        return jax.default_backend() == "cpu"
    return all(d.platform == "cpu" for d in devices())


def compiler_options(params: Any, matmul_dtype: Any = None, tree_reductions: bool = False) -> dict[str, Any]:
    """The options for a jit computing with ``params`` (any tree of arrays) whose matmuls take
    ``matmul_dtype`` inputs (None: the params' own dtype): ``float32_cpu()`` for float32 on the
    CPU, ``low_precision_cpu()`` for other dtypes on the CPU; ``{}`` off the CPU.
    ``tree_reductions``: keep XLA's tree-reduction rewrite (a train step's column sums; the note
    after ``keep_barriers``)."""
    if os.environ.get("VITPORT_XLA_CPU_DOTS", "eigen") == "default":
        return {}
    floats = [leaf for leaf in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    if not floats or not all(_on_cpu(leaf) for leaf in floats):
        return {}
    if matmul_dtype is None:
        low = [jnp.result_type(leaf) for leaf in floats if jnp.result_type(leaf) != jnp.float32]
        matmul_dtype = low[0] if low else None
    if matmul_dtype is not None and jnp.dtype(matmul_dtype) != jnp.float32:
        return low_precision_cpu(matmul_dtype, tree_reductions)
    return float32_cpu(tree_reductions)


def for_model(jm: Any, compute_dtype: Any = None, gradients: bool = False) -> dict[str, Any]:
    """``compiler_options`` for a ``JaxModel``'s params and config (``compute_dtype``: a
    training cast of the params, ``TrainConfig.compute_dtype``; ``gradients``: a jit that
    differentiates the model). A hybrid's CNN stem keeps XLA's tree reductions in its forward
    passes too: its standardized conv weights and GroupNorm sum over kernel and image axes
    (column sums), where the plain reduce is the slow form (``vit_small_r26_s32_224`` at batch
    1: 375 against 275 ms of CPU per call; ``benchmarks/README.md``, session 10)."""
    tree = gradients or getattr(jm.spec, "backbone", None) is not None
    low = (compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32) or (
        jm.config.dtype is not None and jnp.dtype(jm.config.dtype) != jnp.float32)
    if low:  # float32 params computing in another dtype
        return compiler_options(jm.params, compute_dtype or jm.config.dtype, tree)
    return compiler_options(jm.params, jm.config.matmul_dtype, tree)
