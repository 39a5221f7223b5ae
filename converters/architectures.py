"""vitport's table of timm architectures: specs and pretrained tags, readable without torch.

``timm_architectures.json`` is generated from timm's own registry by
``python -m converters.generate_architectures`` and checked against the installed timm by the
tests, so ``create_model("vit_base_patch16_224")`` and hub loading work with no torch at all.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import json
from pathlib import Path
from typing import Any

from .errors import UnsupportedArchitectureError
from .specs import Spec, spec_from_dict

TABLE_PATH = Path(__file__).with_name("timm_architectures.json")


@functools.lru_cache(maxsize=1)
def table() -> dict[str, Any]:
    return json.loads(TABLE_PATH.read_text())


def architectures() -> dict[str, dict[str, Any]]:
    return table()["architectures"]


def split_name(name: str) -> tuple[str, str | None]:
    """``"vit_base_patch16_224.augreg_in1k"`` -> ``("vit_base_patch16_224", "augreg_in1k")``."""
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def list_architectures(pattern: str = "*", supported: bool | None = True) -> list[str]:
    """timm names matching ``pattern``; ``supported=None`` lists refused ones too."""
    return sorted(n for n, a in architectures().items()
                  if fnmatch.fnmatch(n, pattern) and (supported is None or ("spec" in a) == supported))


def _entry(arch: str) -> dict[str, Any]:
    archs = architectures()
    if arch not in archs:
        close = difflib.get_close_matches(arch, archs, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnsupportedArchitectureError(f"unknown architecture {arch!r} (not a timm ViT/DeiT/CaiT name){hint}")
    entry = archs[arch]
    if "spec" not in entry:
        raise UnsupportedArchitectureError(f"{arch}: {entry['unsupported']}")
    return entry


def resolve_tag(name: str) -> tuple[str, str | None]:
    """Fill in timm's default pretrained tag (the first listed) when ``name`` has none."""
    arch, tag = split_name(name)
    tags = architectures().get(arch, {}).get("tags", {})
    if tag is None:
        return arch, next(iter(tags), None)
    if tag not in tags:
        raise UnsupportedArchitectureError(
            f"{arch} has no pretrained tag {tag!r}; timm lists: {', '.join(tags) or 'none'}")
    return arch, tag


def pretrained_tag_cfg(name: str) -> dict[str, Any]:
    """The hub repo and preprocessing settings of ``arch[.tag]`` (default tag if none)."""
    arch, tag = resolve_tag(name)
    _entry(arch)
    return dict(architectures()[arch]["tags"].get(tag, {})) if tag else {}


def arch_spec(name: str, **overrides: Any) -> Spec:
    """The spec of a timm name, ``arch`` or ``arch.tag`` (a tag sets its own num_classes)."""
    arch, tag = split_name(name)
    spec = spec_from_dict(_entry(arch)["spec"])
    if tag is not None:
        cfg = pretrained_tag_cfg(name)
        if "num_classes" in cfg and "num_classes" not in overrides:
            overrides["num_classes"] = cfg["num_classes"]
    return dataclasses.replace(spec, **overrides) if overrides else spec


# ------------------------------------------------------------------ support summary (README)

# Refusal reasons, most specific first: the first that matches names the category.
REFUSAL_CATEGORIES = (
    ("VisionTransformerRelPos", "relative-position ViTs (`VisionTransformerRelPos`)"),
    ("HybridEmbed", "hybrid CNN stems other than ResNetV2, ResNet-D and the MCi `ConvStem` (`HybridEmbed`)"),
    ("(supported: Block, ResPostBlock", "other ViT blocks"),
    ("GluMlp", "SwiGLU / gated MLPs (DINOv2 giant, TIPSv2)"),
    ("rope coordinate augmentation", "`Eva` RoPE coordinate augmentation with rotary tables other than DINOv3's"),
)

