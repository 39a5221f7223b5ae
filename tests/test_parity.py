"""Numeric parity with timm, layer by layer, on bug-sensitive weights (docs/design.md, numerics).

Tiers (``vitport.parity.TOLERANCES``): float64 (every layer and the logits within 1e-10,
relative to the layer's scale) and float32 (within 1e-4), in every front-end of the registry. The measured maxima are attached to
the test report (``pytest -rA`` / junit ``record_property``).
"""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from helpers import TINY_CAIT, TINY_CASES, images, tiny_timm
from test_checkpoints import tree_equal

import vitport
from converters import FRAMEWORKS, flat_keys, stack_blocks
from converters.architectures import arch_spec
from vitport.parity import TOLERANCES, compare, perturb_weights, tolerance, verify_architecture



def assert_within(rows, tol, what):
    bad = [f"{r.layer}: max abs {r.max_abs:.3e} (scale {r.ref_scale:.3g})" for r in rows if not r.ok(tol)]
    assert not bad, f"{what}: over tolerance {tol:g} at " + "; ".join(bad)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_float64_every_layer(case, framework, record_property):
    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, "float64", **kwargs)
    jm = vitport.from_timm(model, framework)
    assert jm.dtype == np.float64, "float64 timm weights must stay float64"
    rows = compare(jm, model, images(jm.spec, dtype="float64"))
    assert len(rows) >= 5, [r.layer for r in rows]  # patch_embed, blocks, ..., logits
    record_property("max_abs_logits_f64", rows[-1].max_abs)
    assert_within(rows, tolerance(jm.spec, "float64"), f"{case}/{framework} float64")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_float32_logits(case, framework, record_property):
    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, "float32", **kwargs)
    jm = vitport.from_timm(model, framework)
    assert jm.dtype == np.float32
    rows = compare(jm, model, images(jm.spec, dtype="float32"))
    record_property("max_abs_logits_f32", rows[-1].max_abs)
    assert rows[-1].max_abs < TOLERANCES["float32"], rows[-1]
    assert_within(rows, TOLERANCES["float32"], f"{case}/{framework} float32")


def test_dynamic_img_size_other_resolution():
    """pos_embed is resampled to the input's grid at run time, as timm does."""
    arch, kwargs = TINY_CASES["dynamic_img_size"]
    model = tiny_timm(arch, "float32", **kwargs)
    for framework in FRAMEWORKS:
        jm = vitport.from_timm(model, framework)
        for size in ((48, 48), (24, 40)):
            rows = compare(jm, model, images(jm.spec, dtype="float32", size=size))
            assert rows[-1].max_abs < 1e-4, (framework, size, rows[-1])


def test_eva_rope_fixed_grid_and_other_sizes():
    """timm's rotary tables for another image size (``ref_feat_shape`` rescaling, grid offset,
    'xy' indexing) and at run time (``dynamic_img_size``). A fixed-size model's table is built
    by timm once, in float32, with torch's float32 sin/cos, which differ from numpy's in the last
    bit: that bounds float64 agreement there near 1e-7; float32 is within its tier."""
    from vitport.parity import compare

    for arch, kwargs in [("vit_pe_core_tiny_patch16_384", dict(TINY_CASES["vit_token"][1], img_size=48)),
                         ("vit_small_patch16_rope_224", dict(TINY_CASES["vit_token"][1], img_size=40))]:
        for dtype, tol in (("float32", 1e-4), ("float64", 1e-6)):
            model = tiny_timm(arch, dtype, **kwargs)
            for framework in FRAMEWORKS:
                jm = vitport.from_timm(model, framework)
                rows = compare(jm, model, images(jm.spec, dtype=dtype))
                assert_within(rows, tol, f"{arch}/{framework}/{dtype}")
    # At run time, without an absolute pos_embed (whose resampling timm does in float32):
    # 'cat' rescaled to ref_feat_shape, and DINOv3's normalised coordinates, exact in float64.
    for case in ("eva_attn_bias_qk_norm_scale_norms", "eva_dinov3_swiglu_reg"):
        arch, kwargs = TINY_CASES[case]
        model = tiny_timm(arch, "float64", **kwargs)
        for framework in FRAMEWORKS:
            jm = vitport.from_timm(model, framework)
            for size in ((48, 48), (24, 40)):
                rows = compare(jm, model, images(jm.spec, dtype="float64", size=size))
                assert_within(rows, TOLERANCES["float64"], f"{case}/{framework} {size}")


