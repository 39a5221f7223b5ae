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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import timm
import torch
from rich.console import Console
from rich.table import Table

import vitport

DEFAULT_MODELS = ("vit_base_patch16_224", "cait_s24_224")
from converters import FRAMEWORKS  # every front-end in the registry


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

        fns = {"timm": run_timm}
        for fw, jm in jax_models.items():
            fns[fw] = lambda jm=jm: jm(x_jax).block_until_ready()

        console.log(f"{name} batch {batch}: {', '.join(fns)} ({args.warmup} warm-up, {args.iters} timed rounds)")
        res = time_interleaved(fns, args.iters, args.warmup)
        ref = res["timm"]["output"].numpy()
        scale = float(np.abs(ref).max())
        timm_ips = batch / res["timm"]["median_s"]
        for impl, r in res.items():
            diff = float(np.abs(np.asarray(r.pop("output")) - ref).max())
            ips = batch / r["median_s"]
            rows.append({"model": name, "batch": batch, "impl": impl, **r, "images_per_s": ips,
                         "speedup_vs_timm": ips / timm_ips, "max_abs_diff": diff, "max_abs_logit": scale,
                         "outputs_match": diff <= args.rtol * max(scale, 1e-6)})
    return rows


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(machine busy CPU-seconds, machine total CPU-seconds, this process's CPU-seconds), Linux only."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()
    return (sum(fields[:8]) - idle) / hz, sum(fields[:8]) / hz, own.user + own.system


def other_cpu_share(before, after) -> float | None:
    """Fraction of the machine's CPU time used by other processes while we ran: a load average
    counts our own threads too, this does not."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others / (after[1] - before[1]))


def render(rows: list[dict], info: dict[str, Any], args: argparse.Namespace, console: Console) -> None:
    console.print(f"[bold]Machine[/]: {info['cpu']}, {info['cores']} cores ({info['platform']})")
    console.print(f"[bold]Versions[/]: python {info['python']}, jax {info['jax']} (backend {info['jax_backend']}: "
                  f"{', '.join(info['jax_devices'])}), flax {info['flax']}, haiku {info['haiku']}, "
                  f"torch {info['torch']} ({info['torch_threads']} threads), timm {info['timm']}")
    share = info["other_processes_cpu_share"]
    if share is not None:
        style = "bold red" if share > 0.05 else "green"
        console.print(f"[bold]Other processes[/] used [{style}]{share:.1%}[/] of the machine's CPU time during the run"
                      + (" — these timings are contaminated; rerun on a quiet machine" if share > 0.05 else ""))
    console.print(f"[bold]Settings[/]: float32, eval mode, {args.warmup} warm-up + {args.iters} timed rounds "
                  f"(timm and each front-end called in turn), median per call; JAX first call includes trace + compile")

    table = Table(title="Inference throughput: timm (PyTorch eager) vs vitport (JAX jit)")
    table.add_column("model")
    table.add_column("batch", justify="right")
    table.add_column("impl")
    table.add_column("first call (s)", justify="right")
    table.add_column("median (ms)", justify="right")
    table.add_column("min-max (ms)", justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("vs timm", justify="right")
    table.add_column("max |Δlogit|", justify="right")
    prev = None
    for r in rows:
        group = (r["model"], r["batch"])
        if prev is not None and group != prev:
            table.add_section()
        prev = group
        ok = r["outputs_match"]
        diff = "ref" if r["impl"] == "timm" else f"{r['max_abs_diff']:.1e}"
        table.add_row(r["model"], str(r["batch"]), r["impl"], f"{r['first_call_s']:.2f}",
                      f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f}",
                      f"{r['images_per_s']:.2f}", f"{r['speedup_vs_timm']:.2f}×",
                      diff if ok else f"[bold red]{diff} MISMATCH[/]")
    console.print(table)
    console.print(f"max |Δlogit| is against timm's logits on the same input; a row fails if it exceeds "
                  f"{args.rtol:g} × max |timm logit|.")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # timm runs on all cores like XLA's CPU backend does by default, so the comparison is fair.
    torch.set_num_threads(os.cpu_count() or 1)
    # Piped output (logs, README) would otherwise be squeezed to 80 columns and wrap the table.
    console = Console() if sys.stdout.isatty() else Console(width=130)
    info = machine_info()

    # Other processes on a small box skew everything (torch's OpenMP threads worst of all);
    # measure how much CPU they took so a reader can tell a clean run from a contaminated one.
    snap = cpu_snapshot()
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batches, args, console)
    info["other_processes_cpu_share"] = other_cpu_share(snap, cpu_snapshot())

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
    return 0 if all(r["outputs_match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
