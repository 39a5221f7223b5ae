"""Inference throughput against the machine's own matmul peak: timm (eager, torch.compile, bf16
autocast) and every vitport front-end (float32, bfloat16, mixed) in one run.

    uv run python benchmarks/benchmark.py                      # both models, batch 1 and 16
    uv run python benchmarks/benchmark.py --models cait_s24_224 --batches 1 --iters 5 --json out.json
    uv run python benchmarks/benchmark.py --sweep              # batch 1 2 4 8 16 32

It first measures the machine's matmul peak (2048^3, XLA and torch, float32 and bfloat16), then
reports each model's throughput as a fraction of that peak (FLOPs per image counted from the
spec: see ``model_flops``) beside its ratio to timm measured in the same run, and the time and
peak memory of ``vitport convert`` of cait_s24_224 from a local safetensors file. Every JAX
model is converted from the very timm model it is compared with and its logits are checked
against timm's float32 logits, so a broken port cannot look fast. This is a benchmark, not a
test: it only fails (exit status 1) when the outputs disagree.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import vitport
from vitport import xla_options

from converters import FRAMEWORKS  # every front-end in the registry
from converters.specs import CaiTSpec, Spec

DEFAULT_MODELS = ("vit_base_patch16_224", "cait_s24_224")
MODES = ("float32", "bfloat16", "mixed")
# each mode compiled with XLA's default CPU dots (YNNPACK) instead of vitport.xla_options' choice: what it gains
EXTRA_MODES = ("float32-ynnpack", "bfloat16-ynnpack", "mixed-ynnpack")
FIRST_CALL_OF = ("apply", "train_step")  # what the first call against depth times
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
             "amx_bf16", "amx_int8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS), help="timm architecture names (none: skip)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="batch sizes")
    p.add_argument("--sweep", action="store_true", help="batch sizes 1 2 4 8 16 32 (overrides --batches)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES + EXTRA_MODES,
                   help="vitport precisions: float32, bfloat16 (bf16 weights and matmuls), mixed (float32 "
                        "weights, bfloat16 matmuls); MODE-ynnpack: MODE compiled with XLA's defaults (its "
                        "YNNPACK dots) instead of vitport's options (vitport.xla_options), not in the default")
    p.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=list(FRAMEWORKS),
                   help="vitport front-ends to time (default: all)")
    p.add_argument("--no-compile", action="store_true", help="skip the timm + torch.compile row")
    p.add_argument("--no-convert", action="store_true", help="skip the conversion measurement")
    p.add_argument("--depths", nargs="*", type=int, default=[12, 24, 36], metavar="N",
                   help="first call of cait_s24_224 at these depths, scanned and unrolled (none: skip)")
    p.add_argument("--first-call-of", nargs="+", default=["apply"], choices=FIRST_CALL_OF,
                   help="what the first call against depth times: the model's evaluation call (apply) and/or "
                        "Trainer.train_step (forward, backward and AdamW at drop_path_rate 0.1)")
    p.add_argument("--first-call-repeats", type=int, default=3, metavar="N",
                   help="fresh processes per first-call point (and per --init point); the median is reported")
    p.add_argument("--warm-cache", action="store_true",
                   help="also time each first call against a filled jax persistent compilation cache")
    p.add_argument("--init", action="store_true",
                   help="also time random init of each --models model, each front-end, in fresh processes: "
                        "vitport.init_params (what create_model runs) against the framework's own init")
    p.add_argument("--bf16-rtol", type=float, default=1e-2,
                   help="as --rtol, for bfloat16 rows (against timm's float32 logits)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per (model, batch, implementation)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="max |logit difference| allowed, relative to max |timm logit|")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    return p.parse_args(argv)


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and flags as ``/proc/cpuinfo`` reports them (Linux)."""
    name, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return name or platform.processor() or platform.machine(), flags


def mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    import flax
    import haiku

    cpu, flags = cpu_model()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_total_gib(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cpu_flags_all": flags,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "flax": flax.__version__,
        "haiku": haiku.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "timm": importlib.metadata.version("timm"),
    }


