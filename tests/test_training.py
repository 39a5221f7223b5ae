"""Training: timm's training-mode semantics, gradients equal timm's autograd, the optimizer
equals timm's AdamW with its param groups, and ``vitport finetune`` end to end.

Gradient tiers: every tensor's gradient within ``GRAD_TOLERANCES[dtype]`` of timm's, relative
to that tensor's largest gradient, floored at 1e-3 of the model's largest gradient (some
gradients are analytically zero and hold only rounding noise: softmax ignores the attention
key bias). Measured maxima go to the test report (``record_property``).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_CASES, images, tiny_timm

import vitport
from converters import FRAMEWORKS
from converters.errors import InvalidArgumentError
from vitport import training
from vitport.frontends import FRONT_ENDS
from vitport.parity import compare_gradients, tolerance

GRAD_TOLERANCES = {"float64": 1e-9, "float32": 1e-4}


def labels_for(spec, batch: int) -> np.ndarray:
    return (np.arange(batch) * 3) % spec.num_classes


def relative_errors(rows) -> dict[str, float]:
    """Per row: max abs error / max(its max |grad|, 1e-3 * the model's max |grad|)."""
    floor = 1e-3 * max(r.ref_scale for r in rows)
    return {r.layer: r.max_abs / max(r.ref_scale, floor) for r in rows}


# ------------------------------------------------------------------- training semantics


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_train_mode_without_dropout_equals_eval_and_distilled_switch(framework):
    """With every rate at zero, train=True is evaluation; a distilled DeiT averages its heads
    in training unless distilled training is on, then returns both (timm's semantics)."""
    import torch

    arch, kwargs = TINY_CASES["deit_distilled"]
    model = tiny_timm(arch, "float64", **kwargs)
    jm = vitport.from_timm(model, framework)
    x = images(jm.spec)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    key = jax.random.PRNGKey(0)
    with torch.no_grad():
        evaluated = model(xt).numpy()
        model.train()
        trained = model(xt).numpy()
        model.set_distilled_training(True)
        ref, ref_dist = model(xt)
    train_out = jm.apply_fn(jm.params, x, train=True, rng=key)
    np.testing.assert_allclose(train_out, trained, rtol=0, atol=1e-12)
    np.testing.assert_allclose(train_out, evaluated, rtol=0, atol=1e-12)
    assert jm.set_distilled_training(True) is jm and jm.config.distilled_training
    logits, logits_dist = jm.apply_fn(jm.params, x, train=True, rng=key)
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(logits_dist, ref_dist.numpy(), rtol=0, atol=1e-12)
    assert not jm.set_distilled_training(False).config.distilled_training
    with pytest.raises(vitport.VitportError, match="distilled models"):
        vitport.from_timm(tiny_timm(*TINY_CASES["vit_token"][:1], **TINY_CASES["vit_token"][1]),
                          framework).set_distilled_training(True)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_rope_coord_aug_training_equals_timm_with_the_same_draw(framework):
    """Sapiens2's train-time RoPE coordinate augmentation (shift, jitter and rescale all on):
    with timm's draw forced on both sides (``vitport.parity.same_rope_coord_aug``), training
    logits equal timm's in float64; evaluation is unaugmented on both sides; vitport's own draws
    change with the key."""
    import torch

    from vitport.parity import same_rope_coord_aug

    arch, kwargs = TINY_CASES["eva_sapiens2_rmsnorm_gqa"]
    model = tiny_timm(arch, "float64", **dict(kwargs, rope_shift_coords=0.5, rope_jitter_coords=1.5))
    jm = vitport.from_timm(model, framework)
    assert (jm.spec.rope_shift_coords, jm.spec.rope_jitter_coords, jm.spec.rope_rescale_coords) == (0.5, 1.5, 2.0)
    x = images(jm.spec)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        evaluated = model(xt).numpy()
    with same_rope_coord_aug(jm.spec, seed=3) as key, torch.no_grad():
        model.train()
        try:
            trained = model(xt).numpy()
        finally:
            model.eval()
        ours = np.asarray(jm.apply_fn(jm.params, x, train=True, rng=key))
    np.testing.assert_allclose(ours, trained, rtol=0, atol=1e-10)
    assert np.abs(trained - evaluated).max() > 1e-3  # the augmentation is really on
    np.testing.assert_allclose(np.asarray(jm.apply_fn(jm.params, x)), evaluated, rtol=0, atol=1e-10)
    a, b = (np.asarray(jm.apply_fn(jm.params, x, train=True, rng=jax.random.PRNGKey(k))) for k in (0, 1))
    assert np.abs(a - b).max() > 1e-6 and np.abs(a - evaluated).max() > 1e-6


def test_rope_coord_aug_draw_distribution():
    """vitport's draw has timm's distributions: shift U(-s, s), log jitter U(-ln J, ln J) per
    axis (independent axes), log rescale U(-ln R, ln R); augmentation is refused by name where
    vitport does not implement it (rotary tables other than DINOv3's)."""
    import math

    from converters.specs import EvaSpec, UnsupportedArchitectureError
    from vitport import ops

    spec = EvaSpec(dim=32, heads=4, rope_type="dinov3", rope_shift_coords=0.5, rope_jitter_coords=1.5,
                   rope_rescale_coords=2.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    shift, jitter, rescale = (np.asarray(t, np.float64) for t in
                              jax.vmap(lambda k: ops.rope_coord_aug_draw(k, spec))(keys))
    for values, bound in ((shift, 0.5), (np.log(jitter), math.log(1.5)), (np.log(rescale), math.log(2.0))):
        assert np.abs(values).max() <= bound * (1 + 1e-6)
        assert abs(values.mean()) < 0.03 * bound  # 20000 draws: standard error 0.004 * bound
        np.testing.assert_allclose(values.var(axis=0), bound ** 2 / 3, rtol=0.05)
        hist = np.histogram(values.ravel(), bins=10, range=(-bound, bound))[0] / values.size
        np.testing.assert_allclose(hist, 0.1, atol=0.01)  # uniform
    assert abs(np.corrcoef(shift.T)[0, 1]) < 0.05 and abs(np.corrcoef(np.log(jitter).T)[0, 1]) < 0.05
    with pytest.raises(UnsupportedArchitectureError, match="rope_type='dinov3' only"):
        EvaSpec(dim=32, heads=4, rope_type="cat", rope_rescale_coords=2.0)


# ------------------------------------------------------------------------ gradient parity


# float64 (the tier that separates mapping bugs from rounding): every case in every front-end.
# float32: every case once and every front-end several times, cases dealt round the front-ends
# (each gradient compile costs seconds on 2 cores; the f32 path has no mapping of its own).
GRAD_RUNS = [(case, framework, "float64") for case in sorted(TINY_CASES) for framework in FRAMEWORKS]
GRAD_RUNS += [(case, framework, "float32") for case, framework in zip(sorted(TINY_CASES), itertools.cycle(FRAMEWORKS))]


@pytest.mark.parametrize("case,framework,dtype", GRAD_RUNS)
def test_gradients_equal_timm(case, framework, dtype, record_property):
    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, dtype, **kwargs)
    jm = vitport.from_timm(model, framework)
    x = images(jm.spec, batch=4, dtype=dtype)
    rows = compare_gradients(jm, model, x, labels_for(jm.spec, 4))
    assert rows[0].layer == "loss" and len(rows) == len(dict(model.named_parameters())) + 1
    rel = relative_errors(rows)
    worst = max(rel, key=rel.get)
    record_property(f"grad_max_abs_{dtype}", max(r.max_abs for r in rows))
    record_property(f"grad_max_rel_{dtype}", rel[worst])
    tol = max(GRAD_TOLERANCES[dtype], tolerance(jm.spec, dtype))  # timm's float32 mixed RoPE tables
    bad = {k: f"{v:.2e}" for k, v in rel.items() if v > tol}
    assert not bad, f"{case}/{framework}/{dtype}: gradients over {tol:g}: {bad}"


def test_distilled_training_gradients_equal_timm():
    """With distilled training on, both heads' losses (timm returns both) give timm's gradients."""
    arch, kwargs = TINY_CASES["deit_distilled"]
    model = tiny_timm(arch, "float64", **kwargs)
    jm = vitport.from_timm(model, FRAMEWORKS[-1]).set_distilled_training(True)
    rows = compare_gradients(jm, model, images(jm.spec, batch=4), labels_for(jm.spec, 4))
    assert max(relative_errors(rows).values()) < GRAD_TOLERANCES["float64"]


# ----------------------------------------------------------------- timm's param groups


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_layer_ids_and_weight_decay_equal_timms_param_groups(case):
    """Layer ids equal timm's ``group_parameters(model, model.group_matcher(), reverse=True)``;
    lr scales and weight decay equal ``param_groups_layer_decay`` with ``no_weight_decay()``."""
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay

    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, "float32", **kwargs)
    spec = vitport.from_timm(model, "flax").spec
    assert training.layer_ids(spec) == group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.7)
    names = {id(p): n for n, p in model.named_parameters()}
    timm_scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    timm_decays = {names[id(p)]: g["weight_decay"] > 0 for g in groups for p in g["params"]}
    assert training.decays(spec) == timm_decays
    ours = training.lr_scales(spec, 0.7)
    assert ours.keys() == timm_scale.keys()
    for k in ours:
        assert ours[k] == pytest.approx(timm_scale[k], rel=1e-15), k


