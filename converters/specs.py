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
# timm's VisionTransformer blocks (``block_fn``), attention (``attn_layer``) and norm (``norm_layer``)
# classes vitport implements, by timm's class names (timm/models/vision_transformer.py, timm/layers).
BlockFn = Literal["Block", "ResPostBlock", "ParallelThingsBlock", "ParallelScalingBlock",
                  "DiffParallelScalingBlock"]
BLOCK_FNS = ("Block", "ResPostBlock", "ParallelThingsBlock", "ParallelScalingBlock", "DiffParallelScalingBlock")
# The blocks with a fused qkv + MLP fc1 ``in_proj`` (ViT-22B style), which ignore mlp_layer and attn_layer.
SCALING_BLOCKS = ("ParallelScalingBlock", "DiffParallelScalingBlock")
AttnLayer = Literal["Attention", "DiffAttention"]
ATTN_LAYERS = ("Attention", "DiffAttention")
NormLayer = Literal["LayerNorm", "RmsNorm"]
NORM_LAYERS = ("LayerNorm", "RmsNorm")
# timm ``attn_layer`` / ``norm_layer`` strings (ATTN_LAYERS in vision_transformer.py, get_norm_layer).
ATTN_LAYER_NAMES = {"": "Attention", "attn": "Attention", "diff": "DiffAttention"}
NORM_LAYER_NAMES = {"layernorm": "LayerNorm", "rmsnorm": "RmsNorm"}


def pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        a, b = x
        return int(a), int(b)
    return int(x), int(x)


def _tuple(x) -> tuple:
    return tuple(int(v) for v in x)


HybridKind = Literal["resnetv2", "resnet", "convstem"]


