"""Architecture specs: the hyperparameters of a checkpoint, framework-neutral.

A spec is the one description of a model that every front-end (Haiku, Flax linen, Flax NNX)
and the key table read: its fields are the model constructors' keyword arguments, and every
structural decision (pool, fc_norm, patch bias, grid, prefix and position-token counts) is a
field or property here, never re-derived in a front-end. Specs come from three places:

- a live timm model (``spec_from_timm_model``): reads the built modules, and refuses by name
  every timm option the JAX models do not implement;
- timm ``create_model`` kwargs on top of an architecture's spec (``spec_with_timm_kwargs``),
  as found in a hub ``config.json``'s ``model_args``;
- the JSON form written next to converted weights (``spec_from_dict``).

No torch at module level: only ``spec_from_timm_model`` imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from .errors import InvalidArgumentError, UnsupportedArchitectureError

Activation = Literal["gelu", "gelu_tanh", "quick_gelu", "silu", "sigmoid"]
# timm's block MLPs: ``Mlp``; ``GluMlp`` (fc1 packs [x | gate], ``gate_last``; timm's ``SwiGLUPacked``
# is ``GluMlp`` with ``gate_last=False`` and SiLU); ``SwiGLU`` (separate ``fc1_g`` / ``fc1_x``).
MlpLayer = Literal["Mlp", "GluMlp", "SwiGLU"]
MLP_LAYERS = ("Mlp", "GluMlp", "SwiGLU")
# timm ``act_layer`` names vitport implements, and the spec's name for each.
ACT_LAYER_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu",
                   "swish": "silu", "sigmoid": "sigmoid"}
Pool = Literal["token", "avg", "map", ""]


def pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        a, b = x
        return int(a), int(b)
    return int(x), int(x)


@dataclass(frozen=True)
class ViTSpec:
    """timm ``VisionTransformer`` / ``VisionTransformerDistilled`` hyperparameters.

    ``fc_norm`` is resolved (timm's ``None`` becomes ``pool == 'avg'``) and ``patch_bias``
    too (timm drops the patch-embedding bias when ``pre_norm``), so the spec says exactly
    which tensors exist.
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: Pool = "token"
    class_token: bool = True
    reg_tokens: int = 0
    distilled: bool = False
    no_embed_class: bool = False
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool = False
    pool_include_prefix: bool = False
    patch_bias: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
    init_values: float | None = None
    activation: Activation = "gelu"
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    mlp_layer: MlpLayer = "Mlp"
    mlp_gate_last: bool = True

    family = "vit"

    def __post_init__(self):
        object.__setattr__(self, "image_size", pair(self.image_size))
        if self.pool not in ("token", "avg", "map", ""):
            raise UnsupportedArchitectureError(f"global_pool={self.pool!r} is not supported "
                                               "(vitport implements 'token', 'avg', 'map' and '')")
        if self.dim % self.heads:
            raise UnsupportedArchitectureError(
                f"dim={self.dim} is not divisible by heads={self.heads} (attn_head_dim is not supported)")
        if self.distilled and self.pool != "token":
            raise UnsupportedArchitectureError("distilled models read the class and distillation "
                                               f"tokens; global_pool={self.pool!r} is not supported")
        if self.distilled and self.has_fc_norm:
            raise UnsupportedArchitectureError("distilled models with fc_norm are not supported")
        if self.pool == "token" and not self.class_token:
            raise UnsupportedArchitectureError("global_pool='token' needs class_token=True")
        if self.mlp_layer not in MLP_LAYERS:
            raise UnsupportedArchitectureError(f"mlp_layer={self.mlp_layer!r} is not supported "
                                               f"(supported: {', '.join(MLP_LAYERS)})")
        if self.mlp_layer == "GluMlp" and self.mlp_dim % 2:
            raise UnsupportedArchitectureError(f"GluMlp needs an even hidden width (fc1 packs x and gate); "
                                               f"mlp_dim={self.mlp_dim}")

    @property
    def mlp_hidden(self) -> int:
        """Width entering ``fc2``: ``mlp_dim`` (timm's ``hidden_features``, fc1's width), halved by
        ``GluMlp``'s chunk into x and gate."""
        return self.mlp_dim // 2 if self.mlp_layer == "GluMlp" else self.mlp_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        """The learned tokens put before the patches, in timm's order."""
        return tuple(name for name, on in (("cls_token", self.class_token), ("reg_token", self.reg_tokens > 0),
                                           ("dist_token", self.distilled)) if on)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
        """Rows of pos_embed that belong to prefix tokens (none with ``no_embed_class``)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def num_pos_tokens(self) -> int:
        h, w = self.grid_size
        return h * w + self.num_pos_prefix_tokens

    @property
    def has_layer_scale(self) -> bool:
        return self.init_values is not None

    @property
    def has_norm(self) -> bool:
        return self.final_norm and not self.fc_norm

    @property
    def has_fc_norm(self) -> bool:
        return self.final_norm and self.fc_norm


@dataclass(frozen=True)
class CaiTSpec:
    """timm ``Cait`` hyperparameters."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    dim: int = 384
    depth: int = 24
    cls_depth: int = 2
    heads: int = 8
    mlp_dim: int = 1536
    cls_mlp_dim: int = 1536
    pool: Literal["token", "avg", ""] = "token"
    qkv_bias: bool = True
    init_values: float = 1e-5
    activation: Activation = "gelu"
    norm_eps: float = 1e-6

    family = "cait"
    # CaiT has no options for these; the shared layers read them from any spec.
    patch_bias = True
    proj_bias = True
    qk_norm = False
    num_prefix_tokens = 1
    num_pos_prefix_tokens = 0  # the class token joins after the self-attention blocks, unembedded

    def __post_init__(self):
        object.__setattr__(self, "image_size", pair(self.image_size))
        if self.pool not in ("token", "avg", ""):
            raise UnsupportedArchitectureError(f"CaiT global_pool={self.pool!r} is not supported")
        if self.dim % self.heads:
            raise UnsupportedArchitectureError(f"dim={self.dim} is not divisible by heads={self.heads}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def num_pos_tokens(self) -> int:
        h, w = self.grid_size
        return h * w


Spec = ViTSpec | CaiTSpec
SPEC_TYPES = {"vit": ViTSpec, "cait": CaiTSpec}


def _square_patch(p) -> int:
    h, w = pair(p)
    if h != w:
        raise UnsupportedArchitectureError(f"non-square patch_size={p!r} is not supported")
    return h


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["image_size"] = list(d["image_size"])
    return {"family": spec.family, **d}


def spec_from_dict(d: dict[str, Any]) -> Spec:
    d = dict(d)
    family = d.pop("family")
    if family not in SPEC_TYPES:
        raise UnsupportedArchitectureError(f"unknown model family {family!r}")
    cls = SPEC_TYPES[family]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise InvalidArgumentError(f"unknown {family} spec fields: {', '.join(unknown)}")
    return cls(**d)


# ------------------------------------------------------------------ timm create_model kwargs


# timm keyword arguments that change nothing at inference.
_INFERENCE_NEUTRAL = {"drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
                      "drop_path_rate", "drop_block_rate", "weight_init", "fix_init", "device", "dtype"}
# timm keyword arguments vitport implements only at their default value.
_VIT_DEFAULT_ONLY = {"pos_embed": ("learn",), "scale_attn_norm": (False,), "scale_mlp_norm": (False,),
                     "dynamic_img_pad": (False,), "embed_layer": (None,),
                     "embed_norm_layer": (None,), "block_fn": (None,), "mlp_layer": (None,),
                     "attn_layer": (None, "attn")}
_CAIT_DEFAULT_ONLY = {k: (None,) for k in ("block_layers", "block_layers_token", "patch_layer", "attn_block",
                                          "mlp_block", "attn_block_token_only", "mlp_block_token_only",
                                          "norm_layer", "act_layer")}


def _ratio_dim(dim: int, ratio: float) -> int:
    return int(dim * ratio + 1e-6)  # timm: int(dim * ratio); the epsilon absorbs ratios derived from ints


def _mlp_width(dim: int, ratio: float | None, factory_ratio: float) -> int:
    """timm's ``int(dim * mlp_ratio)`` exactly for a given ratio; the factory's ratio (derived from
    two ints here) keeps the epsilon."""
    return int(dim * ratio) if ratio is not None else _ratio_dim(dim, factory_ratio)


def spec_with_timm_kwargs(spec: Spec, kwargs: Mapping[str, Any], *, where: str = "model_args") -> Spec:
    """Apply timm constructor keyword arguments on top of a spec (the factory's defaults).

    This is what ``timm.create_model(arch, **kwargs)`` does to the architecture; a keyword
    vitport does not implement, or does not know, is refused by name (all at once).
    """
    from .validate import check_timm_kwargs

    kw = check_timm_kwargs(kwargs, where)  # types and ranges first: "depth": "12" is refused by name
    bad: list[str] = []
    new: dict[str, Any] = {}
    default_only = _CAIT_DEFAULT_ONLY if isinstance(spec, CaiTSpec) else _VIT_DEFAULT_ONLY
    for k in list(kw):
        if k in _INFERENCE_NEUTRAL:
            kw.pop(k)
        elif k in default_only:
            v = kw.pop(k)
            if v not in default_only[k]:
                bad.append(f"{k}={v!r}")
    common = {"img_size": "image_size", "in_chans": "channels", "num_classes": "num_classes",
              "depth": "depth", "num_heads": "heads", "qkv_bias": "qkv_bias", "init_values": "init_values"}
    if not isinstance(spec, CaiTSpec):
        common["proj_bias"] = "proj_bias"
    for k, field in common.items():
        if k in kw:
            v = kw.pop(k)
            new[field] = pair(v) if k == "img_size" else v
    if not isinstance(spec, CaiTSpec) and "init_values" in new and not new["init_values"]:
        new["init_values"] = None  # timm: a falsy init_values means no LayerScale
    if "patch_size" in kw:
        p = kw.pop("patch_size")
        h, w = pair(p)
        if h != w:
            bad.append(f"patch_size={p!r} (non-square)")
        new["patch_size"] = h
    dim = kw.pop("embed_dim", spec.dim)
    new["dim"] = dim
    new["mlp_dim"] = _mlp_width(dim, kw.pop("mlp_ratio", None), spec.mlp_dim / spec.dim)
    if "global_pool" in kw:
        new["pool"] = kw.pop("global_pool")
    if isinstance(spec, CaiTSpec):
        if "depth_token_only" in kw:
            new["cls_depth"] = kw.pop("depth_token_only")
        new["cls_mlp_dim"] = _mlp_width(dim, kw.pop("mlp_ratio_token_only", None), spec.cls_mlp_dim / spec.dim)
    else:
        for k in ("class_token", "reg_tokens", "no_embed_class", "final_norm", "pool_include_prefix",
                  "qk_norm", "dynamic_img_size"):
            if k in kw:
                new[k] = kw.pop(k)
        if "pre_norm" in kw:
            new["pre_norm"] = bool(kw.pop("pre_norm"))
            new["patch_bias"] = not new["pre_norm"]
        if "fc_norm" in kw and kw["fc_norm"] is not None:
            new["fc_norm"] = bool(kw.pop("fc_norm"))
        else:
            kw.pop("fc_norm", None)
            if new.get("pool", spec.pool) != spec.pool:  # timm's fc_norm=None follows the pool
                new["fc_norm"] = new["pool"] == "avg"
        if "act_layer" in kw:
            act = kw.pop("act_layer")
            if isinstance(act, str) and act.lower() in ACT_LAYER_NAMES:
                new["activation"] = ACT_LAYER_NAMES[act.lower()]
            elif act is not None:
                bad.append(f"act_layer={act!r} (supported: {', '.join(repr(a) for a in ACT_LAYER_NAMES)})")
        if "norm_layer" in kw:
            norm = kw.pop("norm_layer")
            if norm == "layernorm":
                new["norm_eps"] = 1e-6  # timm.layers.LayerNorm's default eps
            elif norm is not None:
                bad.append(f"norm_layer={norm!r} (only LayerNorm is supported)")
    bad += [f"{k}={v!r}" for k, v in kw.items()]  # anything left is not implemented (or unknown)
    if bad:
        raise UnsupportedArchitectureError(
            f"timm settings in {where} that vitport does not implement: {', '.join(bad)}")
    return dataclasses.replace(spec, **new)


def timm_mlp_ratio(dim: int, width: int) -> float:
    """The smallest float ``r`` with timm's ``int(dim * r) == width`` (``width / dim`` can fall
    one ulp short, e.g. 15 / 11)."""
    import math

    r = width / dim
    while int(dim * r) < width:
        r = math.nextafter(r, math.inf)
    return r


def timm_model_args(spec: Spec) -> dict[str, Any]:
    """The ``timm.create_model`` keyword arguments that rebuild ``spec`` on top of its factory.

    Only what vitport can change is written: size, classes, width, depth, heads, MLP ratio.
    """
    args: dict[str, Any] = {"img_size": list(spec.image_size), "patch_size": spec.patch_size,
                            "in_chans": spec.channels, "num_classes": spec.num_classes,
                            "embed_dim": spec.dim, "depth": spec.depth, "num_heads": spec.heads,
                            "mlp_ratio": timm_mlp_ratio(spec.dim, spec.mlp_dim), "global_pool": spec.pool}
    if isinstance(spec, CaiTSpec):
        args["depth_token_only"] = spec.cls_depth
        args["mlp_ratio_token_only"] = timm_mlp_ratio(spec.dim, spec.cls_mlp_dim)
    return args


# --------------------------------------------------------------------------- live timm models


def spec_from_timm_model(model) -> Spec:
    """Read the spec off a live timm model; refuse, by name, anything vitport does not implement.

    Every problem found is reported at once.
    """
    import torch.nn as tnn
    from timm.layers import AttentionPoolLatent, GluMlp, LayerScale, Mlp, PatchEmbed, SwiGLU
    from timm.layers.attention import Attention
    from timm.models.cait import (Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn,
                                  TalkingHeadAttn)
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import Block, VisionTransformer

    problems: list[str] = []

    def need(cond: bool, what: str):
        if not cond:
            problems.append(what)

    def ident(m) -> bool:
        return isinstance(m, tnn.Identity)

    def layer_norm_eps(m, where: str) -> float | None:
        if not isinstance(m, tnn.LayerNorm) or not m.elementwise_affine:
            problems.append(f"{where}: {type(m).__name__} (only affine LayerNorm is supported)")
            return None
        return float(m.eps)

    def activation(act, where: str) -> str | None:
        name = type(act).__name__
        if name == "QuickGELU":
            return "quick_gelu"
        if name == "GELUTanh" or (isinstance(act, tnn.GELU) and act.approximate == "tanh"):
            return "gelu_tanh"
        if name == "GELU" and getattr(act, "approximate", "none") == "none":
            return "gelu"
        if isinstance(act, tnn.SiLU) or name in ("SiLU", "Swish"):
            return "silu"
        if isinstance(act, tnn.Sigmoid) or name == "Sigmoid":
            return "sigmoid"
        problems.append(f"{where}: activation {name} (supported: GELU, GELUTanh, QuickGELU, SiLU, Sigmoid)")
        return None

    def check_patch_embed(pe):
        need(type(pe) is PatchEmbed, f"patch_embed: {type(pe).__name__} (hybrid CNN stems are not supported)")
        if type(pe) is not PatchEmbed:
            return None
        need(ident(pe.norm), "patch_embed.norm (embed_norm_layer is not supported)")
        need(not pe.dynamic_img_pad, "dynamic_img_pad=True is not supported")
        need(tuple(pe.proj.kernel_size) == tuple(pe.proj.stride), "patch_embed: overlapping patches")
        need(pe.proj.kernel_size[0] == pe.proj.kernel_size[1], "patch_embed: non-square patches")
        return pe.proj.kernel_size[0]

    def check_mlp(mlp, where: str, dim: int, kinds=(Mlp, GluMlp, SwiGLU)):
        """(hidden width, activation, MLP kind, gate_last) of a timm block MLP."""
        if type(mlp) not in kinds:
            names = ", ".join(k.__name__ for k in kinds)
            problems.append(f"{where}: {type(mlp).__name__} (supported here: {names})")
            return None, None, None, True
        need(ident(mlp.norm), f"{where}.norm (scale_mlp_norm is not supported)")
        fc1 = mlp.fc1_x if type(mlp) is SwiGLU else mlp.fc1
        need(isinstance(fc1, tnn.Linear), f"{where}: convolutional MLP (use_conv=True) is not supported")
        need((fc1.bias is None) == (mlp.fc2.bias is None), f"{where}: fc1 and fc2 disagree on bias")
        need(mlp.fc2.out_features == dim, f"{where}: MLP output width differs from dim")
        gate_last = True
        if type(mlp) is GluMlp:
            gate_last = bool(mlp.gate_last)
            need(mlp.chunk_dim == -1, f"{where}: convolutional GluMlp is not supported")
            need(mlp.fc2.in_features * 2 == fc1.out_features, f"{where}: fc2 width is not half of fc1's")
        if type(mlp) is SwiGLU:
            need(mlp.fc1_g.out_features == fc1.out_features and (mlp.fc1_g.bias is None) == (fc1.bias is None),
                 f"{where}: fc1_g and fc1_x differ")
        return fc1.out_features, activation(mlp.act, f"{where}.act"), type(mlp).__name__, gate_last

    if type(model) is Cait:
        patch = check_patch_embed(model.patch_embed)
        dim = model.embed_dim
        eps = layer_norm_eps(model.norm, "norm")
        b0, c0 = model.blocks[0], model.blocks_token_only[0] if len(model.blocks_token_only) else None
        need(c0 is not None, "CaiT without class-attention blocks")
        need(all(type(b) is LayerScaleBlock and type(b.attn) is TalkingHeadAttn for b in model.blocks),
             "blocks: only LayerScaleBlock with TalkingHeadAttn is supported")
        need(all(type(b) is LayerScaleBlockClassAttn and type(b.attn) is ClassAttn for b in model.blocks_token_only),
             "blocks_token_only: only LayerScaleBlockClassAttn with ClassAttn is supported")
        mlp_dim, act, _, _ = check_mlp(b0.mlp, "blocks.0.mlp", dim, (Mlp,))
        cls_mlp_dim = check_mlp(c0.mlp, "blocks_token_only.0.mlp", dim, (Mlp,))[0] if c0 is not None else None
        layer_norm_eps(b0.norm1, "blocks.0.norm1")
        qkv_bias = b0.attn.qkv.bias is not None
        if c0 is not None:
            need((c0.attn.q.bias is not None) == qkv_bias, "class attention and self attention disagree on qkv_bias")
        gamma = b0.gamma_1
        # Only the values know the init; 6 significant digits undo float32 (1e-6, not 9.99999997e-07).
        init_values = 1e-5 if gamma.is_meta else float(f"{float(gamma.detach().flatten()[0]):.6g}")
        if problems:
            raise UnsupportedArchitectureError("timm Cait options not supported by vitport:\n  "
                                               + "\n  ".join(problems))
        return CaiTSpec(
            image_size=tuple(model.patch_embed.img_size), patch_size=patch,
            channels=model.patch_embed.proj.in_channels,
            num_classes=model.head.out_features if isinstance(model.head, tnn.Linear) else 0,
            dim=dim, depth=len(model.blocks), cls_depth=len(model.blocks_token_only),
            heads=b0.attn.num_heads, mlp_dim=mlp_dim, cls_mlp_dim=cls_mlp_dim,
            pool=model.global_pool, qkv_bias=qkv_bias, init_values=init_values,
            activation=act, norm_eps=eps,
        )

    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported: vitport converts timm's VisionTransformer, "
            "VisionTransformerDistilled and Cait (Eva, relative-position, hybrid and other "
            "ViT variants are out of scope)")

    patch = check_patch_embed(model.patch_embed)
    dim = model.embed_dim
    need(model.pos_embed is not None, "pos_embed='none' is not supported")
    block_types = sorted({type(b).__name__ for b in model.blocks if type(b) is not Block})
    need(not block_types, f"blocks: {', '.join(block_types)} (only timm's standard Block is supported; "
                          "parallel, res-post and differential blocks are not)")
    b0 = model.blocks[0]
    mlp_dim = act = eps = None
    mlp_layer, gate_last = "Mlp", True
    qkv_bias = qk_norm = False
    proj_bias = True
    init_values = None
    if type(b0) is Block:
        need(type(b0.attn) is Attention, f"blocks.0.attn: {type(b0.attn).__name__}")
        if type(b0.attn) is Attention:
            need(ident(b0.attn.norm), "blocks.0.attn.norm (scale_attn_norm is not supported)")
            need(getattr(b0.attn, "gate", None) is None, "gated attention is not supported")
            proj_bias = b0.attn.proj.bias is not None
            need(getattr(b0.mlp, "fc2", None) is None or (b0.mlp.fc2.bias is not None) == proj_bias,
                 "attention and MLP projections disagree on bias")
            need(b0.attn.head_dim * b0.attn.num_heads == dim, "attn_head_dim != dim // num_heads")
            qkv_bias = b0.attn.qkv.bias is not None
            qk_norm = not ident(b0.attn.q_norm)
            if qk_norm:
                layer_norm_eps(b0.attn.q_norm, "blocks.0.attn.q_norm")
        mlp_dim, act, mlp_layer, gate_last = check_mlp(b0.mlp, "blocks.0.mlp", dim)
        eps = layer_norm_eps(b0.norm1, "blocks.0.norm1")
        if isinstance(b0.ls1, LayerScale):
            init_values = float(b0.ls1.init_values)
        else:
            need(ident(b0.ls1), f"blocks.0.ls1: {type(b0.ls1).__name__}")
    pool = model.global_pool
    need(pool in ("token", "avg", "map", ""),
         f"global_pool={pool!r} (supported: 'token', 'avg', 'map', '')")
    if pool == "map":
        ap = model.attn_pool
        need(type(ap) is AttentionPoolLatent, f"attn_pool: {type(ap).__name__}")
        if type(ap) is AttentionPoolLatent:
            need(ap.latent_len == 1 and ap.pool == "token", "attn_pool: latent_len != 1 or pool != 'token'")
            need(ap.pos_embed is None, "attn_pool: pos_embed is not supported")
            need(isinstance(ap.q, tnn.Linear), "attn_pool: q_proj=False is not supported")
            need(ident(ap.q_norm), "attn_pool: qk_norm is not supported")
            need(type(ap.mlp) is Mlp and ap.mlp.fc1.out_features == mlp_dim,
                 "attn_pool: MLP width differs from the blocks'")
            need(isinstance(ap.q, tnn.Linear) and ap.q.bias is not None, "attn_pool: qkv_bias=False")
    elif pool != "" and getattr(model, "attn_pool", None) is not None:
        problems.append("attn_pool with a non-'map' global_pool")
    if not ident(model.norm_pre):
        layer_norm_eps(model.norm_pre, "norm_pre")
    if not ident(model.norm):
        layer_norm_eps(model.norm, "norm")
    if problems:
        raise UnsupportedArchitectureError(
            f"timm {type(model).__name__} options not supported by vitport:\n  " + "\n  ".join(problems))
    has_norm, has_fc_norm = not ident(model.norm), not ident(model.fc_norm)
    return ViTSpec(
        image_size=tuple(model.patch_embed.img_size), patch_size=patch,
        channels=model.patch_embed.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, tnn.Linear) else 0,
        dim=dim, depth=len(model.blocks), heads=b0.attn.num_heads, mlp_dim=mlp_dim,
        pool=pool, class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        distilled=isinstance(model, VisionTransformerDistilled),
        no_embed_class=model.no_embed_class, pre_norm=not ident(model.norm_pre),
        final_norm=has_norm or has_fc_norm, fc_norm=has_fc_norm,
        pool_include_prefix=model.pool_include_prefix,
        patch_bias=model.patch_embed.proj.bias is not None,
        qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias, init_values=init_values, activation=act,
        norm_eps=eps, dynamic_img_size=model.dynamic_img_size, mlp_layer=mlp_layer, mlp_gate_last=gate_last,
    )
