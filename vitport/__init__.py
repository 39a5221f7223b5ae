"""vitport: timm's Vision Transformers (ViT, DeiT, CaiT) in JAX, in Haiku and Flax.

    jm = vitport.from_timm(timm_model, framework="haiku")   # a live timm model (needs torch)
    jm = vitport.create_model("vit_base_patch16_224", framework="flax")   # random init, no torch
    jm = vitport.load("cait_s24_224", framework="haiku")   # hub name, hf-hub: repo, folder or file
    vitport.convert("cait_s24_224", "cait-haiku", framework="haiku")   # a folder that loads without torch
    logits = jm(images_nhwc)
"""

from __future__ import annotations

from typing import Any

from converters.architectures import arch_spec, list_architectures, pretrained_tag_cfg

# jax, Haiku and Flax load on first use (PEP 562), so `vitport` the command installs its signal
# handlers before the heavy imports: a Ctrl-C in the first second is then never swallowed.
_LAZY = {"JaxModel": "api", "from_state_dict": "api", "init_params": "api",
         "convert": "hub", "export_timm": "hub", "load": "hub", "save": "hub"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'vitport' has no attribute {name!r}")


def from_timm(model, framework: str = "flax") -> JaxModel:
    """Convert a live timm model (needs torch); see ``vitport.timm_bridge.from_timm``."""
    from .timm_bridge import from_timm as _from_timm

    return _from_timm(model, framework)


def create_model(name: str, framework: str = "flax", rng: Any = 0, **overrides: Any) -> JaxModel:
    """A randomly initialised model of a timm architecture (``arch`` or ``arch.tag``).

    ``overrides`` replace spec fields (``num_classes=10``, ``image_size=384``, ...). Needs no
    torch: specs come from vitport's table of timm architectures.
    """
    from .api import JaxModel, init_params

    spec = arch_spec(name, **overrides)
    cfg = pretrained_tag_cfg(name)
    preprocessing = {k: v for k, v in cfg.items() if k != "hf_hub_id"}
    return JaxModel(spec, framework, init_params(spec, framework, rng), preprocessing, name.partition(".")[0])


def list_models(pattern: str = "*") -> list[str]:
    """timm architecture names vitport converts, matching a glob ``pattern`` (``"cait_*"``)."""
    return list_architectures(pattern)


__all__ = ["JaxModel", "convert", "create_model", "export_timm", "from_state_dict", "from_timm", "init_params",
           "list_models", "load", "save"]
__version__ = "0.1.0"