def time_interleaved(fns: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, dict[str, Any]]:
    """First call of each (for JAX: trace + compile + run), warm-up, then ``iters`` timed rounds.

    Each round calls every implementation once, so a burst of background load (this is a shared
    2-core box) hits all of them alike instead of skewing whichever happened to be running.
    Every ``fn`` must block until its result is computed, otherwise JAX's async dispatch would
    make us time only the enqueueing.
    """
    res = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out = fn()
        res[name] = {"first_call_s": time.perf_counter() - t0, "output": out, "times_s": []}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            res[name]["times_s"].append(time.perf_counter() - t0)
    for r in res.values():
        r.update(median_s=statistics.median(r["times_s"]), min_s=min(r["times_s"]), max_s=max(r["times_s"]))
    return res


# ------------------------------------------------------------------------------ peak


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of one n^3 matmul (best of ``repeats``), per library and precision.

    XLA's CPU dot is fast on bfloat16 inputs only when it accumulates into float32
    (``preferred_element_type``); its plain bfloat16 product (bf16 result) is measured too, to
    show the difference. torch's bfloat16 matmul accumulates in float32 internally."""
    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a32, b32 = (jax.device_put(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
    a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    # XLA's other float32 dot (Eigen, vitport.xla_options): the machine's peak is the best of all
    eigen = xla_options.eigen_dots()
    dot_eigen = jax.jit(jnp.dot, compiler_options=eigen) if eigen else None
    dot_acc32 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    # Eigen's bf16 dot: vitport's choice on a CPU without bf16 dot instructions (xla_options.low_precision_cpu)
    dot_acc32_eigen = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
                              compiler_options=eigen) if eigen else None
    t32, t16 = torch.from_numpy(np.array(a32)), torch.from_numpy(np.array(b32))
    t32b, t16b = t32.bfloat16(), t16.bfloat16()
    res = {}
    with torch.inference_mode():
        # Without AVX-512 bf16 units torch's bf16 matmul falls back to a scalar loop (~0.5 GFLOP/s
        # on an AVX2-only EPYC): a 512^3 probe says so in a second instead of a minute per call.
        p = t32b[:512, :512]
        t0 = time.perf_counter()
        torch.mm(p, p)
        probe = 2.0 * 512**3 / (time.perf_counter() - t0) / 1e9
    cases = {
        "xla_float32": lambda: dot(a32, b32).block_until_ready(),
        "xla_float32_eigen": lambda: dot_eigen(a32, b32).block_until_ready(),
        "xla_bfloat16_acc_float32": lambda: dot_acc32(a16, b16).block_until_ready(),
        "xla_bfloat16_acc_float32_eigen": lambda: dot_acc32_eigen(a16, b16).block_until_ready(),
        "xla_bfloat16_bf16_result": lambda: dot(a16, b16).block_until_ready(),
        "torch_float32": lambda: torch.mm(t32, t16),
        "torch_bfloat16": lambda: torch.mm(t32b, t16b),
    }
    if dot_eigen is None:
        del cases["xla_float32_eigen"], cases["xla_bfloat16_acc_float32_eigen"]
    if probe < 20:
        del cases["torch_bfloat16"]
        res["torch_bfloat16"] = probe
        res["torch_bfloat16_note"] = "512^3 probe: scalar fallback, 2048^3 not run"
    with torch.inference_mode():
        res.update({name: flops / _best_of(fn, repeats) / 1e9 for name, fn in cases.items()})
    return res


def machine_peak(peaks: dict[str, float]) -> dict[str, float]:
    """The machine's peak per precision: the best any library reached."""
    return {"float32": max(peaks["xla_float32"], peaks.get("xla_float32_eigen", 0.0), peaks["torch_float32"]),
            "bfloat16": max(peaks["xla_bfloat16_acc_float32"], peaks.get("xla_bfloat16_acc_float32_eigen", 0.0),
                            peaks["torch_bfloat16"])}


# ----------------------------------------------------------------------------- FLOPs


def model_flops(spec: Spec) -> float:
    """FLOPs of one image's forward pass, counted from the spec: every matmul and attention
    product (2 FLOPs per multiply-add), the patch convolution counted as the matmul it is.
    Norms, softmax, activations and adds (under 1 % here) are left out."""
    d, h, n = spec.dim, spec.heads, spec.grid_size[0] * spec.grid_size[1]
    macs = n * spec.channels * spec.patch_size**2 * d  # patch embedding

    def self_attention(t: int, mlp_dim: int) -> int:
        return t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * mlp_dim

    if isinstance(spec, CaiTSpec):
        t = n
        macs += spec.depth * (self_attention(t, spec.mlp_dim) + 2 * h * h * t * t)  # + talking heads
        u = t + 1  # class attention: one query over cls + patches
        macs += spec.cls_depth * (d * d + 2 * u * d * d + 2 * u * d + d * d + 2 * d * spec.cls_mlp_dim)
    else:
        t = spec.num_prefix_tokens + n
        macs += spec.depth * self_attention(t, spec.mlp_dim)
        if spec.pool == "map":
            tp = t if spec.pool_include_prefix else n
            macs += d * d + tp * 2 * d * d + 2 * tp * d + d * d + 2 * d * spec.mlp_dim
    heads = 2 if getattr(spec, "distilled", False) else 1
    macs += heads * d * spec.num_classes
    return 2.0 * macs


# ------------------------------------------------------------------------------ models


def vitport_variant(jm: Any, mode: str) -> tuple[Any, Callable]:
    """``(model, its jitted apply)``. float32: as converted; bfloat16: bf16 weights and matmuls
    (float32 activations between them); mixed: float32 weights, bf16 matmuls accumulating in
    float32; ``MODE-ynnpack``: MODE compiled with XLA's defaults, not ``jm.compiler_options``."""
    if mode.endswith("-ynnpack"):
        jm, _ = vitport_variant(jm, mode.removesuffix("-ynnpack"))
        return jm, jax.jit(jm.front_end_apply)
    if mode == "bfloat16":
        jm = jm.astype(jnp.bfloat16)
    elif mode == "mixed":
        jm = jm.astype(jnp.float32, matmul_dtype=jnp.bfloat16)
    return jm, jm.apply_fn


def bench_model(name: str, batches: list[int], args: argparse.Namespace, console: Console,
                peak: dict[str, float], peak_info: dict[str, Any]) -> list[dict]:
    import timm  # here, not at the top: its import (8 s on the 2-core CI machine) is for the model rows only

    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False).eval().float()
    h, w = model.pretrained_cfg["input_size"][1:]
    converted = {fw: vitport.from_timm(model, framework=fw) for fw in args.frameworks}
    spec = next(iter(converted.values())).spec
    flops = model_flops(spec)
    console.log(f"{name}: {flops / 1e9:.2f} GFLOP per image (matmuls, from the spec)")
    compiled = None if args.no_compile else torch.compile(model)
    # bf16 autocast is only timed where torch's bf16 matmul is not a scalar fallback (it would
    # take minutes per call); the table says when it was skipped.
    slow_torch_bf16 = "torch_bfloat16_note" in peak_info
    jax_models = {f"{fw} {mode}": vitport_variant(jm, mode) for fw, jm in converted.items() for mode in args.modes}

    rows = []
    for batch in batches:
        images = np.random.default_rng(args.seed).standard_normal((batch, h, w, 3), dtype=np.float32)
        # Each side gets its input already in its own layout/device, so neither timed loop pays
        # for a transpose or a host->device copy.
        x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

        def run_timm(m=model):
            with torch.inference_mode():
                return m(x_torch)

        def run_autocast():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x_torch)

        fns = {"timm eager": run_timm}
        if compiled is not None:
            fns["timm compile"] = lambda: run_timm(compiled)
        if not slow_torch_bf16:
            fns["timm autocast bf16"] = run_autocast
        for label, (jm, apply) in jax_models.items():
            x = jax.device_put(jm.as_input(images))
            fns[label] = lambda jm=jm, apply=apply, x=x: apply(jm.params, x).block_until_ready()

        console.log(f"{name} batch {batch}: {len(fns)} implementations ({args.warmup} warm-up, "
                    f"{args.iters} timed rounds)")
        res = time_interleaved(fns, args.iters, args.warmup)
        ref = res["timm eager"]["output"].float().numpy()
        scale = float(np.abs(ref).max())
        timm_ips = {k: batch / res[k]["median_s"] for k in ("timm eager", "timm compile") if k in res}
        for impl, r in res.items():
            out = r.pop("output")
            out = out.float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, dtype=np.float32)
            diff = float(np.abs(out - ref).max())
            low = "bf16" in impl or "bfloat16" in impl or "mixed" in impl
            tol = (args.bf16_rtol if low else args.rtol) * max(scale, 1e-6)
            ips = batch / r["median_s"]
            rows.append({"model": name, "batch": batch, "impl": impl, "precision": "bfloat16" if low else "float32",
                         **r, "images_per_s": ips, "gflop_per_image": flops / 1e9,
                         "gflop_per_s": ips * flops / 1e9,
                         "fraction_of_peak": ips * flops / 1e9 / peak["bfloat16" if low else "float32"],
                         **{f"vs_{k.replace(' ', '_')}": ips / v for k, v in timm_ips.items()},
                         "max_abs_diff": diff, "max_abs_logit": scale,
                         # timm's own bf16 row is reported, not judged
                         "outputs_match": impl.startswith("timm") or diff <= tol})
    return rows


