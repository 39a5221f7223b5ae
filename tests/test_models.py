"""The models as users build them, in every front-end: the seed's usage, training mode,
dropout, stochastic depth, param names, and the NNX-specific train()/eval() and optimizer."""

from __future__ import annotations

import dataclasses
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import run_without_torch

import vitport
from converters import (FRAMEWORKS, ViTSpec, canonical_to_timm, flat_keys, framework_path, framework_to_canonical,
                        key_table)
from converters.errors import InvalidArgumentError
from vitport import ops
from vitport.config import ModelConfig, config_from_kwargs
from vitport.flax import CaiT as FlaxCaiT
from vitport.flax import ViT as FlaxViT
from vitport.frontends import front_end

SEED_VIT = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048,
                dropout=0.1, emb_dropout=0.1)
SEED_CAIT = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=12, cls_depth=2, heads=16,
                 mlp_dim=2048, dropout=0.1, emb_dropout=0.1, layer_dropout=0.05)
SMALL_VIT = dict(SEED_VIT, image_size=32, patch_size=8, depth=2, dim=32, heads=4, mlp_dim=64)
SMALL_CAIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, cls_depth=2, heads=4, mlp_dim=64,
                  dropout=0.1, emb_dropout=0.1, layer_dropout=0.5, init_values=0.1)
SMALL = {"vit": SMALL_VIT, "cait": SMALL_CAIT}


def small_config(family: str, **overrides) -> ModelConfig:
    return config_from_kwargs(family, dict(SMALL[family], **overrides))


def test_seed_readme_vit_usage():
    """The original vitport README, verbatim but for jax.tree.leaves."""
    key = jax.random.PRNGKey(0)
    img = jax.random.normal(key, (1, 256, 256, 3))
    v = FlaxViT(**SEED_VIT)
    k1, k2, k3 = jax.random.split(key, 3)
    params = v.init({'params': k1, 'dropout': k2, 'emb_dropout': k3}, img)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_params > 0
    out = v.apply(params, img, rngs={'dropout': k2, 'emb_dropout': k3})
    assert out.shape == (1, 1000)
    # evaluation is the default and needs no rng
    np.testing.assert_array_equal(v.apply(params, img), out)


def test_seed_readme_cait_usage():
    key = jax.random.PRNGKey(0)
    img = jax.random.normal(key, (1, 256, 256, 3))
    v = FlaxCaiT(**SEED_CAIT)
    k1, k2, k3 = jax.random.split(key, 3)
    params = v.init({'params': k1, 'dropout': k2, 'emb_dropout': k3}, img)
    out = v.apply(params, img, rngs={'dropout': k2, 'emb_dropout': k3})
    assert out.shape == (1, 1000)


def test_seed_signature_nnx():
    """The seed's constructor in NNX: evaluation by default, train() switches dropout on."""
    img = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 256, 3), jnp.float32)
    forward = nnx.jit(lambda model, x: model(x))
    model = vitport.nnx.ViT(**SEED_VIT, rngs=nnx.Rngs(0))
    out = forward(model, img)
    assert out.shape == (1, 1000)
    np.testing.assert_array_equal(forward(model, img), out)
    cait = vitport.nnx.CaiT(**dict(SEED_CAIT, depth=2), rngs=nnx.Rngs(0))
    assert forward(cait, img).shape == (1, 1000)


def test_seed_signature_haiku():
    img = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3), jnp.float32)
    for cls, args in ((vitport.haiku.ViT, SMALL_VIT), (vitport.haiku.CaiT, SMALL_CAIT)):
        f = hk.transform(lambda x, is_training=False: cls(**args)(x, is_training=is_training))
        params = f.init(jax.random.PRNGKey(1), img)
        evals = f.apply(params, None, img)
        assert evals.shape == (2, args["num_classes"])
        train = f.apply(params, jax.random.PRNGKey(2), img, is_training=True)
        assert np.abs(np.asarray(train - evals)).max() > 1e-4


