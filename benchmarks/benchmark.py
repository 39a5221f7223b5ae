"""Side-by-side inference throughput: eager timm (PyTorch) vs vitport's Haiku and Flax ports (jitted JAX).

    uv run python benchmarks/benchmark.py                      # both models, batch 1 and 8
    uv run python benchmarks/benchmark.py --models cait_s24_224 --batches 1 --iters 5 --json out.json

Every JAX model is converted from the very timm model it is compared with, and its logits are
checked against timm's before the numbers are trusted, so a broken port cannot look fast.
This is a benchmark, not a test: it only fails (exit status 1) when the outputs disagree.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

# Run as a script from anywhere: make the repo root (vitport, converters) importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import vitport  # noqa: E402

DEFAULT_MODELS = ("vit_base_patch16_224", "cait_s24_224")
FRAMEWORKS = ("haiku", "flax")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm architecture names")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--iters", type=int, default=10, help="timed calls per (model, batch, implementation)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    p.add_argument("--rtol", type=float, default=1e-4,
                   help="max |logit difference| allowed, relative to max |timm logit|")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import flax
    import haiku

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "flax": flax.__version__,
        "haiku": haiku.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "timm": timm.__version__,
    }


def time_calls(fn: Callable[[], Any], iters: int, warmup: int) -> dict[str, Any]:
    """First call (for JAX: trace + compile + run), then warm-up, then ``iters`` timed calls.

    ``fn`` must block until its result is computed, otherwise JAX's async dispatch would make
    us time only the enqueueing.
    """
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "times_s": times, "output": out}


def bench_model(name: str, batches: list[int], args: argparse.Namespace, console: Console) -> list[dict]:
    torch.manual_seed(args.seed)
    model = timm.create_model(name, pretrained=False).eval().float()
    h, w = model.pretrained_cfg["input_size"][1:]
    jax_models = {fw: vitport.from_timm(model, framework=fw) for fw in FRAMEWORKS}

    rows = []
    for batch in batches:
        images = np.random.default_rng(args.seed).standard_normal((batch, h, w, 3), dtype=np.float32)
        # Each side gets its input already in its own layout/device, so neither timed loop pays
        # for a transpose or a host->device copy.
        x_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        x_jax = jax.device_put(images)

        def run_timm():
            with torch.inference_mode():
                return model(x_torch)

        console.log(f"{name} batch {batch}: timm")
        res = time_calls(run_timm, args.iters, args.warmup)
        ref = res.pop("output").numpy()
        scale = float(np.abs(ref).max())
        timm_ips = batch / res["median_s"]
        rows.append({"model": name, "batch": batch, "impl": "timm (eager)", **res, "images_per_s": timm_ips,
                     "speedup_vs_timm": 1.0, "max_abs_diff": 0.0, "max_abs_logit": scale})

        for fw, jm in jax_models.items():
            console.log(f"{name} batch {batch}: {fw}")
            res = time_calls(lambda: jm(x_jax).block_until_ready(), args.iters, args.warmup)
            diff = float(np.abs(np.asarray(res.pop("output")) - ref).max())
            ips = batch / res["median_s"]
            rows.append({"model": name, "batch": batch, "impl": f"{fw} (jit)", **res, "images_per_s": ips,
                         "speedup_vs_timm": ips / timm_ips, "max_abs_diff": diff, "max_abs_logit": scale,
                         "outputs_match": diff <= args.rtol * max(scale, 1e-6)})
    return rows


def render(rows: list[dict], info: dict[str, Any], args: argparse.Namespace, console: Console) -> None:
    console.print(f"[bold]Machine[/]: {info['cpu']}, {info['cores']} cores ({info['platform']})")
    console.print(f"[bold]Versions[/]: python {info['python']}, jax {info['jax']} (backend {info['jax_backend']}: "
                  f"{', '.join(info['jax_devices'])}), flax {info['flax']}, haiku {info['haiku']}, "
                  f"torch {info['torch']} ({info['torch_threads']} threads), timm {info['timm']}")
    console.print(f"[bold]Settings[/]: float32, eval mode, {args.warmup} warm-up + {args.iters} timed calls, "
                  f"median per call; JAX first call includes trace + compile")

    table = Table(title="Inference throughput: timm (PyTorch eager) vs vitport (JAX jit)")
    table.add_column("model")
    table.add_column("batch", justify="right")
    table.add_column("implementation")
    table.add_column("first call (s)", justify="right")
    table.add_column("median (ms)", justify="right")
    table.add_column("min–max (ms)", justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("vs timm", justify="right")
    table.add_column("max |Δlogit|", justify="right")
    prev = None
    for r in rows:
        group = (r["model"], r["batch"])
        if prev is not None and group != prev:
            table.add_section()
        prev = group
        ok = r.get("outputs_match", True)
        diff = "ref" if r["impl"].startswith("timm") else f"{r['max_abs_diff']:.1e}"
        table.add_row(r["model"], str(r["batch"]), r["impl"], f"{r['first_call_s']:.2f}",
                      f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.0f}–{r['max_s'] * 1e3:.0f}",
                      f"{r['images_per_s']:.2f}", f"{r['speedup_vs_timm']:.2f}×",
                      diff if ok else f"[bold red]{diff} MISMATCH[/]")
    console.print(table)
    console.print(f"max |Δlogit| is against timm's logits on the same input; a row fails if it exceeds "
                  f"{args.rtol:g} × max |timm logit|.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # timm runs on all cores like XLA's CPU backend does by default, so the comparison is fair.
    torch.set_num_threads(os.cpu_count() or 1)
    console = Console()
    info = machine_info()

    rows = []
    for name in args.models:
        rows += bench_model(name, args.batches, args, console)

    render(rows, info, args, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "machine": info,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": rows,
        }, indent=2))
        console.print(f"results written to {args.json}")
    return 0 if all(r.get("outputs_match", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
