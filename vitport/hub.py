"""Checkpoints in and out: the hub, local files, vitport's converted folders.

Sources (``load``, ``convert``, ``export_timm``, ``describe`` and the CLI all take the same):

- a timm name, ``cait_s24_224`` or ``vit_base_patch16_224.augreg2_in21k_ft_in1k``: the
  pretrained tag (timm's default when none is given) names the hub repo
  ``timm/<arch>.<tag>``, downloaded with huggingface_hub (its cache, its offline mode). As in
  ``timm.create_model(name, pretrained=True)``, the architecture comes from the name;
- ``hf-hub:<repo_id>[@revision]``: a hub repo in timm's layout; its ``config.json`` says
  what it holds (as in ``timm.create_model('hf-hub:...')``);
- a local folder in the hub layout (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), or a folder written by ``vitport convert``;
- a single ``.safetensors``, ``.pth`` or ``.bin`` file, with ``arch=`` (``--arch``).

``model_args`` are timm's ``create_model`` keyword arguments (``num_classes=10``,
``img_size=384`` ...), applied the way timm applies them; settings vitport does not
implement are refused by name. ``image_size=`` changes the input resolution of the loaded
weights: ``pos_embed`` is resampled as timm does (bicubic, antialiased, in float32).

A converted folder holds ``model.safetensors`` (the JAX params under flat ``a/b/c`` keys) and
``config.json`` (the spec, the preprocessing, where it came from). Loading it needs neither
torch nor timm.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np

from converters import (CaiTSpec, ConversionError, Spec, canonical_to_framework, canonical_to_timm,
                        check_finite, flat_keys, framework_to_canonical, spec_from_dict, spec_to_dict,
                        timm_to_canonical, unflatten_keys)
from converters.architectures import arch_spec, pretrained_tag_cfg, resolve_tag, split_name
from converters.checkpoint_io import (CheckpointError, atomic_dir, check_output, check_shapes,
                                      find_weights, is_checkpoint_file, preprocessing, read_hub_config, read_json,
                                      read_safetensors, read_state_dict, safetensors_header,
                                      spec_for_arch, spec_from_hub_config, sync_preprocessing, write_json,
                                      write_safetensors, write_safetensors_atomic)
from converters.errors import (HubError, HubUnreachableError, InvalidArgumentError, MissingFileError,
                               UnsupportedArchitectureError)
from converters.specs import pair, spec_with_timm_kwargs, timm_model_args

from .api import Framework, JaxModel, check_framework, to_jax_array

FORMAT = "vitport"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DTYPES = ("float32", "float64", "bfloat16", "float16")
HUB_PREFIX = "hf-hub:"
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

# progress(description, done, total): called as work advances; total 0 means "unknown".
ProgressFn = Callable[[str, int, int], None]
SourceKind = Literal["hub", "hub-dir", "file", "vitport"]


@dataclass
class Resolved:
    """A source, located and understood, before any weights are read."""

    source: str
    kind: SourceKind
    weights: Path
    architecture: str
    spec: Spec
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    framework: Framework | None = None  # the params' framework of a vitport folder
    repo_id: str | None = None
    revision: str | None = None

    @property
    def description(self) -> str:
        if self.repo_id:
            return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return str(self.weights.parent if self.kind in ("hub-dir", "vitport") else self.weights)


# --------------------------------------------------------------------------------- hub


def _hub_reason() -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    return "no network connection to the hub"


def _unreachable(repo_id: str, arch: str | None) -> HubUnreachableError:
    from huggingface_hub import constants

    name = arch or "ARCH"
    return HubUnreachableError(
        f"could not download {repo_id} from the Hugging Face Hub: {_hub_reason()}, and it is not in "
        f"the local cache ({constants.HF_HUB_CACHE}). To work without the hub, pass a local copy "
        f"instead: a folder in the hub layout (config.json + model.safetensors), as in "
        f"`vitport convert path/to/folder --out DIR`, or a single weights file with its architecture, "
        f"as in `vitport convert model.safetensors --arch {name} --out DIR` (in Python: "
        f"vitport.load('path/to/folder') or vitport.load('model.safetensors', arch='{name}')).")


def hub_download(repo_id: str, revision: str | None = None, *, arch: str | None = None,
                 need_config: bool = True) -> tuple[Path | None, Path]:
    """``(config.json or None, weights file)`` of a hub repo, through huggingface_hub's cache.

    Prefers ``model.safetensors`` over ``pytorch_model.bin``, as timm does. huggingface_hub
    draws its own progress bars and honours ``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE``.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    weight_files = ("model.safetensors", "pytorch_model.bin")

    def get(filename: str) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=revision))

    def cached_weights() -> Path:
        """The hub is unreachable: use weights already in the cache (timm caches no config.json)."""
        for filename in weight_files:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
            if isinstance(found, str):
                return Path(found)
        raise _unreachable(repo_id, arch)

    try:
        try:
            config = get(CONFIG_NAME)
        except LocalEntryNotFoundError:
            if need_config:
                raise
            return None, cached_weights()
        except EntryNotFoundError:
            if need_config:
                raise HubError(f"{repo_id} has no {CONFIG_NAME}: not a timm model repo "
                               f"(pass the architecture by name, or a local file with --arch)") from None
            config = None
        for filename in weight_files:
            try:
                return config, get(filename)
            except LocalEntryNotFoundError:
                return config, cached_weights()
            except EntryNotFoundError:
                pass
        raise HubError(f"{repo_id} holds neither model.safetensors nor pytorch_model.bin")
    except LocalEntryNotFoundError:
        raise _unreachable(repo_id, arch) from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private or "
                       "gated and you are not logged in)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}") from None
    except (ConnectionError, TimeoutError) as e:
        if isinstance(e, HubUnreachableError):
            raise
        raise _unreachable(repo_id, arch) from None
    except OSError as e:
        if isinstance(e, HubError):
            raise
        if type(e).__module__.startswith(("httpx", "httpcore")):  # huggingface_hub's HTTP client
            raise _unreachable(repo_id, arch) from None
        raise


# ------------------------------------------------------------------------- resolution


def _looks_like_path(source: str) -> bool:
    return (os.sep in source or "/" in source or source.startswith((".", "~"))
            or is_checkpoint_file(source) or source.endswith(".json"))


def _from_hub_config(path: Path, source: str, kind: SourceKind, weights: Path, arch: str | None,
                     model_args: Mapping[str, Any] | None, **extra: Any) -> Resolved:
    cfg = read_json(path)
    if cfg.get("format") == FORMAT:
        raise CheckpointError(f"{path} belongs to a folder converted by vitport; pass the folder itself")
    name, spec, pretrained_cfg, _ = spec_from_hub_config(cfg, where=str(path))
    if arch is not None and split_name(arch)[0] != name:
        raise CheckpointError(f"{path} says the weights are {name}, but arch={arch!r} was given; "
                              "leave --arch out for hub-layout folders")
    cfg = preprocessing(pretrained_cfg)
    if model_args:
        spec = spec_with_timm_kwargs(spec, model_args)
        cfg = sync_preprocessing(cfg, spec)
    return Resolved(source, kind, weights, name, spec, cfg, **extra)


def _from_vitport_dir(folder: Path, cfg: dict[str, Any], source: str) -> Resolved:
    if cfg.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: vitport format version {cfg.get('version')!r} is not "
                              f"supported (this vitport reads version {FORMAT_VERSION})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise MissingFileError(f"{folder} has a vitport {CONFIG_NAME} but no {WEIGHTS_NAME}")
    try:
        spec = spec_from_dict(cfg["spec"])
        framework = check_framework(cfg["framework"])
    except KeyError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME} lacks the entry {e}") from None
    return Resolved(source, "vitport", weights, cfg.get("architecture") or "", spec,
                    dict(cfg.get("pretrained_cfg") or {}), framework=framework)


def resolve(source: str | os.PathLike, *, arch: str | None = None,
            model_args: Mapping[str, Any] | None = None, revision: str | None = None) -> Resolved:
    """Find out what ``source`` is and where its weights are (downloading them if needed)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            cfg = read_json(config)
            if cfg.get("format") == FORMAT:
                if model_args:
                    raise CheckpointError("model_args cannot change a converted folder; use image_size= to "
                                          "change its resolution")
                return _from_vitport_dir(path, cfg, text)
            return _from_hub_config(config, text, "hub-dir", find_weights(path), arch, model_args)
        if arch is None:
            raise CheckpointError(f"{path} has no {CONFIG_NAME}, so it does not say which architecture "
                                  "it holds; pass it with --arch NAME (arch= in Python)")
        name, spec, cfg = spec_for_arch(arch, model_args)
        return Resolved(text, "hub-dir", find_weights(path), name, spec, cfg)
    if path.is_file():
        if not is_checkpoint_file(path):
            raise CheckpointError(f"{path}: not a checkpoint file (.safetensors, .pth, .bin) nor a folder")
        if arch is None:
            sibling = path.parent / CONFIG_NAME
            if path.name in ("model.safetensors", "pytorch_model.bin") and sibling.is_file():
                return _from_hub_config(sibling, text, "hub-dir", path, None, model_args)
            raise CheckpointError(f"{path} is a bare weights file: it does not say which architecture it "
                                  "holds. Pass it with --arch NAME (arch= in Python), e.g. --arch "
                                  "cait_s24_224; `vitport list` shows the names")
        name, spec, cfg = spec_for_arch(arch, model_args)
        return Resolved(text, "file", path, name, spec, cfg)
    if text.startswith(HUB_PREFIX):
        repo_id = text[len(HUB_PREFIX):]
        if "@" in repo_id:
            repo_id, _, rev = repo_id.partition("@")
            revision = revision or rev
        config, weights = hub_download(repo_id, revision, arch=arch)
        return _from_hub_config(config, text, "hub", weights, arch, model_args,
                                repo_id=repo_id, revision=revision)
    if _looks_like_path(text):
        hint = ""
        if text.count("/") == 1 and not is_checkpoint_file(text) and not text.startswith((".", "/", "~")):
            hint = f" (for the hub repo, write hf-hub:{text})"
        raise MissingFileError(f"no such file or folder: {text}{hint}")
    if arch is not None:
        raise CheckpointError("--arch is for local weights files; a timm name already says its architecture")
    # A timm name: the architecture comes from the name, the weights from its tag's repo.
    spec = arch_spec(text)  # unknown or refused architectures fail here, by name
    name, tag = resolve_tag(text)
    tag_cfg = pretrained_tag_cfg(text)
    repo_id = tag_cfg.get("hf_hub_id")
    if not repo_id:
        raise HubError(f"{name}{'.' + tag if tag else ''}: timm publishes no hub weights for it; "
                       "pass a local weights file with --arch")
    if model_args:
        spec = spec_with_timm_kwargs(spec, model_args)
    config, weights = hub_download(repo_id, revision, arch=name, need_config=False)
    cfg = sync_preprocessing({k: v for k, v in tag_cfg.items() if k != "hf_hub_id"}, spec)
    if config is not None:  # label names, when the repo has them
        try:
            _, hub_cfg, _ = read_hub_config(read_json(config))
            for key in ("label_names", "label_descriptions"):
                if key in hub_cfg and hub_cfg.get("num_classes") == spec.num_classes:
                    cfg[key] = hub_cfg[key]
        except (CheckpointError, OSError):
            pass
    return Resolved(text, "hub", weights, name, spec, preprocessing(cfg), repo_id=repo_id, revision=revision)


# -------------------------------------------------------------------------- conversion


def _reader(progress: ProgressFn | None, description: str):
    if progress is None:
        return None
    return lambda done, total: progress(description, done, total)


def read_canonical(r: Resolved, progress: ProgressFn | None = None) -> dict:
    """The checkpoint's canonical tree (numpy), after every check: keys, shapes, finite values."""
    if r.kind == "vitport":
        flat = read_safetensors(r.weights, progress=_reader(progress, f"reading {r.weights.name}"))
        check_finite(flat, str(r.weights))
        params = unflatten_keys(flat, r.framework)
        return framework_to_canonical(params, r.spec, r.framework)
    sd = read_state_dict(r.weights, progress=_reader(progress, f"reading {r.weights.name}"))
    if progress:
        progress("checking and converting", 0, 0)
    return timm_to_canonical(sd, r.spec, source=str(r.weights))