# ------------------------------------------------------------------ first call vs depth

_FIRST_CALL_CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
jax.jit(lambda a: a + 1)(jnp.zeros(1)).block_until_ready()  # the XLA client's own start-up is not the model's
import dataclasses
import vitport
from converters import key_table
from converters.architectures import arch_spec
framework, depth, scan, of = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
x = np.zeros((1, 224, 224, 3), np.float32)
# Weights drawn on the host, as a loaded checkpoint's would arrive: create_model's random init
# would compile its draws first (seconds, growing with depth) and warm the compiler for the timed call.
spec = arch_spec("cait_s24_224", depth=depth)
rng = np.random.default_rng(0)
weights = {e.timm_key: (0.02 * rng.standard_normal(e.timm_shape)).astype(np.float32) for e in key_table(spec)}
jm = vitport.from_state_dict(weights, spec, framework)
if of == "apply":
    jm.set_scan_blocks(scan)
    fn, args = jm.apply_fn, (jm.params, jax.device_put(jm.as_input(x)))
    def again(out):
        return args
else:  # one optimiser step at batch 1, at a fine-tuning drop_path_rate (each block its own rate and key)
    from vitport.training import TrainConfig, Trainer
    jm = dataclasses.replace(jm, config=dataclasses.replace(jm.config, layer_dropout=0.1)).set_scan_blocks(scan)
    trainer = Trainer(jm, TrainConfig(total_steps=100))
    fn, args = trainer.train_step, (trainer.init(jm.params), jax.device_put(x), jnp.zeros((1,), jnp.int32))
    def again(out):  # the step donates its state: the next step takes the new one
        return (out[0], *args[1:])