def test_relpos_buffers_and_other_bias_modes():
    """timm's non-persistent relpos buffers rebuilt in numpy: the position index exactly, the
    'cr' log coordinates within one float32 ulp of torch's (float32, as timm builds them: on an
    AMD EPYC numpy's and torch's float32 log agree bit for bit, on an Intel AVX-512 Xeon torch's
    log(7) is one ulp off the correctly rounded value numpy returns), 'swin' on grids where
    numpy's float32 log2 equals torch's; then float64 parity for the modes the TINY_CASES leave
    out ('swin' RelPosMlp per block, shared 'cr' RelPosMlp: vit_srelpos's default)."""
    import torch
    from timm.layers.pos_embed_rel import gen_relative_log_coords, gen_relative_position_index

    from vitport import ops

    for grid in ((4, 4), (3, 5), (14, 14), (16, 15)):
        for cls in (False, True):
            np.testing.assert_array_equal(ops.rel_pos_index(grid, cls),
                                          gen_relative_position_index(grid, class_token=cls).view(-1).numpy())
        ours = ops.rel_pos_log_coords(grid, "cr")
        np.testing.assert_array_max_ulp(ours, gen_relative_log_coords(grid, mode="cr", dtype=torch.float32).numpy(),
                                        maxulp=1)
        h, w = grid  # and within one ulp of sign(c) log(1 + |c|) in float64
        c = np.stack(np.meshgrid(np.arange(1 - h, h), np.arange(1 - w, w), indexing="ij"), axis=-1).astype(np.float64)
        np.testing.assert_array_max_ulp(ours, (np.sign(c) * np.log1p(np.abs(c))).astype(np.float32), maxulp=1)
    for grid in ((4, 4), (3, 5), (8, 8), (15, 15)):
        np.testing.assert_array_equal(ops.rel_pos_log_coords(grid, "swin"),
                                      gen_relative_log_coords(grid, mode="swin", dtype=torch.float32).numpy())
    kwargs = TINY_CASES["vit_token"][1]
    for arch, kw in (("vit_relpos_small_patch16_224", dict(kwargs, rel_pos_type="mlp_swin")),
                     ("vit_srelpos_small_patch16_224", kwargs)):
        model = tiny_timm(arch, "float64", **kw)
        for framework in FRAMEWORKS:
            jm = vitport.from_timm(model, framework)
            assert_within(compare(jm, model, images(jm.spec, dtype="float64")), TOLERANCES["float64"],
                          f"{arch}/{framework}")


