"""``vitport.init_params`` / ``create_model``: one random init for every front-end
(``vitport.random_init``), checked against each framework's own init and against itself."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from helpers import TINY_CAIT, TINY_CASES, tiny_timm

import vitport
from converters import FRAMEWORKS, framework_to_canonical, spec_from_timm_model, unstack_blocks
from converters.frameworks import pure_tree
from vitport import random_init
from vitport.config import ModelConfig
from vitport.frontends import front_end


def tiny_spec(case: str):
    arch, kwargs = TINY_CASES[case]
    return spec_from_timm_model(tiny_timm(arch, "float32", **kwargs))


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


# Stacking is shared code (converters.stack_blocks): scanned layouts for a family each, and for
# the block lists that stay unscanned.
SCANNED_CASES = {"vit_token", "cait", "eva_rope_mixed_ape", "relpos_mlp_res_post_cls_token", "hybrid_resnet_d",
                 "diff_attention_reg"}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tree_matches_each_frameworks_own_init(case):
    """Same names, shapes and dtypes as the framework's own init, every option (a framework's
    own init may leave scanned blocks unstacked: compared unstacked)."""
    spec = tiny_spec(case)
    for scan in (False, True) if case in SCANNED_CASES else (False,):
        cfg = ModelConfig(spec, scan_blocks=scan)
        for fw in FRAMEWORKS:
            own = jax.eval_shape(lambda: unstack_blocks(pure_tree(front_end(fw).init(cfg, jax.random.PRNGKey(0))),
                                                        spec, fw))
            ours = jax.eval_shape(lambda: vitport.init_params(cfg, fw, 0))
            unstacked = jax.eval_shape(lambda: unstack_blocks(vitport.init_params(cfg, fw, 0), spec, fw))
            assert _shapes(unstacked) == _shapes(own), (case, fw, scan)
            if scan:  # stacked, as the model holds them (JaxModel.in_layout)
                assert _shapes(ours) == _shapes(jax.eval_shape(
                    lambda: vitport.api.JaxModel(spec, fw, vitport.init_params(spec, fw), config=cfg).params))


@pytest.mark.parametrize("case", ["deit3_layerscale_no_embed_class", "diff_attention_reg",
                                  "eva_rope_mixed_ape", "hybrid_resnetv2_same",
                                  "relpos_mlp_res_post_cls_token", "parallel_scaling_rmsnorm_xp"])
def test_values_follow_the_frameworks_own_init(case):
    """Against NNX's own init (it builds every param from the same declarations): every
    constant tensor (biases, norm scales, LayerScale, BatchNorm statistics) equal, every random
    one random at the same scale."""
    spec = tiny_spec(case)
    cfg = ModelConfig(spec)
    own = framework_to_canonical(pure_tree(front_end("nnx").init(cfg, jax.random.PRNGKey(0))), spec, "nnx")
    ours = random_init.canonical_init(cfg, jax.random.PRNGKey(0))
    assert ours.keys() == own.keys()
    for key, a in own.items():
        a, b = np.asarray(a), np.asarray(ours[key])
        if np.all(a == a.flat[0]):
            np.testing.assert_array_equal(b, a, err_msg=str(key))
        else:
            assert not np.all(b == b.flat[0]), key
            if a.size >= 256:  # a scale estimate worth comparing
                assert 0.8 < b.std() / a.std() < 1.25, (key, a.std(), b.std())


def test_same_numbers_in_every_framework_and_under_jit():
    spec = tiny_spec("cait")
    cfg = ModelConfig(spec)
    canon = {fw: framework_to_canonical(vitport.init_params(cfg, fw, 7), spec, fw) for fw in FRAMEWORKS}
    for fw in FRAMEWORKS[1:]:
        for key, a in canon[FRAMEWORKS[0]].items():
            np.testing.assert_array_equal(np.asarray(canon[fw][key]), np.asarray(a), err_msg=f"{fw} {key}")
    eager = random_init.canonical_init(cfg, jax.random.PRNGKey(7))
    traced = jax.jit(lambda k: random_init.canonical_init(cfg, k))(jax.random.PRNGKey(7))
    typed = random_init.canonical_init(cfg, jax.random.key(7))  # a new-style key: the same bits
    for key, a in eager.items():
        np.testing.assert_array_equal(np.asarray(traced[key]), np.asarray(a), err_msg=str(key))
        np.testing.assert_array_equal(np.asarray(typed[key]), np.asarray(a), err_msg=str(key))
    other = random_init.canonical_init(cfg, jax.random.PRNGKey(8))
    assert not np.array_equal(np.asarray(other[("blocks.0.attn.qkv", "kernel")]),
                              np.asarray(eager[("blocks.0.attn.qkv", "kernel")]))


def test_a_tensors_draw_does_not_depend_on_the_others():
    """Keys come from the tensor's timm name: a deeper model or another head keeps the first
    blocks' weights; two tensors of one shape differ."""
    spec = spec_from_timm_model(tiny_timm("cait_s24_224", "float32", **TINY_CAIT))
    deeper = dataclasses.replace(spec, depth=spec.depth + 2, num_classes=spec.num_classes + 3)
    a = random_init.canonical_init(ModelConfig(spec), jax.random.PRNGKey(0))
    b = random_init.canonical_init(ModelConfig(deeper), jax.random.PRNGKey(0))
    for key in a:
        if not key[0].startswith("head"):
            np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]), err_msg=str(key))
    assert not np.array_equal(np.asarray(a[("blocks.0.attn.qkv", "kernel")]),
                              np.asarray(a[("blocks.1.attn.qkv", "kernel")]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_distribution(dtype):
    """Kernels: jax's truncated_normal(0.02) initializer (timm's std, cut at two of its own
    standard deviations); cls token timm's std 1e-6; the param dtype is the config's."""
    spec = dataclasses.replace(tiny_spec("vit_token"), dim=256, mlp_dim=1024)
    tree = random_init.canonical_init(ModelConfig(spec, param_dtype=dtype), jax.random.PRNGKey(1))
    assert {a.dtype for a in tree.values()} == {np.dtype(dtype)}
    w = np.asarray(tree[("blocks.0.mlp.fc1", "kernel")], np.float64)  # 262144 values
    assert abs(w.mean()) < 2e-4 and abs(w.std() / 0.02 - 1) < 0.02
    assert np.abs(w).max() <= 2 * 0.02 / 0.87962566103423978 * (1 + 1e-2)
    cls = np.asarray(tree[("", "cls_token")], np.float64)
    assert 0.5e-6 < cls.std() < 2e-6


def test_init_compiles_a_fixed_number_of_programs():
    """However many shapes a model has, its random init compiles a bounded number of programs
    (the chunked draw, the key), not one per op or shape as the frameworks' own inits do."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
            compiles.append(duration)

    spec = dataclasses.replace(tiny_spec("vit_token"), dim=40, mlp_dim=72, heads=5)  # shapes no other test has
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for fw in FRAMEWORKS:
            vitport.init_params(spec, fw, 5)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) <= 3, len(compiles)


def test_every_registered_architecture_has_an_init_rule_for_every_tensor():
    """All of timm's architectures vitport builds (not only the tiny twins): every tensor of the
    key table finds its declaration, and kernels are the only drawn tensors besides free params."""
    from converters.architectures import arch_spec, list_architectures

    names = list_architectures()
    assert len(names) > 100
    for name in names:
        cfg = ModelConfig(arch_spec(name))
        decls = random_init.declarations(cfg)
        for e in random_init.param_table(cfg.spec):
            kind, what = random_init.init_rule(e, decls)
            if kind == "unit" and e.kind != "param":
                assert e.leaf == "kernel" and what == random_init.WEIGHT_DRAW, (name, e)
            elif kind == "constant":
                assert e.leaf != "kernel", (name, e)
