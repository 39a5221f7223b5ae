import os

# Tests never touch the network: the hub is offline unless a test points it at local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

# float64 parity tiers need x64; float32 models stay float32 (params carry their dtype).
jax.config.update("jax_enable_x64", True)