@dataclass(frozen=True)
class HybridBackbone:
    """The CNN of a timm hybrid ViT's ``HybridEmbed.backbone`` (``timm/models/vision_transformer_hybrid.py``),
    read off the live modules (docs/design.md, section 3).

    ``'resnetv2'``: timm's ``ResNetV2(preact=False)`` as ``_resnetv2`` builds it (or, with no
    stages, its stem alone, an ``nn.Sequential`` of ``conv``, ``norm``, ``pool``): weight-standardised
    convolutions (``StdConv2dSame`` / ``StdConv2d``, eps ``std_conv_eps``), ``GroupNormAct``
    (``norm_groups`` groups, ``norm_eps``, ReLU) after each, a 7x7 stride-2 stem conv and a 3x3
    stride-2 max pool, then non-pre-activation ``Bottleneck`` stages (the first block of each with a
    ``DownsampleConv`` shortcut). ``same_padding``: TF 'SAME' padding (timm's default for hybrids)
    instead of torch's symmetric ``get_padding``. Per stage: ``layers`` blocks, ``channels`` out,
    ``mid_channels`` in the bottleneck, ``strides`` of its first block.

    ``'resnet'``: timm's ResNet-D (``resnet26d`` / ``resnet50d`` as ``features_only=True``
    ``FeatureListNet``, ``timm/models/resnet.py``): the deep stem ``conv1`` (3x3/2 to ``stem_width``,
    3x3, 3x3 to ``stem_chs``, BatchNorm + ReLU between), ``bn1``, 3x3/2 max pool (padding 1), then
    ``layer1..`` of ``resnet.Bottleneck`` (stride in conv2) with the avg-down shortcut
    (``downsample = AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)``, 1x1 conv,
    BatchNorm) on each stage's first block; plain convolutions (torch padding), ``BatchNorm2d``
    with eps ``bn_eps`` in evaluation mode (frozen running statistics, also when fine-tuning).

    ``'convstem'``: timm's MCi ``ConvStem`` (``vision_transformer_hybrid.py``), an ``nn.Sequential``
    of ``ConvNormAct``: per entry ``channels`` out, ``kernel_sizes``, ``strides``, symmetric
    ``paddings``; every conv but the last without bias and followed by ``BatchNormAct2d`` (eps
    ``bn_eps``, frozen as above, activation ``act``); the last with bias and no norm. With
    ``embed_proj=False`` (``HybridEmbed(proj=False)``) its output is the tokens: no ``proj``.
    """

    kind: HybridKind = "resnetv2"
    stem_chs: int = 64
    layers: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    mid_channels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    same_padding: bool = True
    std_conv_eps: float = 1e-8
    norm_groups: int = 32
    norm_eps: float = 1e-5
    stem_width: int = 32  # 'resnet': the deep stem's inner width
    bn_eps: float = 1e-5  # 'resnet', 'convstem': BatchNorm2d eps
    kernel_sizes: tuple[int, ...] = ()  # 'convstem'
    paddings: tuple[int, ...] = ()  # 'convstem'
    act: str = "relu"  # 'convstem': the BatchNormAct2d activation (timm's ConvStem act_layer)
    embed_proj: bool = True  # HybridEmbed's proj (False: the backbone's width is the embedding's)

    def __post_init__(self):
        for name in ("layers", "channels", "mid_channels", "strides", "kernel_sizes", "paddings"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))  # JSON gives lists
        if self.kind not in ("resnetv2", "resnet", "convstem"):
            raise UnsupportedArchitectureError(f"hybrid backbone kind {self.kind!r} is not supported")
        if self.kind == "convstem":
            if not (len(self.channels) == len(self.kernel_sizes) == len(self.strides) == len(self.paddings) >= 1):
                raise InvalidArgumentError("hybrid ConvStem: channels, kernel_sizes, strides and paddings differ in "
                                           "length")
            if self.act not in ("relu", "gelu"):
                raise UnsupportedArchitectureError(f"hybrid ConvStem activation {self.act!r} is not supported")
            return
        n = len(self.layers)
        if not (len(self.channels) == len(self.mid_channels) == len(self.strides) == n):
            raise InvalidArgumentError("hybrid backbone: layers, channels, mid_channels and strides differ in length")
        if self.kind == "resnetv2" and any(c % self.norm_groups
                                           for c in (self.stem_chs, *self.channels, *self.mid_channels)):
            raise InvalidArgumentError(f"hybrid backbone: widths must be multiples of norm_groups={self.norm_groups}")

    @property
    def num_features(self) -> int:
        """Width of the feature map handed to ``HybridEmbed.proj``."""
        return self.channels[-1] if self.channels else self.stem_chs

    def feature_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The backbone's output size: every stride-2 step (stem conv, max pool, stage) gives
        ``ceil(n / 2)``, with 'SAME' padding and with timm's symmetric ``get_padding`` alike."""
        h, w = image_size
        if self.kind == "convstem":  # torch's conv arithmetic, conv by conv
            for k, st, p in zip(self.kernel_sizes, self.strides, self.paddings):
                h, w = (h + 2 * p - k) // st + 1, (w + 2 * p - k) // st + 1
            return h, w
        for s in (2, 2, *self.strides):
            h, w = -(-h // s), -(-w // s)
        return h, w


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
    block_fn: BlockFn = "Block"
    num_parallel: int = 2  # ParallelThingsBlock's branches
    fuse_out_proj: bool = False  # ParallelScalingBlock's one out_proj (DiffParallelScalingBlock always fuses)
    attn_layer: AttnLayer = "Attention"
    norm_layer: NormLayer = "LayerNorm"
    backbone: HybridBackbone | None = None  # a hybrid ViT's CNN stem (timm's HybridEmbed)

    family = "vit"

    def __post_init__(self):
        object.__setattr__(self, "image_size", pair(self.image_size))
        if isinstance(self.backbone, Mapping):  # the JSON form
            object.__setattr__(self, "backbone", HybridBackbone(**self.backbone))
        if self.backbone is not None and self.dynamic_img_size:
            raise UnsupportedArchitectureError("dynamic_img_size with a hybrid CNN stem is not supported")
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
        self._check_blocks()

    def _check_blocks(self) -> None:
        """``block_fn`` / ``attn_layer`` / ``norm_layer``; options a block ignores are reset to their
        defaults so that equal models have equal specs."""
        for name, value, allowed in (("block_fn", self.block_fn, BLOCK_FNS),
                                     ("attn_layer", self.attn_layer, ATTN_LAYERS),
                                     ("norm_layer", self.norm_layer, NORM_LAYERS)):
            if value not in allowed:
                raise UnsupportedArchitectureError(
                    f"{name}={value!r} is not supported (supported: {', '.join(allowed)})")
        if self.block_fn in SCALING_BLOCKS:  # timm: "mlp_layer / attn_layer: not used"
            if self.mlp_layer != "Mlp":
                raise UnsupportedArchitectureError(f"{self.block_fn} has its own MLP; mlp_layer={self.mlp_layer!r}")
            object.__setattr__(self, "attn_layer", "Attention")
        if self.block_fn != "ParallelThingsBlock":
            object.__setattr__(self, "num_parallel", 2)
        elif self.num_parallel < 1:
            raise UnsupportedArchitectureError(f"num_parallel={self.num_parallel} (must be at least 1)")
        if self.block_fn != "ParallelScalingBlock":
            object.__setattr__(self, "fuse_out_proj", False)
        if self.differential and (self.dim // self.heads) % 2:
            raise UnsupportedArchitectureError(f"differential attention splits each head in two: the head width "
                                               f"{self.dim // self.heads} must be even")

    @property
    def differential(self) -> bool:
        """Differential attention (timm ``DiffAttention`` or ``DiffParallelScalingBlock``)."""
        return self.attn_layer == "DiffAttention" or self.block_fn == "DiffParallelScalingBlock"

    @property
    def fused_out_proj(self) -> bool:
        """One ``out_proj`` over ``cat(attention, MLP)`` instead of ``attn_out_proj`` + ``mlp_out_proj``."""
        return self.block_fn == "DiffParallelScalingBlock" or self.fuse_out_proj

    @property
    def mlp_hidden(self) -> int:
        """Width entering ``fc2``: ``mlp_dim`` (timm's ``hidden_features``, fc1's width), halved by
        ``GluMlp``'s chunk into x and gate."""
        return self.mlp_dim // 2 if self.mlp_layer == "GluMlp" else self.mlp_dim

    @property
    def grid_size(self) -> tuple[int, int]:
        if self.backbone is not None:  # HybridEmbed patchifies the backbone's feature map
            h, w = self.backbone.feature_size(self.image_size)
            return h // self.patch_size, w // self.patch_size
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def patch_in_channels(self) -> int:
        """Channels entering ``patch_embed.proj``: the image's, or a hybrid backbone's features."""
        return self.backbone.num_features if self.backbone is not None else self.channels

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
        # ResPostBlock has no LayerScale: its init_values is the init of norm1 / norm2's weight.
        return self.init_values is not None and self.block_fn != "ResPostBlock"

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


RopeType = Literal["", "cat", "dinov3", "mixed"]


@dataclass(frozen=True)
class EvaSpec:
    """timm ``Eva`` hyperparameters (``timm/models/eva.py``: EVA-02, RoPE ViTs, DINOv3, PE, ...).

    A family of its own, as timm has a class of its own: its blocks (``EvaBlock``: ``gamma_1`` /
    ``gamma_2``, ``EvaAttention`` with ``q_bias`` / ``v_bias`` or timm's ``AttentionRope``), its
    keyword arguments and its state_dict order differ from ``VisionTransformer``'s, while the
    primitives, MLPs, attention pool and patch embedding are shared (``vitport.structure``).
    Resolved like ``ViTSpec``: ``final_norm`` / ``fc_norm`` say which of ``norm`` / ``fc_norm``
    exist, ``mlp_dim`` is fc1's width (``GluMlp``: x and gate packed), ``attn_pool_*`` the
    ``map`` head's own heads and MLP width. ``rope_*`` are timm's rotary settings
    (``RotaryEmbeddingCat`` for ``'cat'``, ``RotaryEmbeddingDinoV3`` for ``'dinov3'``,
    ``RotaryEmbeddingMixed`` for ``'mixed'``: learned frequencies ``rope.freqs`` per block and head).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: Pool = "avg"
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    abs_pos_embed: bool = True
    pre_norm: bool = False
    final_norm: bool = False
    fc_norm: bool = True
    attn_type: Literal["eva", "rope"] = "eva"
    qkv_fused: bool = True
    qkv_bias: bool = True
    qk_norm: bool = False
    scale_attn_inner: bool = False
    mlp_layer: MlpLayer = "Mlp"
    scale_mlp: bool = False
    init_values: float | None = None
    attn_only_layer_scale: bool = False
    rope_type: RopeType = ""
    rope_temperature: float = 10000.0
    rope_grid_offset: float = 0.0
    rope_grid_indexing: Literal["ij", "xy"] = "ij"
    rope_rotate_half: bool = False
    rope_ref_feat_shape: tuple[int, int] | None = None
    rope_normalize_coords: Literal["separate", "min", "max"] = "separate"
    attn_pool_heads: int = 0
    attn_pool_mlp_dim: int = 0
    norm_eps: float = 1e-6
    dynamic_img_size: bool = False
    # timm's norm_layer for every norm of the model (blocks, q/k norm, scale_mlp / scale_attn_inner,
    # norm_pre, norm, fc_norm, attn_pool.norm): LayerNorm or RmsNorm (Sapiens2).
    norm_layer: NormLayer = "LayerNorm"
    # timm's num_kv_heads (grouped-query attention, AttentionRope unfused only), one entry per block;
    # None: every block has heads k/v heads.
    num_kv_heads: tuple[int, ...] | None = None
    # timm's train-time RoPE coordinate augmentation (None: off); evaluation ignores them.
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None

    family = "eva"
    # What timm's Eva fixes: GELU in Mlp and the attention pool, SiLU in the gated MLPs
    # (SwiGLUPacked: gate first), output projections with bias, timm's pool over all tokens.
    activation = "gelu"
    glu_activation = "silu"
    mlp_gate_last = False
    proj_bias = True
    distilled = False
    pool_include_prefix = False

    def __post_init__(self):
        object.__setattr__(self, "image_size", pair(self.image_size))
        if self.rope_ref_feat_shape is not None:
            object.__setattr__(self, "rope_ref_feat_shape", pair(self.rope_ref_feat_shape))
        if self.pool not in ("token", "avg", "map", ""):
            raise UnsupportedArchitectureError(f"Eva global_pool={self.pool!r} is not supported "
                                               "(vitport implements 'token', 'avg', 'map' and '')")
        if self.pool == "token" and not self.class_token:
            raise UnsupportedArchitectureError("global_pool='token' needs class_token=True")
        if self.dim % self.heads:
            raise UnsupportedArchitectureError(
                f"dim={self.dim} is not divisible by heads={self.heads} (attn_head_dim is not supported)")
        if self.rope_type and (self.dim // self.heads) % 4:
            raise UnsupportedArchitectureError(f"rotary embeddings need a head width divisible by 4; "
                                               f"got {self.dim // self.heads}")
        if self.rope_type not in ("", "cat", "dinov3", "mixed"):
            raise UnsupportedArchitectureError(f"rope_type={self.rope_type!r} is not supported "
                                               "(vitport implements 'cat', 'dinov3' and 'mixed')")
        if self.rope_type == "mixed":
            if self.rope_rotate_half:  # timm's create_rope_embed raises on it
                raise UnsupportedArchitectureError("rope_type='mixed' with rope_rotate_half=True (timm refuses it)")
            # timm's RotaryEmbeddingMixed takes neither a grid offset nor ref_feat_shape (create_rope_embed
            # drops them): the spec keeps what is computed.
            object.__setattr__(self, "rope_grid_offset", 0.0)
            object.__setattr__(self, "rope_ref_feat_shape", None)
        if self.mlp_layer not in MLP_LAYERS:
            raise UnsupportedArchitectureError(f"mlp_layer={self.mlp_layer!r} is not supported")
        self._check_sapiens2_options()
        if self.mlp_layer == "GluMlp" and self.mlp_dim % 2:
            raise UnsupportedArchitectureError(f"GluMlp needs an even fc1 width; mlp_dim={self.mlp_dim}")
        if self.pool != "map":  # only the 'map' head has these; 0 keeps specs comparable
            object.__setattr__(self, "attn_pool_heads", 0)
            object.__setattr__(self, "attn_pool_mlp_dim", 0)
        else:
            object.__setattr__(self, "attn_pool_heads", self.attn_pool_heads or self.heads)
            object.__setattr__(self, "attn_pool_mlp_dim", self.attn_pool_mlp_dim or self.mlp_hidden)

    def _check_sapiens2_options(self) -> None:
        """``norm_layer``, ``num_kv_heads`` and the RoPE coordinate augmentation, as timm checks them."""
        if self.norm_layer not in NORM_LAYERS:
            raise UnsupportedArchitectureError(f"Eva norm_layer={self.norm_layer!r} is not supported "
                                               "(vitport implements LayerNorm and RmsNorm)")
        kv = self.num_kv_heads

        def whole(h) -> bool:
            return isinstance(h, int) and not isinstance(h, bool)

        if kv is not None:
            if not (whole(kv) or (isinstance(kv, (list, tuple)) and all(whole(h) for h in kv))):
                raise InvalidArgumentError(f"num_kv_heads={kv!r:.80} (must be null, an integer or one per block)")
            kv = (kv,) * self.depth if whole(kv) else tuple(kv)
            if len(kv) != self.depth:  # timm asserts one entry per block
                raise UnsupportedArchitectureError(f"num_kv_heads has {len(kv)} entries for depth={self.depth}")
            if any(h <= 0 or self.heads % h for h in kv):
                raise UnsupportedArchitectureError(f"num_kv_heads={kv}: each must divide heads={self.heads}")
            if any(h != self.heads for h in kv) and (self.attn_type != "rope" or self.qkv_fused):
                # timm: EvaBlock asserts attn_type='rope', AttentionRope asserts qkv_fused=False
                raise UnsupportedArchitectureError("grouped-query attention (num_kv_heads) needs attn_type='rope' "
                                                   "and qkv_fused=False (timm refuses it otherwise)")
            object.__setattr__(self, "num_kv_heads", None if all(h == self.heads for h in kv) else kv)
        for name, low in (("rope_shift_coords", 0.0), ("rope_jitter_coords", 1.0), ("rope_rescale_coords", 1.0)):
            v = getattr(self, name)
            if v is not None:
                import math
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise InvalidArgumentError(f"{name}={v!r:.80} (must be a number or null)")
                if not math.isfinite(float(v)) or float(v) < low:  # timm's _coord_aug_config
                    raise UnsupportedArchitectureError(f"{name}={v!r} must be finite and >= {low}")
                object.__setattr__(self, name, float(v) if self.rope_type else None)  # no rope: nothing to augment
        if self.rope_aug_active and self.rope_type != "dinov3":
            raise UnsupportedArchitectureError(
                f"RoPE coordinate augmentation (rope_shift/jitter/rescale_coords) with rope_type="
                f"{self.rope_type!r}: vitport implements it for rope_type='dinov3' only")

    @property
    def rope_aug_active(self) -> bool:
        """timm's ``aug_active``: any of the three set (a set no-op value still draws, as timm does)."""
        return any(v is not None for v in (self.rope_shift_coords, self.rope_jitter_coords, self.rope_rescale_coords))

    def kv_heads(self, block: int) -> int:
        """Block ``block``'s key/value heads (timm's ``num_kv_heads``; ``heads`` without GQA)."""
        return self.heads if self.num_kv_heads is None else self.num_kv_heads[block]

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def patch_bias(self) -> bool:
        return not self.pre_norm  # timm: PatchEmbed(bias=not use_pre_transformer_norm)

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("cls_token", self.class_token), ("reg_token", self.reg_tokens > 0))
                     if on)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def num_pos_prefix_tokens(self) -> int:
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
        return self.final_norm

    @property
    def has_fc_norm(self) -> bool:
        return self.fc_norm

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim // 2 if self.mlp_layer == "GluMlp" else self.mlp_dim