def test_every_front_end_takes_every_constructor_option():
    """The seed-style constructors accept every spec field and run-time setting."""
    fields = {f.name for f in dataclasses.fields(ViTSpec)} | {"dropout", "emb_dropout", "layer_dropout"}
    assert fields <= {f.name for f in dataclasses.fields(FlaxViT)}
    cfg = small_config("vit", qk_norm=True, proj_bias=False, init_values=0.1, reg_tokens=2, pool="mean")
    for framework in FRAMEWORKS:
        params = front_end(framework).init(cfg, jax.random.PRNGKey(0))
        assert set(flat_keys(params, framework)) == {
            "/".join(map(str, framework_path(e, cfg.spec, framework))) for e in key_table(cfg.spec)}
    with pytest.raises(InvalidArgumentError, match="unknown vit argument.*qkv_norm"):
        vitport.nnx.ViT(**SMALL_VIT, qkv_norm=True, rngs=nnx.Rngs(0))


def test_eva_front_ends_build_from_the_spec():
    """``Eva`` in every front-end: the linen module's fields are EvaSpec's; each front-end
    creates exactly the key table's params, and they compute the same function."""
    from converters import EvaSpec
    from vitport.flax import Eva as FlaxEva

    assert {f.name for f in dataclasses.fields(EvaSpec)} <= {f.name for f in dataclasses.fields(FlaxEva)}
    spec = EvaSpec(image_size=32, patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64, num_classes=10,
                   reg_tokens=2, attn_type="eva", qk_norm=True, scale_attn_inner=True, mlp_layer="SwiGLU",
                   scale_mlp=True, init_values=0.1, rope_type="cat", rope_grid_indexing="xy", pool="map")
    cfg = ModelConfig(spec)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    state_dict = None
    outputs = []
    for framework in FRAMEWORKS:
        params = front_end(framework).init(cfg, jax.random.PRNGKey(0))
        assert set(flat_keys(params, framework)) == {
            "/".join(map(str, framework_path(e, spec, framework))) for e in key_table(spec)}
        if state_dict is None:
            state_dict = canonical_to_timm(framework_to_canonical(params, spec, framework), spec)
        outputs.append(np.asarray(vitport.from_state_dict(state_dict, spec, framework)(x)))
    for out in outputs[1:]:
        np.testing.assert_allclose(out, outputs[0], rtol=0, atol=1e-5)