def test_lr_schedule_all_warm_up():
    """A run no longer than its warm-up (one epoch with the default one warm-up epoch) is a
    linear ramp from warmup_lr to lr, as timm's scheduler never reaches its cosine then."""
    cfg = training.TrainConfig(total_steps=4, lr=1e-3, warmup_steps=4, warmup_lr=1e-5)
    lrs = [float(training.lr_schedule(cfg)(s)) for s in range(5)]
    assert lrs == pytest.approx([1e-5 + (1e-3 - 1e-5) * s / 4 for s in range(5)], rel=1e-12)


STEP_CASES = ("cait", "deit_distilled", "reg_tokens_avg_fc_norm")


STEP_RUNS = [(fw, case, scan) for scan in (False, True) for fw, case in zip(FRAMEWORKS, itertools.cycle(STEP_CASES))]


@pytest.mark.parametrize("framework,case,scan", STEP_RUNS)
def test_train_steps_equal_timm_adamw(framework, case, scan):
    """Three float64 steps of ``Trainer.train_step`` equal timm's recipe: ``create_optimizer_v2(
    'adamw', layer_decay=...)``, ``LabelSmoothingCrossEntropy``, ``clip_grad_norm_`` and the
    warm-up + cosine learning rate applied with each group's ``lr_scale``; block by block, and
    with the blocks stacked and scanned (``set_scan_blocks``: layer decay slice by slice)."""
    import timm.optim
    import torch
    from timm.loss import LabelSmoothingCrossEntropy

    arch, kwargs = TINY_CASES[case]
    model = tiny_timm(arch, "float64", **kwargs)
    jm = vitport.from_timm(model, framework).set_scan_blocks(scan)
    cfg = training.TrainConfig(total_steps=5, lr=3e-3, warmup_steps=1, warmup_lr=1e-4, min_lr=1e-5,
                               weight_decay=0.3, layer_decay=0.6, label_smoothing=0.1, clip_grad=0.5)
    x, y = images(jm.spec, batch=4), labels_for(jm.spec, 4)
    trainer = training.Trainer(jm, cfg)
    state = trainer.init(jm.params)

    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         layer_decay=cfg.layer_decay, eps=cfg.eps, betas=cfg.betas)
    loss_fn = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
    model.train()
    for step in range(3):
        state, metrics = trainer.train_step(state, x, y)
        for group in opt.param_groups:  # what timm's scheduler does each update
            group["lr"] = float(training.lr_schedule(cfg)(step)) * group["lr_scale"]
        opt.zero_grad()
        loss = loss_fn(model(xt), yt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        opt.step()
        assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-12, abs=1e-12), step
    model.eval()
    if scan:
        assert f"length={jm.spec.depth}" in str(jax.make_jaxpr(trainer.train_step)(state, x, y))
    ours = jm.with_params(state.params).to_timm_state_dict()
    worst = {k: float(np.abs(ours[k] - v.detach().numpy()).max()) for k, v in model.state_dict().items()}
    assert max(worst.values()) < 1e-10, sorted(worst.items(), key=lambda kv: -kv[1])[:5]


