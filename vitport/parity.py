"""Layer-by-layer numeric parity between a timm model and its JAX port (needs torch + timm).

The pieces, used by the tests and by ``vitport verify``:

- ``perturb_weights``: re-initialise a timm model so that every path matters. timm's own init
  hides bugs (CaiT's LayerScale of 1e-5 makes every block nearly the identity, so swapped
  ``proj_l``/``proj_w`` or gammas change logits by < 2e-5); docs/design.md (numerics) gives the scheme.
- ``compare``: run both sides on the same images and report, for every timm-named
  activation both expose, the max absolute and max relative difference;
- ``compare_weights``: do timm and vitport hold the same numbers (a checkpoint read twice);
- ``timm_model_for``: timm's own loading of a checkpoint vitport resolved;
- ``TOLERANCES``: what each dtype must meet; ``tolerance(spec, dtype)``: the same, except where
  timm itself computes in float32 in a float64 model (mixed RoPE tables).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters import FRAMEWORKS

from . import xla_options
from .api import JaxModel

# Per-dtype tolerance, relative to max(1, max|reference|) of each compared tensor.
TOLERANCES = {"float64": 1e-10, "float32": 1e-4}

# timm builds mixed RoPE tables (angles, sin, cos) in float32 whatever the model's dtype
# (``get_mixed_freqs``), with torch's float32 sin/cos, whose last bit differs from a correctly
# rounded one for about 5% of arguments: a float64 comparison is bounded by that rounding
# (measured: 3e-8 on a tiny twin, see docs/design.md section 3), not by the 1e-10 tier.
FLOAT32_TABLE_TOLERANCE = 1e-6


def tolerance(spec, dtype: str) -> float:
    """``TOLERANCES[dtype]``, or ``FLOAT32_TABLE_TOLERANCE`` for a float64 model whose timm
    forward computes a float32 table (``rope_type='mixed'``)."""
    if dtype == "float64" and getattr(spec, "rope_type", "") == "mixed":
        return max(TOLERANCES[dtype], FLOAT32_TABLE_TOLERANCE)
    return TOLERANCES[dtype]


GAMMA_NAMES = ("gamma", "gamma_1", "gamma_2")


def perturb_weights(model, seed: int = 0):
    """Bug-sensitive re-initialisation, in place and deterministic; returns the model.

    Linear/conv weights N(0, 1/fan_in), their biases 0.05 N; LayerNorm (and RmsNorm) scale 1 + 0.2 N and
    bias 0.05 N; BatchNorm affine as LayerNorm's, running mean 0.1 N, running var U(0.5, 1.5);
    LayerScale gammas U(0.05, 0.5); tokens, latents and pos_embed 0.5 N.
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal(p, std, mean=0.0):
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).mul(std).add(mean))

    with torch.no_grad():
        # BatchNorm running statistics (buffers, frozen in vitport): mean 0.1 N, var U(0.5, 1.5),
        # so a swapped or ignored statistic moves the output.
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                normal(module.running_mean, 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen,
                                                    dtype=torch.float64) + 0.5)
        for name, p in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if (isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
                    or type(module).__name__ == "RmsNorm"):
                normal(p, 0.2, 1.0) if leaf == "weight" else normal(p, 0.05)
            elif isinstance(module, (nn.Linear, nn.Conv2d)):
                normal(p, p[0].numel() ** -0.5) if leaf == "weight" else normal(p, 0.05)
            elif leaf in GAMMA_NAMES:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64) * 0.45 + 0.05)
            else:
                normal(p, 0.5)
    return model