@dataclass(frozen=True)
class RelPosSpec:
    """timm ``VisionTransformerRelPos`` hyperparameters (``timm/models/vision_transformer_relpos.py``:
    ``vit_relpos_*``, ``vit_srelpos_*``).

    A family of its own, as timm has a class of its own: no absolute position embedding, a
    relative-position bias added to every attention's logits (``RelPosBias``: a learned table
    indexed by the query-key offset; ``RelPosMlp``: an MLP over log-spaced offsets), per block
    or one ``shared_rel_pos`` for all blocks, and two block kinds (``block_fn``: ``RelPosBlock``
    pre-norm with LayerScale, ``ResPostRelPosBlock`` res-post norm). ``rel_pos_type`` is 'mlp'
    or 'bias'; ``rel_pos_mlp_mode`` is ``RelPosMlp``'s ``mode`` ('cr': timm's default; 'swin':
    timm's rel_pos_type containing 'swin'); ``rel_pos_dim`` its hidden width;
    ``rel_pos_mlp_drop`` the dropout timm hard-codes after its ReLU (0.125, training only).
    ``init_values`` is timm's: LayerScale in ``RelPosBlock``; in ``ResPostRelPosBlock`` only the
    init of the norms' weights (no tensor of its own).
    """

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    channels: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    pool: Literal["token", "avg", ""] = "avg"
    class_token: bool = False
    fc_norm: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = 1e-6
    rel_pos_type: Literal["mlp", "bias"] = "mlp"
    rel_pos_mlp_mode: Literal["cr", "swin"] = "cr"
    rel_pos_dim: int = 128
    rel_pos_mlp_drop: float = 0.125
    shared_rel_pos: bool = False
    block_fn: Literal["RelPosBlock", "ResPostRelPosBlock"] = "RelPosBlock"
    activation: Activation = "gelu"
    norm_eps: float = 1e-6

    family = "relpos"
    # What timm's VisionTransformerRelPos fixes: a patch bias, output projections with bias, a
    # plain Mlp, no register or distillation tokens, a fixed input size.
    patch_bias = True
    proj_bias = True
    mlp_layer = "Mlp"
    mlp_gate_last = True
    distilled = False
    reg_tokens = 0
    pool_include_prefix = False
    dynamic_img_size = False

    def __post_init__(self):
        object.__setattr__(self, "image_size", pair(self.image_size))
        if not self.init_values:  # timm: a falsy init_values means no LayerScale
            object.__setattr__(self, "init_values", None)
        if self.pool not in ("token", "avg", ""):
            raise UnsupportedArchitectureError(f"VisionTransformerRelPos global_pool={self.pool!r} is not supported "
                                               "(timm's VisionTransformerRelPos has 'token', 'avg' and '')")
        if self.pool == "token" and not self.class_token:
            raise UnsupportedArchitectureError("global_pool='token' needs class_token=True")
        if self.dim % self.heads:
            raise UnsupportedArchitectureError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.rel_pos_type not in ("mlp", "bias"):
            raise UnsupportedArchitectureError(f"rel_pos_type={self.rel_pos_type!r} is not supported")
        if self.rel_pos_mlp_mode not in ("cr", "swin"):
            raise UnsupportedArchitectureError(f"RelPosMlp mode={self.rel_pos_mlp_mode!r} is not supported")
        if self.block_fn not in ("RelPosBlock", "ResPostRelPosBlock"):
            raise UnsupportedArchitectureError(f"block_fn={self.block_fn!r} is not supported")

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls_token",) if self.class_token else ()

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)

    num_pos_prefix_tokens = 0  # no absolute position embedding

    @property
    def num_rel_distances(self) -> int:
        """Rows of ``RelPosBias.relative_position_bias_table``: one per (dy, dx) offset, plus
        cls->token, token->cls and cls->cls with a class token (BEiT's scheme)."""
        h, w = self.grid_size
        return (2 * h - 1) * (2 * w - 1) + 3 * self.num_prefix_tokens

    @property
    def has_layer_scale(self) -> bool:
        return self.init_values is not None and self.block_fn == "RelPosBlock"

    @property
    def has_norm(self) -> bool:
        return not self.fc_norm

    @property
    def has_fc_norm(self) -> bool:
        return self.fc_norm

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim


Spec = ViTSpec | CaiTSpec | EvaSpec | RelPosSpec
SPEC_TYPES = {"vit": ViTSpec, "cait": CaiTSpec, "eva": EvaSpec, "relpos": RelPosSpec}


def _square_patch(p) -> int:
    h, w = pair(p)
    if h != w:
        raise UnsupportedArchitectureError(f"non-square patch_size={p!r} is not supported")
    return h