@pytest.mark.parametrize("framework,arch", [(fw, "vit_base_patch16_224") for fw in FRAMEWORKS]
                         + [(FRAMEWORKS[0], "vit_small_patch16_18x2_224")])  # the rates are structure's
def test_scanned_training_runs_each_block_at_its_rate(framework, arch):
    """With the blocks scanned in training, each step drops at its own block's stochastic-depth
    rate with its own key: at ``drop_path_rate=1`` timm's linear rule gives block 0 rate 0 (never
    drops: its output is evaluation's) and the last block rate 1 (always drops every branch:
    its output is its input); ParallelThingsBlock's rates sit in its nested branches. Masks
    follow the rng: the same key repeats, another differs, and an NNX module's own stream
    advances from call to call."""
    jm = vitport.create_model(arch, framework, rng=1, drop_path_rate=1.0,
                              **dict(TINY_CASES["vit_token"][1], depth=4)).set_scan_blocks()
    x = jnp.asarray(images(jm.spec, batch=8, dtype="float32"))

    def run(key):
        return jm.apply_fn(jm.params, x, train=True, rng=key, return_intermediates=True)

    assert "length=4" in str(jax.make_jaxpr(run)(jax.random.key(0)))
    (logits, out), (again, _), (other, _) = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    _, evaluated = jm.apply_fn(jm.params, x, return_intermediates=True)
    np.testing.assert_allclose(out["blocks.0"], evaluated["blocks.0"], rtol=0, atol=1e-6)
    assert np.array_equal(out["blocks.3"], out["blocks.2"])
    assert not np.allclose(out["blocks.2"], out["blocks.1"]) or not np.allclose(out["blocks.1"], out["blocks.0"])
    assert np.array_equal(logits, again) and not np.allclose(logits, other)
    if framework == "nnx" and arch == "vit_base_patch16_224":  # no rngs given: the stacked block's own stream
        module = jm.module
        module.train()
        assert not np.allclose(module(x), module(x))


