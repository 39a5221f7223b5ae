"""Regenerate ``timm_architectures.json`` from the installed timm (dev tool; needs torch + timm).

    uv run python -m converters.generate_architectures

Walks timm's registry for ``vit_*``, ``deit*`` and ``cait*``, builds every architecture
(on the meta device, so nothing is allocated), and records either its vitport spec or the
reason vitport refuses it, plus each pretrained tag's hub repo and preprocessing settings.
``tests/test_registry.py`` fails when this file and the installed timm disagree.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .architectures import TABLE_PATH
from .specs import spec_from_timm_model, spec_to_dict

PATTERNS = ("vit_*", "deit*", "cait*")
TAG_KEYS = ("hf_hub_id", "num_classes", "input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation")


def timm_names() -> list[str]:
    import timm

    return sorted({n for p in PATTERNS for n in timm.list_models(p)})


def build_meta(name: str):
    """The architecture with no storage behind its tensors (fast even for 7B models)."""
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


def cait_init_values(name: str) -> float:
    """CaiT keeps its LayerScale init only in tensor values, which the meta device drops:
    read it off a one-block CPU build (registered model_args survive the size overrides)."""
    import timm

    tiny = timm.create_model(name, pretrained=False, embed_dim=8, num_heads=1, depth=1, depth_token_only=1,
                             img_size=16, patch_size=16)
    return spec_from_timm_model(tiny).init_values


def describe(name: str) -> dict:
    from timm.models import get_arch_pretrained_cfgs

    entry: dict = {}
    try:
        spec = spec_from_timm_model(build_meta(name))
        if spec.family == "cait":
            spec = dataclasses.replace(spec, init_values=cait_init_values(name))
        entry["spec"] = spec_to_dict(spec)
    except Exception as e:  # the reason is the record
        entry["unsupported"] = str(e)
    tags = {}
    for full, cfg in get_arch_pretrained_cfgs(name).items():
        tag = full.split(".", 1)[1] if "." in full else ""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg.__dict__)
        tags[tag] = {k: (list(d[k]) if isinstance(d.get(k), tuple) else d.get(k)) for k in TAG_KEYS if d.get(k) is not None}
    entry["tags"] = tags
    return entry


def generate() -> dict:
    import timm

    return {"timm_version": timm.__version__, "architectures": {n: describe(n) for n in timm_names()}}


def main() -> None:
    table = generate()
    Path(TABLE_PATH).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    archs = table["architectures"]
    ok = sum("spec" in a for a in archs.values())
    print(f"wrote {TABLE_PATH}: {len(archs)} architectures, {ok} supported, {len(archs) - ok} refused")


if __name__ == "__main__":
    main()
