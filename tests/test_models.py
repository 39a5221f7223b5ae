"""The models as users build them: the seed's usage, training mode, dropout, layer dropout."""

from __future__ import annotations


import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_without_torch

import vitport
from vitport import ops
from vitport.flax import CaiT as FlaxCaiT
from vitport.flax import ViT as FlaxViT
from vitport.haiku import CaiT as HaikuCaiT
from vitport.haiku import ViT as HaikuViT

SEED_VIT = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=6, heads=16, mlp_dim=2048,
                dropout=0.1, emb_dropout=0.1)
SEED_CAIT = dict(image_size=256, patch_size=32, num_classes=1000, dim=1024, depth=12, cls_depth=2, heads=16,
                 mlp_dim=2048, dropout=0.1, emb_dropout=0.1, layer_dropout=0.05)
SMALL_CAIT = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=3, cls_depth=2, heads=4, mlp_dim=64,
                  dropout=0.1, emb_dropout=0.1, layer_dropout=0.5, init_values=0.1)


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


@pytest.mark.parametrize("cls,kw", [(FlaxViT, dict(SEED_VIT, depth=2, dim=64, heads=4, mlp_dim=128)),
                                    (FlaxCaiT, SMALL_CAIT)])
def test_flax_dropout_only_in_training(cls, kw):
    size = kw["image_size"]
    img = jax.random.normal(jax.random.PRNGKey(0), (4, size, size, 3))
    model = cls(**kw)
    params = model.init(jax.random.PRNGKey(1), img)
    eval_a, eval_b = model.apply(params, img), model.apply(params, img, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = model.apply(params, img, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    train_b = model.apply(params, img, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    assert np.abs(np.asarray(train_a - eval_a)).max() > 1e-4
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-4, "a fresh draw each step"
    with pytest.raises(Exception, match="dropout"):
        model.apply(params, img, train=True)  # training without an rng is an error, not silent eval


def test_haiku_seed_signature_and_training():
    img = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    kw = dict(SEED_VIT, image_size=32, patch_size=8, depth=2, dim=32, heads=4, mlp_dim=64)
    for cls, args in ((HaikuViT, kw), (HaikuCaiT, SMALL_CAIT)):
        f = hk.transform(lambda x, is_training=False: cls(**args)(x, is_training=is_training))
        params = f.init(jax.random.PRNGKey(1), img)
        evals = f.apply(params, None, img)
        assert evals.shape == (2, args["num_classes"])
        train = f.apply(params, jax.random.PRNGKey(2), img, is_training=True)
        assert np.abs(np.asarray(train - evals)).max() > 1e-4


def test_cait_trains_with_layer_dropout():
    """A few SGD steps with stochastic depth: finite loss and gradients for every param
    (every layer keeps its params even when its branch is dropped)."""
    model = FlaxCaiT(**SMALL_CAIT)
    img = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    labels = jnp.array([0, 1, 2, 3])
    params = model.init(jax.random.PRNGKey(1), img)

    def loss_fn(p, rng):
        logits = model.apply(p, img, train=True, rngs={"dropout": rng})
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for i in range(5):
        loss, grads = step(params, jax.random.PRNGKey(10 + i))
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
        losses.append(float(loss))
    assert jax.tree.structure(params) == jax.tree.structure(model.init(jax.random.PRNGKey(1), img))
    assert all(np.isfinite(losses)), losses


def test_drop_path_is_per_sample_and_rescaled():
    x = jnp.ones((2000, 3, 4))
    y = np.asarray(ops.drop_path(x, 0.25, jax.random.PRNGKey(0)))
    per_sample = y.reshape(2000, -1)
    assert set(np.unique(per_sample)) <= {0.0, 1 / 0.75}
    assert (per_sample.min(1) == per_sample.max(1)).all(), "a whole sample is kept or dropped"
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.04
    assert ops.drop_path(x, 0.25, None) is x


def test_cait_layer_dropout_rate_is_constant_over_depth():
    """timm's Cait uses the same drop-path rate in every block; ViT decays it linearly from 0."""
    assert ops.drop_path_rates(0.1, 3) == [0.0, 0.05, 0.1]
    img = jnp.ones((16, 32, 32, 3))
    no_dropout = dict(dropout=0.0, emb_dropout=0.0, layer_dropout=0.5)
    first_block_change = {}
    for name, model in (("cait", FlaxCaiT(**dict(SMALL_CAIT, **no_dropout))),
                        ("vit", FlaxViT(**dict(SEED_VIT, image_size=32, patch_size=8, depth=3, dim=32, heads=4,
                                                mlp_dim=64, **no_dropout)))):
        params = model.init(jax.random.PRNGKey(0), img)
        _, out = model.apply(params, img, train=True, rngs={"dropout": jax.random.PRNGKey(1)},
                             return_intermediates=True)
        _, ref = model.apply(params, img, return_intermediates=True)
        first_block_change[name] = float(np.abs(np.asarray(out["blocks.0"] - ref["blocks.0"])).max())
    assert first_block_change["cait"] > 1e-3
    assert first_block_change["vit"] == 0.0


def test_explicit_stable_param_names():
    params = FlaxViT(**dict(SEED_VIT, image_size=64, depth=2)).init(jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)))
    assert set(params["params"]) == {"patch_embed", "cls_token", "pos_embed", "blocks_0", "blocks_1", "norm", "head"}
    assert set(params["params"]["blocks_0"]) == {"norm1", "attn", "norm2", "mlp"}
    f = hk.transform(lambda x: HaikuViT(**dict(SEED_VIT, image_size=64, depth=1))(x))
    names = set(f.init(jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3))))
    assert "vit/blocks_0/attn/qkv" in names and "vit/patch_embed/proj" in names


def test_wrong_input_size_is_a_clear_error():
    model = FlaxViT(**dict(SEED_VIT, image_size=64, depth=1))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 64, 64, 3)))
    with pytest.raises(ValueError, match="expects 64x64.*dynamic_img_size"):
        model.apply(params, jnp.ones((1, 96, 96, 3)))


@pytest.mark.parametrize("name,count", [("vit_base_patch16_224", 86_567_656), ("cait_s24_224", 46_916_200)])
def test_timm_param_counts(name, count):
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == (152 if name.startswith("vit") else 476)


def test_import_and_create_model_without_torch():
    """vitport, its models and create_model must not need torch."""
    code = (
        "import vitport\n"
        "jm = vitport.create_model('vit_tiny_patch16_224', framework='haiku', num_classes=5)\n"
        "import numpy as np\n"
        "print(jm(np.zeros((1, 224, 224, 3), np.float32)).shape)\n"
        "assert 'cait_s24_224' in vitport.list_models('cait_*')\n"
    )
    out = run_without_torch(code)
    assert out.stdout.strip() == "(1, 5)"


def test_create_model_uses_the_tags_preprocessing():
    jm = vitport.create_model("cait_s24_224", "flax", num_classes=3)
    assert jm.pretrained_cfg["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert jm.pretrained_cfg["crop_pct"] == 1.0
    assert vitport.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", "flax",
                                depth=1).pretrained_cfg["mean"] == [0.5, 0.5, 0.5]