# ------------------------------------------------------- every front-end, through the registry


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("family", ["vit", "cait"])
def test_dropout_only_in_training(framework, family):
    cfg = small_config(family)
    fe = front_end(framework)
    img = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3), jnp.float32)
    params = vitport.init_params(cfg, framework, 1)
    apply = jax.jit(fe.apply(cfg), static_argnames=("train", "return_intermediates"))
    eval_a, eval_b = apply(params, img), apply(params, img, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(params, img, train=True, rng=jax.random.PRNGKey(2))
    train_b = apply(params, img, train=True, rng=jax.random.PRNGKey(3))
    assert np.abs(np.asarray(train_a - eval_a)).max() > 1e-4
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-4, "a fresh draw each step"
    np.testing.assert_array_equal(train_a, apply(params, img, train=True, rng=jax.random.PRNGKey(2)))
    with pytest.raises(Exception, match="(?i)rng"):
        fe.apply(cfg)(params, img, train=True)  # training without an rng is an error, not silent eval
    # with every rate at zero, training is evaluation
    quiet = small_config(family, dropout=0.0, emb_dropout=0.0, layer_dropout=0.0)
    quiet_train = jax.jit(functools.partial(fe.apply(quiet), train=True))
    np.testing.assert_allclose(quiet_train(params, img, rng=jax.random.PRNGKey(2)), eval_a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cait_trains_with_layer_dropout(framework):
    """A few SGD steps with stochastic depth: finite loss and gradients for every param
    (every layer keeps its params even when its branch is dropped), and the loss falls."""
    cfg = small_config("cait")
    fe = front_end(framework)
    img = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3), jnp.float32)
    labels = jnp.array([0, 1, 2, 3])
    params = vitport.init_params(cfg, framework, 1)
    apply = fe.apply(cfg)

    def loss_fn(p, rng):
        logits = apply(p, img, train=True, rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for i in range(5):
        loss, grads = step(params, jax.random.PRNGKey(10 + i))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses


def test_drop_path_is_per_sample_and_rescaled():
    x = jnp.ones((2000, 3, 4))
    y = np.asarray(ops.drop_path(x, 0.25, jax.random.PRNGKey(0)))
    per_sample = y.reshape(2000, -1)
    assert set(np.unique(per_sample)) <= {0.0, 1 / 0.75}
    assert (per_sample.min(1) == per_sample.max(1)).all(), "a whole sample is kept or dropped"
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.04
    assert ops.drop_path(x, 0.25, None) is x


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cait_layer_dropout_rate_is_constant_over_depth(framework):
    """timm's Cait uses the same drop-path rate in every block; ViT decays it linearly from 0."""
    vit3 = small_config("vit", depth=3, layer_dropout=0.1)
    assert [vit3.drop_path_rate(i) for i in range(3)] == [0.0, 0.05, 0.1]
    img = jnp.ones((16, 32, 32, 3), jnp.float32)
    first_block_change = {}
    for family in ("cait", "vit"):
        cfg = small_config(family, depth=3, dropout=0.0, emb_dropout=0.0, layer_dropout=0.5)
        fe = front_end(framework)
        params = vitport.init_params(cfg, framework, 0)
        apply = jax.jit(fe.apply(cfg), static_argnames=("train", "return_intermediates"))
        _, out = apply(params, img, train=True, rng=jax.random.PRNGKey(1), return_intermediates=True)
        _, ref = apply(params, img, return_intermediates=True)
        first_block_change[family] = float(np.abs(np.asarray(out["blocks.0"] - ref["blocks.0"])).max())
    assert first_block_change["cait"] > 1e-3
    assert first_block_change["vit"] == 0.0


@pytest.mark.parametrize("framework,expected", [
    ("haiku", {"vit/blocks_0/attn/qkv/w", "vit/patch_embed/proj/w", "vit/cls_token", "vit/blocks_1/norm2/offset"}),
    ("flax", {"params/blocks_0/attn/qkv/kernel", "params/patch_embed/proj/kernel", "params/cls_token",
              "params/blocks_1/norm2/bias"}),
    ("nnx", {"blocks/0/attn/qkv/kernel", "patch_embed/proj/kernel", "cls_token", "blocks/1/norm2/bias"}),
])
def test_explicit_stable_param_names(framework, expected):
    params = front_end(framework).init(small_config("vit"), jax.random.PRNGKey(0))
    assert expected <= set(flat_keys(params, framework))


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_wrong_input_size_is_a_clear_error(framework):
    jm = vitport.api.JaxModel(small_config("vit").spec, framework,
                              vitport.init_params(small_config("vit").spec, framework))
    with pytest.raises(InvalidArgumentError, match="expects 32x32.*dynamic_img_size"):
        jm(np.ones((1, 48, 48, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match="uint8 pixels.*preprocess"):
        jm(np.ones((1, 32, 32, 3), np.uint8))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("arch", ["vit_base_patch16_224", "deit_base_distilled_patch16_224", "cait_s24_224"])
def test_empty_batch_gives_an_empty_result(framework, arch):
    """timm returns (0, K) for 0 images; so does every front-end, features included."""
    jm = vitport.create_model(arch, framework, img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=1,
                              num_classes=5)
    empty = np.zeros((0, 32, 32, 3), np.float32)
    assert jm(empty).shape == (0, 5)
    assert jm.forward_features(empty).shape[0] == 0


# ------------------------------------------------------------------------------- NNX only


def test_nnx_train_and_eval_switch_dropout():
    model = vitport.nnx.ViT(**SMALL_VIT, rngs=nnx.Rngs(0))
    img = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3), jnp.float32)
    evals = model(img)
    np.testing.assert_array_equal(model(img), evals)  # evaluation by default: deterministic
    model.train()
    a, b = model(img), model(img)  # the 'dropout' stream advances on each call
    assert np.abs(np.asarray(a - evals)).max() > 1e-4 and np.abs(np.asarray(a - b)).max() > 1e-4
    model.eval()
    np.testing.assert_array_equal(model(img), evals)


@pytest.mark.parametrize("family", ["vit", "cait"])
def test_nnx_optimizer_step_lowers_the_loss(family):
    """One ``nnx.Optimizer`` step with optax on a fixed batch lowers the loss and moves weights."""
    cls = vitport.nnx.ViT if family == "vit" else vitport.nnx.CaiT
    model = cls(**dict(SMALL[family], dropout=0.0, emb_dropout=0.0, layer_dropout=0.0, num_classes=10),
                rngs=nnx.Rngs(0))
    img = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3), jnp.float32)
    labels = jnp.arange(8) % 10
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(img), labels).mean()

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    loss0 = step(model, optimizer)
    loss1 = loss_fn(model)
    assert float(loss1) < float(loss0)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))


