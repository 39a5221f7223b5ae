"""``benchmarks/benchmark.py`` (the source of the README's speed figures) runs end to end and
writes its JSON: a smoke run on a small model, every front-end, every precision, one timed round."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmarks_started_by_tests_compile_with_xla_defaults():
    """conftest.py's compile-fast XLA flags reach the test process only: the benchmark processes
    below inherit an environment without them, while a subprocess compared bit for bit gets them."""
    from helpers import env_with_test_xla_flags

    flags = os.environ["VITPORT_TESTS_XLA_FLAGS"].split()
    assert not set(flags) & set(os.environ.get("XLA_FLAGS", "").split())
    assert set(flags) <= set(env_with_test_xla_flags()["XLA_FLAGS"].split())


def test_benchmark_runs_and_checks_every_row(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--models", "vit_tiny_patch16_224",
         "--batches", "2", "--iters", "1", "--warmup", "0", "--no-compile", "--no-convert", "--depths",
         "--modes", "float32", "bfloat16", "mixed", "float32-ynnpack", "bfloat16-ynnpack",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    impls = {r["impl"] for r in result["results"]}
    assert {f"{fw} {mode}" for fw in ("haiku", "flax", "nnx") for mode in ("float32", "bfloat16", "mixed")} <= impls
    assert {f"{fw} {mode}-ynnpack" for fw in ("haiku", "flax", "nnx") for mode in ("float32", "bfloat16")} <= impls
    assert "timm eager" in impls
    for r in result["results"]:
        assert r["outputs_match"], r
        assert 0 < r["fraction_of_peak"] and r["images_per_s"] > 0
    peaks = result["machine"]["matmul_peak_gflops"]
    assert result["machine"]["machine_peak_gflops"]["float32"] == max(
        peaks["xla_float32"], peaks["xla_float32_eigen"], peaks["torch_float32"])
    assert result["machine"]["machine_peak_gflops"]["bfloat16"] == max(
        peaks["xla_bfloat16_acc_float32"], peaks["xla_bfloat16_acc_float32_eigen"], peaks["torch_bfloat16"])
    steal = result["machine"]["steal_cpu_share"]  # None off Linux
    assert steal is None or 0.0 <= steal <= 1.0
    low = {r["impl"]: r["precision"] for r in result["results"]}
    assert low["flax bfloat16-ynnpack"] == low["flax mixed"] == "bfloat16" and low["flax float32-ynnpack"] == "float32"


def test_first_call_against_depth_runs_both_block_modes(tmp_path):
    out = tmp_path / "first-call.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--models", "--no-convert", "--frameworks",
         "flax", "--depths", "2", "--first-call-repeats", "1", "--warm-cache", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    machine = json.loads(out.read_text())["machine"]
    rows = machine["first_call_vs_depth"]
    assert ({(r["of"], r["scan_blocks"], r["warm_cache"], r["depth"]) for r in rows}
            == {("apply", s, c, d) for s in (False, True) for c in (False, True) for d in (2,)})
    for r in rows:
        assert 0 < r["compile_s"] < r["first_call_s"] and r["second_call_s"] > 0, r
        assert r["compile_s"] == pytest.approx(r["trace_s"] + r["lower_s"] + r["xla_compile_s"]), r
        assert r["first_call_s"] == pytest.approx(r["compile_s"] + r["first_run_s"]), r
        assert r["compile_cpu_s"] > 0 and r["first_run_cpu_s"] > 0, r
    assert "First call of cait_s24_224 against depth" in proc.stdout
    assert "trace / lower / XLA compile / first run" in proc.stdout


def test_first_train_step_child_times_a_scanned_step():
    """``--first-call-of train_step``'s child process (the table around it is the one above):
    one scanned AdamW step of a 2-block cait_s24_224, its compile and steady steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from benchmark import _FIRST_CALL_CHILD
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_CHILD, "haiku", "2", "1", "train_step"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < r["compile_s"] < r["first_call_s"] and r["second_call_s"] > 0, r


