import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network: the hub is offline unless a test points it at local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The `vitport` command keeps jax's compilation cache under ~/.cache (vitport.compile_cache): the
# commands tests start do not, unless a test points it at a folder of its own.
os.environ.setdefault("VITPORT_COMPILATION_CACHE", "off")

# The tests compile hundreds of distinct small programs and run each once or twice: they spend
# their time in XLA's compiler, not in the programs. LLVM at -O0 and XLA's classic loop emitters
# compile them about twice as fast (the whole suite: 49 min -> 24 min on the 2-core AMD EPYC CI
# machine, durations in the notes on issue 11). The programs are the same and XLA's CPU backend uses no
# fast-math at any level; float32 results move by a rounding (2e-7 on tiny models' logits), far
# inside every tolerance. XLA reads XLA_FLAGS once, when the backend starts, so the flags are taken
# out of the environment again: the benchmarks and CLI runs that tests start compile as a user's
# would, except subprocesses whose numbers a test compares bit for bit with its own
# (helpers.env_with_test_xla_flags). VITPORT_TESTS_XLA_FLAGS= (empty) runs with XLA's defaults.
FAST_COMPILE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("VITPORT_TESTS_XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)

import jax  # noqa: E402

# float64 parity tiers need x64; float32 models stay float32 (params carry their dtype).
jax.config.update("jax_enable_x64", True)


def _start_xla_with_test_flags() -> None:
    users = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = f"{users or ''} {os.environ['VITPORT_TESTS_XLA_FLAGS']}".strip()
    try:
        jax.devices()  # starts the CPU backend, which parses XLA_FLAGS (once per process)
    finally:
        if users is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = users


_start_xla_with_test_flags()


def _keep_the_tests_llvm_level() -> None:
    """vitport's float32 jits ask for LLVM -O1 per jit unless XLA_FLAGS sets a level
    (``vitport.xla_options.fast_backend``), and a per-jit option overrides XLA_FLAGS. The flags
    left the environment again above, so in-process tests keep their -O0 here."""
    if "xla_backend_optimization_level" in os.environ["VITPORT_TESTS_XLA_FLAGS"]:
        from vitport import xla_options

        xla_options.FAST_BACKEND = ()


_keep_the_tests_llvm_level()


def _share_compilation_cache() -> None:
    """One jax persistent compilation cache for the whole run, shared by the xdist workers: tests
    build the same tiny models and eager draws over and over, in new jits and in both workers,
    and compile them once (test_models.py alone: 180 s -> 150 s on the 2-core CI machine). The
    controller (or a ``-n 0`` run) makes the folder and removes it at exit; the workers, started
    from its environment, find it there. Only compiles over 0.1 s are written. Subprocesses
    that tests start (benchmarks, the CLI) do not read the variable: their compiles stay cold."""
    folder = os.environ.get("VITPORT_TESTS_JAX_CACHE")
    if folder is None:
        folder = os.environ["VITPORT_TESTS_JAX_CACHE"] = tempfile.mkdtemp(prefix="vitport-tests-jax-cache-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


_share_compilation_cache()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty, offline Hugging Face cache in a temporary folder."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache
