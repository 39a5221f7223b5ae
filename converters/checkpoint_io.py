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

Writing is ``converters.writer``'s job (atomic, signal-safe; re-exported here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .architectures import arch_spec, pretrained_tag_cfg, split_name
from .errors import CheckpointError, MissingFileError, OutputExistsError  # noqa: F401  (re-exported)
from .keymap import key_table
from .specs import Spec, spec_with_timm_kwargs
from .validate import check_pretrained_cfg, check_timm_kwargs

SAFETENSORS_EXTS = (".safetensors",)
TORCH_EXTS = (".pth", ".pt", ".bin", ".pth.tar", ".ckpt")
CHECKPOINT_EXTS = SAFETENSORS_EXTS + TORCH_EXTS
# timm's preference order inside a hub-layout folder (safetensors first).
# Sharded checkpoints name their index (``converters.sharded``) instead of one file.
HUB_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "pytorch_model.pth", "model.pth")
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
    if name.endswith(".index.json"):  # a sharded checkpoint, read shard by shard
        from .sharded import read_sharded

        return read_sharded(path, progress)
    if name.endswith(SAFETENSORS_EXTS):
        return strip_wrapper_prefixes(read_safetensors(path, progress=progress))
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
        if "global" in detail.lower():  # the safe unpickler refused a Python object: a safety refusal
            raise CheckpointError(
                f"refused to read {path}: it holds pickled Python objects, not just tensors "
                f"({detail}). vitport reads .pth/.bin files only with torch.load(weights_only=True), "
                "whose safe unpickler stopped before running any of it: nothing in the file was executed. "
                "If the file comes from someone you trust, ask them for a .safetensors copy, or extract "
                "its state_dict in a separate, trusted environment and save it with safetensors.") from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: torch's safe unpickler "
            f"(torch.load(weights_only=True)) stopped at '{detail}'. Either the "
            "file is not a PyTorch checkpoint (damaged, truncated, or another format) or it uses pickle "
            "instructions the safe unpickler does not allow; nothing in it was executed. Check the file "
            "(re-download or re-export it, preferably as .safetensors).") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - torch's readers raise anything on foreign bytes (KeyError, IndexError...)
        if isinstance(e, FileNotFoundError):
            raise MissingFileError(f"no such checkpoint file: {path}") from None
        first = str(e).splitlines()[0] if str(e) else "no detail"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {first}): "
                              "torch.load(weights_only=True) could not parse it, so it is truncated, damaged "
                              "or not a checkpoint. Nothing in it was executed; re-download or re-export "
                              "it.") from None
    state_dict, _ = unwrap_state_dict(obj, source=str(path))
    out = {}
    for i, (k, v) in enumerate(state_dict.items()):
        try:
            out[k] = torch_to_numpy(v)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {k} is {e}") from None
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
    # torch's boilerplate around the reason (it advises weights_only=False: never repeat that)
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue",
                   "You can use", "Re-running")
    reasons = [ln for ln in lines if not ln.startswith(boilerplate) and "weights_only" not in ln]
    return reasons[0].split(". Please use")[0] if reasons else "unpickling failed"


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, keeping its dtype (bfloat16 through ml_dtypes)."""
    import torch

    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"not a tensor: {type(t).__name__}")
    if t.layout != torch.strided or t.is_quantized:  # sparse, quantized: not timm's dense weights
        kind = "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")
        raise CheckpointError(f"a {kind} tensor, not a dense one as timm's weights are; save dense tensors "
                              "(tensor.to_dense(), tensor.dequantize())")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def unwrap_state_dict(obj: Any, *, source: str = "checkpoint") -> tuple[dict[str, Any], str | None]:
    """A training checkpoint's weights: ``(state_dict, wrapper key or None)``.

    Follows timm's ``load_state_dict`` + ``clean_state_dict``: EMA weights first, then
    ``state_dict``, then ``model``; the ``module.`` / ``_orig_mod.`` wrapper prefixes are
    dropped from every key.
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
    return strip_wrapper_prefixes(obj), wrapper


