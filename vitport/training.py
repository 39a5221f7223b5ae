"""Fine-tuning with optax, following timm's conventions (``timm/optim``, ``train.py``).

- AdamW (``torch.optim.AdamW``: decoupled weight decay, eps outside the square root);
- no weight decay for tensors with ``ndim <= 1`` nor for the model's ``no_weight_decay()``
  names (ViT/DeiT: ``pos_embed``, ``cls_token``, ``reg_token``, ``dist_token``; CaiT:
  ``pos_embed``, ``cls_token``);
- layer-wise learning-rate decay as ``timm.optim.param_groups_layer_decay`` with the model's
  ``group_matcher`` (``layer_ids``): a tensor in layer ``i`` of ``n`` gets
  ``lr * layer_decay ** (n - 1 - i)``. timm multiplies the group's lr, so the decoupled weight
  decay is scaled too; so is it here;
- linear warm-up then cosine decay (``optax.warmup_cosine_decay_schedule``), per step;
- label smoothing (timm's ``LabelSmoothingCrossEntropy``), gradient clipping by global norm
  (timm's ``--clip-grad``), optional bfloat16 compute over float32 params, optional
  rematerialisation of the transformer blocks.

- BatchNorm (hybrid ResNet-D stems) stays in evaluation mode in training: its running statistics
  are frozen (no gradient, no weight decay, zero updates through a mask, ``frozen``).

Masks and scales are written once per timm key and mapped through the converter's canonical
tree (``timm_keyed_tree``), so they fit every front-end's params.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from converters import canonical_to_framework, stack_blocks
from converters.errors import InvalidArgumentError
from converters.keymap import FROZEN_KINDS, key_table
from converters.specs import CaiTSpec, Spec

from . import xla_options
from .api import JaxModel, input_dtype
from .structure import scanned_lists

# ------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class TrainConfig:
    """How to optimise: one frozen value handed to every function below.

    Attributes:
      total_steps: optimiser steps of the whole run (the cosine reaches ``min_lr`` there).
      lr: peak learning rate (after warm-up).
      warmup_steps: linear warm-up from ``warmup_lr`` to ``lr``.
      warmup_lr, min_lr: timm's ``--warmup-lr`` / ``--min-lr``.
      weight_decay: AdamW's decoupled decay (timm's ``--weight-decay``).
      layer_decay: timm's ``--layer-decay`` (None: every layer at ``lr``).
      label_smoothing: timm's ``--smoothing``.
      clip_grad: max global gradient norm (timm's ``--clip-grad``, mode 'norm'); None: off.
      betas, eps: Adam's.
      compute_dtype: e.g. "bfloat16": forward and backward in that dtype, params, optimizer
        state and the loss stay in the params' dtype.
      remat: rematerialise the forward pass, keeping only each block's output
        (``jax.checkpoint`` with a ``save_only_these_names`` policy). Same numbers; but on
        XLA:CPU it was measured to *raise* temporary memory (a 6-block, dim-192 ViT at batch 32:
        319 -> 367 MB), because the backward recomputes every block up front. Per-block remat
        inside each front-end (``nn.remat`` / ``hk.remat`` / ``nnx.remat``) is still to do.
    """

    total_steps: int
    lr: float = 5e-4
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float | None = None
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    compute_dtype: str | None = None
    remat: bool = False

    def __post_init__(self):
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise InvalidArgumentError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1; got "
                                       f"warmup_steps={self.warmup_steps}, total_steps={self.total_steps}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise InvalidArgumentError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise InvalidArgumentError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name, value, least in (("lr", self.lr, 0.0), ("warmup_lr", self.warmup_lr, 0.0),
                                   ("min_lr", self.min_lr, 0.0), ("weight_decay", self.weight_decay, 0.0)):
            if not (math.isfinite(value) and value >= least):  # NaN or a negative rate trains to garbage silently
                raise InvalidArgumentError(f"{name} must be a finite number of at least {least:g}, got {value}")
        if self.lr <= 0:
            raise InvalidArgumentError(f"lr must be positive, got {self.lr}")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad > 0):
            raise InvalidArgumentError(f"clip_grad must be a positive number (or None: no clipping), got "
                                       f"{self.clip_grad}")


# ------------------------------------------------------------------ timm's param groups

# timm's ``no_weight_decay()`` per model class.
NO_WEIGHT_DECAY = {"vit": ("pos_embed", "cls_token", "reg_token", "dist_token"), "cait": ("pos_embed", "cls_token"),
                   "eva": ("pos_embed", "cls_token", "reg_token", "rope.*"), "relpos": ("cls_token",)}

# timm's MATCH_PREV_GROUP: an ordinal ending in it joins the group before (ViT's final norm).
MATCH_PREV_GROUP = 99999.0

# ``group_matcher()`` of VisionTransformer, VisionTransformerDistilled and Eva (the same as
# VisionTransformer's), regex for regex. VisionTransformerRelPos's stem ``^cls_token|patch_embed``
# matches the same of its keys; its ``shared_rel_pos.*`` match nothing: the last group, as in timm.
_VIT_STEM = re.compile(r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre")
_DEIT_STEM = re.compile(r"^cls_token|pos_embed|patch_embed|dist_token")
_BLOCK = re.compile(r"^blocks\.(\d+)")
_FINAL_NORM = re.compile(r"^norm")


def _vit_ordinal(spec: Spec, name: str) -> tuple[float, ...]:
    if (_DEIT_STEM if getattr(spec, "distilled", False) else _VIT_STEM).match(name):
        return (0.0,)
    if m := _BLOCK.match(name):
        return (1.0, float(m.group(1)))
    if _FINAL_NORM.match(name):
        return (1.0, MATCH_PREV_GROUP)
    return (math.inf,)  # un-matched (fc_norm, attn_pool, heads): the last group


def _cait_ordinal(spec: CaiTSpec, name: str) -> tuple[float, ...]:
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return (0.0,)
    if name.startswith("blocks."):
        return (float(name.split(".")[1]) + 1,)
    if name.startswith("blocks_token_only."):  # overlaps the class-attention blocks with the last blocks
        return (float(name.split(".")[1]) + spec.depth - spec.cls_depth + 1,)
    if name.startswith("norm."):
        return (float(spec.depth),)
    return (math.inf,)


def layer_ids(spec: Spec) -> dict[str, int]:
    """timm key -> layer id, as ``timm.models.group_parameters(model, model.group_matcher(),
    reverse=True)`` computes it: sort the matcher's ordinals and number them consecutively."""
    ordinal = _cait_ordinal if isinstance(spec, CaiTSpec) else _vit_ordinal
    keys = [e.timm_key for e in key_table(spec) if e.kind not in FROZEN_KINDS]  # timm's named_parameters
    ordinals = {k: ordinal(spec, k) for k in keys}
    ids, lid = {}, -1
    for o in sorted(set(ordinals.values())):
        if lid < 0 or o[-1] != MATCH_PREV_GROUP:
            lid += 1
        ids[o] = lid
    return {k: ids[ordinals[k]] for k in keys}


def lr_scales(spec: Spec, layer_decay: float | None) -> dict[str, float]:
    """timm key -> learning-rate multiplier (``param_groups_layer_decay``'s ``lr_scale``)."""
    ids = layer_ids(spec)
    if layer_decay is None:
        return {k: 1.0 for k in ids}
    top = max(ids.values())
    return {k: layer_decay ** (top - i) for k, i in ids.items()}


def decays(spec: Spec) -> dict[str, bool]:
    """timm key -> whether AdamW decays it (not 1-D tensors, not ``no_weight_decay()``); over timm's
    parameters (frozen BatchNorm statistics are not among them)."""
    names = NO_WEIGHT_DECAY[spec.family]
    return {e.timm_key: len(e.timm_shape) > 1 and not any(fnmatch.fnmatch(e.timm_key, n) for n in names)
            for e in key_table(spec) if e.kind not in FROZEN_KINDS}


def frozen(spec: Spec) -> dict[str, bool]:
    """timm key -> whether it is frozen: BatchNorm running statistics (buffers in timm, held in
    vitport's params, see ``converters.keymap.FROZEN_KINDS``) never change in fine-tuning."""
    return {e.timm_key: e.kind in FROZEN_KINDS for e in key_table(spec)}


def timm_keyed_tree(jm: JaxModel, values: Mapping[str, Any], frozen_value: Any = False) -> Any:
    """A tree shaped like ``jm.params`` from one value per timm key (through the canonical tree);
    frozen tensors without a value (BatchNorm statistics: not timm parameters) get ``frozen_value``."""
    canonical = {e.key: values[e.timm_key] if e.kind not in FROZEN_KINDS else values.get(e.timm_key, frozen_value)
                 for e in key_table(jm.spec)}
    tree = canonical_to_framework(canonical, jm.spec, jm.framework)
    if not jm.config.scan_blocks:
        return tree
    return stack_blocks(tree, jm.spec, jm.framework, scanned_lists(jm.config), stack=_per_block_values)


def _per_block_values(values: list[Any]) -> Any:
    """One value per block for a stacked tensor (``set_scan_blocks``): a mask must hold for every
    block alike (one leaf masks the whole tensor); numbers become a ``(blocks,)`` array that
    ``_scale_by_tree`` applies slice by slice."""
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        if len(set(values)) > 1:
            raise InvalidArgumentError(f"a stacked block tensor needs one mask value for all its blocks; got {values}")
        return values[0]
    return np.asarray(values)


# ---------------------------------------------------------------------------- optimizer


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up, then cosine to ``min_lr`` at ``total_steps``; computed in the default
    float dtype (float64 under x64), not in the int32 step counter's float32."""
    if cfg.warmup_steps == cfg.total_steps:  # the run is all warm-up (timm never reaches its cosine then)
        schedule = optax.linear_schedule(cfg.warmup_lr, cfg.lr, cfg.warmup_steps)
    else:
        schedule = optax.warmup_cosine_decay_schedule(cfg.warmup_lr if cfg.warmup_steps else cfg.lr, cfg.lr,
                                                      cfg.warmup_steps, cfg.total_steps, cfg.min_lr)
    return lambda count: schedule(jnp.asarray(count, jnp.result_type(float)))


def _scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiply each update by its scale; a ``(blocks,)`` scale of a stacked tensor, slice by slice."""
    def scale(u, s):
        s = jnp.asarray(s, u.dtype)
        return u * s.reshape(s.shape + (1,) * (u.ndim - s.ndim))

    return optax.stateless(lambda updates, params: jax.tree.map(scale, updates, scales))


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """``torch.nn.utils.clip_grad_norm_`` (timm's ``--clip-grad``): scale by
    ``min(1, max_norm / (norm + 1e-6))`` (optax's ``clip_by_global_norm`` has no 1e-6)."""
    def clip(updates, params=None):
        coef = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates)

    return optax.stateless(clip)


def optimizer(jm: JaxModel, cfg: TrainConfig) -> optax.GradientTransformation:
    """timm's AdamW with its param groups, for ``jm``'s params in its own framework."""
    parts = [clip_grad_norm(cfg.clip_grad)] if cfg.clip_grad else []
    parts += [optax.scale_by_adam(*cfg.betas, eps=cfg.eps),
              optax.add_decayed_weights(cfg.weight_decay, mask=timm_keyed_tree(jm, decays(jm.spec))),
              optax.scale_by_learning_rate(lr_schedule(cfg))]
    if cfg.layer_decay is not None:
        parts.append(_scale_by_tree(timm_keyed_tree(jm, lr_scales(jm.spec, cfg.layer_decay), 0.0)))
    fixed = frozen(jm.spec)
    if any(fixed.values()):  # BatchNorm running statistics: no update at all (their gradient is 0 too)
        parts.append(optax.masked(optax.set_to_zero(), timm_keyed_tree(jm, fixed)))
    return optax.chain(*parts)


# -------------------------------------------------------------------------------- loss


def classification_loss(output: Any, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy with timm's label smoothing (``(1 - s) * nll + s * mean(-log p)``).

    ``output`` may be a distilled DeiT's ``(logits, logits_dist)`` (distilled training): then
    the mean of both heads' losses, each against ``labels`` (DeiT's hard-label objective with
    the labels standing in for the teacher's).
    """
    if isinstance(output, tuple):
        return sum(classification_loss(o, labels, smoothing) for o in output) / len(output)
    logits = output.astype(jnp.promote_types(output.dtype, jnp.float32))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


# --------------------------------------------------------------------------- train step


@functools.lru_cache(maxsize=8)
def _cached_trainer(config: Any, framework: str, cfg: TrainConfig) -> "Trainer":
    return Trainer(JaxModel(config.spec, framework, None, config=config), cfg)


def trainer_for(jm: JaxModel, cfg: TrainConfig) -> "Trainer":
    """A ``Trainer`` shared by runs with the same model structure and settings, so a second run
    (a resumed one, say) reuses the compiled steps."""
    return _cached_trainer(jm.config, jm.framework, cfg)


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly: a pytree (orbax saves it as it is)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key; step ``s`` draws from ``fold_in(rng, s)``


BLOCK_OUTPUT = "vitport_block"  # checkpoint_name of each block's output (vitport.structure)


class Trainer:
    """A jitted train step and eval step for one model and one ``TrainConfig``.

        trainer = Trainer(jm, TrainConfig(total_steps=1000, lr=1e-4, layer_decay=0.75))
        state = trainer.init(jm.params, seed=0)
        state, metrics = trainer.train_step(state, images, labels)   # metrics: loss, lr, grad_norm
        correct, losses = trainer.eval_step(state.params, images, labels)   # per example

    ``jm`` carries the dropout / stochastic-depth rates (``jm.config``); they run in
    ``train_step`` from the state's rng. A model with ``set_scan_blocks()`` trains its stacked
    blocks as one ``lax.scan`` (each step at its block's rate, with its own rng key, and
    ``layer_decay`` slice by slice): the step compiles once for any depth, 2-3x faster than block
    by block on a 2-core CPU, but its steps ran 0.77-1.02x as fast (``benchmarks/train_step.py``;
    ``benchmarks/README.md``, session 8).
    """

    def __init__(self, jm: JaxModel, cfg: TrainConfig):
        self.cfg = cfg  # holds no params: only structure (jm's config and framework) and settings
        self.tx = optimizer(jm, cfg)
        self.schedule = lr_schedule(cfg)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype) if cfg.compute_dtype else None
        self.model_config = jm.config
        apply = jm.front_end.apply(jm.config)

        def forward(params, images, rng):
            return apply(params, images, train=True, rng=rng)

        if cfg.remat:  # keep only the blocks' outputs; recompute inside each block when differentiating
            forward = jax.checkpoint(forward, policy=jax.checkpoint_policies.save_only_these_names(BLOCK_OUTPUT))
        self._forward, self._apply = forward, apply
        self.train_step = xla_options.jit(self._train_step, xla_options.for_model(jm, cfg.compute_dtype, gradients=True),
                                          donate_argnums=0)
        self.eval_step = xla_options.jit(self._eval_step, xla_options.for_model(jm, cfg.compute_dtype))

    def init(self, params: Any, seed: int = 0) -> TrainState:
        params = jax.tree.map(jnp.array, params)  # a copy: train_step donates the state's buffers
        return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), jax.random.PRNGKey(seed))

    def _cast(self, tree: Any) -> Any:
        if self.compute_dtype is None:
            return tree
        return jax.tree.map(lambda a: a.astype(self.compute_dtype), tree)

    def _input_dtype(self, params: Any) -> jnp.dtype:
        """Images as the model takes them (float32 under a bf16 ``matmul_dtype``), or in compute_dtype."""
        return self.compute_dtype or input_dtype(self.model_config, params)

    def loss(self, params: Any, images: jax.Array, labels: jax.Array, rng: jax.Array) -> jax.Array:
        output = self._forward(self._cast(params), images.astype(self._input_dtype(params)), rng)
        return classification_loss(output, labels, self.cfg.label_smoothing)

    def _train_step(self, state: TrainState, images: jax.Array, labels: jax.Array):
        rng = jax.random.fold_in(state.rng, state.step)
        loss, grads = jax.value_and_grad(self.loss)(state.params, images, labels, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "lr": self.schedule(state.step), "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    def _eval_step(self, params: Any, images: jax.Array, labels: jax.Array):
        """Per example, in evaluation mode: (correct, unsmoothed loss)."""
        logits = self._apply(self._cast(params), images.astype(self._input_dtype(params))).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.argmax(logits, -1) == labels, losses


def with_new_head(jm: JaxModel, num_classes: int, seed: int = 0) -> JaxModel:
    """``jm`` with its classifier replaced for ``num_classes``, everything else kept, as timm
    fine-tunes with another ``num_classes``: the new head (and ``head_dist``) is initialised by
    timm's ViT init (truncated normal std 0.02, zero bias)."""
    if not jm.spec.num_classes:
        raise InvalidArgumentError("this model has no classifier head (num_classes=0) to replace")
    spec = dataclasses.replace(jm.spec, num_classes=num_classes)
    tree = dict(jm.canonical())
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    for key, head in zip(keys, ("head", "head_dist")):
        if (head, "kernel") in tree:
            dtype = np.asarray(tree[head, "kernel"]).dtype
            tree[head, "kernel"] = jax.nn.initializers.truncated_normal(0.02)(key, (spec.dim, num_classes), dtype)
            tree[head, "bias"] = jnp.zeros((num_classes,), dtype)
    cfg = {k: v for k, v in jm.pretrained_cfg.items() if k not in ("label_names", "label_descriptions")}
    cfg["num_classes"] = num_classes
    return dataclasses.replace(jm, spec=spec, config=dataclasses.replace(jm.config, spec=spec),
                               params=canonical_to_framework(tree, spec, jm.framework), pretrained_cfg=cfg)


__all__ = ["TrainConfig", "TrainState", "Trainer", "trainer_for", "classification_loss", "decays", "frozen", "layer_ids", "lr_scales",
           "lr_schedule", "optimizer", "timm_keyed_tree", "with_new_head"]
