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