def test_random_init_child_counts_the_compiles():
    """``--init``'s child process (its table is rendered from these rows): vitport.init_params
    compiles one chunked draw, against one program per op and shape for the framework's own init."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from benchmark import _INIT_CHILD
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    init = {}
    for how in ("vitport", "own"):
        proc = subprocess.run([sys.executable, "-c", _INIT_CHILD, "vit_tiny_patch16_224", "nnx", how],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        init[how] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert init[how]["seconds"] > 0 and 0 <= init[how]["compile_s"] <= init[how]["seconds"], init
    assert init["vitport"]["compiles"] <= 3 < init["own"]["compiles"], init


def test_profile_groups_the_ops_by_module_path():
    """``benchmarks/op_profile.py``: a profiled forward pass, its ops grouped by module path, the
    blocks folded into one row per op, compiled as ``apply_fn`` compiles (float32: no YNNPACK
    fusions; test_speed_modes checks the choice itself)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "op_profile.py"), "vit_tiny_patch16_224", "--batch", "1",
         "--iters", "1", "--profiled", "1", "--top", "100"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "(0 YNNPACK fusions)" in out and "images/s" in out
    assert "blocks_N/mlp/fc1" in out and "blocks_N/attn/qkv" in out, out


def test_profile_of_the_train_step_has_the_backward_pass_and_the_optimizer():
    """``op_profile.py --train-step``: Trainer's step profiled, its backward ops (jax's
    ``transpose(jvp(...))``) grouped by the block paths like the forward ones."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "op_profile.py"), "vit_tiny_patch16_224", "--batch", "1",
         "--train-step", "--dots", "default", "--iters", "1", "--profiled", "1", "--top", "400"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("vit_tiny_patch16_224 train step flax float32 batch 1, dots: default"), out
    backward = [line for line in out.splitlines() if "transpose(jvp(" in line and "blocks_N/mlp/fc1" in line]
    forward = [line for line in out.splitlines() if "/jvp(" in line and "transpose(" not in line
               and "blocks_N/mlp/fc1" in line]
    assert backward and forward, out


def test_xla_dots_times_attention_products_and_the_model_per_fusion_type():
    """``benchmarks/xla_dots.py``: the attention products at the model's shapes (CaiT's blocks see
    the patches only) under Eigen's and XLA's default dots, whole and split, then the whole model
    per option value, with its logits against the first value's."""
    def run(*args):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "xla_dots.py"), *args],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = run("vit_tiny_patch16_224", "--batch", "2", "--fusion-types", "", "default", "--splits", "1", "2",
              "--rounds", "1")
    assert "(B, heads, N, Dh) = (2, 3, 197, 64)" in out
    for product in ("q·kᵀ", "weights·v"):
        for how in ("eigen", "xla default (ynnpack)"):
            rows = [line for line in out.splitlines() if line.strip().startswith(product) and how in line]
            assert len(rows) == 2 and any("batch in 2 dots" in row for row in rows), out
    model_rows = {how: line for line in out.splitlines() for how in ("eigen", "xla default (ynnpack)")
                  if "YNNPACK fusions" in line and line.split("  ")[1].strip() == how}
    assert set(model_rows) == {"eigen", "xla default (ynnpack)"}, out
    assert " 0 YNNPACK fusions" in model_rows["eigen"] and " 0 YNNPACK fusions" not in model_rows["xla default (ynnpack)"]
    assert float(model_rows["xla default (ynnpack)"].rsplit(" ", 1)[1]) < 1e-4, out
    assert "(B, heads, N, Dh) = (1, 4, 196, 48)" in run("cait_xxs24_224", "--batch", "1", "--no-model", "--splits",
                                                          "1", "--fusion-types", "", "--rounds", "1")