def timm_intermediates(model, images_nchw) -> tuple[Any, dict[str, np.ndarray]]:
    """timm's output and the outputs of its named modules, captured with forward hooks."""
    import torch

    names = ["patch_embed", "norm", "head", "head_dist"]
    names += [f"blocks.{i}" for i in range(len(model.blocks))]
    names += [f"blocks_token_only.{i}" for i in range(len(getattr(model, "blocks_token_only", None) or []))]
    captured: dict[str, np.ndarray] = {}
    handles = []

    def hook(name):
        def fn(_module, args, output):
            captured[name] = output.detach().cpu().numpy()
        return fn

    def pre_hook(_module, args):
        captured["pre_logits"] = args[0].detach().cpu().numpy()

    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        handles.append(m.register_forward_hook(hook(name)))
    if not hasattr(model, "head_dist"):  # distilled heads read two tokens: no single pre_logits
        handles.append(model.head.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            out = model(images_nchw)
    finally:
        for h in handles:
            h.remove()
    if "patch_embed" in captured:
        pe = captured["patch_embed"]
        captured["patch_embed"] = pe.reshape(pe.shape[0], -1, pe.shape[-1])
    return out.detach().cpu().numpy(), captured


@dataclass(frozen=True)
class LayerDiff:
    layer: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ref_scale: float

    def ok(self, tol: float) -> bool:
        """Within ``tol`` of the reference's own scale (absolute for |values| <= 1)."""
        return self.max_abs <= tol * max(1.0, self.ref_scale)


def diff(layer: str, ours: Any, ref: Any) -> LayerDiff:
    """``max_rel`` is max |ours - ref| / max(|ref|, 1e-3 * max|ref|): elementwise, floored
    so that entries near zero do not blow it up."""
    a, b = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{layer}: shape {a.shape} in JAX, {b.shape} in timm")
    err = np.abs(a - b)
    scale = float(np.abs(b).max()) if b.size else 0.0
    floor = max(1e-3 * scale, np.finfo(np.float64).tiny)
    rel = float((err / np.maximum(np.abs(b), floor)).max()) if b.size else 0.0
    return LayerDiff(layer, tuple(b.shape), float(err.max()) if b.size else 0.0, rel, scale)


def compare(jax_model: JaxModel, timm_model, images_nhwc: np.ndarray) -> list[LayerDiff]:
    """Per-layer differences, in forward order, ending with the final 'logits' row."""
    import torch

    timm_model.eval()
    dtype = next(timm_model.parameters()).dtype
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(dtype)
    ref_out, ref = timm_intermediates(timm_model, x)
    out, ours = jax_model(images_nhwc, return_intermediates=True)
    # timm's hooks fire in forward order; jit returns the JAX dict with sorted keys.
    rows = [diff(name, ours[name], ref[name]) for name in ref if name in ours]
    rows.append(diff("logits", out, ref_out))
    return rows


def random_images(spec, batch: int = 2, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """Normalised-image-like inputs, NHWC."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *spec.image_size, spec.channels)).astype(dtype)


@dataclass(frozen=True)
class VerifyResult:
    name: str
    framework: str
    dtype: str
    rows: list[LayerDiff]


def build_timm_model(name: str, dtype: str = "float32", seed: int = 0, **kwargs: Any):
    """A timm model with bug-sensitive random weights (offline), in eval mode."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, **kwargs)
    return perturb_weights(model, seed).to(getattr(torch, dtype)).eval()


def verify_architecture(name: str, frameworks=FRAMEWORKS, dtypes=("float64", "float32"), *,
                        batch: int = 2, seed: int = 0, status=None, timm_model=None):
    """Yield a VerifyResult per (dtype, framework): timm vs the converted JAX model.

    ``timm_model`` (optional) is checked instead of a freshly perturbed ``name``; its
    weights are cast to each dtype.
    """
    import contextlib

    from .timm_bridge import from_timm

    status = status or (lambda msg: contextlib.nullcontext())
    for dtype in dtypes:
        with status(f"building {name} ({dtype})"):
            if timm_model is None:
                model = build_timm_model(name, dtype, seed)
            else:
                import torch

                model = timm_model.to(getattr(torch, dtype)).eval()
        for framework in frameworks:
            with status(f"converting to {framework} and comparing ({dtype})"):
                jm = from_timm(model, framework)
                images = random_images(jm.spec, batch, seed, dtype=np.dtype(dtype))
                rows = compare(jm, model, images)
            yield VerifyResult(name, framework, dtype, rows)


def compare_weights(jm: JaxModel, timm_model) -> tuple[LayerDiff, list[str]]:
    """The largest difference between vitport's and timm's tensors, as a parity row, and the
    keys only one side has (those make the row infinite)."""
    ours, theirs = jm.to_timm_state_dict(), timm_model.state_dict()
    only_one = sorted(set(theirs) ^ set(ours))
    worst = max((float(np.max(np.abs(ours[k].astype(np.float64) - theirs[k].double().numpy())))
                 for k in ours if k in theirs), default=0.0)
    n_values = sum(int(np.prod(v.shape)) for v in ours.values())
    worst = float("inf") if only_one else worst
    return LayerDiff(f"weights ({len(ours)} tensors, {n_values:,} values)", (), worst, worst, 1.0), only_one


def _to_torch(a):
    import numpy as np
    import torch

    a = np.ascontiguousarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def timm_model_for(r, tree, model_args: dict[str, Any] | None = None):
    """timm's own model for a resolved source, loading the checkpoint timm's own way.

    vitport's reading of the file is what is under test, so timm reads it independently:
    ``hf-hub:`` / ``local-dir:`` for hub layouts, ``pretrained_cfg_overlay=dict(file=...)``
    for single files. A vitport folder has no timm file; its weights are loaded from the
    exported timm state_dict.
    """
    import timm

    from converters import canonical_to_timm

    from .hub import model_args_for_timm

    kwargs = dict(model_args or {})
    if r.kind == "vitport":
        model = timm.create_model(r.architecture, pretrained=False, **model_args_for_timm(r.spec, r.architecture))
        model.load_state_dict({k: _to_torch(v) for k, v in canonical_to_timm(tree, r.spec).items()})
    elif r.kind == "hub" and r.source.startswith("hf-hub:"):  # timm reads the repo's config.json itself
        model = timm.create_model(r.source, pretrained=True, **kwargs)
    elif r.kind == "hub":  # a timm name: timm downloads (or finds in the cache) the tag's weights itself
        # vitport already checked that the weights have spec.num_classes classes; say so, or timm
        # would drop a head whose size differs from its default tag's.
        overlay = dict(num_classes=r.spec.num_classes)
        model = timm.create_model(r.source, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    elif r.kind == "hub-dir" and (r.weights.parent / "config.json").is_file():
        model = timm.create_model(f"local-dir:{r.weights.parent}", pretrained=True, **kwargs)
    else:
        overlay = dict(file=str(r.weights), num_classes=r.spec.num_classes)
        model = timm.create_model(r.architecture, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return model.eval()


# ---------------------------------------------------------------------------- gradients


def timm_gradients(timm_model, images_nhwc: np.ndarray, labels: np.ndarray, *,
                   distilled_training: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """timm's loss and autograd gradients (by state_dict key) in training mode.

    The loss is ``vitport.training.classification_loss`` written in torch: mean cross-entropy,
    or for a distilled model in distilled training the mean over its two heads. The model is
    left in evaluation mode, distilled training off.
    """
    import torch
    import torch.nn.functional as F

    dtype = next(timm_model.parameters()).dtype
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))).to(dtype)
    y = torch.from_numpy(np.asarray(labels, np.int64))
    if hasattr(timm_model, "set_distilled_training"):
        timm_model.set_distilled_training(distilled_training)
    timm_model.train()
    for m in timm_model.modules():  # vitport keeps BatchNorm in evaluation mode in training (frozen stats)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    timm_model.zero_grad(set_to_none=True)
    try:
        out = timm_model(x)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(F.cross_entropy(o, y) for o in outs) / len(outs)
        loss.backward()
    finally:
        timm_model.eval()
        if hasattr(timm_model, "set_distilled_training"):
            timm_model.set_distilled_training(False)
    grads = {k: p.grad.detach().cpu().numpy() for k, p in timm_model.named_parameters() if p.grad is not None}
    timm_model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def jax_gradients(jm: JaxModel, images_nhwc: np.ndarray, labels: np.ndarray,
                  rng=None) -> tuple[float, dict[str, np.ndarray]]:
    """The same loss through ``jm.apply_fn`` in training mode, and its gradients named by timm
    key (``jm.with_params(grads).to_timm_state_dict()``)."""
    import jax

    from .training import classification_loss

    def loss_fn(params):
        return classification_loss(jm.apply_fn(params, x, train=True, rng=rng), y)

    x, y = jax.numpy.asarray(images_nhwc, jm.input_dtype), jax.numpy.asarray(labels)
    # one compile, apply_fn inlined (so this jit carries the model's compiler options)
    loss, grads = xla_options.jit(jax.value_and_grad(loss_fn), xla_options.for_model(jm, gradients=True))(jm.params)
    named = jm.with_params(grads).to_timm_state_dict()
    # Frozen tensors (BatchNorm running statistics: buffers in timm) have no timm gradient; theirs
    # must be exactly zero here (ops.batch_norm_frozen's stop_gradient).
    from converters.keymap import FROZEN_KINDS, key_table

    fixed = [e.timm_key for e in key_table(jm.spec) if e.kind in FROZEN_KINDS]
    moved = [k for k in fixed if np.any(named[k])]
    if moved:
        raise ValueError(f"frozen BatchNorm statistics received gradients: {moved}")
    return float(loss), {k: v for k, v in named.items() if k not in set(fixed)}


@contextlib.contextmanager
def same_rope_coord_aug(spec, seed: int = 0):
    """timm's train-time RoPE coordinate augmentation (Eva ``rope_shift/jitter/rescale_coords``) is
    one random draw per forward call. For the block, timm's next draw is fixed (torch seeded with
    ``seed``) and vitport is given the same values (``structure.forced_rope_coord_aug``): timm's
    draw is reproduced in its own order (shift U(-s, s), jitter exp(U(-ln J, ln J)) per axis, then
    rescale exp(U(-ln R, ln R)), float32 on CPU) and torch's rng is put back so timm draws exactly
    these. Yields the key a training call needs (its draw replaced), ``None`` without augmentation."""
    if not getattr(spec, "rope_aug_active", False):
        yield None
        return
    import math

    import jax
    import torch

    from . import structure

    saved = torch.get_rng_state()
    torch.manual_seed(seed)
    state = torch.get_rng_state()
    shift, jitter, rescale = torch.zeros(2), torch.ones(2), torch.ones(1)
    if spec.rope_shift_coords is not None:
        shift = torch.empty(2).uniform_(-spec.rope_shift_coords, spec.rope_shift_coords)
    if spec.rope_jitter_coords is not None:
        j = math.log(spec.rope_jitter_coords)
        jitter = torch.empty(2).uniform_(-j, j).exp()
    if spec.rope_rescale_coords is not None:
        r = math.log(spec.rope_rescale_coords)
        rescale = torch.empty(1).uniform_(-r, r).exp()
    torch.set_rng_state(state)  # timm's forward draws the same values again
    # The forced draw is read while tracing: jitted functions (JaxModel.apply_fn) traced outside
    # the block must not be reused inside it, nor those traced inside after it.
    jax.clear_caches()
    try:
        with structure.forced_rope_coord_aug(shift.numpy(), jitter.numpy(), float(rescale[0])):
            yield jax.random.PRNGKey(seed)
    finally:
        torch.set_rng_state(saved)
        jax.clear_caches()


@contextlib.contextmanager
def _hard_coded_dropout_off(timm_model):
    """timm's ``RelPosMlp`` drops its hidden layer with a fixed p=0.125 in training (no keyword
    sets it), so its training mode is random even with every rate at zero. Gradients are
    compared as one deterministic function: that dropout is off on both sides for the call."""
    drops = [m.mlp.drop1 for m in timm_model.modules() if type(m).__name__ == "RelPosMlp"]
    saved = [d.p for d in drops]
    for d in drops:
        d.p = 0.0
    try:
        yield
    finally:
        for d, p in zip(drops, saved):
            d.p = p


def compare_gradients(jm: JaxModel, timm_model, images_nhwc: np.ndarray, labels: np.ndarray) -> list[LayerDiff]:
    """Per-tensor differences of cross-entropy gradients, timm autograd vs ``jax.grad``.

    Both sides run in training mode (with zero dropout rates and timm's fixed ``RelPosMlp``
    dropout off, the same function as evaluation); a distilled model follows ``jm.config.distilled_training`` on both sides.
    Rows: 'loss' first, then one per trained timm key (``named_parameters``) in ``state_dict``
    order; BatchNorm stays in evaluation mode on both sides and its running statistics (buffers)
    get no row (their JAX gradient must be exactly zero). A tensor only one side has is an error.
    """
    with _hard_coded_dropout_off(timm_model), same_rope_coord_aug(jm.spec) as rng:
        ref_loss, ref = timm_gradients(timm_model, images_nhwc, labels,
                                       distilled_training=jm.config.distilled_training)
        if getattr(jm.spec, "rel_pos_mlp_drop", 0.0):
            spec = dataclasses.replace(jm.spec, rel_pos_mlp_drop=0.0)
            jm = dataclasses.replace(jm, spec=spec, config=dataclasses.replace(jm.config, spec=spec))
        loss, ours = jax_gradients(jm, images_nhwc, labels, rng)
    if set(ours) != set(ref):
        raise ValueError(f"gradients for different tensors: only JAX {sorted(set(ours) - set(ref))}, "
                         f"only timm {sorted(set(ref) - set(ours))}")
    return [diff("loss", np.float64(loss), np.float64(ref_loss))] + [diff(k, ours[k], ref[k]) for k in ref]
