"""Walk timm's registry: every vit_*/deit*/cait* architecture converts with parity, or is
refused with a message naming what is missing. A new timm architecture that is neither, or
a stale ``timm_architectures.json``, fails here."""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np
import pytest

import vitport
from converters import FRAMEWORKS, UnsupportedArchitectureError, spec_from_timm_model
from converters.architectures import (arch_spec, architectures, list_architectures, support_summary_markdown,
                                      table)
from converters.generate_architectures import build_meta, describe, timm_names
from vitport.parity import compare, perturb_weights

SUPPORTED = list_architectures(supported=True)
REFUSED = list_architectures(supported=False)


def test_table_covers_timm_registry():
    """Same names as the installed timm, and each entry regenerates identically."""
    import timm

    assert table()["timm_version"] == timm.__version__, "regenerate: python -m converters.generate_architectures"
    live = timm_names()
    added, removed = sorted(set(live) - set(architectures())), sorted(set(architectures()) - set(live))
    assert not added and not removed, f"timm added {added}, removed {removed}: regenerate the table"


@pytest.mark.parametrize("name", sorted(architectures()))
def test_table_entry_is_current(name):
    assert describe(name) == architectures()[name], f"{name}: regenerate the architecture table"


def test_refused_by_name():
    """Architectures the table marks refused raise UnsupportedArchitectureError naming the
    missing option. With timm 1.0.31 there are none (all 240 convert); a timm release that adds
    an architecture vitport cannot build lands here once the table is regenerated."""
    for name in REFUSED:
        with pytest.raises(UnsupportedArchitectureError) as err:
            vitport.from_timm(build_meta(name), "flax")
        message = str(err.value)
        assert re.search(r"not supported|is not supported|supported:", message), message
        with pytest.raises(UnsupportedArchitectureError, match=re.escape(name)):
            vitport.create_model(name)


def tiny_twin_kwargs(spec) -> dict:
    """The same options at a width, depth and resolution that run in milliseconds."""
    kw = dict(embed_dim=32, num_heads=2, depth=2, img_size=4 * spec.patch_size,
              num_classes=10 if spec.num_classes else 0, mlp_ratio=spec.mlp_dim / spec.dim)
    if spec.family == "cait":
        kw["mlp_ratio_token_only"] = spec.cls_mlp_dim / spec.dim
    if spec.family == "eva":  # Sapiens2 gives one k/v head count per block of its own depth
        kw["num_kv_heads"] = (2, 1) if spec.num_kv_heads else (2, 2)  # GQA: full attention, then grouped
    b = getattr(spec, "backbone", None)
    if b is not None and not b.embed_proj:  # HybridEmbed(proj=False): the stem's width is the embedding's
        kw.update(embed_dim=spec.dim, img_size=2 * spec.image_size[0] // spec.grid_size[0])
    return kw


@functools.lru_cache(maxsize=None)
def float32_parity(spec) -> dict[str, float]:
    """Worst logits and per-layer errors for one tiny spec (cached: archs that shrink to the
    same spec are the same timm module tree)."""
    model = _tiny_models[spec]
    worst = {}
    for framework in FRAMEWORKS:
        jm = vitport.from_timm(model, framework)
        rows = compare(jm, model, np.random.default_rng(0).standard_normal((2, *spec.image_size, 3),
                                                                            dtype=np.float32))
        worst[framework] = (rows[-1].max_abs, [r.layer for r in rows if not r.ok(1e-4)])
    return worst


_tiny_models: dict = {}


@pytest.mark.parametrize("name", SUPPORTED)
def test_tiny_twin_converts_with_parity(name):
    import timm

    spec = arch_spec(name)
    model = timm.create_model(name, pretrained=False, **tiny_twin_kwargs(spec))
    tiny = spec_from_timm_model(model)
    perturb_weights(model).float().eval()
    extra = {"cait": lambda: {"cls_mlp_dim": tiny.cls_mlp_dim},
             "eva": lambda: {"attn_pool_mlp_dim": tiny.attn_pool_mlp_dim,
                             "num_kv_heads": tiny.num_kv_heads if spec.num_kv_heads else None}}.get(spec.family, dict)()
    shrunk = dataclasses.replace(spec, image_size=tiny.image_size, dim=tiny.dim, heads=2, depth=2,
                                 mlp_dim=tiny.mlp_dim, num_classes=tiny.num_classes, **extra)
    assert tiny == shrunk, "the tiny twin must keep every option of the architecture"
    _tiny_models.setdefault(tiny, model)
    for framework, (logits_err, bad_layers) in float32_parity(tiny).items():
        assert logits_err < 1e-4 and not bad_layers, (framework, logits_err, bad_layers)


def test_readme_support_table_matches_the_walk():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert support_summary_markdown() in readme, (
        "README's support table is stale; paste converters.architectures.support_summary_markdown()")


def test_list_models():
    assert "vit_base_patch16_224" in vitport.list_models()
    assert vitport.list_models("cait_*") == [n for n in SUPPORTED if n.startswith("cait_")]
    assert len(vitport.list_models("cait_*")) == 10
    assert not set(vitport.list_models()) & set(REFUSED)


def test_every_supported_spec_survives_a_converted_folders_checks():
    """What `vitport convert` writes into config.json reads back through the same validation a
    converted folder's spec gets (SwiGLU models name activation 'silu', hybrids a backbone)."""
    import json

    from converters.specs import spec_from_dict, spec_to_dict
    from converters.validate import check_spec

    for name in SUPPORTED:
        spec = arch_spec(name)
        back = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec))))
        check_spec(back, name)
        assert back == spec, name