def test_nnx_module_is_built_abstractly_and_filled():
    """``jm.module`` holds the converted weights; building it initialises nothing at random."""
    spec = small_config("vit").spec
    jm = vitport.api.JaxModel(spec, "nnx", vitport.init_params(spec, "nnx", 3))
    model = jm.module
    assert isinstance(model, vitport.nnx.ViT)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(model(x), jm(x), rtol=1e-5, atol=1e-6)  # eager vs jitted
    np.testing.assert_array_equal(np.asarray(model.blocks[1].attn.qkv.kernel[...]),
                                  np.asarray(jm.params["blocks"][1]["attn"]["qkv"]["kernel"]))


@pytest.mark.parametrize("scan", [False, True], ids=["blockwise", "scanned"])
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "cait_xxs24_224", "vit_base_patch16_rope_reg1_gap_256",
                                  "vit_relpos_medium_patch16_224"])
def test_nnx_graph_draws_no_keys_and_gives_each_stream_its_own(name, scan, monkeypatch):
    """The graph converted weights are merged into (``nnx_front_end._nnx_graph``) is built without
    jax.random, whose eager seed and fold_in compiled five programs on a process's first NNX call;
    yet every Dropout / DropPath / rope stream in it has a key of its own, so a model trained
    from its own streams draws different masks per layer and per call."""
    from vitport.nnx import front_end as nnx_front_end

    jm = vitport.create_model(name, "nnx", img_size=32, patch_size=8, depth=2, num_classes=3, drop_rate=0.1,
                              proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
    cfg = dataclasses.replace(jm.config, scan_blocks=scan)

    def no_keys(*args, **kwargs):
        raise AssertionError("jax.random ran while the NNX graph was built")

    with monkeypatch.context() as patched:
        for fn in ("key", "PRNGKey", "fold_in", "split"):
            patched.setattr(jax.random, fn, no_keys)
        _, rest = nnx_front_end._nnx_graph.__wrapped__(cfg)
    keys = [np.asarray(jax.random.key_data(v.get_value())).tobytes()
            for _, v in nnx.to_flat_state(rest) if isinstance(v, nnx.RngKey)]
    assert len(keys) >= 4 and len(set(keys)) == len(keys)

    model = nnx_front_end.nnx_module(cfg, jm.params if not scan else jm.set_scan_blocks().params)
    model.train()
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    first, second = np.asarray(model(x)), np.asarray(model(x))
    model.eval()
    assert np.isfinite(first).all() and np.abs(first - second).max() > 0
    assert np.abs(first - np.asarray(model(x))).max() > 0


@pytest.mark.parametrize("scan", [False, True], ids=["blockwise", "scanned"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "cait_xxs24_224", "vit_base_patch16_rope_reg1_gap_256",
                                  "vit_relpos_medium_patch16_224", "vit_tiny_r_s16_p8_224"])
def test_linen_apply_reads_params_without_tracing_initializers(name, scan, monkeypatch):
    """On apply, vitport's linen layers read each stored param and check its shape themselves:
    flax's own check traces the param's initializer (``jax.eval_shape``) once per param per
    call, which was a third of linen's trace time. Apply runs with ``jax.eval_shape`` patched
    to raise; its output equals the Haiku front-end's; ``init`` still draws."""
    import flax.linen as nn

    jm = vitport.create_model(name, "flax", img_size=32, patch_size=8, depth=2, num_classes=3)
    jm = jm.set_scan_blocks(scan)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    module = front_end("flax").module(jm.config, jm.params)

    def no_eval_shape(*args, **kwargs):
        raise AssertionError("linen traced an initializer on apply")

    with monkeypatch.context() as patched:
        patched.setattr(jax, "eval_shape", no_eval_shape)
        out, inter = module.apply(jm.params, x, return_intermediates=True)
    ref = vitport.from_state_dict(jm.to_timm_state_dict(), jm.spec, "haiku").set_scan_blocks(scan)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref.apply_fn(ref.params, x)), rtol=1e-5, atol=1e-5)
    assert inter
    # init draws, through the same modules
    params = module.init(jax.random.PRNGKey(0), x)
    kernels = [a for path, a in jax.tree_util.tree_leaves_with_path(params) if "kernel" in jax.tree_util.keystr(path)]
    assert kernels and all(float(jnp.abs(k).max()) > 0 for k in kernels)
    assert isinstance(module, nn.Module)


