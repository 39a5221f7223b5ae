"""Checkpoint files in and out, framework-neutral: numpy arrays, no jax, torch only on demand.

Reading:

- ``.safetensors`` through ``safetensors`` with the numpy backend (no torch; bfloat16 comes
  back as ``ml_dtypes.bfloat16``). A truncated or corrupt file is refused with its name.
- ``.pth`` / ``.pt`` / ``.bin`` only through ``torch.load(weights_only=True)`` (torch is
  imported when such a file is read, never before). A pickle that holds anything but tensors
  and plain containers is refused by torch's safe unpickler before any of it runs; the error
  says so. Training checkpoints are unwrapped the way timm does it (``state_dict_ema``,
  ``model_ema``, ``state_dict``, ``model``; a leading ``module.`` from DataParallel), so the
  original DeiT / CaiT releases load as they are.

Reading timm's hub layout (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``):
``read_hub_config`` parses the config like ``timm.models._hub._parse_model_cfg`` and
``spec_from_hub_config`` turns it into a spec: vitport's architecture table gives the
factory's defaults, ``model_args`` override them with timm's keyword semantics, and every
keyword vitport does not implement is refused by name.

Writing is atomic: ``atomic_dir`` and ``atomic_file`` build the output next to its target and
move it into place with ``os.replace`` only once it is complete, so an error or an interrupt
(KeyboardInterrupt included) leaves the filesystem as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .architectures import arch_spec, pretrained_tag_cfg, split_name
from .errors import CheckpointError, MissingFileError, OutputExistsError
from .keymap import key_table
from .specs import Spec, spec_with_timm_kwargs

SAFETENSORS_EXTS = (".safetensors",)
TORCH_EXTS = (".pth", ".pt", ".bin", ".pth.tar", ".ckpt")
CHECKPOINT_EXTS = SAFETENSORS_EXTS + TORCH_EXTS
# timm's preference order inside a hub-layout folder (safetensors first).
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
# Keys of a training checkpoint that hold the weights, in timm's order (EMA first).
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
PREPROCESSING_KEYS = ("input_size", "mean", "std", "crop_pct", "crop_mode", "interpolation",
                      "num_classes", "label_names", "label_descriptions")

Progress = Callable[[int, int], None]  # (done, total)


# ----------------------------------------------------------------------------- reading


def is_checkpoint_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(CHECKPOINT_EXTS)


def read_state_dict(path: str | os.PathLike, *, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """A checkpoint file as ``{timm_key: numpy array}``, unwrapped; dtypes are kept."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no such checkpoint file: {path}")
    name = path.name.lower()
    if name.endswith(SAFETENSORS_EXTS):
        return read_safetensors(path, progress=progress)
    if name.endswith(TORCH_EXTS):
        return _read_torch(path, progress=progress)
    raise CheckpointError(f"{path}: unknown checkpoint format; vitport reads "
                          f"{', '.join(CHECKPOINT_EXTS)} files (and hub-layout folders)")


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid safetensors file ({err}); it is truncated or corrupt. "
        f"Download or copy it again (for hub files, delete it from the Hugging Face cache first).")


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """``({key: (shape, dtype)}, metadata)`` of a safetensors file, without reading the data."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            info = {}
            for k in f.keys():
                s = f.get_slice(k)
                info[k] = (tuple(int(n) for n in s.get_shape()), str(s.get_dtype()))
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _corrupt(path, e) from None
    return info, meta


def read_safetensors(path: str | os.PathLike, *, progress: Progress | None = None) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            for i, k in enumerate(keys):
                out[k] = f.get_tensor(k)
                if progress:
                    progress(i + 1, len(keys))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _corrupt(path, e) from None
    return out


def _read_torch(path: Path, *, progress: Progress | None = None) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install 'vitport[torch]'). "
            "Without torch, convert a .safetensors file or a hub-layout folder instead.") from None
    import pickle

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickler_reason(str(e))
        if "global" in detail.lower():
            raise CheckpointError(
                f"refused to read {path}: it holds pickled Python objects, not just tensors "
                f"({detail}). vitport reads .pth/.bin files only with torch.load(weights_only=True), "
                "which stopped before running any of it: nothing in the file was executed. If you trust "
                "the file, extract its state_dict yourself and save it with safetensors.") from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({detail}): it is corrupt, truncated, or a "
            "pickle that torch's safe loader does not accept. Nothing in it was executed.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}); it is corrupt "
                              "or truncated. Nothing in it was executed.") from None
    state_dict, _ = unwrap_state_dict(obj, source=str(path))
    out = {}
    for i, (k, v) in enumerate(state_dict.items()):
        out[k] = torch_to_numpy(v)
        if progress:
            progress(i + 1, len(state_dict))
    return out


def _unpickler_reason(msg: str) -> str:
    for line in msg.splitlines():
        if "WeightsUnpickler error:" in line:
            reason = line.split("WeightsUnpickler error:", 1)[1].strip()
            if reason:
                return reason.split(". Please use")[0].strip()
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):  # the reason can sit on the line after the marker
        if ln.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else "unpickling failed"


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, keeping its dtype (bfloat16 through ml_dtypes)."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"not a tensor: {type(t).__name__}")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> tuple[dict[str, Any], str | None]:
    """A training checkpoint's weights: ``(state_dict, wrapper key or None)``.

    Follows timm's ``load_state_dict`` + ``clean_state_dict``: EMA weights first, then
    ``state_dict``, then ``model``; a leading ``module.`` is dropped from every key.
    """
    wrapper = None
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj, wrapper = obj[key], key
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a state_dict")
    non_tensors = [str(k) for k, v in obj.items() if not hasattr(v, "shape")]
    if non_tensors:
        raise CheckpointError(f"{source}: not a state_dict; these entries are not tensors: "
                              + ", ".join(non_tensors[:20]) + (" ..." if len(non_tensors) > 20 else ""))
    out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}
    return out, wrapper


# ------------------------------------------------------------------- timm hub layout


def find_weights(folder: str | os.PathLike) -> Path:
    """The weights file of a hub-layout folder, in timm's order of preference."""
    folder = Path(folder)
    for name in HUB_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise MissingFileError(f"{folder} holds none of {', '.join(HUB_WEIGHT_FILES)} "
                            "(a hub-layout folder has config.json and model.safetensors)")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_hub_config(cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, pretrained_cfg, model_args)`` of a timm hub ``config.json``.

    Mirrors ``timm.models._hub._parse_model_cfg`` (legacy single-dict configs included).
    """
    cfg = json.loads(json.dumps(cfg))  # deep copy
    if "pretrained_cfg" not in cfg:
        pretrained_cfg = cfg
        if "architecture" not in pretrained_cfg:
            raise CheckpointError("config.json has no 'architecture' entry: not a timm hub config")
        cfg = {"architecture": pretrained_cfg.pop("architecture"), "pretrained_cfg": pretrained_cfg}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
    if "architecture" not in cfg:
        raise CheckpointError("config.json has no 'architecture' entry: not a timm hub config")
    pretrained_cfg = dict(cfg["pretrained_cfg"] or {})
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in cfg:
            pretrained_cfg[key] = cfg[key]
    model_args = dict(cfg.get("model_args") or {})
    return cfg["architecture"], pretrained_cfg, model_args


def preprocessing(pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a pretrained_cfg that say how to feed the model (JSON-ready)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in pretrained_cfg.items()
            if k in PREPROCESSING_KEYS and v is not None}


def spec_from_hub_config(cfg: Mapping[str, Any], *, where: str = "config.json") -> tuple[str, Spec, dict[str, Any], dict[str, Any]]:
    """``(architecture, spec, pretrained_cfg, model_args)`` of a timm hub ``config.json``.

    The spec is what ``timm.create_model('local-dir:...')`` would build: the factory's
    defaults, then ``num_classes``/``in_chans``/``img_size`` from the pretrained_cfg, then
    ``model_args``.
    """
    arch, pretrained_cfg, model_args = read_hub_config(cfg)
    arch, _ = split_name(arch)
    spec = arch_spec(arch)
    kw: dict[str, Any] = {}
    if pretrained_cfg.get("num_classes") is not None and pretrained_cfg["num_classes"] >= 0:
        kw["num_classes"] = pretrained_cfg["num_classes"]
    input_size = pretrained_cfg.get("input_size")
    if input_size is not None:
        kw["in_chans"] = input_size[0]
        if pretrained_cfg.get("fixed_input_size", False):
            kw["img_size"] = tuple(input_size[-2:])
    kw.update(model_args)
    spec = spec_with_timm_kwargs(spec, kw, where=where)
    return arch, spec, pretrained_cfg, model_args


def spec_for_arch(name: str, model_args: Mapping[str, Any] | None = None) -> tuple[str, Spec, dict[str, Any]]:
    """``(architecture, spec, pretrained_cfg)`` of a timm name (``arch[.tag]``) plus timm kwargs."""
    arch, _ = split_name(name)
    spec = arch_spec(name)
    if model_args:
        spec = spec_with_timm_kwargs(spec, model_args, where="model_args")
    cfg = {k: v for k, v in pretrained_tag_cfg(name).items() if k != "hf_hub_id"}
    return arch, spec, sync_preprocessing(cfg, spec)


def sync_preprocessing(cfg: Mapping[str, Any], spec: Spec) -> dict[str, Any]:
    """Preprocessing that agrees with a spec changed by timm kwargs: input size and classes
    (label names go when the number of classes changes)."""
    cfg = dict(cfg)
    cfg["input_size"] = [spec.channels, *spec.image_size]
    if cfg.get("num_classes") != spec.num_classes:
        for key in ("label_names", "label_descriptions"):
            cfg.pop(key, None)
        cfg["num_classes"] = spec.num_classes
    return cfg


def check_shapes(shapes: Mapping[str, tuple[int, ...]], spec: Spec) -> dict[str, list[str]]:
    """Missing / unexpected / misshapen keys of a timm state_dict's shapes (no data needed)."""
    expected = {e.timm_key: e.timm_shape for e in key_table(spec)}
    return {
        "missing keys": [k for k in expected if k not in shapes],
        "unexpected keys": [k for k in shapes if k not in expected],
        "wrong shapes": [f"{k}: {tuple(shapes[k])}, {expected[k]} expected" for k in expected
                         if k in shapes and tuple(shapes[k]) != expected[k]],
    }