def _json_form(v):
    """Tuples as JSON's lists, also inside nested specs (a hybrid ``backbone``)."""
    if isinstance(v, tuple):
        return [_json_form(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_form(x) for k, x in v.items()}
    return v


def spec_to_dict(spec: Spec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d = {k: _json_form(v) for k, v in d.items()}  # JSON's form (image_size, ...)
    return {"family": spec.family, **d}


def grid_for(spec: "Spec", height: int, width: int) -> tuple[int, int]:
    """The patch grid of an input of ``height`` x ``width`` pixels: the spec's ``grid_size`` at that
    size (a hybrid's CNN stem shrinks the image before it is cut into patches)."""
    return dataclasses.replace(spec, image_size=(height, width)).grid_size


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
                     "embed_norm_layer": (None,), "mlp_layer": (None,)}
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
    if isinstance(spec, EvaSpec):
        return _eva_with_timm_kwargs(spec, kw, where)
    if isinstance(spec, RelPosSpec):
        return _relpos_with_timm_kwargs(spec, kw, where)
    bad: list[str] = []
    new: dict[str, Any] = {}
    if isinstance(spec, ViTSpec):
        new.update(_vit_layers_from_timm_kwargs(spec, kw, bad))
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
    scaling = new.get("block_fn", getattr(spec, "block_fn", "Block")) in SCALING_BLOCKS
    if not isinstance(spec, CaiTSpec) and "init_values" in new and not new["init_values"] and not (
            scaling and new["init_values"] is not None):
        new["init_values"] = None  # timm: a falsy init_values means no LayerScale (scaling blocks: None only)
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
            key = norm.replace("_", "").lower() if isinstance(norm, str) else norm
            if key in NORM_LAYER_NAMES:
                new["norm_layer"] = NORM_LAYER_NAMES[key]
                new["norm_eps"] = 1e-6  # the default eps of timm.layers.LayerNorm and RmsNorm
            elif norm is not None:
                bad.append(f"norm_layer={norm!r} (supported: {', '.join(repr(n) for n in NORM_LAYER_NAMES)})")
    bad += [f"{k}={v!r}" for k, v in kw.items()]  # anything left is not implemented (or unknown)
    if bad:
        raise UnsupportedArchitectureError(
            f"timm settings in {where} that vitport does not implement: {', '.join(bad)}")
    return dataclasses.replace(spec, **new)


def _vit_layers_from_timm_kwargs(spec: ViTSpec, kw: dict[str, Any], bad: list[str]) -> dict[str, Any]:
    """timm's ``block_fn`` and ``attn_layer`` (a class, or for attn_layer a name of timm's
    ``ATTN_LAYERS``), popped from ``kw``; what vitport does not implement goes to ``bad``."""
    new: dict[str, Any] = {}
    if "block_fn" in kw:
        v = kw.pop("block_fn")
        name = "Block" if v is None else getattr(v, "__name__", None)  # timm takes a class, not a name
        if name in BLOCK_FNS and (v is None or getattr(v, "__module__", "") == "timm.models.vision_transformer"):
            new["block_fn"] = name
        else:
            bad.append(f"block_fn={v!r} (supported: timm's {', '.join(BLOCK_FNS)} classes)")
    if "attn_layer" in kw:
        v = kw.pop("attn_layer")
        timm_class = (getattr(v, "__module__", "").startswith("timm.layers")
                      and getattr(v, "__name__", "") in ATTN_LAYERS)
        name = (ATTN_LAYER_NAMES.get(v) if isinstance(v, str) else "Attention" if v is None
                else v.__name__ if timm_class else None)
        if name:
            new["attn_layer"] = name
        else:
            bad.append(f"attn_layer={v!r} (supported: 'attn', 'diff')")
    return new


def _eva_with_timm_kwargs(spec: EvaSpec, kw: dict[str, Any], where: str) -> EvaSpec:
    """``spec_with_timm_kwargs`` for ``Eva``'s keywords (``timm/models/eva.py``); anything else
    is refused by name."""
    new: dict[str, Any] = {}
    for k in list(kw):
        if k in _INFERENCE_NEUTRAL:
            kw.pop(k)
    names = {"img_size": "image_size", "in_chans": "channels", "num_classes": "num_classes", "depth": "depth",
             "num_heads": "heads", "global_pool": "pool", "dynamic_img_size": "dynamic_img_size",
             "class_token": "class_token", "num_reg_tokens": "reg_tokens", "no_embed_class": "no_embed_class",
             "qkv_bias": "qkv_bias", "qkv_fused": "qkv_fused", "qk_norm": "qk_norm", "attn_type": "attn_type",
             "scale_attn_inner": "scale_attn_inner", "init_values": "init_values",
             "attn_only_layer_scale": "attn_only_layer_scale", "use_abs_pos_emb": "abs_pos_embed",
             "use_pre_transformer_norm": "pre_norm", "rope_temperature": "rope_temperature",
             "rope_grid_offset": "rope_grid_offset", "rope_grid_indexing": "rope_grid_indexing",
             "rope_rotate_half": "rope_rotate_half", "ref_feat_shape": "rope_ref_feat_shape",
             "attn_pool_num_heads": "attn_pool_heads", "num_kv_heads": "num_kv_heads",
             "rope_shift_coords": "rope_shift_coords", "rope_jitter_coords": "rope_jitter_coords",
             "rope_rescale_coords": "rope_rescale_coords"}
    for k, field in names.items():
        if k in kw:
            v = kw.pop(k)
            new[field] = pair(v) if k in ("img_size", "ref_feat_shape") and v is not None else v
    bad: list[str] = []
    if kw.get("dynamic_img_pad", False):
        bad.append("dynamic_img_pad=True")
    kw.pop("dynamic_img_pad", None)
    if "patch_size" in kw:
        h, w = pair(kw.pop("patch_size"))
        if h != w:
            bad.append(f"patch_size={(h, w)!r} (non-square)")
        new["patch_size"] = h
    if "use_rot_pos_emb" in kw or "rope_type" in kw:
        rope_on = kw.pop("use_rot_pos_emb", bool(spec.rope_type))
        rope_type = kw.pop("rope_type", spec.rope_type or "cat")
        if rope_on and rope_type not in ("cat", "dinov3", "mixed"):
            bad.append(f"rope_type={rope_type!r} (supported: 'cat', 'dinov3', 'mixed')")
        new["rope_type"] = rope_type if rope_on and rope_type in ("cat", "dinov3", "mixed") else ""
    pool = new.get("pool", spec.pool)
    if "use_fc_norm" in kw:
        v = kw.pop("use_fc_norm")
        new["fc_norm"] = pool == "avg" if v is None else bool(v)
    if "use_post_transformer_norm" in kw:
        v = kw.pop("use_post_transformer_norm")
        new["final_norm"] = not new.get("fc_norm", spec.fc_norm) if v is None else bool(v)
    # The MLP: timm derives its kind from swiglu_mlp / scale_mlp / swiglu_align_to, its width from mlp_ratio.
    dim = new["dim"] = kw.pop("embed_dim", spec.dim)
    swiglu = kw.pop("swiglu_mlp", spec.mlp_layer != "Mlp")
    scale_mlp = new["scale_mlp"] = kw.pop("scale_mlp", spec.scale_mlp)
    align = kw.pop("swiglu_align_to", None)
    layer = "Mlp" if not swiglu else (
        "SwiGLU" if scale_mlp or align or (spec.mlp_layer == "SwiGLU" and align is None) else "GluMlp")
    new["mlp_layer"] = layer
    ratio = kw.pop("mlp_ratio", None)
    hidden = _mlp_width(dim, ratio, spec.mlp_hidden / spec.dim)  # timm's int(dim * mlp_ratio)
    if ratio is not None or dim != spec.dim or layer != spec.mlp_layer or align:
        width = hidden + (-hidden % align if layer == "SwiGLU" and align else 0)
        new["mlp_dim"] = 2 * width if layer == "GluMlp" else width
    if "attn_pool_mlp_ratio" in kw:
        r = kw.pop("attn_pool_mlp_ratio")
        new["attn_pool_mlp_dim"] = int(dim * r) if r else hidden
    elif dim != spec.dim:
        new["attn_pool_mlp_dim"] = _ratio_dim(dim, spec.attn_pool_mlp_dim / spec.dim)
    bad += [f"{k}={v!r}" for k, v in kw.items()]
    if bad:
        raise UnsupportedArchitectureError(
            f"timm settings in {where} that vitport does not implement: {', '.join(bad)}")
    return dataclasses.replace(spec, **new)


def _relpos_with_timm_kwargs(spec: RelPosSpec, kw: dict[str, Any], where: str) -> RelPosSpec:
    """``spec_with_timm_kwargs`` for ``VisionTransformerRelPos``'s keywords; anything else is
    refused by name."""
    new: dict[str, Any] = {}
    bad: list[str] = []
    for k in list(kw):
        if k in _INFERENCE_NEUTRAL:
            kw.pop(k)
    names = {"img_size": "image_size", "in_chans": "channels", "num_classes": "num_classes", "depth": "depth",
             "num_heads": "heads", "global_pool": "pool", "class_token": "class_token", "fc_norm": "fc_norm",
             "qkv_bias": "qkv_bias", "qk_norm": "qk_norm", "init_values": "init_values",
             "shared_rel_pos": "shared_rel_pos"}
    for k, field in names.items():
        if k in kw:
            v = kw.pop(k)
            new[field] = pair(v) if k == "img_size" else v
    if "patch_size" in kw:
        h, w = pair(kw.pop("patch_size"))
        if h != w:
            bad.append(f"patch_size={(h, w)!r} (non-square)")
        new["patch_size"] = h
    if "rel_pos_type" in kw:  # timm: 'mlp*' is RelPosMlp ('swin' in the name: swin mode), anything else RelPosBias
        t = kw.pop("rel_pos_type")
        new["rel_pos_type"] = "mlp" if str(t).startswith("mlp") else "bias"
        new["rel_pos_mlp_mode"] = "swin" if "swin" in str(t) else "cr"
    if "rel_pos_dim" in kw:
        new["rel_pos_dim"] = kw.pop("rel_pos_dim") or RelPosSpec.rel_pos_dim  # timm: None keeps RelPosMlp's 128
    if "block_fn" in kw:
        b = kw.pop("block_fn")
        name = b if isinstance(b, str) else getattr(b, "__name__", repr(b))
        if name in ("RelPosBlock", "ResPostRelPosBlock"):
            new["block_fn"] = name
        else:
            bad.append(f"block_fn={b!r} (supported: RelPosBlock, ResPostRelPosBlock)")
    if "act_layer" in kw:
        act = kw.pop("act_layer")
        if isinstance(act, str) and act.lower() in ACT_LAYER_NAMES:
            new["activation"] = ACT_LAYER_NAMES[act.lower()]
        elif act is not None:
            bad.append(f"act_layer={act!r}")
    if "norm_layer" in kw:
        norm = kw.pop("norm_layer")
        if norm == "layernorm":
            new["norm_eps"] = 1e-6
        elif norm is not None:
            bad.append(f"norm_layer={norm!r} (only LayerNorm is supported)")
    if kw.get("embed_layer") is None:
        kw.pop("embed_layer", None)
    dim = new["dim"] = kw.pop("embed_dim", spec.dim)
    new["mlp_dim"] = _mlp_width(dim, kw.pop("mlp_ratio", None), spec.mlp_dim / spec.dim)
    bad += [f"{k}={v!r}" for k, v in kw.items()]
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
    hidden = spec.mlp_dim // 2 if isinstance(spec, EvaSpec) and spec.mlp_layer == "GluMlp" else spec.mlp_dim
    args: dict[str, Any] = {"img_size": list(spec.image_size), "patch_size": spec.patch_size,
                            "in_chans": spec.channels, "num_classes": spec.num_classes,
                            "embed_dim": spec.dim, "depth": spec.depth, "num_heads": spec.heads,
                            "mlp_ratio": timm_mlp_ratio(spec.dim, hidden), "global_pool": spec.pool}
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
    from timm.layers import AttentionPoolLatent, GluMlp, Mlp, PatchEmbed, SwiGLU
    from timm.models.cait import (Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn,
                                  TalkingHeadAttn)
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

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

    def check_mlp(mlp, where: str, dim: int, kinds=(Mlp, GluMlp, SwiGLU), allow_norm: bool = False):
        """(hidden width, activation, MLP kind, gate_last) of a timm block MLP."""
        if type(mlp) not in kinds:
            names = ", ".join(k.__name__ for k in kinds)
            problems.append(f"{where}: {type(mlp).__name__} (supported here: {names})")
            return None, None, None, True
        if allow_norm and not ident(mlp.norm):  # allow_norm may be the caller's own norm check (Eva)
            (allow_norm if callable(allow_norm) else layer_norm_eps)(mlp.norm, f"{where}.norm")
        else:
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

    from timm.models.eva import Eva
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    if type(model) is Eva:
        return _eva_spec(model, problems, need, ident, layer_norm_eps, check_patch_embed, check_mlp)
    if type(model) is VisionTransformerRelPos:
        return _relpos_spec(model, problems, need, ident, layer_norm_eps, check_patch_embed, check_mlp)

    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not supported: vitport converts timm's VisionTransformer, "
            "VisionTransformerDistilled, VisionTransformerRelPos, Cait and Eva (hybrid and other "
            "ViT variants are out of scope)")

    from timm.layers import HybridEmbed

    backbone = None
    if type(model.patch_embed) is HybridEmbed:
        patch, backbone = _hybrid_embed(model.patch_embed, need)
        need(not model.dynamic_img_size, "dynamic_img_size with a hybrid CNN stem is not supported")
    else:
        patch = check_patch_embed(model.patch_embed)
    dim = model.embed_dim
    need(model.pos_embed is not None, "pos_embed='none' is not supported")
    norm_kinds: set[str] = set()

    def norm_eps(m, where: str) -> float | None:
        """A ViT norm: affine LayerNorm or timm's RmsNorm (one kind for the whole model: norm_layer)."""
        from timm.layers import RmsNorm

        kind = "RmsNorm" if type(m) is RmsNorm else "LayerNorm" if isinstance(m, tnn.LayerNorm) else None
        if kind is None or not m.elementwise_affine:
            problems.append(f"{where}: {type(m).__name__} (only affine LayerNorm and RmsNorm are supported)")
            return None
        norm_kinds.add(kind)
        return float(m.eps)

    fields = _vit_block_fields(model, need, ident, norm_eps, check_mlp, activation)
    mlp_dim = fields.get("mlp_dim")
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
    for name in ("norm_pre", "norm", "fc_norm"):
        if not ident(getattr(model, name)):
            norm_eps(getattr(model, name), name)
    if pool == "map" and type(model.attn_pool) is AttentionPoolLatent:
        norm_eps(model.attn_pool.norm, "attn_pool.norm")
    need(len(norm_kinds) <= 1,
         f"norms of different kinds ({', '.join(sorted(norm_kinds))}): one norm_layer is supported")
    if problems:
        raise UnsupportedArchitectureError(
            f"timm {type(model).__name__} options not supported by vitport:\n  " + "\n  ".join(problems))
    has_norm, has_fc_norm = not ident(model.norm), not ident(model.fc_norm)
    return ViTSpec(
        image_size=tuple(model.patch_embed.img_size), patch_size=patch,
        channels=model.patch_embed.in_chans if backbone is not None else model.patch_embed.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, tnn.Linear) else 0,
        dim=dim, depth=len(model.blocks), heads=fields["heads"], mlp_dim=mlp_dim,
        pool=pool, class_token=model.cls_token is not None, reg_tokens=model.num_reg_tokens,
        distilled=isinstance(model, VisionTransformerDistilled),
        no_embed_class=model.no_embed_class, pre_norm=not ident(model.norm_pre),
        final_norm=has_norm or has_fc_norm, fc_norm=has_fc_norm,
        pool_include_prefix=model.pool_include_prefix,
        patch_bias=getattr(model.patch_embed.proj, "bias", None) is not None,  # HybridEmbed(proj=False): Identity
        qkv_bias=fields["qkv_bias"], qk_norm=fields["qk_norm"], proj_bias=fields["proj_bias"],
        init_values=fields["init_values"], activation=fields["activation"], norm_eps=fields["norm_eps"],
        dynamic_img_size=model.dynamic_img_size, mlp_layer=fields["mlp_layer"], mlp_gate_last=fields["mlp_gate_last"],
        block_fn=fields["block_fn"], num_parallel=fields["num_parallel"], fuse_out_proj=fields["fuse_out_proj"],
        attn_layer=fields["attn_layer"], norm_layer=norm_kinds.pop() if norm_kinds else "LayerNorm",
        backbone=backbone,
    )