def test_eva_rope_mixed_tables(monkeypatch):
    """timm's mixed RoPE (learned ``rope.freqs``, one table per block) for another image size, at
    run time (``dynamic_img_size``, two other grids), and exactly: timm builds the tables in
    float32 with torch's sin/cos in every dtype, so with those replaced by correctly rounded
    float32 sin/cos (what vitport computes) float64 parity is the 1e-10 tier."""
    import timm.layers.pos_embed_sincos as pes
    import torch

    arch = "vit_small_patch16_rope_mixed_ape_224"
    for kwargs, sizes in ((dict(TINY_CASES["vit_token"][1], img_size=40), [None]),
                          (dict(TINY_CASES["vit_token"][1], dynamic_img_size=True), [(48, 48), (24, 40)])):
        for dtype in ("float32", "float64"):
            model = tiny_timm(arch, dtype, **kwargs)
            jm = vitport.from_timm(model, FRAMEWORKS[0])
            for size in sizes:
                rows = compare(jm, model, images(jm.spec, dtype=dtype, size=size))
                assert_within(rows, tolerance(jm.spec, dtype), f"{kwargs} {dtype} {size}")

    def correctly_rounded_mixed_freqs(freqs, t_x, t_y, dtype=None):
        angles = (t_x.float().unsqueeze(-1) * freqs[0].float().unsqueeze(-2)
                  + t_y.float().unsqueeze(-1) * freqs[1].float().unsqueeze(-2))
        sin, cos = angles.double().sin().float(), angles.double().cos().float()
        return torch.cat([pes._rope_layout(sin), pes._rope_layout(cos)], -1).to(dtype or freqs.dtype)

    monkeypatch.setattr(pes, "get_mixed_freqs", correctly_rounded_mixed_freqs)
    model = tiny_timm(arch, "float64", **dict(TINY_CASES["vit_token"][1], img_size=40))
    for framework in FRAMEWORKS:
        rows = compare(vitport.from_timm(model, framework), model, images(jm.spec, dtype="float64", size=(40, 40)))
        assert_within(rows, TOLERANCES["float64"], f"{framework} with correctly rounded sin/cos")


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", ["vit_token", "deit_distilled", "cait"])
def test_front_ends_agree(case, framework):
    """Every front-end computes the same function as the first one, layer by layer, and
    ``.to()`` moves weights between them without changing it."""
    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, "float64", **kwargs)
    reference, jm = vitport.from_timm(model, FRAMEWORKS[0]), vitport.from_timm(model, framework)
    x = images(jm.spec, dtype="float64")
    (ref_out, ref_mid), (out, mid) = reference(x, True), jm(x, True)
    assert sorted(mid) == sorted(ref_mid)
    for name in mid:
        np.testing.assert_allclose(np.asarray(mid[name]), np.asarray(ref_mid[name]), rtol=0, atol=1e-12,
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(reference.to(framework)(x)), np.asarray(ref_out), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ the parity check catches bugs


def _swap(sd: dict, a: str, b: str) -> dict:
    sd = dict(sd)
    sd[a], sd[b] = sd[b], sd[a]
    return sd


CAIT_SWAPS = {
    "proj_l<->proj_w": lambda sd: _swap(_swap(sd, "blocks.0.attn.proj_l.weight", "blocks.0.attn.proj_w.weight"),
                                        "blocks.0.attn.proj_l.bias", "blocks.0.attn.proj_w.bias"),
    "gamma_1<->gamma_2": lambda sd: _swap(sd, "blocks.1.gamma_1", "blocks.1.gamma_2"),
    "class-attn k<->v": lambda sd: _swap(_swap(sd, "blocks_token_only.0.attn.k.weight",
                                               "blocks_token_only.0.attn.v.weight"),
                                         "blocks_token_only.0.attn.k.bias", "blocks_token_only.0.attn.v.bias"),
}


@pytest.mark.parametrize("bug", sorted(CAIT_SWAPS))
def test_parity_check_catches_swapped_weights(bug):
    """A converter with one of these swaps fails the float32 tolerance by orders of magnitude
    on bug-sensitive weights, while timm's own init (LayerScale 1e-5) would hide it."""
    from vitport.timm_bridge import state_dict_to_numpy

    import timm

    def logit_error(model):
        model = model.float().eval()
        jm = vitport.from_timm(model, "flax")
        broken = vitport.from_state_dict(CAIT_SWAPS[bug](state_dict_to_numpy(model.state_dict())), jm.spec, "flax")
        return compare(broken, model, images(jm.spec, dtype="float32"))[-1].max_abs

    sensitive = logit_error(perturb_weights(timm.create_model("cait_s24_224", pretrained=False, **TINY_CAIT)))
    assert sensitive > 1e-2, f"{bug} moved logits by only {sensitive:.2e}"
    default_init = logit_error(timm.create_model("cait_s24_224", pretrained=False, **TINY_CAIT))
    assert default_init < 1e-4, f"timm's init was expected to hide {bug}; it moved logits by {default_init:.2e}"


# ------------------------------------------------------------------------------- full size


@pytest.mark.slow
@pytest.mark.parametrize("name,count", [("vit_base_patch16_224", 86_567_656), ("cait_s24_224", 46_916_200)])
def test_full_size(name, count, record_property):
    """One full-size model per family, both frameworks, float64 per layer and float32 logits."""
    for result in verify_architecture(name, FRAMEWORKS, ("float64", "float32"), batch=1):
        tol = TOLERANCES[result.dtype]
        record_property(f"{result.framework}_{result.dtype}_logits_max_abs", result.rows[-1].max_abs)
        assert_within(result.rows, tol, f"{name}/{result.framework}/{result.dtype}")
        assert result.rows[-1].layer == "logits"
    spec = arch_spec(name)
    for framework in FRAMEWORKS:  # shapes only: a full-size random init takes 6-13 s here
        shapes = jax.eval_shape(lambda: vitport.init_params(spec, framework))
        assert sum(math.prod(a.shape) for a in jax.tree.leaves(shapes)) == count, framework


# Blocks that differ in shape (Sapiens2's per-block k/v heads), take per-block inputs (mixed
# RoPE's per-block tables) or depend on their index (DiffAttention) run one by one even with
# scan_blocks.
UNSCANNED_CASES = {"eva_sapiens2_rmsnorm_gqa", "eva_rope_mixed_ape", "diff_attention_reg"}


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_scan_blocks_float64_every_layer(case, framework):
    """``scan_blocks``: the blocks as one lax.scan give timm's numbers at every layer, attention
    maps included (scan outputs filed under each block's name), in every front-end."""
    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, "float64", **kwargs)
    jm = vitport.from_timm(model, framework).set_scan_blocks()
    x = jm.as_input(images(jm.spec, dtype="float64"))
    scanned = "scan[" in str(jax.make_jaxpr(lambda p: jm.apply_fn(p, x))(jm.params))
    assert scanned == (case not in UNSCANNED_CASES), f"{case}: blocks scanned={scanned}"
    rows = compare(jm, model, images(jm.spec, dtype="float64"))
    assert_within(rows, tolerance(jm.spec, "float64"), f"{case}/{framework} float64, scan_blocks")
    # The same intermediates (block outputs, attention maps) under the same names as block by block.
    unrolled = vitport.from_timm(model, framework)
    ours = jax.eval_shape(lambda p: jm.apply_fn(p, x, return_intermediates=True)[1], jm.params)
    ref = jax.eval_shape(lambda p: unrolled.apply_fn(p, x, return_intermediates=True)[1], unrolled.params)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    # Scanned lists are stored stacked (one entry per tensor, leading axis = blocks), so no call
    # stacks them; timm's per-block layout comes back bit for bit.
    keys = flat_keys(jm.params, framework)
    per_block = [k for k in keys if re.match(r"(params/|[a-z]+/)?blocks(_token_only)?[_/]0/", k)]  # top-level lists
    assert bool(per_block) == (case in UNSCANNED_CASES), per_block[:3]
    if scanned:
        assert len(keys) < len(flat_keys(unrolled.params, framework))
    ours, ref = jm.to_timm_state_dict(), unrolled.to_timm_state_dict()
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_scan_blocks_layout_is_in_memory_only(framework, tmp_path):
    """A model with stacked blocks saves timm's one entry per block, loads back, moves between
    front-ends (staying stacked) and unstacks again, bit for bit; a per-block tree given to
    ``with_params`` is stacked to match."""
    ref = vitport.create_model("cait_s24_224", framework, rng=3, **TINY_CAIT)
    jm = vitport.create_model("cait_s24_224", framework, rng=3, **TINY_CAIT).set_scan_blocks()
    x = images(ref.spec, 2, "float32")
    np.testing.assert_allclose(np.asarray(jm(x)), np.asarray(ref(x)), rtol=0, atol=1e-6)  # XLA fuses a scan its own way
    out = vitport.save(jm, tmp_path / "m")
    assert flat_keys(vitport.load(out).params, framework).keys() == flat_keys(ref.params, framework).keys()
    assert tree_equal(vitport.load(out).params, ref.params)
    for other in FRAMEWORKS:
        moved = jm.to(other)
        assert moved.config.scan_blocks and len(flat_keys(moved.params, other)) < len(flat_keys(ref.to(other).params, other))
        assert tree_equal(moved.canonical(), ref.canonical())
    assert tree_equal(jm.with_params(ref.params).params, jm.params)
    assert tree_equal(jm.set_scan_blocks(False).params, ref.params)
    # A list the model runs one by one (Eva's mixed RoPE: a rotary table per block) is split
    # again when a tree comes in stacked.
    mixed = vitport.create_model(*TINY_CASES["eva_rope_mixed_ape"][:1], framework, rng=3,
                                 **TINY_CASES["eva_rope_mixed_ape"][1]).set_scan_blocks()
    stacked = stack_blocks(mixed.params, mixed.spec, framework, {"blocks": mixed.spec.depth})
    assert len(flat_keys(stacked, framework)) < len(flat_keys(mixed.params, framework))
    assert tree_equal(mixed.with_params(stacked).params, mixed.params)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_scan_blocks_gradients_and_training(framework):
    """Gradients through the stacked weights equal the unrolled model's, block for block
    (float64). Training scans the stacked blocks too (``test_training`` checks its numbers);
    after ``set_scan_blocks(False)`` both modes run block by block again."""
    import jax.numpy as jnp

    arch, kwargs = TINY_CASES["cait"]
    model = tiny_timm(arch, "float64", **kwargs)
    scanned, unrolled = vitport.from_timm(model, framework).set_scan_blocks(), vitport.from_timm(model, framework)
    x = jnp.asarray(images(scanned.spec, dtype="float64"))
    grads = {}
    for name, jm in (("scanned", scanned), ("unrolled", unrolled)):
        grads[name] = jm.with_params(jax.grad(lambda p: jnp.sum(jm.apply_fn(p, x) ** 2))(jm.params)).canonical()
    assert grads["scanned"].keys() == grads["unrolled"].keys()
    for k, g in grads["unrolled"].items():
        np.testing.assert_allclose(np.asarray(grads["scanned"][k]), np.asarray(g), rtol=1e-11, atol=1e-13, err_msg=str(k))
    assert all(np.any(np.asarray(g)) for g in grads["scanned"].values())
    x3 = jnp.asarray(images(scanned.spec, batch=3, dtype="float64"))  # batch 3: no scan of length depth (2) but blocks'
    for enabled in (True, False):
        scanned.set_scan_blocks(enabled)
        for train, rng in ((False, None), (True, jax.random.key(0))):
            jaxpr = str(jax.make_jaxpr(lambda p: scanned.apply_fn(p, x3, train=train, rng=rng))(scanned.params))
            assert (f"length={scanned.spec.depth}" in jaxpr) == enabled, f"scan={enabled}, train={train}"