def resize_canonical(tree: dict, spec: Spec, image_size: int | tuple[int, int]) -> tuple[dict, Spec]:
    """Change the input resolution: resample ``pos_embed`` as timm does (bicubic, antialias, float32)."""
    from .ops import resample_pos_embed

    new_size = pair(image_size)
    if new_size == tuple(spec.image_size):
        return tree, spec
    if any(s < spec.patch_size for s in new_size):
        raise InvalidArgumentError(f"image_size={new_size} is smaller than one {spec.patch_size}-pixel patch")
    new_spec = dataclasses.replace(spec, image_size=new_size)
    prefix = 0 if isinstance(spec, CaiTSpec) or spec.no_embed_class else spec.num_prefix_tokens
    key = ("", "pos_embed")
    pe = np.asarray(tree[key])
    out = resample_pos_embed(pe, new_spec.grid_size, spec.grid_size, prefix)
    tree = dict(tree)
    tree[key] = np.asarray(out).astype(pe.dtype)
    return tree, new_spec


def _cast(tree: dict, dtype: str | None) -> dict:
    if dtype is None:
        return tree
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "bfloat16":
        import ml_dtypes

        target = np.dtype(ml_dtypes.bfloat16)
    else:
        target = np.dtype(dtype)

    def cast(a):
        a = np.asarray(a)
        return a.astype(target) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") else a

    return {k: cast(v) for k, v in tree.items()}


def model_from_canonical(tree: dict, r: Resolved, framework: str | None = None, *, image_size=None,
                         dtype: str | None = None) -> JaxModel:
    """A JaxModel from a checked canonical tree (``read_canonical``): resized, cast, renamed."""
    framework = check_framework(framework or r.framework or "flax")
    spec, cfg = r.spec, dict(r.pretrained_cfg)
    if image_size is not None:
        tree, spec = resize_canonical(tree, spec, image_size)
        if spec is not r.spec:
            cfg["input_size"] = [spec.channels, *spec.image_size]
    tree = _cast(tree, dtype)
    params = canonical_to_framework({k: to_jax_array(v) for k, v in tree.items()}, spec, framework)
    return JaxModel(spec, framework, params, cfg, r.architecture or None)


def load_resolved(r: Resolved, framework: str | None = None, *, image_size=None, dtype: str | None = None,
                  progress: ProgressFn | None = None) -> JaxModel:
    return model_from_canonical(read_canonical(r, progress), r, framework, image_size=image_size, dtype=dtype)


def load(source: str | os.PathLike, framework: str | None = None, *, arch: str | None = None,
         model_args: Mapping[str, Any] | None = None, image_size: int | tuple[int, int] | None = None,
         revision: str | None = None, dtype: str | None = None,
         progress: ProgressFn | None = None) -> JaxModel:
    """Load a checkpoint into JAX: a timm name, ``hf-hub:`` repo, local folder or file.

    ``framework`` is ``"flax"`` or ``"haiku"`` (default: a converted folder's own framework,
    else flax). ``arch`` names the architecture of a bare weights file; ``model_args`` are
    timm ``create_model`` kwargs; ``image_size`` resamples ``pos_embed`` to a new resolution;
    ``dtype`` casts the weights (default: keep the checkpoint's). Folders written by
    ``convert`` load without torch.
    """
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    return load_resolved(r, framework, image_size=image_size, dtype=dtype, progress=progress)


# ------------------------------------------------------------------------------ output