# ----------------------------------------------------------------- bf16 and remat


def test_remat_and_bfloat16(record_property):
    """Rematerialisation keeps the numbers (its memory is recorded, see TrainConfig.remat);
    bfloat16 compute keeps float32 params and a loss close to float32's."""
    arch, kwargs = TINY_CASES["vit_token"]
    model = tiny_timm(arch, "float32", **kwargs)
    jm = vitport.from_timm(model, FRAMEWORKS[0])
    args = (jm.params, jnp.asarray(images(jm.spec, batch=8, dtype="float32")), jnp.asarray(labels_for(jm.spec, 8)),
            jax.random.PRNGKey(0))
    grads, temp = {}, {}
    for remat in (False, True):
        trainer = training.Trainer(jm, training.TrainConfig(total_steps=3, remat=remat))
        compiled = jax.jit(jax.value_and_grad(trainer.loss)).lower(*args).compile()
        grads[remat], temp[remat] = compiled(*args), compiled.memory_analysis().temp_size_in_bytes
    for a, b in zip(jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The same with the blocks scanned: each step's output is named for the policy inside the scan.
    scanned = vitport.from_timm(model, FRAMEWORKS[0]).set_scan_blocks()
    loss, scanned_grads = jax.value_and_grad(training.Trainer(scanned, training.TrainConfig(total_steps=3, remat=True)).loss)(
        scanned.params, *args[1:])
    np.testing.assert_allclose(loss, grads[False][0], rtol=1e-6)
    for k, g in jm.with_params(grads[False][1]).canonical().items():
        np.testing.assert_allclose(scanned.with_params(scanned_grads).canonical()[k], g, rtol=0, atol=1e-6, err_msg=str(k))
    record_property("temp_bytes_plain", temp[False])
    record_property("temp_bytes_remat", temp[True])
    bf16 = training.Trainer(jm, training.TrainConfig(total_steps=3, compute_dtype="bfloat16"))
    state, metrics = bf16.train_step(bf16.init(jm.params), *args[1:3])
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(state.params))
    assert float(metrics["loss"]) == pytest.approx(float(grads[False][0]), rel=0.05)


# ------------------------------------------------------------------------------ finetune

COLOURS = {"blue": (40, 60, 200), "green": (50, 190, 60), "red": (210, 50, 40)}


