"""Live timm models -> JaxModel. The only vitport module that needs torch (imported lazily)."""

from __future__ import annotations

from typing import Any

import numpy as np

from converters import spec_from_timm_model

from .api import Framework, JaxModel, from_state_dict

PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation", "num_classes",
                      "label_names")


def tensor_to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, keeping its dtype (bfloat16 through ml_dtypes)."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def state_dict_to_numpy(state_dict) -> dict[str, np.ndarray]:
    return {k: tensor_to_numpy(v) for k, v in state_dict.items()}


def preprocessing_cfg(pretrained_cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The parts of timm's ``pretrained_cfg`` that say how to feed the model."""
    cfg = pretrained_cfg or {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in PREPROCESSING_KEYS}


def from_timm(model, framework: Framework = "flax") -> JaxModel:
    """Convert a live timm ``VisionTransformer`` / ``VisionTransformerDistilled`` / ``Cait``.

    Parameters keep the model's dtype (a float64 model needs ``jax_enable_x64``).
    Unsupported timm options are refused by name before anything is converted.
    """
    spec = spec_from_timm_model(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    return from_state_dict(state_dict_to_numpy(model.state_dict()), spec, framework,
                           source=f"timm model {arch or type(model).__name__}",
                           pretrained_cfg=preprocessing_cfg(cfg), architecture=arch)
