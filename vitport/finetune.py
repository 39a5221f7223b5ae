"""``vitport finetune``: fine-tune a converted timm model on an image folder, resumably.

Data: the ImageFolder layout, ``DATA_DIR/train/<class>/*`` and ``DATA_DIR/val/<class>/*``;
classes are the sorted folder names of ``train`` (timm's / torchvision's ``ImageFolder``).
Training images get timm's default training augmentation (``RandomResizedCrop`` with scale
(0.08, 1) and ratio (3/4, 4/3) in the checkpoint's interpolation, horizontal flip,
normalisation), in Pillow + numpy; validation images timm's evaluation transform
(``vitport.preprocess``).

Work in progress lives in ``OUT.partial/`` next to ``OUT``: orbax checkpoints of the training
state after every epoch (``checkpoints/``), the best model so far (``best/``) and the run's
settings (``run.json``). ``--resume`` restores the latest checkpoint and continues exactly
(the data order and augmentation of each epoch, and the dropout of each step, are functions
of the seed). When the run ends, ``best/`` (a vitport folder with the label names in its
``pretrained_cfg``, plus ``training.json``) is renamed to ``OUT``: ``OUT`` appears only
complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from converters.checkpoint_io import write_json
from converters.errors import InvalidArgumentError, MissingFileError, OutputExistsError, VitportError

from .api import JaxModel
from .preprocess import PIL_FILTERS, EvalTransform, ImageError, image_name, load_image

# timm.data.readers.img_extensions.IMG_EXTENSIONS
IMG_EXTENSIONS = (".png", ".jpg", ".jpeg")
PARTIAL_SUFFIX = ".partial"
HISTORY_NAME = "training.json"


class DataError(VitportError, ValueError):
    """The image folder cannot be used for training (missing split, empty class, bad image)."""


class DivergedError(VitportError, ArithmeticError):
    """The loss became NaN or infinite: what the epoch learnt is not kept."""


# ------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one run (``vitport finetune``'s options). Stored in ``run.json``; a
    resumed run must use the same ones."""

    epochs: int = 10
    lr: float = 5e-4
    batch_size: int = 32
    layer_decay: float | None = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    drop_path_rate: float = 0.0
    img_size: int | tuple[int, int] | None = None
    framework: str | None = None
    compute_dtype: str | None = None
    remat: bool = False
    scan_blocks: bool = False  # train the blocks as one lax.scan (JaxModel.set_scan_blocks)
    seed: int = 0
    workers: int = 4
    shard: str | None = None  # a ``vitport.sharding`` strategy over every local device; None: one device

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 1:
            raise InvalidArgumentError("epochs, batch size and workers must be at least 1")
        if not (math.isfinite(self.drop_path_rate) and 0 <= self.drop_path_rate < 1):
            raise InvalidArgumentError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.shard not in (None, "dp", "fsdp", "tp"):
            raise InvalidArgumentError(f"shard must be dp, fsdp or tp (or None for one device); got {self.shard!r}")