# jit's own first call, in its three steps: trace + lower + compile, then the first run
t0 = time.perf_counter()
c0 = time.process_time()  # CPU time too: a VM's stolen time inflates wall time, not this
traced = fn.trace(*args)
t_trace = time.perf_counter()
lowered = traced.lower()
t_lower = time.perf_counter()
compiled = lowered.compile()
t1 = time.perf_counter()
c1 = time.process_time()
out = jax.block_until_ready(compiled(*args))
t2 = time.perf_counter()
c2 = time.process_time()
steady = []
for _ in range(5):
    t = time.perf_counter()
    out = jax.block_until_ready(compiled(*again(out)))
    steady.append(time.perf_counter() - t)
print(json.dumps({"compile_s": t1 - t0, "trace_s": t_trace - t0, "lower_s": t_lower - t_trace,
                  "xla_compile_s": t1 - t_lower, "first_call_s": t2 - t0, "first_run_s": t2 - t1,
                  "compile_cpu_s": c1 - c0, "first_run_cpu_s": c2 - c1, "second_call_s": statistics.median(steady)}))
"""


def _ratio(last: dict, first: dict, key: str) -> str:
    """``last[key] / first[key]``, or "-" for JSONs written before ``key`` was measured."""
    return f"{last[key] / first[key]:.2f}×" if key in last and key in first else "-"


def bench_first_call(console: Console, frameworks: list[str], depths: list[int], repeats: int,
                     warm_cache: bool, of: list[str] = ("apply",)) -> list[dict]:
    """First call (trace + compile + run) of cait_s24_224 at several depths, batch 1, of the
    evaluation call and/or ``Trainer.train_step`` (``of``), with the blocks one by one (the
    default) and scanned (``JaxModel.set_scan_blocks``): the median of
    ``repeats`` fresh processes per point (one process's start-up varies by 0.2 s here). With
    ``warm_cache``, each point is also timed against jax's persistent compilation cache after one
    process has filled it (``JAX_COMPILATION_CACHE_DIR``): a user's second and later runs."""
    import subprocess
    import tempfile

    def run(what: str, fw: str, depth: int, scan: bool, env: dict | None = None) -> dict:
        proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_CHILD, fw, str(depth), str(int(scan)), what],
                              capture_output=True, text=True, check=True, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rows = []
    for what in of:
        for fw in frameworks:
            for scan in (False, True):
                for cached in (False, True) if warm_cache else (False,):
                    for depth in depths:
                        with tempfile.TemporaryDirectory(prefix="vitport-jax-cache-") as cache:
                            env = None
                            if cached:
                                env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache,
                                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
                                run(what, fw, depth, scan, env)  # fills the cache
                            runs = [run(what, fw, depth, scan, env) for _ in range(repeats)]
                        r = {k: statistics.median(one[k] for one in runs) for k in runs[0]}
                        rows.append({"of": what, "framework": fw, "scan_blocks": scan, "warm_cache": cached,
                                     "depth": depth, **r, "first_call_runs_s": [one["first_call_s"] for one in runs]})
                        console.log(f"first call of {what}, {fw} depth {depth} scan_blocks={scan} "
                                    f"warm_cache={cached}: {r['first_call_s']:.2f} s (compile {r['compile_s']:.2f} s)")
    return rows


