"""The locate stage: what a source is and where its weights are (downloading them if needed).


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

import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping
from urllib.parse import urlparse

from .architectures import arch_spec, pretrained_tag_cfg, resolve_tag, split_name
from .checkpoint_io import (find_weights, is_checkpoint_file, preprocessing, read_hub_config, read_json,
                            spec_for_arch, spec_from_hub_config, sync_preprocessing)
from .errors import (CheckpointError, HubError, HubUnreachableError, InvalidArgumentError, MissingFileError,
                     UnsupportedArchitectureError)
from .frameworks import FRAMEWORKS
from .sharded import INDEX_FILES, SAFETENSORS_INDEX, TORCH_INDEX
from .specs import Spec, spec_from_dict, spec_with_timm_kwargs
from .validate import check_pretrained_cfg, check_spec, check_spec_values, expand_user

FORMAT = "vitport"
FORMAT_VERSION = 1
MATMUL_DTYPES = (None, "bfloat16", "float16")  # a vitport folder's "matmul_dtype"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
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
    framework: str | None = None  # the params' framework of a vitport folder
    matmul_dtype: str | None = None  # a vitport folder's 16-bit matmul mode (vitport.ModelConfig)
    repo_id: str | None = None
    revision: str | None = None

    @property
    def description(self) -> str:
        if self.repo_id:
            return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")
        return str(self.weights.parent if self.kind in ("hub-dir", "vitport") else self.weights)


# --------------------------------------------------------------------------------- hub


PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to the hub endpoint be opened within ``timeout`` seconds?

    huggingface_hub retries an unreachable hub for about 25 s (5 retries, exponential back-off)
    before it looks in its cache; this probe lets vitport go to the cache (or fail with the
    offline instructions) within a few seconds. Behind a proxy the probe is skipped.
    """
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def probe():  # getaddrinfo has no timeout of its own: run it in a thread and stop waiting
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _hub_reason(offline: bool) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if offline:
        return f"no network connection to the hub ({constants.ENDPOINT} could not be reached)"
    return "no network connection to the hub"


def _unreachable(repo_id: str, arch: str | None, offline: bool = False) -> HubUnreachableError:
    from huggingface_hub import constants

    name = arch or "ARCH"
    return HubUnreachableError(
        f"could not download {repo_id} from the Hugging Face Hub: {_hub_reason(offline)}, and it is not in "
        f"the local cache ({constants.HF_HUB_CACHE}). To work offline: on a machine with network, "
        f"download it into the cache with `hf download {repo_id}` (then copy the cache folder, or point "
        f"HF_HUB_CACHE at it, and set HF_HUB_OFFLINE=1), or pass a local copy instead: a folder in the "
        f"hub layout (config.json + model.safetensors), as in "
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

    from huggingface_hub import constants

    weight_files = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", TORCH_INDEX)
    # Unreachable hub: read the cache at once instead of after huggingface_hub's retries.
    cache_only = not constants.HF_HUB_OFFLINE and not hub_reachable()

    def get(filename: str) -> Path:
        path = Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=cache_only))
        if filename in INDEX_FILES:  # a sharded checkpoint: its shards land next to the index
            for shard in _index_shard_names(path):
                hf_hub_download(repo_id, shard, revision=revision, local_files_only=cache_only)
        return path

    def cached_weights() -> Path:
        """The hub is unreachable: use weights already in the cache (timm caches no config.json)."""
        for filename in weight_files:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
            if isinstance(found, str) and filename in INDEX_FILES:
                if all(isinstance(try_to_load_from_cache(repo_id, n, revision=revision), str)
                       for n in _index_shard_names(Path(found))):
                    return Path(found)
            elif isinstance(found, str):
                return Path(found)
        raise _unreachable(repo_id, arch, cache_only)

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
        raise HubError(f"{repo_id} holds neither model.safetensors nor pytorch_model.bin (nor their sharded "
                       "index files)")
    except LocalEntryNotFoundError:
        raise _unreachable(repo_id, arch, cache_only) from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such repository on the Hugging Face Hub (or it is private or "
                       "gated and you are not logged in)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} has no revision {revision!r}") from None
    except (ConnectionError, TimeoutError) as e:
        if isinstance(e, HubUnreachableError):
            raise
        raise _unreachable(repo_id, arch, cache_only) from None
    except OSError as e:
        if isinstance(e, HubError):
            raise
        if type(e).__module__.startswith(("httpx", "httpcore")):  # huggingface_hub's HTTP client
            raise _unreachable(repo_id, arch, cache_only) from None
        raise


