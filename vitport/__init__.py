"""vitport: timm's Vision Transformers (ViT, DeiT, CaiT) in JAX, in Haiku and Flax."""

from .api import JaxModel, from_state_dict, init_params


def from_timm(model, framework: str = "flax") -> JaxModel:
    """Convert a live timm model (needs torch); see ``vitport.timm_bridge.from_timm``."""
    from .timm_bridge import from_timm as _from_timm

    return _from_timm(model, framework)


__all__ = ["JaxModel", "from_state_dict", "from_timm", "init_params"]
__version__ = "0.1.0"