# --------------------------------------------------------------------------- random init

_INIT_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
import vitport, vitport.api, vitport.random_init
from converters.architectures import arch_spec
from vitport.config import ModelConfig
from vitport.frontends import front_end
name, fw, how = sys.argv[1:4]
cfg = ModelConfig(arch_spec(name))
compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(duration) if event == "/jax/core/compile/backend_compile_duration" else None)
t0 = time.perf_counter()
params = vitport.init_params(cfg, fw, 0) if how == "vitport" else front_end(fw).init(cfg, jax.random.PRNGKey(0))
jax.block_until_ready(params)
print(json.dumps({"seconds": time.perf_counter() - t0, "compiles": len(compiles), "compile_s": sum(compiles)}))
"""


def bench_init(console: Console, models: list[str], frameworks: list[str], repeats: int) -> list[dict]:
    """Random init of each model in each front-end, in fresh processes (after the imports):
    ``vitport.init_params`` (``vitport.random_init``, what ``create_model`` runs) against the
    framework's own init (``FrontEnd.init``: Haiku's and linen's ``init``, NNX's construction);
    the median of ``repeats`` processes, with the XLA compiles each made."""
    import subprocess

    rows = []
    for name in models:
        for fw in frameworks:
            for how in ("vitport", "own"):
                runs = [json.loads(subprocess.run([sys.executable, "-c", _INIT_CHILD, name, fw, how], check=True,
                                                  capture_output=True, text=True).stdout.strip().splitlines()[-1])
                        for _ in range(repeats)]
                r = {k: statistics.median(one[k] for one in runs) for k in runs[0]}
                rows.append({"model": name, "framework": fw, "init": how, **r,
                             "runs_s": [one["seconds"] for one in runs]})
                console.log(f"init {name} {fw} {how}: {r['seconds']:.2f} s, {r['compiles']:.0f} compiles")
    return rows


# -------------------------------------------------------------------------- conversion

_CONVERT_CHILD = r"""
import json, os, sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

import jax, jax.numpy as jnp, numpy as np, safetensors, safetensors.numpy  # imports and the XLA client are not the conversion
jnp.zeros(1).block_until_ready()
import vitport.hub as hub
src, out = sys.argv[1], sys.argv[2]
base = status("VmRSS")
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    reset = True
except OSError:
    reset = False