# Options of supported architectures, as (label, predicate on the spec dict).
OPTION_CATEGORIES = (
    ("ViT (class token, token pool)", lambda s: s["family"] == "vit" and s["pool"] == "token"
     and not s["distilled"]),
    ("`Eva` (`EvaBlock`: EVA-02 attention, RoPE ViTs, DINOv3, PE)", lambda s: s["family"] == "eva"),
    ("rotary position embeddings `cat` (RoPE ViTs, PE)", lambda s: s.get("rope_type") == "cat"),
    ("rotary position embeddings `dinov3`", lambda s: s.get("rope_type") == "dinov3"),
    ("rotary position embeddings `mixed` (learned per-block frequencies)", lambda s: s.get("rope_type") == "mixed"),
    ("DeiT distilled (`dist_token`, `head_dist`)", lambda s: s.get("distilled", False)),
    ("CaiT (talking heads, class attention)", lambda s: s["family"] == "cait"),
    ("`VisionTransformerRelPos` (relative-position bias, `RelPosMlp` log coordinates)",
     lambda s: s["family"] == "relpos"),
    ("shared relative-position bias (`vit_srelpos_*`)", lambda s: s.get("shared_rel_pos", False)),
    ("res-post blocks (`ResPostRelPosBlock`)", lambda s: s.get("block_fn") == "ResPostRelPosBlock"),
    ("global average pool + `fc_norm`", lambda s: s["family"] in ("vit", "eva") and s["pool"] == "avg"),
    ("attention pool `map` (SigLIP)", lambda s: s["pool"] == "map"),
    ("no pooling / no class token", lambda s: s["pool"] == "" or not s.get("class_token", True)),
    ("register tokens", lambda s: s.get("reg_tokens", 0) > 0),
    ("`no_embed_class`", lambda s: s.get("no_embed_class", False)),
    ("`pre_norm`, patch embed without bias (CLIP)", lambda s: s.get("pre_norm", False)),
    ("LayerScale `init_values` (DeiT-3, DINOv2, ...)", lambda s: s["family"] in ("vit", "eva")
     and s.get("init_values") is not None),
    ("`qk_norm`", lambda s: s.get("qk_norm", False)),
    ("SwiGLU / gated MLPs (`SwiGLUPacked`, `SwiGLU`, `GluMlp`)", lambda s: s.get("mlp_layer", "Mlp") != "Mlp"),
    ("`qkv_bias=False`", lambda s: not s["qkv_bias"]),
    ("`proj_bias=False`", lambda s: not s.get("proj_bias", True)),
    ("`gelu_tanh`", lambda s: s.get("activation") == "gelu_tanh"),
    ("`quick_gelu`", lambda s: s.get("activation") == "quick_gelu"),
    ("LayerNorm eps 1e-5", lambda s: s["norm_eps"] == 1e-5),
    ("`RmsNorm` norm layer (xp ViTs, Sapiens2)", lambda s: s.get("norm_layer") == "RmsNorm"),
    ("grouped-query attention (`num_kv_heads`, Sapiens2)", lambda s: s.get("num_kv_heads") is not None),
    ("train-time RoPE coordinate augmentation (`rope_*_coords`, Sapiens2)",
     lambda s: any(s.get(f"rope_{k}_coords") is not None for k in ("shift", "jitter", "rescale"))),
    ("`ResPostBlock` (norm after attention / MLP)", lambda s: s.get("block_fn") == "ResPostBlock"),
    ("`ParallelThingsBlock` (parallel attention / MLP branches)", lambda s: s.get("block_fn") == "ParallelThingsBlock"),
    ("`ParallelScalingBlock` (fused qkv + MLP `in_proj`)", lambda s: s.get("block_fn") in
     ("ParallelScalingBlock", "DiffParallelScalingBlock")),
    ("differential attention (`DiffAttention`, `DiffParallelScalingBlock`)", lambda s: s.get("attn_layer")
     == "DiffAttention" or s.get("block_fn") == "DiffParallelScalingBlock"),
    ("`dynamic_img_size`", lambda s: s.get("dynamic_img_size", False)),
    ("hybrid CNN stem: ResNetV2 (`HybridEmbed`, StdConv + GroupNorm; R26, R50, R-Ti stem)",
     lambda s: (s.get("backbone") or {}).get("kind") == "resnetv2"),
    ("hybrid CNN stem: ResNet-D (`HybridEmbed`, deep stem, avg-down, frozen BatchNorm; resnet26d, resnet50d)",
     lambda s: (s.get("backbone") or {}).get("kind") == "resnet"),
    ("hybrid CNN stem: MCi `ConvStem` (`HybridEmbed(proj=False)`, frozen BatchNorm)",
     lambda s: (s.get("backbone") or {}).get("kind") == "convstem"),
)


def refusal_category(reason: str) -> str:
    for needle, label in REFUSAL_CATEGORIES:
        if needle in reason:
            return label
    return "other: " + reason.splitlines()[-1].strip()


def support_summary_markdown() -> str:
    """The README's table of what vitport converts, computed from the architecture table."""
    archs = architectures()
    specs = [a["spec"] for a in archs.values() if "spec" in a]
    lines = [f"timm {table()['timm_version']}: {len(archs)} architectures under `vit_*`, `deit*`, `cait*`; "
             f"**{len(specs)} convert**, {len(archs) - len(specs)} are refused by name.", "",
             "| supported option | architectures |", "|---|---:|"]
    lines += [f"| {label} | {sum(1 for s in specs if pred(s))} |" for label, pred in OPTION_CATEGORIES]
    refused: dict[str, int] = {}
    for a in archs.values():
        if "unsupported" in a:
            cat = refusal_category(a["unsupported"])
            refused[cat] = refused.get(cat, 0) + 1
    if refused:
        lines += ["", "| refused (out of scope for now) | architectures |", "|---|---:|"]
        lines += [f"| {label} | {n} |" for label, n in sorted(refused.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)