def _index_shard_names(index: Path) -> list[str]:
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data.get("weight_map"), dict) else {}
    return list(dict.fromkeys(v for v in weight_map.values() if isinstance(v, str) and Path(v).name == v))


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
    config = folder / CONFIG_NAME
    if cfg.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: vitport format version {cfg.get('version')!r} is not "
                              f"supported (this vitport reads version {FORMAT_VERSION})")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / SAFETENSORS_INDEX).is_file():  # written in shards
        weights = folder / SAFETENSORS_INDEX
    if not weights.is_file():
        raise MissingFileError(f"{folder} has a vitport {CONFIG_NAME} but no {WEIGHTS_NAME}")
    for key in ("spec", "framework"):
        if key not in cfg:
            raise CheckpointError(f"{config} lacks the entry {key!r}; convert the checkpoint again")
    if cfg["framework"] not in FRAMEWORKS:
        raise CheckpointError(f"{config}: framework {cfg['framework']!r} is not one of {FRAMEWORKS}")
    spec_dict = cfg["spec"]
    if not isinstance(spec_dict, dict) or not isinstance(spec_dict.get("family"), str):
        raise CheckpointError(f"{config}: 'spec' must be a JSON object with a 'family'; convert the "
                              "checkpoint again")
    try:
        check_spec_values(spec_dict, "its 'spec'")
        spec = spec_from_dict(spec_dict)
        check_spec(spec, "its 'spec'")
    except (TypeError, ValueError) as e:  # a hand-edited spec: wrong types or impossible values
        if isinstance(e, (InvalidArgumentError, UnsupportedArchitectureError)):
            raise CheckpointError(f"{config}: {e}") from None
        raise CheckpointError(f"{config}: invalid 'spec' ({e}); convert the checkpoint again") from None
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    if not isinstance(pretrained_cfg, dict):
        raise CheckpointError(f"{config}: 'pretrained_cfg' must be a JSON object")
    check_pretrained_cfg(pretrained_cfg, f"{config} 'pretrained_cfg'")  # preprocessing values a hand edit may break
    if not isinstance(cfg.get("architecture") or "", str):
        raise CheckpointError(f"{config}: 'architecture' must be a timm model name, got {cfg['architecture']!r}")
    matmul_dtype = cfg.get("matmul_dtype")  # absent from folders written before it was kept
    if matmul_dtype not in MATMUL_DTYPES:
        raise CheckpointError(f"{config}: 'matmul_dtype' must be one of {MATMUL_DTYPES}, got {matmul_dtype!r}")
    return Resolved(source, "vitport", weights, str(cfg.get("architecture") or ""), spec,
                    dict(pretrained_cfg), framework=cfg["framework"], matmul_dtype=matmul_dtype)


def resolve(source: str | os.PathLike, *, arch: str | None = None,
            model_args: Mapping[str, Any] | None = None, revision: str | None = None) -> Resolved:
    """Find out what ``source`` is and where its weights are (downloading them if needed)."""
    text = str(source)
    path = expand_user(text)
    if path.is_dir():
        config = path / CONFIG_NAME
        if config.is_file():
            cfg = read_json(config)
            if cfg.get("format") == FORMAT:
                if model_args:
                    raise CheckpointError("model_args cannot change a converted folder; to change its resolution "
                                          "use image_size= (vitport convert --img-size)")
                resolved = _from_vitport_dir(path, cfg, text)
                if arch is not None and split_name(arch)[0] != resolved.architecture:
                    raise CheckpointError(f"{path} is a converted {resolved.architecture or 'model'}; arch={arch!r} "
                                          "(--arch) cannot change it: leave it out")
                return resolved
            return _from_hub_config(config, text, "hub-dir", find_weights(path), arch, model_args)
        if arch is None:
            raise CheckpointError(f"{path} has no {CONFIG_NAME}, so it does not say which architecture "
                                  "it holds; pass it with --arch NAME (arch= in Python)")
        name, spec, cfg = spec_for_arch(arch, model_args)
        return Resolved(text, "hub-dir", find_weights(path), name, spec, cfg)
    if path.is_file():
        if not is_checkpoint_file(path) and path.name not in INDEX_FILES:
            raise CheckpointError(f"{path}: not a checkpoint file (.safetensors, .pth, .bin) nor a folder")
        if arch is None:
            sibling = path.parent / CONFIG_NAME
            if path.name in ("model.safetensors", "pytorch_model.bin", *INDEX_FILES) and sibling.is_file():
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