# ----------------------------------------------------------------------------- writing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output path unless ``force``; make sure its parent exists."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError(f"{path} already exists; refusing to overwrite it "
                                "(pass --force / force=True to replace it)")
    if path.parent and not path.parent.exists():
        raise MissingFileError(f"the folder {path.parent} does not exist")
    return path


def _commit(tmp: Path, target: Path, force: bool) -> None:
    """Move a finished ``tmp`` onto ``target``; an existing target is replaced only if ``force``."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target) if tmp.is_file() else os.rename(tmp, target)
        return
    if not force:
        raise OutputExistsError(f"{target} already exists; refusing to overwrite it "
                                "(pass --force / force=True to replace it)")
    if tmp.is_file() and not target.is_dir():
        os.replace(tmp, target)  # atomic for files
        return
    # Directories cannot be replaced in one step: move the old one aside, swap, then delete it.
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    backup.rmdir()
    os.rename(target, backup)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(backup, target)
        raise
    _remove(backup)


@contextlib.contextmanager
def _staged(tmp: Path, target: Path, force: bool) -> Iterator[Path]:
    """Yield ``tmp``; commit it to ``target`` on success, delete it on any exception."""
    try:
        yield tmp
        _commit(tmp, target, force)
    except BaseException:  # KeyboardInterrupt too: never leave a partial output
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``target``; on success it becomes ``target``.

    On any exception (KeyboardInterrupt included) the temporary folder is deleted and
    ``target`` is left as it was.
    """
    target = check_output(target, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent or "."))
    with _staged(tmp, target, force) as staged:
        yield staged


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``target``; on success it replaces ``target``."""
    target = check_output(target, force)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent or ".")
    os.close(fd)
    with _staged(Path(name), target, force) as staged:
        yield staged


def _contiguous(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}


def write_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy-convertible arrays (bfloat16 included) to a safetensors file (not atomic)."""
    from safetensors.numpy import save_file

    save_file(_contiguous(tensors), str(path), metadata=dict(metadata) if metadata else None)


def write_safetensors_atomic(tensors: Mapping[str, Any], path: str | os.PathLike, *, force: bool = False,
                             metadata: Mapping[str, str] | None = None) -> Path:
    """``write_safetensors`` through ``atomic_file``: all or nothing."""
    with atomic_file(path, force) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return Path(path)


def write_json(data: Any, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