def test_profile_of_the_compile_lists_xla_phases_and_fusions():
    """``op_profile.py --compile``: XLA's compile of the forward pass under the profiler, its
    phases by name (jax's Python frames left out) and the optimized HLO's fusions by kind."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "op_profile.py"), "vit_tiny_patch16_224", "--batch", "1",
         "--scan-blocks", "--compile", "--top", "200"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "scanned" in out and "XLA compile:" in out and "ms wall" in out
    assert "FusionCompiler::Compile" in out and "$" not in out.split("XLA compile:")[1].split("fusions in")[0]
    fusions = re.search(r"^(\d+) fusions in the optimized HLO: (.+)$", out, re.M)
    assert fusions and int(fusions.group(1)) > 0, out
    kinds = [item.split(" ") for item in fusions.group(2).strip().split(", ")]
    assert all(len(k) == 2 for k in kinds) and sum(int(n) for n, _ in kinds) == int(fusions.group(1)), out


def test_compile_options_compares_compile_and_run_times_and_logits_per_option_set():
    """``benchmarks/compile_options.py``: each option set's XLA compile (median, range, CPU time)
    and run time per batch, with its logits against the first set's; a null drops an option."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_options.py"), "vit_tiny_patch16_224", "--scan-blocks",
         "--options", "{}", '{"xla_backend_optimization_level": 1}', '{"xla_cpu_experimental_ynn_fusion_type": null}',
         "xla", "--compile-rounds", "2", "--batches", "2", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    first = out.splitlines()[0]  # a subprocess: vitport's own options, not the tests' -O0 (conftest.py)
    assert "(flax, scanned)" in first and "'xla_cpu_experimental_ynn_fusion_type': ''" in first, out
    assert "'xla_backend_optimization_level': 1" in first, out
    assert "'xla_disable_hlo_passes': 'cse_barrier_expander,tree_reduction_rewriter'" in first, out  # a forward pass's
    compile_rows = re.findall(r"^  (\S+.*?)\s+(\d+\.\d+) s wall \((\d+\.\d+)-(\d+\.\d+)\),\s+(\d+\.\d+) s CPU$",
                              out.split("run at batch")[0], re.M)
    assert [r[0] for r in compile_rows] == ["{}", '{"xla_backend_optimization_level": 1}',
                                            '{"xla_cpu_experimental_ynn_fusion_type": null}', "xla"], out
    assert all(float(lo) <= float(med) <= float(hi) and float(c) > 0 for _, med, lo, hi, c in compile_rows), out
    run_rows = re.findall(r"^  (\S+.*?)\s+(\d+\.\d+) ms .*, +(\d+\.\d+) ms CPU, max \|Δlogit\| (\S+)$",
                          out.split("run at batch 2")[1], re.M)
    assert len(run_rows) == 4 and float(run_rows[0][3]) == 0.0 and all(float(d) < 1e-4 for *_, d in run_rows), out
    assert all(float(cpu) > 0 for _, _, cpu, _ in run_rows), out


