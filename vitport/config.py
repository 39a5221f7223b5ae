"""The one description every module receives: a resolved spec plus run-time settings.

``ModelConfig`` is frozen (hashable, so linen modules can hold it as an attribute and jit
can treat it as static). Front-end modules read structure from ``cfg.spec`` and dropout
rates and dtypes from ``cfg``; none of them takes loose hyperparameters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from converters.errors import InvalidArgumentError
from converters.specs import SPEC_TYPES, CaiTSpec, Spec

# The seed's pool names ('cls', 'mean') next to timm's ('token', 'avg').
POOL_ALIASES = {"cls": "token", "token": "token", "mean": "avg", "avg": "avg", "map": "map", "": "", None: ""}

# Constructor keywords that are run-time settings rather than spec fields.
RUNTIME_FIELDS = ("dropout", "emb_dropout", "layer_dropout", "attn_dropout", "head_dropout", "dtype", "param_dtype",
                  "matmul_dtype", "distilled_training", "scan_blocks")


@dataclass(frozen=True)
class ModelConfig:
    """A spec and how to run it.

    Attributes:
      spec: the architecture (``ViTSpec``, ``CaiTSpec`` or ``EvaSpec``).
      dropout: timm ``proj_drop_rate``: after the attention projection and in the MLP.
      emb_dropout: timm ``pos_drop_rate``: on the embedded tokens.
      layer_dropout: timm ``drop_path_rate`` (stochastic depth): ViT decays it linearly over
        depth from 0, CaiT uses it in every self-attention block, as timm does.
      attn_dropout: timm ``attn_drop_rate``: on the attention weights.
      head_dropout: timm ``drop_rate``: on the pooled features before the classifier.
      dtype: computation dtype (None: follow the inputs and params).
      param_dtype: dtype of freshly initialised params.
      matmul_dtype: None, or 'bfloat16' / 'float16': every matmul, attention product and the
        patch convolution casts its inputs to it and accumulates in float32 (the fast form on
        CPUs with bf16 dot units), the rest of the model runs in the params' dtype. float32
        weights with ``matmul_dtype='bfloat16'`` is the mixed mode; bf16 weights take the
        float32-accumulating products without it (``vitport.ops``).
      distilled_training: timm's ``set_distilled_training``: a distilled DeiT in training
        returns ``(logits, logits_dist)`` instead of their average (other models ignore it).
      scan_blocks: run each list of identical blocks (``structure.scanned_lists``) as one
        ``jax.lax.scan``: the blocks are traced and compiled once, so the first call hardly
        grows with depth. ``JaxModel.set_scan_blocks`` also stores those lists' weights stacked
        on a leading axis (``converters.frameworks.stack_blocks``), so steady calls run as fast
        as block by block, in evaluation and training (each step at its block's
        stochastic-depth rate, with its own rng key). Params kept one subtree per block are
        stacked inside every call in evaluation (correct, but a copy of the block weights per
        call) and run block by block in training; so do blocks that differ in shape
        (``vitport.structure._blocks``). Off by default.
    """

    spec: Spec
    dropout: float = 0.0
    emb_dropout: float = 0.0
    layer_dropout: float = 0.0
    attn_dropout: float = 0.0
    head_dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = "float32"
    matmul_dtype: str | None = None
    distilled_training: bool = False
    scan_blocks: bool = False

    def __post_init__(self):
        if self.matmul_dtype is not None:
            import numpy as np
            import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

            name = np.dtype(self.matmul_dtype).name
            if name not in ("bfloat16", "float16"):
                raise InvalidArgumentError(f"matmul_dtype must be None, 'bfloat16' or 'float16'; got {name!r}")
            object.__setattr__(self, "matmul_dtype", name)  # a name: hashable, comparable

    @property
    def family(self) -> str:
        return self.spec.family

    def drop_path_rate(self, block: int) -> float:
        """Stochastic-depth rate of self-attention block ``block``."""
        if isinstance(self.spec, CaiTSpec):
            return self.layer_dropout
        depth = self.spec.depth
        return self.layer_dropout * block / (depth - 1) if depth > 1 else 0.0


def _resolve_vit_options(kw: dict[str, Any]) -> dict[str, Any]:
    """The seed constructor's conveniences: pool aliases, ``fc_norm``/``patch_bias`` None."""
    if "pool" in kw:
        try:
            kw["pool"] = POOL_ALIASES[kw["pool"]]
        except (KeyError, TypeError):
            raise InvalidArgumentError(f"pool must be one of 'cls'/'token', 'mean'/'avg', 'map' or ''; "
                                       f"got {kw['pool']!r}") from None
    if kw.get("fc_norm", False) is None:  # timm: fc_norm=None means "when pooling by average"
        kw["fc_norm"] = kw.get("pool", "token") == "avg"
    if kw.get("patch_bias", False) is None:  # timm drops the patch bias of pre-norm (CLIP) models
        kw["patch_bias"] = not kw.get("pre_norm", False)
    return kw


def config_from_kwargs(family: str, kwargs: Mapping[str, Any]) -> ModelConfig:
    """Build a config from the seed-style constructor keywords of ``ViT`` / ``CaiT``.

    Unknown keywords are an error that names them.
    """
    spec_cls = SPEC_TYPES[family]
    kw = {k: v for k, v in kwargs.items()}
    runtime = {k: kw.pop(k) for k in RUNTIME_FIELDS if k in kw}
    spec_fields = {f.name for f in dataclasses.fields(spec_cls)}
    if family == "cait":
        kw["pool"] = POOL_ALIASES.get(kw.get("pool", "token"), kw.get("pool"))
        if kw.get("cls_mlp_dim") is None:
            kw["cls_mlp_dim"] = kw.get("mlp_dim", CaiTSpec.mlp_dim)
    elif family == "vit":
        kw = _resolve_vit_options(kw)
    unknown = sorted(set(kw) - spec_fields)
    if unknown:
        raise InvalidArgumentError(f"unknown {family} argument(s): {', '.join(unknown)}; known: "
                                   f"{', '.join(sorted(spec_fields | set(RUNTIME_FIELDS)))}")
    if runtime.get("param_dtype") is None:
        runtime.pop("param_dtype", None)
    return ModelConfig(spec_cls(**kw), **runtime)


def config_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Inverse of ``config_from_kwargs``: the constructor keywords that rebuild ``cfg``."""
    return {**dataclasses.asdict(cfg.spec), **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}}