t0 = time.perf_counter()
hub.convert(src, out, "flax", arch="cait_s24_224", force=True)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rss_before": base, "peak_rss": status("VmHWM"), "hwm_reset": reset}))
"""


def bench_convert(console: Console, workdir: Path) -> dict[str, Any]:
    """``vitport.convert`` of cait_s24_224 from a local safetensors file of a random-weight timm
    model (made here, offline), in a fresh process: the conversion's own wall time (after the
    imports) and its peak extra memory (peak RSS minus the RSS before it), and the whole
    ``vitport convert`` command's wall time."""
    import subprocess

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = workdir / "cait_s24_224.safetensors"
    model = timm.create_model("cait_s24_224", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    del model
    size = src.stat().st_size
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _CONVERT_CHILD, str(src), str(workdir / "out_api")],
                          capture_output=True, text=True, env=env, check=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitport.cli", "convert", str(src), "--arch", "cait_s24_224",
                    "--out", str(workdir / "out_cli"), "--force"], capture_output=True, env=env, check=True)
    cli_s = time.perf_counter() - t0
    extra = r["peak_rss"] - r["rss_before"]
    res = {"checkpoint_bytes": size, "convert_s": r["seconds"], "peak_extra_bytes": extra,
           "peak_extra_vs_checkpoint": extra / size, "hwm_reset": r["hwm_reset"], "cli_wall_s": cli_s}
    console.log(f"convert cait_s24_224: {r['seconds']:.2f} s, peak extra memory {extra / 2**20:.0f} MiB = "
                f"{extra / size:.2f}x the {size / 2**20:.0f} MiB checkpoint; `vitport convert` command "
                f"{cli_s:.1f} s wall")
    return res


def cpu_snapshot() -> tuple[float, float, float, float] | None:
    """(machine busy CPU-seconds, machine total CPU-seconds, this process's CPU-seconds, CPU-seconds
    the hypervisor stole from this VM: counted as busy, since they slow a run as other processes
    do), Linux only."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()  # with the finished child processes this run started (first-call probes, convert)
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz, own.user + own.system + own.children_user + \
        own.children_system, fields[7] / hz


def other_cpu_share(before, after) -> float | None:
    """Fraction of the machine's CPU time used by other processes while we ran: a load average
    counts our own threads too, this does not."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others / (after[1] - before[1]))