def model_args_for_timm(spec: Spec, architecture: str | None) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``spec`` (only those that differ from the factory)."""
    if not architecture:
        return timm_model_args(spec)
    try:
        base = timm_model_args(arch_spec(architecture))
    except UnsupportedArchitectureError:
        return timm_model_args(spec)
    ours = timm_model_args(spec)
    return {k: v for k, v in ours.items() if base.get(k) != v}


def vitport_config(jm: JaxModel, source: str | None = None) -> dict[str, Any]:
    from . import __version__

    return {
        "format": FORMAT, "version": FORMAT_VERSION, "vitport_version": __version__,
        "framework": jm.framework, "architecture": jm.architecture,
        "spec": spec_to_dict(jm.spec), "pretrained_cfg": preprocessing(jm.pretrained_cfg),
        "timm_model_args": model_args_for_timm(jm.spec, jm.architecture),
        "source": source,
    }


def save(jm: JaxModel, out: str | os.PathLike, *, force: bool = False, source: str | None = None,
         progress: ProgressFn | None = None) -> Path:
    """Write a converted folder (``model.safetensors`` + ``config.json``), all or nothing."""
    tensors = {k: np.asarray(v) for k, v in flat_keys(jm.params, jm.framework).items()}
    with atomic_dir(out, force) as tmp:
        if progress:
            progress(f"writing {Path(out).name}", 0, 0)
        write_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": FORMAT, "framework": jm.framework})
        write_json(vitport_config(jm, source), tmp / CONFIG_NAME)
    return Path(out)


def convert(source: str | os.PathLike, out: str | os.PathLike, framework: str = "flax", *,
            force: bool = False, arch: str | None = None, model_args: Mapping[str, Any] | None = None,
            image_size=None, revision: str | None = None, dtype: str | None = None,
            progress: ProgressFn | None = None) -> JaxModel:
    """Convert ``source`` into a folder at ``out``; returns the converted model.

    An existing ``out`` is refused before anything is read (unless ``force``); an error or an
    interrupt leaves no partial output.
    """
    check_framework(framework)
    check_output(out, force)
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    jm = load_resolved(r, framework, image_size=image_size, dtype=dtype, progress=progress)
    save(jm, out, force=force, source=r.description, progress=progress)
    return jm


def export_timm(source: str | os.PathLike, out_file: str | os.PathLike, *, force: bool = False,
                arch: str | None = None, model_args: Mapping[str, Any] | None = None,
                revision: str | None = None, progress: ProgressFn | None = None) -> tuple[Path, Resolved]:
    """Write ``source``'s weights as a timm state_dict in a safetensors file (atomic).

    The file loads with ``timm.create_model(arch, pretrained=True,
    pretrained_cfg_overlay=dict(file=out_file))`` (plus the model's non-default kwargs).
    """
    if not str(out_file).endswith(".safetensors"):
        raise InvalidArgumentError(f"--out must name a .safetensors file, got {out_file}")
    check_output(out_file, force)
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    tree = read_canonical(r, progress)
    state_dict = canonical_to_timm(tree, r.spec)
    if progress:
        progress(f"writing {Path(out_file).name}", 0, 0)
    write_safetensors_atomic(state_dict, out_file, force=force, metadata={"format": "pt"})
    return Path(out_file), r


def timm_snippet(architecture: str, spec: Spec, file: str | os.PathLike) -> str:
    """The timm call that loads an exported file."""
    args = model_args_for_timm(spec, architecture)
    kwargs = "".join(f", {k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in args.items())
    return (f"timm.create_model({architecture!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={str(file)!r}, num_classes={spec.num_classes}){kwargs})")


# -------------------------------------------------------------------------------- info


class _Shape:
    """Stands in for an array when only its shape is known (header-only checks)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def describe(source: str | os.PathLike, *, arch: str | None = None, model_args: Mapping[str, Any] | None = None,
             revision: str | None = None) -> dict[str, Any]:
    """What a checkpoint holds, read from its header where possible (safetensors data is not read)."""
    r = resolve(source, arch=arch, model_args=model_args, revision=revision)
    if r.weights.name.endswith(".safetensors"):
        header, _ = safetensors_header(r.weights)
        shapes = {k: s for k, (s, _) in header.items()}
        dtypes = [SAFETENSORS_DTYPES.get(d, d) for _, d in header.values()]
    else:
        sd = read_state_dict(r.weights)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        dtypes = [str(v.dtype) for v in sd.values()]
    if r.kind == "vitport":
        try:
            framework_to_canonical(unflatten_keys({k: _Shape(s) for k, s in shapes.items()}, r.framework),
                                   r.spec, r.framework)
            problems: dict[str, list[str]] = {}
        except ConversionError as e:
            problems = e.problems
    else:
        problems = {k: v for k, v in check_shapes(shapes, r.spec).items() if v}
    counts: dict[str, int] = {}
    for d in dtypes:
        counts[d] = counts.get(d, 0) + 1
    return {
        "resolved": r,
        "num_tensors": len(shapes),
        "num_params": int(sum(int(np.prod(s)) for s in shapes.values())),
        "dtypes": counts,
        "file_size": r.weights.stat().st_size,
        "problems": problems,
    }