def diff_lambda_init(depth: int) -> float:
    """timm ``DiffAttention.set_lambda_init``: the differential weight's offset for block ``depth``."""
    import math

    return 0.8 - 0.6 * math.exp(-0.3 * depth)


def _vit_block_fields(model, need, ident, norm_eps, check_mlp, activation) -> dict[str, Any]:
    """The block options of a timm ``VisionTransformer`` (``block_fn``, its attention, MLP, norms,
    LayerScale), read off ``blocks.0``; every block must be of the same class and, for differential
    attention, carry timm's depth-dependent ``lambda_init``."""
    from timm.layers import LayerScale, RmsNorm
    from timm.layers.attention import Attention
    from timm.layers.diff_attention import DiffAttention
    from timm.models.vision_transformer import (Block, DiffParallelScalingBlock, ParallelScalingBlock,
                                                ParallelThingsBlock, ResPostBlock)

    classes = {c.__name__: c for c in (Block, ResPostBlock, ParallelThingsBlock, ParallelScalingBlock,
                                       DiffParallelScalingBlock)}
    dim, b0 = model.embed_dim, model.blocks[0]
    types = sorted({type(b).__name__ for b in model.blocks})
    f: dict[str, Any] = dict(block_fn=type(b0).__name__, heads=None, mlp_dim=None, activation=None, mlp_layer="Mlp",
                             mlp_gate_last=True, norm_eps=None, qkv_bias=False, qk_norm=False, proj_bias=True,
                             init_values=None, num_parallel=2, fuse_out_proj=False, attn_layer="Attention")
    if len(types) != 1 or classes.get(types[0]) is not type(b0):
        need(False, f"blocks: {', '.join(types)} (supported: {', '.join(classes)})")
        return f

    def layer_scale(ls, where: str) -> float | None:
        if isinstance(ls, LayerScale):
            return float(ls.init_values)
        need(ident(ls), f"{where}: {type(ls).__name__}")
        return None

    def differential(attn, where: str) -> None:
        need(attn.lambda_q1 is not None, f"{where}: dual_lambda=True (lambda_a / lambda_b) is not supported")
        need(type(attn.sub_norm) is RmsNorm and attn.sub_norm.eps == 1e-5,
             f"{where}.sub_norm: not RmsNorm(eps=1e-5)")
        need(attn.head_dim * 2 * attn.num_heads == dim, f"{where}: head_dim != dim // num_heads // 2")

    def lambda_inits(attns) -> None:
        need(all(a.lambda_init == diff_lambda_init(i) for i, a in enumerate(attns)),
             "differential attention lambda_init is not timm's 0.8 - 0.6 exp(-0.3 depth) of the block index")

    def attention(attn, where: str) -> None:
        kind = type(attn).__name__
        if type(attn) not in (Attention, DiffAttention):
            need(False, f"{where}: {kind} (supported: Attention, DiffAttention)")
            return
        need(ident(attn.norm), f"{where}.norm (scale_attn_norm is not supported)")
        need(getattr(attn, "gate", None) is None, "gated attention is not supported")
        if type(attn) is Attention:
            need(attn.head_dim * attn.num_heads == dim, "attn_head_dim != dim // num_heads")
        else:
            differential(attn, where)
        f.update(attn_layer=kind, heads=attn.num_heads, qkv_bias=attn.qkv.bias is not None,
                 qk_norm=not ident(attn.q_norm), proj_bias=attn.proj.bias is not None)
        if f["qk_norm"]:
            norm_eps(attn.q_norm, f"{where}.q_norm")

    def mlp(m, where: str) -> None:
        f["mlp_dim"], f["activation"], f["mlp_layer"], f["mlp_gate_last"] = check_mlp(m, where, dim)
        need(getattr(m, "fc2", None) is None or (m.fc2.bias is not None) == f["proj_bias"],
             "attention and MLP projections disagree on bias")

    name = f["block_fn"]
    if name == "Block":
        attention(b0.attn, "blocks.0.attn")
        mlp(b0.mlp, "blocks.0.mlp")
        f["norm_eps"] = norm_eps(b0.norm1, "blocks.0.norm1")
        f["init_values"] = layer_scale(b0.ls1, "blocks.0.ls1")
    elif name == "ResPostBlock":
        attention(b0.attn, "blocks.0.attn")
        mlp(b0.mlp, "blocks.0.mlp")
        f["norm_eps"] = norm_eps(b0.norm1, "blocks.0.norm1")
        f["init_values"] = None if b0.init_values is None else float(b0.init_values)  # norm weights' init
    elif name == "ParallelThingsBlock":
        f["num_parallel"] = len(b0.attns)
        need(len(b0.ffns) == len(b0.attns), "ParallelThingsBlock: as many attention as MLP branches")
        attention(b0.attns[0].attn, "blocks.0.attns.0.attn")
        mlp(b0.ffns[0].mlp, "blocks.0.ffns.0.mlp")
        f["norm_eps"] = norm_eps(b0.attns[0].norm, "blocks.0.attns.0.norm")
        f["init_values"] = layer_scale(b0.attns[0].ls, "blocks.0.attns.0.ls")
    else:  # ParallelScalingBlock, DiffParallelScalingBlock: fused in_proj [mlp fc1 | q | k | v]
        f["heads"] = b0.num_heads
        f["qkv_bias"] = b0.in_proj.bias is not None
        need((b0.mlp_bias is None) == f["qkv_bias"], "blocks.0.mlp_bias and in_proj bias disagree")
        f["mlp_dim"] = b0.in_proj.out_features - 3 * dim
        f["activation"] = activation(b0.mlp_act, "blocks.0.mlp_act")
        f["qk_norm"] = not ident(b0.q_norm)
        if f["qk_norm"]:
            norm_eps(b0.q_norm, "blocks.0.q_norm")
        out = b0.out_proj if b0.out_proj is not None else b0.attn_out_proj
        f["proj_bias"] = out.bias is not None
        f["fuse_out_proj"] = name == "ParallelScalingBlock" and b0.out_proj is not None
        if b0.out_proj is None:
            need((b0.mlp_out_proj.bias is not None) == f["proj_bias"],
                 "attn_out_proj and mlp_out_proj disagree on bias")
        f["norm_eps"] = norm_eps(b0.in_norm, "blocks.0.in_norm")
        f["init_values"] = layer_scale(b0.ls, "blocks.0.ls")
        if name == "ParallelScalingBlock":
            need(b0.head_dim * b0.num_heads == dim, "head_dim != dim // num_heads")
        else:
            differential(b0, "blocks.0")
            lambda_inits(model.blocks)
    if f["attn_layer"] == "DiffAttention":
        lambda_inits([b.attns[0].attn if name == "ParallelThingsBlock" else b.attn for b in model.blocks])
    return f