def make_dataset(root, per_class=(24, 8), seed=0):
    """Three classes of noisy, differently sized images in one dominant colour each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for name, colour in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(32, 56, 2)
                px = np.clip(np.asarray(colour) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def finetune_env(tmp_path_factory):
    from test_checkpoints import save_hub_dir

    root = tmp_path_factory.mktemp("finetune")
    sources = {}
    for name, case in (("vit", "vit_token"), ("cait", "cait")):
        arch, kwargs = TINY_CASES[case]
        sources[name] = save_hub_dir(tiny_timm(arch, "float32", **kwargs), root / name)
    return make_dataset(root / "data"), sources


FAST = ["--epochs", "3", "--batch-size", "24", "--lr", "2e-3", "--workers", "2"]


def finetune_cli(capsys, *argv):
    from vitport import cli

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_finetune_learns_and_goes_back_to_timm(finetune_env, tmp_path, capsys):
    """`vitport finetune` on three colour classes: high validation accuracy in three short
    epochs; the folder loads in vitport with the class names, and its export loads in timm
    with strict=True and gives the same logits."""
    import timm
    import torch

    from converters.checkpoint_io import read_safetensors

    data, sources = finetune_env
    out = tmp_path / "vit-ft"
    rc, stdout, err = finetune_cli(capsys, "finetune", sources["vit"], data, "--out", out, *FAST,
                                   "--framework", FRAMEWORKS[0])
    assert rc == 0, err
    assert "epoch 3:" in stdout and not (tmp_path / "vit-ft.partial").exists()
    history = __import__("json").loads((out / "training.json").read_text())
    assert history["best_val_accuracy"] >= 0.9, history["history"]
    assert history["history"][-1]["train_loss"] < history["history"][0]["train_loss"]
    jm = vitport.load(out)
    assert jm.pretrained_cfg["label_names"] == sorted(COLOURS) and jm.spec.num_classes == 3

    exported = tmp_path / "vit-ft.safetensors"
    assert finetune_cli(capsys, "export", out, "--out", exported)[0] == 0
    arch, kwargs = TINY_CASES["vit_token"]
    model = timm.create_model(arch, pretrained=False, **dict(kwargs, num_classes=3)).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in read_safetensors(exported).items()}, strict=True)
    x = jm.preprocess(sorted((data / "val" / "red").iterdir())[:4])
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(np.asarray(jm(x)), ref, rtol=0, atol=1e-4)
    assert (ref.argmax(-1) == sorted(COLOURS).index("red")).all()


def test_finetune_resume_equals_an_uninterrupted_run(finetune_env, tmp_path):
    """Interrupted after epoch 1 and resumed, a CaiT run ends with the same weights and history
    as one that ran straight through (same seed), bit for bit; with its blocks scanned (stacked
    weights and optimizer state in the checkpoint, stochastic depth per step)."""
    from converters.checkpoint_io import read_safetensors
    from vitport.finetune import FinetuneConfig, finetune

    data, sources = finetune_env
    cfg = FinetuneConfig(epochs=3, batch_size=24, lr=2e-3, drop_path_rate=0.1, framework=FRAMEWORKS[-1],
                         workers=2, seed=3, scan_blocks=True)
    straight = finetune(sources["cait"], data, tmp_path / "straight", cfg)

    def stop_after_first_epoch(event, **info):
        if event == "epoch_done" and info["result"].epoch == 0:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(sources["cait"], data, out, cfg, progress=stop_after_first_epoch)
    assert not out.exists() and (tmp_path / "resumed.partial").is_dir()
    with pytest.raises(vitport.VitportError, match="--resume"):
        finetune(sources["cait"], data, out, cfg)
    with pytest.raises(vitport.VitportError, match="lr"):
        finetune(sources["cait"], data, out, dataclasses.replace(cfg, lr=1e-3), resume=True)
    epochs = []
    finetune(sources["cait"], data, out, cfg, resume=True,
             progress=lambda event, **info: epochs.append(info["epoch"]) if event == "epoch" else None)
    assert epochs == [1, 2]
    a, b = read_safetensors(straight / "model.safetensors"), read_safetensors(out / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    history = [__import__("json").loads((o / "training.json").read_text())["history"] for o in (straight, out)]
    assert [h["val_loss"] for h in history[0]] == [h["val_loss"] for h in history[1]]
    assert history[0][-1]["val_accuracy"] >= 0.9


def _bad_data(root):
    make_dataset(root / "no-val", per_class=(2, 1))
    __import__("shutil").rmtree(root / "no-val" / "val")
    make_dataset(root / "empty-class", per_class=(2, 1))
    for f in (root / "empty-class" / "train" / "red").iterdir():
        f.unlink()
    make_dataset(root / "unreadable", per_class=(2, 1))
    (root / "unreadable" / "train" / "blue" / "broken.jpg").write_bytes(b"not a jpeg")
    make_dataset(root / "other-classes", per_class=(2, 1))
    (root / "other-classes" / "val" / "red").rename(root / "other-classes" / "val" / "purple")
    return {"no-val": "no val/ folder", "empty-class": "holds no images", "unreadable": "broken.jpg",
            "other-classes": "same class folders"}


def test_finetune_bad_data_is_one_clear_error(finetune_env, tmp_path, capsys):
    _, sources = finetune_env
    for name, message in _bad_data(tmp_path).items():
        out = tmp_path / f"{name}-out"
        rc, _, err = finetune_cli(capsys, "finetune", sources["vit"], tmp_path / name, "--out", out, *FAST)
        assert rc == 2 and message in " ".join(err.split()), (name, err)
        assert "Traceback" not in err
        assert not out.exists() and not (tmp_path / f"{name}-out.partial").exists(), name


def test_train_transform_pixels_equal_torchvision():
    """For the same crop box and flip, the training transform gives torchvision's pixels, and
    the boxes follow RandomResizedCrop's rules (area and ratio ranges, inside the image)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    from vitport.finetune import TrainTransform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8))
    t = TrainTransform((32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "bicubic")
    for seed in range(20):
        left, top, w, h = t.crop_box(img.width, img.height, np.random.default_rng(seed))
        assert 0 <= left <= img.width - w and 0 <= top <= img.height - h
        assert 0.08 * 45 * 61 * 0.9 <= w * h and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        ours = t(img, np.random.default_rng(seed))
        ref = F.resized_crop(img, top, left, h, w, [32, 32], InterpolationMode.BICUBIC)
        gen = np.random.default_rng(seed)
        t.crop_box(img.width, img.height, gen)
        if gen.random() < 0.5:
            ref = F.hflip(ref)
        ref = F.normalize(F.to_tensor(ref), t.mean, t.std).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_batch_norm_statistics_stay_frozen_in_a_train_step():
    """BatchNorm running statistics (hybrid ResNet-D stems) are held in the params but never
    trained: no weight decay, zero updates (``training.frozen``), while every other tensor moves."""
    arch, kwargs = TINY_CASES["hybrid_resnet_d"]
    jm = vitport.from_timm(tiny_timm(arch, "float32", **kwargs), "nnx")
    trainer = training.Trainer(jm, training.TrainConfig(total_steps=4, lr=1e-2, warmup_steps=0, weight_decay=0.5,
                                                        layer_decay=0.7, clip_grad=1.0))
    state, _ = trainer.train_step(trainer.init(jm.params), images(jm.spec, batch=2), np.array([1, 2]))
    before, after = jm.to_timm_state_dict(), jm.with_params(state.params).to_timm_state_dict()
    frozen = training.frozen(jm.spec)
    assert sum(frozen.values()) == 3 * sum(k.endswith("running_var") for k in before) > 0
    for k in before:
        assert np.array_equal(before[k], after[k]) == frozen[k], k


def test_batches_with_one_worker_do_not_wait_on_themselves():
    """A batch job waits on its images; in the images' own pool of one worker it waited forever
    (``vitport finetune --workers 1`` hung at 0 % CPU)."""
    import threading

    from vitport.finetune import Batches

    batches, got = Batches(1), []

    def batch(s: int) -> list[int]:
        return list(batches.pool.map(lambda i: i * s, range(3)))

    runner = threading.Thread(target=lambda: got.extend(batches._ahead(batch, 3)), daemon=True)
    runner.start()
    runner.join(timeout=30)
    batches.close()
    assert not runner.is_alive() and got == [[0, 0, 0], [0, 1, 2], [0, 2, 4]]


@pytest.mark.parametrize("field,value", [("lr", -1.0), ("lr", float("nan")), ("lr", 0.0), ("weight_decay", float("inf")),
                                         ("weight_decay", -0.1), ("clip_grad", -1.0), ("clip_grad", float("nan")),
                                         ("min_lr", -1e-6)])
def test_train_config_refuses_rates_that_train_to_garbage(field, value):
    from vitport.training import TrainConfig

    with pytest.raises(InvalidArgumentError, match=field):
        TrainConfig(total_steps=10, **{field: value})


@pytest.mark.parametrize("rate", [1.5, 1.0, -0.1, float("nan")])
def test_finetune_config_refuses_drop_path_rates_outside_0_1(rate):
    from vitport.finetune import FinetuneConfig

    with pytest.raises(InvalidArgumentError, match="drop_path_rate"):
        FinetuneConfig(drop_path_rate=rate)


def test_a_diverged_run_is_stopped_not_saved(finetune_env, tmp_path, capsys):
    """A learning rate that blows the weights up: the run stops at the first non-finite loss with
    one error, before anything of that epoch is saved as the best model (which vitport would then
    refuse to load); one image worker on the way."""
    data, sources = finetune_env
    out = tmp_path / "diverged"
    rc, _, err = finetune_cli(capsys, "finetune", sources["vit"], data, "--out", out, "--epochs", "1",
                              "--batch-size", "24", "--lr", "1e30", "--workers", "1", "--framework", FRAMEWORKS[0])
    assert rc == 2 and "training diverged" in err and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "diverged.partial" / "best").exists()