@pytest.mark.parametrize("path", [("head", "kernel"), ("norm", "scale"), ("pos_embed",), ("blocks_1", "norm1", "bias")])
def test_linen_apply_refuses_a_wrongly_shaped_param_by_name(path):
    """The shape check that replaces flax's: a Linear kernel, a norm's scale and bias, a free
    param (pos_embed), each given a wrong shape, is refused with flax's ``ScopeParamShapeError``
    naming the param and its module."""
    import flax

    v = FlaxViT(**dict(SMALL_VIT, dropout=0.0, emb_dropout=0.0))
    img = jnp.zeros((1, 32, 32, 3))
    params = jax.tree_util.tree_map(lambda a: a, v.init(jax.random.PRNGKey(0), img))
    node = params["params"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = jnp.zeros(node[path[-1]].shape[:-1] + (node[path[-1]].shape[-1] + 1,))
    with pytest.raises(flax.errors.ScopeParamShapeError, match=path[-1]) as err:
        v.apply(params, img)
    assert "/".join(path[:-1]) in str(err.value)


# ------------------------------------------------------------------------------- create_model


@pytest.mark.parametrize("name,count", [("vit_base_patch16_224", 86_567_656), ("cait_s24_224", 46_916_200)])
def test_timm_param_counts(name, count):
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == (152 if name.startswith("vit") else 476)


def test_import_and_create_model_without_torch():
    """vitport, its models and create_model must not need torch, in any front-end."""
    code = (
        "import vitport, numpy as np\n"
        "for fw in vitport.FRAMEWORKS:\n"
        "    jm = vitport.create_model('vit_tiny_patch16_224', framework=fw, num_classes=5, depth=2)\n"
        "    print(fw, jm(np.zeros((1, 224, 224, 3), np.float32)).shape)\n"
        "assert 'cait_s24_224' in vitport.list_models('cait_*')\n"
    )
    out = run_without_torch(code)
    assert out.stdout.split() == ["haiku", "(1,", "5)", "flax", "(1,", "5)", "nnx", "(1,", "5)"]


def test_create_model_takes_timm_keywords():
    jm = vitport.create_model("vit_base_patch16_224", "nnx", img_size=64, embed_dim=64, num_heads=2, depth=1,
                              num_classes=3, global_pool="avg", reg_tokens=2, drop_path_rate=0.1)
    s = jm.spec
    assert (s.image_size, s.dim, s.heads, s.depth, s.num_classes, s.pool, s.fc_norm, s.reg_tokens) == \
        ((64, 64), 64, 2, 1, 3, "avg", True, 2)
    assert jm.config.layer_dropout == 0.1
    assert jm(np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 3)
    with pytest.raises(vitport.VitportError, match="img_szie"):
        vitport.create_model("vit_base_patch16_224", img_szie=384)


def test_create_model_uses_the_tags_preprocessing():
    jm = vitport.create_model("cait_s24_224", "flax", num_classes=3, depth=1)
    assert jm.pretrained_cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert jm.pretrained_cfg["crop_pct"] == 1.0
    assert vitport.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", "flax",
                                depth=1).pretrained_cfg["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_models_with_one_config_share_one_compile(framework):
    """A second model with the same config (a reload, ``to()``, ``with_params``) runs on the first
    one's compile: each front-end's apply is one function per config, and jit keys on it."""
    compiles = []

    def listener(event, duration, **kwargs):
        # An executable compiled, or read from the persistent cache the test run shares (conftest)
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
            compiles.append(duration)

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, num_heads=2, depth=1, num_classes=3)
    x = np.zeros((1, 32, 32, 3), np.float32)
    first = vitport.create_model("vit_base_patch16_224", framework, rng=1, **kwargs)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        first(x)
        assert compiles, "the listener saw no compile: the event's name changed"
        compiles.clear()
        second = vitport.create_model("vit_base_patch16_224", framework, rng=2, **kwargs)
        second(x)
        first.with_params(second.params)(x)
        assert compiles == []
        other = vitport.create_model("vit_base_patch16_224", framework, rng=2, **dict(kwargs, num_classes=4))
        compiles.clear()  # random init compiles its draws of new shapes
        other(x)
        assert len(compiles) == 1, "another config compiles its own"
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_with_params_maps_any_tree_to_timm_keys(framework):
    """Gradients (any tree shaped like params) get timm's names through the converter."""
    jm = vitport.create_model("vit_base_patch16_224", framework, img_size=32, patch_size=8, embed_dim=32,
                              num_heads=2, depth=1, num_classes=4)
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    grads = jax.grad(lambda p: jm.apply_fn(p, x).sum())(jm.params)
    named = jm.with_params(grads).to_timm_state_dict()
    assert list(named) == [e.timm_key for e in key_table(jm.spec)]
    np.testing.assert_allclose(named["head.bias"], np.full(4, 2.0), rtol=1e-6)  # d(sum logits)/d bias = batch
    with pytest.raises(vitport.VitportError):
        jm.with_params({"not": np.zeros(3)})


def test_front_end_registry_has_every_framework():
    """``FRONT_ENDS`` lists ``converters.FRAMEWORKS`` in order, each entry (imported on first
    use from ``vitport.<framework>.front_end``) named for its framework; others are refused."""
    from vitport.frontends import FRONT_ENDS

    assert tuple(FRONT_ENDS) == FRAMEWORKS and len(FRONT_ENDS) == len(FRAMEWORKS)
    assert [fe.name for fe in FRONT_ENDS.values()] == list(FRAMEWORKS)
    assert [front_end(fw).layout.name for fw in FRAMEWORKS] == list(FRAMEWORKS)
    assert "torch" not in FRONT_ENDS
    with pytest.raises(InvalidArgumentError, match="torch"):
        front_end("torch")