def _hybrid_embed(pe, need) -> tuple[int | None, HybridBackbone | None]:
    """``(patch size, backbone)`` of a timm ``HybridEmbed``; what vitport does not implement is
    named through ``need``. The backbone is read off the modules (never the tensor values: the
    registry walk builds on the meta device)."""
    import torch.nn as tnn
    from timm.layers import GroupNormAct, StdConv2d, StdConv2dSame
    from timm.models.resnetv2 import Bottleneck, DownsampleConv, ResNetV2

    problems: list[str] = []

    def want(cond: bool, what: str):
        if not cond:
            problems.append(what)

    from timm.models.vision_transformer_hybrid import ConvStem

    want(isinstance(pe.proj, tnn.Conv2d) or (isinstance(pe.proj, tnn.Identity) and type(pe.backbone) is ConvStem),
         "patch_embed: HybridEmbed without a projection (proj=False) is only supported over a ConvStem")
    want(pe.flatten and not pe.dynamic_img_pad, "patch_embed: HybridEmbed with dynamic_img_pad or a non-flat "
                                                "output_fmt is not supported")
    patch = None
    if isinstance(pe.proj, tnn.Conv2d):
        k = tuple(pe.proj.kernel_size)
        want(k == tuple(pe.proj.stride) and k[0] == k[1] and pe.proj.padding in ((0, 0), 0, "valid")
             and pe.proj.groups == 1, "patch_embed.proj: only square non-overlapping patches are supported")
        patch = k[0]
    bb = pe.backbone
    if isinstance(bb, ResNetV2):
        stem, stages = bb.stem, list(bb.stages)
        want(isinstance(bb.norm, tnn.Identity), "patch_embed.backbone: pre-activation ResNetV2 (preact=True) "
                                                "is not supported")
        want(isinstance(bb.head.fc, tnn.Identity) and bb.head.global_pool.pool_type == "",
             "patch_embed.backbone: a ResNetV2 with a pooling or classifier head is not supported")
    elif isinstance(bb, tnn.Sequential) and [n for n, _ in bb.named_children()] == ["conv", "norm", "pool"]:
        stem, stages = bb, []  # timm's _resnetv2(layers=()): the stem alone (vit_tiny_r_s16_p8)
    elif type(bb) is ConvStem:
        backbone = _conv_stem_backbone(bb, want, embed_proj=isinstance(pe.proj, tnn.Conv2d))
        patch = patch if patch is not None else 1  # proj=False: the stem's output pixels are the tokens
        for p in problems:
            need(False, p)
        return patch, None if problems else backbone
    elif type(bb).__name__ == "FeatureListNet" and list(dict(bb.named_children()))[:4] == [
            "conv1", "bn1", "act1", "maxpool"]:
        backbone = _resnet_d_backbone(bb, want)
        for p in problems:
            need(False, p)
        return patch, None if problems else backbone
    else:
        problems.append(f"patch_embed: HybridEmbed with a {type(bb).__name__} backbone (hybrid CNN stems other "
                        "than timm's ResNetV2, ResNet-D and ConvStem are not supported)")
        for p in problems:
            need(False, p)
        return patch, None
    convs = [m for m in bb.modules() if isinstance(m, tnn.Conv2d)]
    norms = [m for m in bb.modules() if isinstance(m, (tnn.GroupNorm, tnn.BatchNorm2d, tnn.LayerNorm))]
    want(all(type(c) in (StdConv2dSame, StdConv2d) for c in convs),
         "patch_embed.backbone: only weight-standardised convolutions (StdConv2d, StdConv2dSame) are supported")
    same = all(type(c) is StdConv2dSame for c in convs)
    want(same or all(type(c) is StdConv2d for c in convs), "patch_embed.backbone: mixed StdConv2d and StdConv2dSame")
    want(all(c.bias is None and c.groups == 1 and tuple(c.dilation) == (1, 1) for c in convs),
         "patch_embed.backbone: convolutions with bias, groups or dilation are not supported")
    want(len({c.eps for c in convs}) == 1, "patch_embed.backbone: StdConv eps differs between convolutions")
    want(all(type(n) is GroupNormAct and n.affine for n in norms),
         "patch_embed.backbone: only affine GroupNormAct is supported")
    want(len({(n.num_groups, n.eps) for n in norms}) == 1, "patch_embed.backbone: GroupNorm groups or eps differ")
    want(all(isinstance(n.act, (tnn.ReLU, tnn.Identity)) and isinstance(n.drop, tnn.Identity) for n in norms),
         "patch_embed.backbone: only ReLU GroupNormAct is supported")
    if not same and convs:
        want(all(tuple(c.padding) == tuple((s - 1 + k - 1) // 2 for s, k in zip(c.stride, c.kernel_size))
                 for c in convs), "patch_embed.backbone: StdConv2d with non-default padding")
    want(type(stem.conv) in (StdConv2dSame, StdConv2d) and tuple(stem.conv.kernel_size) == (7, 7)
         and tuple(stem.conv.stride) == (2, 2) and hasattr(stem, "norm") and hasattr(stem, "pool")
         and not hasattr(stem, "pad"), "patch_embed.backbone.stem: only the 7x7 'same' or '' ResNetV2 stem "
                                       "(not deep, fixed or pre-activation) is supported")
    pool = getattr(stem, "pool", None)
    want(pool is not None and tuple(pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2)
         == (3, 3) and isinstance(pool, tnn.MaxPool2d), "patch_embed.backbone.stem.pool: only a 3x3 max pool")
    layers, channels, mids, strides = [], [], [], []
    for i, stage in enumerate(stages):
        blocks = list(stage.blocks)
        want(all(type(b) is Bottleneck for b in blocks), f"patch_embed.backbone.stages.{i}: only the non-pre-"
                                                         "activation Bottleneck is supported")
        if not all(type(b) is Bottleneck for b in blocks):
            continue
        b0 = blocks[0]
        want(type(b0.downsample) is DownsampleConv and all(b.downsample is None for b in blocks[1:]),
             f"patch_embed.backbone.stages.{i}: only a DownsampleConv shortcut on the first block (avg_down is "
             "not supported)")
        want(all(tuple(b.conv2.stride) == (1, 1) and tuple(b.conv1.stride) == (1, 1) for b in blocks[1:])
             and tuple(b0.conv1.stride) == (1, 1), f"patch_embed.backbone.stages.{i}: stride outside conv2 of "
                                                   "the first block")
        want(all(isinstance(b.drop_path, tnn.Identity) for b in blocks),
             f"patch_embed.backbone.stages.{i}: stochastic depth inside the backbone is not supported")
        layers.append(len(blocks))
        channels.append(b0.conv3.out_channels)
        mids.append(b0.conv1.out_channels)
        strides.append(b0.conv2.stride[0])
        want(b0.conv2.stride[0] == b0.conv2.stride[1] and b0.downsample.conv.stride == b0.conv2.stride,
             f"patch_embed.backbone.stages.{i}: non-square or inconsistent strides")
        want(all(isinstance(b.act3, tnn.ReLU) for b in blocks), f"patch_embed.backbone.stages.{i}: act3 not ReLU")
    for p in problems:
        need(False, p)
    if problems:
        return patch, None
    n0 = norms[0]
    return patch, HybridBackbone(
        kind="resnetv2", stem_chs=stem.conv.out_channels, layers=tuple(layers), channels=tuple(channels),
        mid_channels=tuple(mids), strides=tuple(strides), same_padding=same, std_conv_eps=float(convs[0].eps),
        norm_groups=n0.num_groups, norm_eps=float(n0.eps))


def _conv_stem_backbone(bb, want, embed_proj: bool) -> HybridBackbone | None:
    """timm's MCi ``ConvStem``: ``ConvNormAct`` entries ``0..n-1`` (conv; ``BatchNormAct2d`` and
    its activation on all but the last, which has a conv bias and no norm)."""
    import torch.nn as tnn
    from timm.layers import BatchNormAct2d, ConvNormAct

    items = list(bb)
    want(all(type(m) is ConvNormAct for m in items), "patch_embed.backbone: ConvStem entries other than "
                                                     "ConvNormAct are not supported")
    if not all(type(m) is ConvNormAct for m in items):
        return None
    convs = [m.conv for m in items]
    want(all(type(c) is tnn.Conv2d and c.groups == 1 and tuple(c.dilation) == (1, 1) and c.padding_mode == "zeros"
             and isinstance(c.padding, tuple) and c.padding[0] == c.padding[1]
             and c.kernel_size[0] == c.kernel_size[1] and c.stride[0] == c.stride[1] for c in convs),
         "patch_embed.backbone: ConvStem convolutions with groups, dilation, 'same' or non-square "
         "padding, kernels or strides are not supported")
    norms, last = [m.bn for m in items[:-1]], items[-1]
    want(all(c.bias is None for c in convs[:-1]) and convs[-1].bias is not None
         and isinstance(last.bn, tnn.Sequential) and len(last.bn) == 0,
         "patch_embed.backbone: only timm's ConvStem layout (norm and act on all but the last conv, "
         "bias on the last) is supported")
    acts = {type(n.act) for n in norms if type(n) is BatchNormAct2d}
    want(all(type(n) is BatchNormAct2d and n.affine and n.track_running_stats and isinstance(n.drop, tnn.Identity)
             for n in norms) and len({n.eps for n in norms}) <= 1,
         "patch_embed.backbone: only affine BatchNormAct2d with running statistics is supported in a ConvStem")
    gelu = acts == {tnn.GELU} and all(n.act.approximate == "none" for n in norms)
    want(gelu or acts <= {tnn.ReLU}, "patch_embed.backbone: ConvStem activations other than ReLU or exact GELU "
                                     "are not supported")
    return HybridBackbone(kind="convstem", channels=tuple(c.out_channels for c in convs),
                          kernel_sizes=tuple(c.kernel_size[0] for c in convs),
                          strides=tuple(c.stride[0] for c in convs),
                          paddings=tuple(c.padding[0] for c in convs), act="gelu" if gelu else "relu",
                          bn_eps=float(norms[0].eps) if norms else 1e-5, embed_proj=embed_proj, same_padding=False)


def _resnet_d_backbone(bb, want) -> HybridBackbone:
    """A timm ResNet-D ``features_only`` backbone (``FeatureListNet`` over ``resnet.ResNet`` with
    ``stem_type='deep'``, ``avg_down=True``: vit_*_resnet26d/50d); problems go to ``want``."""
    import torch.nn as tnn
    from timm.models.resnet import Bottleneck

    names = [n for n, _ in bb.named_children()]
    stage_names = names[4:]
    want(len(stage_names) >= 1 and stage_names == [f"layer{i + 1}" for i in range(len(stage_names))]
         and list(bb.return_layers)[-1] == stage_names[-1],  # HybridEmbed takes the last feature map
         "patch_embed.backbone: a ResNet feature map other than its last stage's (out_indices) is not supported")
    convs = [m for m in bb.modules() if isinstance(m, tnn.Conv2d)]
    norms = [m for m in bb.modules() if isinstance(m, tnn.modules.batchnorm._NormBase)
             or isinstance(m, (tnn.GroupNorm, tnn.LayerNorm))]
    want(all(type(c) is tnn.Conv2d and c.bias is None and c.groups == 1 and tuple(c.dilation) == (1, 1)
             and tuple(c.padding) == (c.kernel_size[0] // 2,) * 2 and c.padding_mode == "zeros" for c in convs),
         "patch_embed.backbone: ResNet convolutions with bias, groups (cardinality), dilation or non-default "
         "padding are not supported")
    want(all(type(n) is tnn.BatchNorm2d and n.affine and n.track_running_stats for n in norms)
         and len({n.eps for n in norms}) == 1,
         "patch_embed.backbone: only affine BatchNorm2d with running statistics and one eps is supported")
    stem = bb.conv1
    deep = (isinstance(stem, tnn.Sequential) and len(stem) == 7
            and [type(m) for m in stem] == [tnn.Conv2d, tnn.BatchNorm2d, tnn.ReLU] * 2 + [tnn.Conv2d]
            and [tuple(stem[i].kernel_size) + tuple(stem[i].stride) for i in (0, 3, 6)]
            == [(3, 3, 2, 2), (3, 3, 1, 1), (3, 3, 1, 1)])
    want(deep, "patch_embed.backbone.conv1: only the deep ResNet-D stem (stem_type='deep') is supported")
    want(isinstance(bb.act1, tnn.ReLU) and isinstance(bb.maxpool, tnn.MaxPool2d)
         and (bb.maxpool.kernel_size, bb.maxpool.stride, bb.maxpool.padding, bb.maxpool.dilation,
              bb.maxpool.ceil_mode) == (3, 2, 1, 1, False),
         "patch_embed.backbone: only a ReLU stem and a 3x3/2 max pool (padding 1) are supported")
    layers, channels, mids, strides = [], [], [], []
    c_in = stem[6].out_channels if deep else None
    for i, name in enumerate(stage_names):
        blocks = list(getattr(bb, name))
        ok = all(type(b) is Bottleneck for b in blocks)
        want(ok, f"patch_embed.backbone.{name}: only the ResNet Bottleneck block is supported")
        if not ok:
            continue
        b0 = blocks[0]
        ds = b0.downsample
        stride = b0.conv2.stride[0]
        avg = (isinstance(ds, tnn.Sequential) and len(ds) == 3 and isinstance(ds[1], tnn.Conv2d)
               and tuple(ds[1].kernel_size) == (1, 1) and tuple(ds[1].stride) == (1, 1)
               and (isinstance(ds[0], tnn.Identity) if stride == 1 else
                    type(ds[0]) is tnn.AvgPool2d and ds[0].kernel_size == 2 and ds[0].stride == stride
                    and ds[0].padding == 0 and ds[0].ceil_mode and not ds[0].count_include_pad))
        want(avg and all(b.downsample is None for b in blocks[1:]),
             f"patch_embed.backbone.{name}: only the avg-down shortcut (avg_down=True) on the first block is "
             "supported")
        want(all(tuple(b.conv1.stride) == (1, 1) and tuple(b.conv3.stride) == (1, 1) for b in blocks)
             and all(tuple(b.conv2.stride) == (1, 1) for b in blocks[1:])
             and tuple(b0.conv2.stride) == (stride, stride), f"patch_embed.backbone.{name}: stride outside conv2 "
                                                             "of the first block")
        want(all(isinstance(b.drop_block, tnn.Identity) and isinstance(b.aa, tnn.Identity) and b.se is None
                 and (b.drop_path is None or isinstance(b.drop_path, tnn.Identity)) for b in blocks),
             f"patch_embed.backbone.{name}: drop block, anti-aliasing, attention (se) or stochastic depth "
             "inside the backbone is not supported")
        want(all(isinstance(getattr(b, a), tnn.ReLU) for b in blocks for a in ("act1", "act2", "act3")),
             f"patch_embed.backbone.{name}: activations other than ReLU are not supported")
        want(c_in == b0.conv1.in_channels, f"patch_embed.backbone.{name}: unexpected input width")
        layers.append(len(blocks))
        channels.append(b0.conv3.out_channels)
        mids.append(b0.conv1.out_channels)
        strides.append(stride)
        c_in = b0.conv3.out_channels
    if not deep or not norms:
        return None
    return HybridBackbone(kind="resnet", stem_chs=stem[6].out_channels, stem_width=stem[0].out_channels,
                          layers=tuple(layers), channels=tuple(channels), mid_channels=tuple(mids),
                          strides=tuple(strides), same_padding=False, bn_eps=float(norms[0].eps))


def _eva_spec(model, problems, need, ident, layer_norm_eps, check_patch_embed, check_mlp) -> EvaSpec:
    """``spec_from_timm_model`` for timm's ``Eva``: every option read off the modules, the
    unimplemented ones refused by name."""
    import torch.nn as tnn
    from timm.layers import AttentionPoolLatent, AttentionRope
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed
    from timm.models.eva import EvaAttention, EvaBlock

    patch = check_patch_embed(model.patch_embed)
    dim = model.embed_dim
    norm_kinds: set[str] = set()
    affine_layer_norm_eps = layer_norm_eps

    def eva_norm(m, where: str) -> float | None:
        """An Eva norm: affine LayerNorm or timm's RmsNorm (Sapiens2); timm builds every norm
        of an Eva from one norm_layer, so one kind for the whole model."""
        from timm.layers import RmsNorm

        if type(m) is RmsNorm:
            if not m.elementwise_affine:
                problems.append(f"{where}: RmsNorm without weight (only affine LayerNorm and RmsNorm are supported)")
                return None
            norm_kinds.add("RmsNorm")
            return float(m.eps)
        eps = affine_layer_norm_eps(m, where)
        if eps is not None:
            norm_kinds.add("LayerNorm")
        return eps

    layer_norm_eps = eva_norm  # every Eva norm below goes through it
    pre_norm = not ident(model.norm_pre)
    if pre_norm:
        layer_norm_eps(model.norm_pre, "norm_pre")
    need((model.patch_embed.proj.bias is not None) == (not pre_norm), "patch_embed bias with pre-norm")
    block_types = sorted({type(b).__name__ for b in model.blocks if type(b) is not EvaBlock})
    if block_types:  # the rest is read off EvaBlock's attributes
        problems.append(f"blocks: {', '.join(block_types)} (use_post_norm / EvaBlockPostNorm is not supported)")
        raise UnsupportedArchitectureError("timm Eva options not supported by vitport:\n  " + "\n  ".join(problems))
    b0 = model.blocks[0]
    attn = b0.attn
    heads = attn.num_heads
    attn_type = {EvaAttention: "eva", AttentionRope: "rope"}.get(type(attn))
    need(attn_type is not None, f"blocks.0.attn: {type(attn).__name__}")
    qkv_fused = getattr(attn, "qkv", None) is not None
    qkv_bias = qk_norm = scale_attn_inner = False
    if attn_type:
        need(attn.head_dim * heads == dim, "attn_head_dim != dim // num_heads")
        need(getattr(attn, "gate", None) is None, "gated_attn=True is not supported")
        need(attn.proj.bias is not None, "attention projection without bias")
        need(attn.num_prefix_tokens == model.num_prefix_tokens, "attention num_prefix_tokens differs from the model's")
        if attn_type == "eva":
            qkv_bias = attn.q_bias is not None if qkv_fused else attn.q_proj.bias is not None
        else:
            qkv_bias = (attn.qkv if qkv_fused else attn.q_proj).bias is not None
        qk_norm = not ident(attn.q_norm)
        if qk_norm:
            layer_norm_eps(attn.q_norm, "blocks.0.attn.q_norm")
        scale_attn_inner = not ident(attn.norm)
        if scale_attn_inner:
            layer_norm_eps(attn.norm, "blocks.0.attn.norm")
    mlp_dim, act, mlp_layer, _ = check_mlp(b0.mlp, "blocks.0.mlp", dim, allow_norm=eva_norm)
    scale_mlp = hasattr(b0.mlp, "norm") and not ident(b0.mlp.norm)
    if mlp_layer == "Mlp":
        need(act == "gelu", f"blocks.0.mlp.act: {act} (timm's Eva uses GELU)")
    elif mlp_layer is not None:
        need(act == "silu", f"blocks.0.mlp.act: {act} (timm's Eva gated MLPs use SiLU)")
        need(mlp_layer != "GluMlp" or not b0.mlp.gate_last, "GluMlp with gate_last=True in Eva")
    eps = layer_norm_eps(b0.norm1, "blocks.0.norm1")
    init_values = None
    attn_only_layer_scale = False
    if b0.gamma_1 is not None:
        init_values = float(b0.init_values)
        attn_only_layer_scale = b0.gamma_2 is None
    rope, rope_kw = model.rope, {}
    rotate_half = bool(getattr(attn, "rotate_half", False))
    if rope is None:
        rope_type = ""
    elif type(rope) is RotaryEmbeddingCat:
        rope_type = "cat"
        need(not rope.in_pixels and rope.grid_type == "index",
             "rope: pixel-frequency bands (in_pixels=True) are not supported")
        rope_kw = dict(rope_ref_feat_shape=tuple(rope.ref_feat_shape) if rope.ref_feat_shape is not None else None)
    elif type(rope) is RotaryEmbeddingDinoV3:
        rope_type = "dinov3"
        need(rope.temperature is not None and rope.min_period is None and rope.max_period is None,
             "rope: DINOv3 min_period / max_period are not supported (temperature only)")
        rope_kw = dict(rope_normalize_coords=rope.normalize_coords)
    elif type(rope) is RotaryEmbeddingMixed:
        rope_type = "mixed"  # learned rope.freqs (2, depth, heads, head_dim // 2); one slice per block
        need(tuple(rope.freqs.shape) == (2, len(model.blocks), heads, attn.head_dim // 2) and model.rope_mixed,
             "rope: RotaryEmbeddingMixed frequencies do not match the blocks")
    else:
        rope_type = ""
        name = {"RotaryEmbeddingMRope": "rope_type='mrope'"}
        problems.append(f"rope: {name.get(type(rope).__name__, type(rope).__name__)} is not supported "
                        "(vitport implements rope_type 'cat', 'dinov3' and 'mixed')")
    aug_kw: dict[str, Any] = {}
    if rope_type and rope.aug_active:  # train-time only; vitport draws it for the DINOv3 table (Sapiens2)
        need(rope_type == "dinov3", f"rope coordinate augmentation (shift / jitter / rescale coords) with "
                                    f"rope_type={rope_type!r} is not supported (only 'dinov3')")
        aug_kw = dict(rope_shift_coords=rope.shift_coords, rope_jitter_coords=rope.jitter_coords,
                      rope_rescale_coords=rope.rescale_coords)
    if rope_type:
        need(bool(getattr(rope, "rotate_half", False)) == rotate_half, "rope and attention disagree on rotate_half")
        need((rope.feat_shape is None) == bool(model.dynamic_img_size), "rope feat_shape and dynamic_img_size disagree")
        rope_kw.update(rope_temperature=float(rope.temperature),
                       rope_grid_offset=float(getattr(rope, "grid_offset", 0.0)),  # none in 'mixed'
                       rope_grid_indexing=rope.grid_indexing, rope_rotate_half=rotate_half)
    pool = model.global_pool
    need(pool in ("token", "avg", "map", ""), f"global_pool={pool!r} (supported: 'token', 'avg', 'map', '')")
    ap_heads = ap_mlp = 0
    if pool == "map":
        ap = model.attn_pool
        need(type(ap) is AttentionPoolLatent, f"attn_pool: {type(ap).__name__}")
        if type(ap) is AttentionPoolLatent:
            need(ap.latent_len == 1 and ap.pool == "token", "attn_pool: latent_len != 1 or pool != 'token'")
            need(ap.pos_embed is None, "attn_pool: pos_embed is not supported")
            need(isinstance(ap.q, tnn.Linear) and ap.q.bias is not None, "attn_pool: q_proj=False or qkv_bias=False")
            need(ident(ap.q_norm), "attn_pool: qk_norm is not supported")
            need(ap.mlp is not None and isinstance(ap.mlp.act, tnn.GELU), "attn_pool: MLP with a non-GELU activation")
            layer_norm_eps(ap.norm, "attn_pool.norm")
            ap_heads, ap_mlp = ap.num_heads, ap.mlp.fc1.out_features if ap.mlp is not None else 0
    if not ident(model.norm):
        layer_norm_eps(model.norm, "norm")
    if not ident(model.fc_norm):
        layer_norm_eps(model.fc_norm, "fc_norm")
    need(len(norm_kinds) <= 1,
         f"norms of different kinds ({', '.join(sorted(norm_kinds))}): one norm_layer is supported")
    kv_heads = tuple(getattr(b.attn, "num_kv_heads", heads) for b in model.blocks)
    if problems:
        raise UnsupportedArchitectureError("timm Eva options not supported by vitport:\n  " + "\n  ".join(problems))
    return EvaSpec(
        image_size=tuple(model.patch_embed.img_size), patch_size=patch, channels=model.patch_embed.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, tnn.Linear) else 0,
        dim=dim, depth=len(model.blocks), heads=heads, mlp_dim=mlp_dim, pool=pool,
        class_token=model.cls_token is not None,
        reg_tokens=model.reg_token.shape[1] if model.reg_token is not None else 0,
        no_embed_class=model.no_embed_class, abs_pos_embed=model.pos_embed is not None, pre_norm=pre_norm,
        final_norm=not ident(model.norm), fc_norm=not ident(model.fc_norm), attn_type=attn_type,
        qkv_fused=qkv_fused, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_attn_inner=scale_attn_inner,
        mlp_layer=mlp_layer, scale_mlp=scale_mlp, init_values=init_values,
        attn_only_layer_scale=attn_only_layer_scale, rope_type=rope_type, **rope_kw,
        attn_pool_heads=ap_heads, attn_pool_mlp_dim=ap_mlp, norm_eps=eps, dynamic_img_size=model.dynamic_img_size,
        norm_layer=norm_kinds.pop() if norm_kinds else "LayerNorm",
        num_kv_heads=None if all(h == heads for h in kv_heads) else kv_heads, **aug_kw,
    )


def _relpos_spec(model, problems, need, ident, layer_norm_eps, check_patch_embed, check_mlp) -> RelPosSpec:
    """``spec_from_timm_model`` for timm's ``VisionTransformerRelPos``: every option read off the
    modules (the bias modules of every block, shared or not), the unimplemented ones refused by name."""
    import torch.nn as tnn
    from timm.layers import Mlp, RelPosBias, RelPosMlp
    from timm.models.vision_transformer_relpos import RelPosAttention, RelPosBlock, ResPostRelPosBlock

    patch = check_patch_embed(model.patch_embed)
    dim = model.embed_dim
    kinds = {type(b) for b in model.blocks}
    need(len(kinds) == 1 and kinds <= {RelPosBlock, ResPostRelPosBlock},
         f"blocks: {', '.join(sorted(k.__name__ for k in kinds))} (supported: one of RelPosBlock, ResPostRelPosBlock)")
    if problems:
        raise UnsupportedArchitectureError("timm VisionTransformerRelPos options not supported by vitport:\n  "
                                           + "\n  ".join(problems))
    b0 = model.blocks[0]
    attn = b0.attn
    need(type(attn) is RelPosAttention, f"blocks.0.attn: {type(attn).__name__}")
    need(attn.head_dim * attn.num_heads == dim, "attn_head_dim != dim // num_heads")
    need(attn.proj.bias is not None, "attention projection without bias")
    qk_norm = not ident(attn.q_norm)
    if qk_norm:
        layer_norm_eps(attn.q_norm, "blocks.0.attn.q_norm")
    shared = model.shared_rel_pos is not None
    per_block = [b.attn.rel_pos for b in model.blocks]
    need(all((r is None) == shared for r in per_block), "both a shared and per-block relative position bias")
    rel = model.shared_rel_pos if shared else per_block[0]
    mods = [rel] if shared else per_block
    need(all(type(r) is type(rel) for r in mods), "blocks with different relative position modules")
    grid = tuple(model.patch_embed.grid_size)
    prefix = model.num_prefix_tokens
    rel_kw: dict[str, Any] = {}
    if type(rel) is RelPosBias:
        rel_kw["rel_pos_type"] = "bias"
        need(all(tuple(r.window_size) == grid and r.prefix_tokens == prefix for r in mods),
             "rel_pos: window size or prefix tokens differ from the model's grid")
    elif type(rel) is RelPosMlp:
        rel_kw["rel_pos_type"] = "mlp"
        need(all(tuple(r.window_size) == grid and r.prefix_tokens == prefix for r in mods),
             "rel_pos: window size or prefix tokens differ from the model's grid")
        need(rel.mode in ("cr", "swin"), f"RelPosMlp mode={rel.mode!r} (supported: 'cr', 'swin')")
        need(tuple(rel.pretrained_window_size) == (0, 0), "RelPosMlp pretrained_window_size is not supported")
        need(rel.relative_position_index is not None, "RelPosMlp without a position index")
        mlp = rel.mlp
        need(type(mlp) is Mlp and isinstance(mlp.act, tnn.ReLU) and ident(mlp.norm)
             and mlp.fc1.in_features == 2 and mlp.fc2.out_features == attn.num_heads,
             "RelPosMlp: an MLP other than timm's Mlp(2, hidden, num_heads, ReLU)")
        need((mlp.fc2.bias is None) == (rel.mode == "swin") and mlp.fc1.bias is not None,
             "RelPosMlp: MLP biases differ from timm's for its mode")
        need(mlp.drop2.p == 0, "RelPosMlp: dropout after fc2")
        rel_kw.update(rel_pos_mlp_mode=rel.mode, rel_pos_dim=mlp.fc1.out_features, rel_pos_mlp_drop=float(mlp.drop1.p))
    else:
        problems.append(f"rel_pos: {type(rel).__name__} (supported: RelPosBias, RelPosMlp)")
    block_fn = type(b0).__name__
    mlp_dim, act, _, _ = check_mlp(b0.mlp, "blocks.0.mlp", dim, (Mlp,))
    need(b0.mlp.fc1.bias is not None, "blocks.0.mlp without bias")
    eps = layer_norm_eps(b0.norm1, "blocks.0.norm1")
    if block_fn == "RelPosBlock":
        init_values = float(b0.ls1.init_values) if not ident(b0.ls1) else None
    else:
        init_values = b0.init_values
    pool = model.global_pool
    need(pool in ("token", "avg", ""), f"global_pool={pool!r} (supported: 'token', 'avg', '')")
    if not ident(model.norm):
        layer_norm_eps(model.norm, "norm")
    if not ident(model.fc_norm):
        layer_norm_eps(model.fc_norm, "fc_norm")
    need(ident(model.norm) != ident(model.fc_norm), "both or neither of norm and fc_norm")
    if problems:
        raise UnsupportedArchitectureError("timm VisionTransformerRelPos options not supported by vitport:\n  "
                                           + "\n  ".join(problems))
    return RelPosSpec(
        image_size=tuple(model.patch_embed.img_size), patch_size=patch, channels=model.patch_embed.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, tnn.Linear) else 0,
        dim=dim, depth=len(model.blocks), heads=attn.num_heads, mlp_dim=mlp_dim, pool=pool,
        class_token=model.cls_token is not None, fc_norm=not ident(model.fc_norm),
        qkv_bias=attn.qkv.bias is not None, qk_norm=qk_norm, init_values=init_values, shared_rel_pos=shared,
        block_fn=block_fn, activation=act, norm_eps=eps, **rel_kw,
    )
