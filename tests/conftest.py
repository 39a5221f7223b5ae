import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network: the hub is offline unless a test points it at local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

# float64 parity tiers need x64; float32 models stay float32 (params carry their dtype).
jax.config.update("jax_enable_x64", True)


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
