"""Live timm models -> JaxModel. The only vitport module that needs torch (imported lazily)."""

from __future__ import annotations

import numpy as np

from converters import spec_from_timm_model
from converters.checkpoint_io import preprocessing, torch_to_numpy

from .api import Framework, JaxModel, from_state_dict


def state_dict_to_numpy(state_dict) -> dict[str, np.ndarray]:
    """A torch state_dict as numpy arrays, dtypes kept (bfloat16 through ml_dtypes)."""
    return {k: torch_to_numpy(v) for k, v in state_dict.items()}


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
                           pretrained_cfg=preprocessing(cfg), architecture=arch)