def steal_share(before, after) -> float | None:
    """The part of ``other_cpu_share`` the hypervisor stole (``steal`` in /proc/stat)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[3] - before[3]) / (after[1] - before[1])


def render(rows: list[dict], info: dict[str, Any], args: argparse.Namespace, console: Console) -> None:
    console.print(f"[bold]Machine[/]: {info['cpu']}, {info['cores']} cores, {info['memory_gib'] or 0:.0f} GiB "
                  f"({info['platform']}); flags: {' '.join(info['cpu_flags']) or 'none of interest'}")
    console.print(f"[bold]Versions[/]: python {info['python']}, jax {info['jax']} (backend {info['jax_backend']}: "
                  f"{', '.join(info['jax_devices'])}), flax {info['flax']}, haiku {info['haiku']}, "
                  f"torch {info['torch']} ({info['torch_threads']} threads), timm {info['timm']}")
    pk, mp = info["matmul_peak_gflops"], info["machine_peak_gflops"]
    eigen = f" (Eigen dots {pk['xla_float32_eigen']:.0f})" if "xla_float32_eigen" in pk else ""
    eigen16 = (f" (Eigen dots {pk['xla_bfloat16_acc_float32_eigen']:.0f})"
               if "xla_bfloat16_acc_float32_eigen" in pk else "")
    console.print(f"[bold]Matmul peak[/] 2048^3, GFLOP/s: float32 XLA {pk['xla_float32']:.0f}{eigen}, torch "
                  f"{pk['torch_float32']:.0f}; bfloat16 XLA (float32 accumulation) {pk['xla_bfloat16_acc_float32']:.0f}{eigen16}, "
                  f"XLA (bf16 result) {pk['xla_bfloat16_bf16_result']:.0f}, torch {pk['torch_bfloat16']:.1f}"
                  f"{' (' + pk['torch_bfloat16_note'] + ')' if 'torch_bfloat16_note' in pk else ''}. "
                  f"Peak used: float32 {mp['float32']:.0f}, bfloat16 {mp['bfloat16']:.0f} (the best library)")
    share = info["other_processes_cpu_share"]
    if share is not None:
        style = "bold red" if share > 0.05 else "green"
        steal = info.get("steal_cpu_share")
        stolen = f" (the hypervisor's steal: {steal:.1%})" if steal else ""
        console.print(f"[bold]Other processes[/] used [{style}]{share:.1%}[/] of the machine's CPU time during the run"
                      + stolen
                      + (" — these timings are contaminated; rerun on a quiet machine" if share > 0.05 else ""))
    console.print(f"[bold]Settings[/]: eval mode, {args.warmup} warm-up + {args.iters} timed rounds "
                  f"(every implementation called in turn), median per call; first call includes trace + compile")

    table = Table(title="Inference throughput: timm (PyTorch) vs vitport (JAX jit), fraction of the matmul peak")
    for col, just in (("model", "left"), ("batch", "right"), ("impl", "left"), ("first call (s)", "right"),
                      ("median (ms)", "right"), ("images/s", "right"), ("GFLOP/s", "right"), ("of peak", "right"),
                      ("vs eager", "right"), ("vs compile", "right"), ("max |Δlogit|", "right")):
        table.add_column(col, justify=just)
    prev = None
    for r in rows:
        group = (r["model"], r["batch"])
        if prev is not None and group != prev:
            table.add_section()
        prev = group
        diff = "ref" if r["impl"] == "timm eager" else f"{r['max_abs_diff']:.1e}"
        compile_ratio = r.get("vs_timm_compile")
        table.add_row(r["model"], str(r["batch"]), r["impl"], f"{r['first_call_s']:.2f}",
                      f"{r['median_s'] * 1e3:.1f}", f"{r['images_per_s']:.2f}", f"{r['gflop_per_s']:.0f}",
                      f"{r['fraction_of_peak']:.0%}", f"{r['vs_timm_eager']:.2f}×",
                      "" if compile_ratio is None else f"{compile_ratio:.2f}×",
                      diff if r["outputs_match"] else f"[bold red]{diff} MISMATCH[/]")
    if rows:
        console.print(table)
        if "torch_bfloat16_note" in pk:
            console.print("timm autocast bf16 not timed: torch's bf16 matmul on this CPU is a scalar fallback "
                          f"({pk['torch_bfloat16']:.1f} GFLOP/s).")
        console.print(f"'of peak': the row's GFLOP/s over the machine's peak for its precision (bfloat16 rows: "
                      f"the bfloat16 peak). max |Δlogit| is against timm's float32 logits on the same input; a "
                      f"row fails above {args.rtol:g} (bfloat16 rows {args.bf16_rtol:g}) × max |timm logit|.")
    all_depth_rows = info.get("first_call_vs_depth") or []
    for what in dict.fromkeys(r.get("of", "apply") for r in all_depth_rows):
        depth_rows = [r for r in all_depth_rows if r.get("of", "apply") == what]
        called = "cait_s24_224" if what == "apply" else "Trainer.train_step of cait_s24_224"
        t = Table(title=f"First call of {called} against depth, batch 1, fresh process (median of "
                        f"{args.first_call_repeats}): trace + compile (+ run)")
        depths = sorted({r["depth"] for r in depth_rows})
        growth = len(depths) > 1  # the last depth against the first
        for col in ("front-end", "blocks", *[f"depth {d} (s)" for d in depths],
                    *([f"{depths[-1]} / {depths[0]}", f"{depths[-1]} / {depths[0]}, compile CPU time"] if growth else []),
                    f"steady call, depth {depths[0]} (ms)",
                    f"depth {depths[-1]}: trace / lower / XLA compile / first run (s)"):
            t.add_column(col, justify="left" if col in ("front-end", "blocks") else "right")
        for fw in dict.fromkeys(r["framework"] for r in depth_rows):
            for scan in (False, True):
                for cached in dict.fromkeys(r.get("warm_cache", False) for r in depth_rows):
                    by = {r["depth"]: r for r in depth_rows if r["framework"] == fw and r["scan_blocks"] == scan
                          and r.get("warm_cache", False) == cached}
                    first, last = by[depths[0]], by[depths[-1]]
                    t.add_row(fw, ("lax.scan (scan_blocks)" if scan else "one by one (default)")
                              + (", warm jax cache" if cached else ""),
                              *[f"{by[d]['compile_s']:.2f} ({by[d]['first_call_s']:.2f})" for d in depths],
                              *([f"{last['compile_s'] / first['compile_s']:.2f}× "
                                 f"({last['first_call_s'] / first['first_call_s']:.2f}×)",
                                 _ratio(last, first, "compile_cpu_s")] if growth else []),
                              f"{first['second_call_s'] * 1e3:.0f}",
                              f"{last['trace_s']:.2f} / {last['lower_s']:.2f} / {last['xla_compile_s']:.2f} / "
                              + (f"{last['first_run_s']:.2f}" if "first_run_s" in last else "-"))
        console.print(t)
    init_rows = info.get("random_init")
    if init_rows:
        t = Table(title="Random init, fresh process after the imports (median): vitport.init_params / "
                        "create_model against the framework's own init", title_justify="left")
        for col in ("model", "front-end", "init_params (s)", "compiles", "own init (s)", "compiles", "own / init_params"):
            t.add_column(col, justify="left" if col in ("model", "front-end") else "right")
        for r in init_rows:
            if r["init"] != "vitport":
                continue
            own = next(o for o in init_rows if o["init"] == "own" and (o["model"], o["framework"]) ==
                       (r["model"], r["framework"]))
            t.add_row(r["model"], r["framework"], f"{r['seconds']:.2f}", f"{r['compiles']:.0f}", f"{own['seconds']:.2f}",
                      f"{own['compiles']:.0f}", f"{own['seconds'] / r['seconds']:.1f}×")
        console.print(t)
    conv = info.get("convert")
    if conv:
        console.print(f"[bold]convert cait_s24_224[/] from safetensors: {conv['convert_s']:.2f} s, peak extra memory "
                      f"{conv['peak_extra_vs_checkpoint']:.2f}× the {conv['checkpoint_bytes'] / 2**20:.0f} MiB "
                      f"checkpoint; `vitport convert` command {conv['cli_wall_s']:.1f} s wall (with imports)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweep:
        args.batches = [1, 2, 4, 8, 16, 32]
    # timm runs on all cores like XLA's CPU backend does by default, so the comparison is fair.
    torch.set_num_threads(os.cpu_count() or 1)
    # torch.compile's worker pool would count as "other processes"; compile in this process.
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1
    # Piped output (logs, README) would otherwise be squeezed to 80 columns and wrap the table.
    console = Console() if sys.stdout.isatty() else Console(width=150)
    info = machine_info()

    # Other processes on a small box skew everything (torch's OpenMP threads worst of all);
    # measure how much CPU they took so a reader can tell a clean run from a contaminated one.
    snap = cpu_snapshot()
    console.log("matmul peak (2048^3)")
    info["matmul_peak_gflops"] = matmul_peak()
    info["machine_peak_gflops"] = peak = machine_peak(info["matmul_peak_gflops"])
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batches, args, console, peak, info["matmul_peak_gflops"])
    if args.depths:
        info["first_call_vs_depth"] = bench_first_call(console, args.frameworks, args.depths, args.first_call_repeats,
                                                       args.warm_cache, args.first_call_of)
    if args.init:
        info["random_init"] = bench_init(console, args.models, args.frameworks, args.first_call_repeats)
    if not args.no_convert:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vitport-bench-") as tmp:
            info["convert"] = bench_convert(console, Path(tmp))
    snap_after = cpu_snapshot()
    info["other_processes_cpu_share"] = other_cpu_share(snap, snap_after)
    info["steal_cpu_share"] = steal_share(snap, snap_after)

    render(rows, info, args, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "flops": "model_flops(spec): 2 x multiply-adds of every matmul, attention product and the patch "
                     "convolution; norms, softmax, activations and adds left out",
            "machine": info,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": rows,
        }, indent=2))
        console.print(f"results written to {args.json}")
    return 0 if all(r["outputs_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