# Prefixes of wrapped models, in timm's order (``timm.models._helpers.clean_state_dict``):
# torch.compile around DDP, DDP, torch.compile.
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop DataParallel's ``module.`` and torch.compile's ``_orig_mod.`` from every key, as timm does."""
    out = {}
    for k, v in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            k = k.removeprefix(prefix)
        out[k] = v
    return out


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
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests JSON too deeply to be a config file") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise MissingFileError(f"no such file: {path}") from None
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def read_hub_config(cfg: Mapping[str, Any], where: str = "config.json") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, pretrained_cfg, model_args)`` of a timm hub ``config.json``.

    Mirrors ``timm.models._hub._parse_model_cfg`` (legacy single-dict configs included).
    """
    cfg = json.loads(json.dumps(cfg))  # deep copy
    if not isinstance(cfg.get("architecture", ""), str):
        raise CheckpointError(f"{where}: 'architecture' must be a timm name, got {cfg['architecture']!r:.60}")
    if "pretrained_cfg" not in cfg:
        pretrained_cfg = cfg
        if "architecture" not in pretrained_cfg:
            raise CheckpointError(f"{where} has no 'architecture' entry: not a timm hub config")
        cfg = {"architecture": pretrained_cfg.pop("architecture"), "pretrained_cfg": pretrained_cfg}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
    if "architecture" not in cfg:
        raise CheckpointError(f"{where} has no 'architecture' entry: not a timm hub config")
    pretrained_cfg = check_pretrained_cfg(cfg["pretrained_cfg"] or {}, where)
    for key in ("num_classes", "label_names", "label_descriptions"):
        if key in cfg:
            pretrained_cfg[key] = cfg[key]
    check_pretrained_cfg(pretrained_cfg, where)
    model_args = check_timm_kwargs(cfg.get("model_args") or {}, f"{where} 'model_args'")
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
    arch, pretrained_cfg, model_args = read_hub_config(cfg, where)
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

# Writing lives in converters.writer (the one place that enforces atomicity, --force rules,
# permissions and signal safety); these names stay importable from here.
from .writer import (atomic_dir, atomic_file, check_output, write_json, write_safetensors,  # noqa: E402,F401
                     write_safetensors_atomic)


# ------------------------------------------------------------------- read stage: file -> tree


def _reader(progress, description: str) -> Progress | None:
    if progress is None:
        return None
    return lambda done, total: progress(description, done, total)


def read_canonical(r, progress: Callable[[str, int, int], None] | None = None, *, lazy: bool = False) -> dict:
    """A located source's (``converters.locate.Resolved``) canonical tree (numpy), after every
    check: keys, shapes, finite values. ``progress(description, done, total)``.

    ``lazy``: safetensors sources give ``converters.lazy.LazyTensor`` values instead, checked
    for keys and shapes from the headers now and read (and checked for finite values) one at a
    time when materialised: a loader that moves each to the device then holds one tensor of
    the source at a time, not all of it (``vitport.place.model_from_canonical``)."""
    from .frameworks import framework_to_canonical, unflatten_keys
    from .keymap import check_finite, checked_on_load, timm_to_canonical
    from .lazy import lazy_state_dict

    refs = lazy_state_dict(r.weights) if lazy else None
    if refs is not None:
        refs = _counted(refs, progress, f"reading {r.weights.name}")
        if r.kind == "vitport":
            params = unflatten_keys(checked_on_load(refs, str(r.weights)), r.framework)
            return framework_to_canonical(params, r.spec, r.framework)
        return timm_to_canonical(refs, r.spec, source=str(r.weights))
    if r.kind == "vitport":
        read = read_state_dict if r.weights.name.endswith(".index.json") else read_safetensors
        flat = read(r.weights, progress=_reader(progress, f"reading {r.weights.name}"))
        check_finite(flat, str(r.weights))
        params = unflatten_keys(flat, r.framework)
        return framework_to_canonical(params, r.spec, r.framework)
    sd = read_state_dict(r.weights, progress=_reader(progress, f"reading {r.weights.name}"))
    if progress:
        progress("checking and converting", 0, 0)
    return timm_to_canonical(sd, r.spec, source=str(r.weights))


def _counted(refs: dict, progress: Callable[[str, int, int], None] | None, description: str) -> dict:
    """Lazy tensors that report ``progress(description, done, total)`` as they are read."""
    if progress is None:
        return refs
    import threading

    done, lock = [0], threading.Lock()  # tensors are read in threads (vitport.api.place_all)

    def tick(a):
        with lock:
            done[0] += 1
            progress(description, done[0], len(refs))
        return a

    return {k: v.map(tick) for k, v in refs.items()}
