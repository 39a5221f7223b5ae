import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub is offline unless a test points it at local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

# float64 parity tiers need x64; float32 models stay float32 (params carry their dtype).
jax.config.update("jax_enable_x64", True)


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