def test_compile_options_times_the_train_step():
    """``--train-step``: Trainer's step (forward, backward, AdamW) is compiled and run per option
    set; its loss and updated params are compared with the first set's."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compile_options.py"), "cait_xxs24_224", "--depth", "2",
         "--train-step", "--options", "{}", '{"xla_backend_optimization_level": 3}',
         "--compile-rounds", "1", "--batches", "2", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.splitlines()[0].startswith("cait_xxs24_224 Trainer's train step (flax, block by block)"), out
    assert "'xla_disable_hlo_passes': 'cse_barrier_expander'}" in out.splitlines()[0], out  # tree reductions kept
    run_rows = re.findall(r"^  (\S+.*?)\s+(\d+\.\d+) ms .* max \|Δloss, params\| (\S+)$",
                          out.split("run at batch 2")[1], re.M)
    # the same step compiled at another LLVM level: equal up to float32 rounding
    assert [r[0] for r in run_rows] == ["{}", '{"xla_backend_optimization_level": 3}'], out
    assert float(run_rows[0][2]) == 0.0 and float(run_rows[1][2]) < 1e-4, out


def test_reductions_times_both_forms_with_their_errors():
    """``benchmarks/reductions.py``: each reduction at a ViT's shapes compiled as forward passes
    compile it (plain reduces) and as train steps do (XLA's tree rewrite), with float32 errors."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reductions.py"), "--batch", "2", "--tokens", "50", "--dim", "64",
         "--heads", "2", "--rounds", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^(\w[\w ]*?) \(.*?\)\s+plain \(forward passes\): +\d+\.\d+ ms, (\S+), rel\. error (\S+) \| "
                      r"tree \(train steps\): +\d+\.\d+ ms, (\S+), rel\. error (\S+)( \| dot: .*)?$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["rows", "softmax rows", "columns", "columns", "columns", "whole"], proc.stdout
    assert all(plain == "reduce" and tree == "reduce-window" for _, plain, _, tree, *_ in rows), proc.stdout
    assert all(float(e) < 1e-4 for _, _, e1, _, e2, _ in rows for e in (e1, e2)), proc.stdout
    assert [bool(dot) for *_, dot in rows] == [False, False, True, True, True, False], proc.stdout
    assert all(re.match(r" \| dot: +\d+\.\d+ ms, dot, rel\. error \S+$", dot) for *_, dot in rows if dot), proc.stdout


def test_train_step_times_vitport_against_timm_on_the_same_step():
    """``benchmarks/train_step.py``: timm's eager step and vitport's Trainer step, blocks one by
    one and scanned, each with its time, images/s, ratio to timm and page faults per step."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "vit_tiny_patch16_224", "--depth", "2",
         "--batches", "2", "--steps", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"│\s+2 │ (timm eager|vitport unrolled|vitport scanned)\s+│\s+([\d.]*) │\s+(\d+) │\s+([\d.]+) │\s+([\d.]+)x │"
        r"\s+(\d+) │", proc.stdout)}
    assert set(rows) == {"timm eager", "vitport unrolled", "vitport scanned"}, proc.stdout
    assert rows["timm eager"][0] == "" and rows["timm eager"][3] == "1.00", proc.stdout
    for name in ("vitport unrolled", "vitport scanned"):
        compile_s, ms, ips, ratio, _ = rows[name]
        assert float(compile_s) > 0 and abs(2 / (int(ms) / 1e3) - float(ips)) <= 0.05 * float(ips) + 0.01, proc.stdout


def test_train_step_times_bf16_compute_and_xla_default_options():
    """``train_step.py --compute-dtypes float32 bfloat16 --dots vitport default``: one row per
    compute dtype and option set, each a working step."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "vit_tiny_patch16_224", "--depth", "2",
         "--batches", "2", "--steps", "1", "--blocks", "unrolled", "--compute-dtypes", "float32", "bfloat16",
         "--dots", "vitport", "default"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = set(re.findall(r"│\s+2 │ (vitport [a-z0-9 -]+?)\s+│\s+[\d.]+ │\s+\d+ │", proc.stdout))
    assert names == {f"vitport unrolled {dtype}{dots}" for dtype in ("float32", "bfloat16")
                     for dots in ("", " xla-default-dots")}, proc.stdout


def test_dot_ceiling_counts_every_product_of_the_forward_pass(tmp_path):
    """``benchmarks/dot_ceiling.py``: the products it finds in the jaxpr and times one by one
    are the model's FLOPs exactly as ``benchmark.model_flops`` counts them from the spec (so none
    is missed or counted twice, CaiT's per-image attention loop included), each timed in XLA and
    as torch's GEMM of the same size."""
    out = tmp_path / "ceiling.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dot_ceiling.py"), "vit_tiny_patch16_224", "cait_xxs24_224",
         "--batch", "2", "--rounds", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "COLUMNS": "250"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "products alone on XLA's kernels" in proc.stdout and "the same GEMMs in torch" in proc.stdout
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from benchmark import model_flops
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from converters.architectures import arch_spec

    for r in json.loads(out.read_text())["results"]:
        spec = arch_spec(r["model"])
        assert r["products_flops"] == model_flops(spec) * r["batch"], r["model"]
        assert sum(p["count"] * p["flops"] for p in r["products"]) == r["products_flops"]
        assert all(p["xla_s"] > 0 and p["torch_s"] > 0 for p in r["products"])
        assert 0 < r["xla_products_s"] and 0 < r["model_s"]
        if r["model"] == "cait_xxs24_224":  # the attention products run once per image and block
            attention = [p for p in r["products"] if p["product"].startswith("dot float32[1,4,196,48]")]
            assert attention and all(p["count"] == spec.depth * r["batch"] for p in attention), r["products"]
