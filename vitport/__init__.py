"""vitport: timm's Vision Transformers (ViT, DeiT, CaiT) in JAX: Haiku, Flax linen and Flax NNX.

    jm = vitport.from_timm(timm_model, framework="nnx")   # a live timm model (needs torch)
    jm = vitport.create_model("vit_base_patch16_224", framework="flax", img_size=384)   # random init, no torch
    jm = vitport.load("cait_s24_224", framework="haiku")   # hub name, hf-hub: repo, folder or file
    vitport.convert("cait_s24_224", "cait-haiku", framework="haiku")   # a folder that loads without torch
    logits = jm(images_nhwc)
"""

from __future__ import annotations

from typing import Any

from converters import FRAMEWORKS, VitportError
from converters.architectures import arch_spec, list_architectures, pretrained_tag_cfg
from converters.specs import spec_with_timm_kwargs

# jax, Haiku and Flax load on first use (PEP 562), so `vitport` the command installs its signal
# handlers before the heavy imports: a Ctrl-C in the first second is then never swallowed.
_LAZY = {"JaxModel": "api", "from_state_dict": "api", "init_params": "api", "ModelConfig": "config",
         "convert": "hub", "export_timm": "hub", "load": "hub", "save": "hub"}


def __getattr__(name: str) -> Any:
    import importlib
    import importlib.util

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # submodules: vitport.nnx, vitport.api, ...
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vitport' has no attribute {name!r}")


def from_timm(model, framework: str = "flax") -> JaxModel:
    """Convert a live timm model (needs torch); see ``vitport.timm_bridge.from_timm``."""
    from .timm_bridge import from_timm as _from_timm

    return _from_timm(model, framework)


# timm's training-time rates -> ModelConfig fields.
TIMM_DROP_RATES = {"drop_rate": "head_dropout", "proj_drop_rate": "dropout", "pos_drop_rate": "emb_dropout",
                   "attn_drop_rate": "attn_dropout", "drop_path_rate": "layer_dropout"}


def create_model(name: str, framework: str = "flax", rng: Any = 0, **timm_kwargs: Any) -> JaxModel:
    """A randomly initialised model of a timm architecture (``arch`` or ``arch.tag``).

    Takes ``timm.create_model``'s keyword names (``img_size``, ``embed_dim``, ``depth``,
    ``num_heads``, ``num_classes``, ``global_pool``, ``reg_tokens``, ``drop_path_rate``, ...),
    exactly as ``load(..., model_args=...)`` does; a keyword vitport does not know or
    implement is an error that names it. Needs no torch.
    """
    from .api import JaxModel, init_params
    from .config import ModelConfig

    rates = {TIMM_DROP_RATES[k]: timm_kwargs.pop(k) for k in list(timm_kwargs) if k in TIMM_DROP_RATES}
    spec = spec_with_timm_kwargs(arch_spec(name), timm_kwargs, where=f"create_model({name!r}, ...)")
    cfg = ModelConfig(spec, **rates)
    preprocessing = {k: v for k, v in pretrained_tag_cfg(name).items() if k != "hf_hub_id"}
    return JaxModel(spec, framework, init_params(cfg, framework, rng), preprocessing, name.partition(".")[0],
                    config=cfg)


def list_models(pattern: str = "*") -> list[str]:
    """timm architecture names vitport converts, matching a glob ``pattern`` (``"cait_*"``)."""
    return list_architectures(pattern)


__all__ = ["FRAMEWORKS", "JaxModel", "ModelConfig", "VitportError", "convert", "create_model", "export_timm", "from_state_dict", "from_timm", "init_params",
           "list_models", "load", "save"]
__version__ = "0.1.0"