# -------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class ImageFolder:
    """One split: ``(path, class index)`` samples, sorted by class then file name."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def scan_split(data_dir: Path, split: str, classes: Sequence[str] | None = None) -> ImageFolder:
    """Read ``data_dir/split/<class>/*``; every class folder must hold images, and ``val``'s
    classes must be ``train``'s. Each image's header is opened, so an unreadable file is
    reported before training starts."""
    root = data_dir / split
    if not root.is_dir():
        raise DataError(f"{data_dir} has no {split}/ folder: expected {data_dir}/train/<class>/* and "
                        f"{data_dir}/val/<class>/* (the ImageFolder layout)")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{root} holds no class folders: expected {root}/<class>/<image>")
    if classes is not None and found != list(classes):
        raise DataError(f"{root} has classes {found}, but train/ has {list(classes)}: both splits need the "
                        "same class folders")
    samples = []
    for index, name in enumerate(found):
        files = _images_in(root / name)
        if not files:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
        for path in files:
            _check_header(path)
            samples.append((path, index))
    return ImageFolder(root, tuple(found), tuple(samples))


def _check_header(path: Path) -> None:
    try:
        with Image.open(path):
            pass
    except Exception as e:  # Pillow raises many types for unreadable files
        raise DataError(f"{path}: not an image Pillow can read ({type(e).__name__}: {e}); remove it or "
                        "replace it") from None


@dataclass(frozen=True)
class TrainTransform:
    """timm's default training transform: RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)),
    RandomHorizontalFlip(0.5), ToTensor, Normalize, with torchvision's sampling rules."""

    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """torchvision ``RandomResizedCrop.get_params``: ``(left, top, w, h)``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
        in_ratio = width / height  # fallback: the central crop with the ratio clamped
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        left, top, w, h = self.crop_box(img.width, img.height, rng)
        size = (self.input_size[1], self.input_size[0])
        # Crop, then resize, as torchvision's resized_crop (resize(box=...) would filter across the box edge).
        img = img.crop((left, top, left + w, top + h)).resize(size, PIL_FILTERS[self.interpolation])
        x = np.asarray(img, np.float32) / np.float32(255)
        if rng.random() < 0.5:
            x = x[:, ::-1]
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def _load(path: Path) -> Image.Image:
    try:
        return load_image(path)
    except ImageError as e:
        raise DataError(str(e)) from None


class Batches:
    """Batches of one split, loaded by a thread pool (Pillow releases the GIL while decoding
    and resizing) one batch ahead."""

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers)  # images
        # Whole batches are assembled in a pool of their own: a batch job waits on its images, and
        # in the images' pool it would hold a worker they need (with one worker: forever).
        self.batches = ThreadPoolExecutor(1)

    def close(self) -> None:
        self.batches.shutdown(cancel_futures=True)
        self.pool.shutdown(cancel_futures=True)

    def train(self, data: ImageFolder, transform: TrainTransform, cfg: FinetuneConfig,
              epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shuffled full batches (timm drops the last partial one); order and augmentation are
        functions of ``(seed, epoch)`` only, so a resumed run sees the same batches."""
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data.samples))
        steps = len(order) // cfg.batch_size

        def item(i: int) -> np.ndarray:
            path, _ = data.samples[i]
            return transform(_load(path), np.random.default_rng([cfg.seed, epoch, int(i)]))

        def batch(s: int):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            return (np.stack(list(self.pool.map(item, idx))),
                    np.asarray([data.samples[i][1] for i in idx], np.int32))

        yield from self._ahead(batch, steps)

    def eval(self, data: ImageFolder, transform: EvalTransform,
             batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        """Batches padded to ``batch_size`` (one compiled shape); the int is the real count."""
        n = len(data.samples)

        def item(i: int) -> np.ndarray:
            path, _ = data.samples[i]
            return transform(_load(path), image_name(path))

        def batch(s: int):
            idx = list(range(s * batch_size, min(n, (s + 1) * batch_size)))
            x = np.stack(list(self.pool.map(item, idx)))
            y = np.asarray([data.samples[i][1] for i in idx], np.int32)
            pad = batch_size - len(idx)
            return np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]), np.pad(y, (0, pad)), len(idx)

        yield from self._ahead(batch, -(-n // batch_size))

    def _ahead(self, batch: Callable[[int], Any], steps: int) -> Iterator[Any]:
        pending = self.batches.submit(batch, 0) if steps else None
        for s in range(steps):
            current = pending.result()
            pending = self.batches.submit(batch, s + 1) if s + 1 < steps else None
            yield current


# --------------------------------------------------------------------------------- run


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    images_per_second: float


# progress(event, **info): "epoch" (epoch, steps), "step" (loss, images_per_second), "val", "done"
Progress = Callable[..., None]


# Settings that change how fast a run goes, not what it computes: --resume may change them.
SPEED_ONLY_SETTINGS = ("workers",)


def _run_settings(source: str, cfg: FinetuneConfig, classes: Sequence[str]) -> dict[str, Any]:
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SPEED_ONLY_SETTINGS}
    settings = {"source": str(source), "config": config, "classes": list(classes)}
    return json.loads(json.dumps(settings))  # as run.json holds them (tuples become lists)


def load_for_finetuning(source: str | os.PathLike, cfg: FinetuneConfig, num_classes: int) -> JaxModel:
    """The model to fine-tune: loaded (pos_embed resampled to ``img_size``), float32, a new
    head for ``num_classes``, the run's stochastic depth, and its blocks scanned (weights
    stacked) with ``scan_blocks``."""
    from .hub import load
    from .training import with_new_head

    jm = load(source, cfg.framework, image_size=cfg.img_size, dtype="float32")
    jm = with_new_head(jm, num_classes, seed=cfg.seed)
    jm = dataclasses.replace(jm, config=dataclasses.replace(jm.config, layer_dropout=cfg.drop_path_rate))
    return jm.set_scan_blocks(cfg.scan_blocks)


def _placement(jm: JaxModel, cfg: FinetuneConfig) -> tuple[Callable[..., tuple], JaxModel]:
    """``(to_devices, trained)``: the model to train (``jm`` sharded by ``cfg.shard``: params and
    so the optimizer state split by the strategy) and ``to_devices(*host_arrays)``, which puts a
    batch where the train step wants it (split over the mesh's ``data`` axis when sharded)."""
    import jax

    if not cfg.shard:
        return (lambda *arrays: arrays), jm
    from jax.sharding import NamedSharding, PartitionSpec

    from .sharding import DATA

    if jax.process_count() > 1:
        raise InvalidArgumentError("finetune --shard runs in one process over its local devices; multi-process "
                                   "fine-tuning is not supported (use embed / predict for multi-process jobs)")
    sharded = jm.shard(strategy=cfg.shard)
    if cfg.batch_size % sharded.data_size:
        raise InvalidArgumentError(f"--batch-size {cfg.batch_size} does not split over the {sharded.data_size} "
                                   f"devices of the '{DATA}' axis of --shard {cfg.shard}; use a multiple of "
                                   f"{sharded.data_size}")
    batch = NamedSharding(sharded.mesh, PartitionSpec(DATA))
    return (lambda *arrays: tuple(jax.device_put(a, batch) for a in arrays)), sharded


def finetune(source: str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike,
             cfg: FinetuneConfig = FinetuneConfig(), *, resume: bool = False,
             progress: Progress | None = None) -> Path:
    """Fine-tune ``source`` on ``data_dir``; returns ``out`` (a vitport folder of the model with
    the best validation accuracy). See the module docstring for the folders it uses."""
    import jax
    import orbax.checkpoint as ocp

    from .hub import save
    from .images import eval_transform
    from .training import TrainConfig, trainer_for

    progress = progress or (lambda event, **info: None)
    out, data_dir = Path(out), Path(data_dir)
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose another --out or remove it")
    if not data_dir.is_dir():
        raise MissingFileError(f"no such data folder: {data_dir}")
    if partial.exists() and not resume:
        raise OutputExistsError(f"{partial} holds an interrupted run; pass --resume to continue it, or remove it")
    if resume and not partial.exists():
        raise MissingFileError(f"nothing to resume: {partial} does not exist")

    train_data = scan_split(data_dir, "train")
    val_data = scan_split(data_dir, "val", train_data.classes)
    steps_per_epoch = len(train_data.samples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise DataError(f"{train_data.root} has {len(train_data.samples)} images, fewer than one batch of "
                        f"{cfg.batch_size}; lower --batch-size")
    settings = _run_settings(source, cfg, train_data.classes)
    jm = load_for_finetuning(source, cfg, len(train_data.classes))
    jm.pretrained_cfg["label_names"] = list(train_data.classes)
    template = jm  # unsharded: the best params are saved through it
    to_devices, jm = _placement(jm, cfg)
    if resume:
        before = json.loads((partial / "run.json").read_text())
        for key in SPEED_ONLY_SETTINGS:  # run.json of runs before they were left out
            before.get("config", {}).pop(key, None)
        if before != settings:
            changed = sorted(k for k in settings["config"] if before["config"].get(k) != settings["config"][k])
            raise InvalidArgumentError(f"--resume needs the interrupted run's settings; these differ: "
                                       f"{', '.join(changed) or 'source or classes'} (see {partial / 'run.json'})")
    else:
        partial.mkdir(parents=True)
        write_json(settings, partial / "run.json")

    total = steps_per_epoch * cfg.epochs
    trainer = trainer_for(jm, TrainConfig(
        total_steps=total, lr=cfg.lr, warmup_steps=min(total, round(cfg.warmup_epochs * steps_per_epoch)),
        weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay, label_smoothing=cfg.label_smoothing,
        clip_grad=cfg.clip_grad, compute_dtype=cfg.compute_dtype, remat=cfg.remat))
    state = trainer.init(jm.params, cfg.seed)
    ts = eval_transform(jm)
    train_transform = TrainTransform(ts.input_size, ts.mean, ts.std, ts.interpolation)

    checkpoints = ocp.CheckpointManager((partial / "checkpoints").absolute(),
                                        options=ocp.CheckpointManagerOptions(max_to_keep=1))
    history: list[dict[str, Any]] = []
    best, start = -1.0, 0
    if resume and checkpoints.latest_step() is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)  # keeps each array's sharding
        restored = checkpoints.restore(checkpoints.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state, history = restored.state, restored.meta["history"]
        best, start = restored.meta["best"], restored.meta["epoch"] + 1

    batches = Batches(cfg.workers)
    try:
        for epoch in range(start, cfg.epochs):
            progress("epoch", epoch=epoch, epochs=cfg.epochs, steps=steps_per_epoch)
            losses, t0 = [], time.perf_counter()
            for step, (x, y) in enumerate(batches.train(train_data, train_transform, cfg, epoch)):
                state, metrics = trainer.train_step(state, *to_devices(x, y))
                losses.append(metrics["loss"])
                if step % 10 == 0 or step == steps_per_epoch - 1:  # reading the loss waits for the step
                    rate = (step + 1) * cfg.batch_size / (time.perf_counter() - t0)
                    progress("step", step=step + 1, loss=float(metrics["loss"]), images_per_second=rate)
            rate = steps_per_epoch * cfg.batch_size / (time.perf_counter() - t0)
            correct = loss_sum = 0.0
            progress("val", images=len(val_data.samples))
            for x, y, n in batches.eval(val_data, ts, cfg.batch_size):
                c, l = jax.device_get(trainer.eval_step(state.params, *to_devices(x, y)))
                correct, loss_sum = correct + float(c[:n].sum()), loss_sum + float(l[:n].sum())  # no padding
            result = EpochResult(epoch, float(np.mean(jax.device_get(losses))), loss_sum / len(val_data.samples),
                                 correct / len(val_data.samples), rate)
            if not (math.isfinite(result.train_loss) and math.isfinite(result.val_loss)):
                raise DivergedError(
                    f"the loss became {result.train_loss} (train) / {result.val_loss} (validation) in epoch "
                    f"{epoch + 1}: training diverged (a learning rate of {cfg.lr:g} may be too high). Nothing of "
                    f"this epoch was saved; run again with a lower --lr (a new --out)")
            history.append(dataclasses.asdict(result))
            if result.val_accuracy > best:
                best = result.val_accuracy
                save(template.with_params(jax.device_get(state.params)), partial / "best", force=True,
                     source=str(source))
            checkpoints.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
                {"epoch": epoch, "best": best, "history": history})))
            checkpoints.wait_until_finished()
            progress("epoch_done", result=result, best=best)
    finally:
        batches.close()
        checkpoints.close()

    write_json({"settings": settings, "history": history, "best_val_accuracy": best}, partial / "best" / HISTORY_NAME)
    os.replace(partial / "best", out)  # the finished folder appears in one rename
    shutil.rmtree(partial)
    return out
