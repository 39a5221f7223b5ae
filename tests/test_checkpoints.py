"""Checkpoints in and out: hub layout, single files, the hub cache, converted folders, export,
resolution change, and every bad input ending in one clear error with nothing left behind.

Only local files: tiny timm models with bug-sensitive random weights, saved with timm's own
hub writer (``timm.models._hub.save_for_hf``); the hub cache is a temporary folder filled in
huggingface_hub's own layout, and the hub is offline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import vitport
from converters import FRAMEWORKS, ConversionError, UnsupportedArchitectureError
from converters.checkpoint_io import (CheckpointError, OutputExistsError, read_state_dict, spec_from_hub_config,
                                      unwrap_state_dict)
from helpers import (HUB_WRITABLE_CASES, TINY, TINY_CAIT, TINY_CASES, env_with_test_xla_flags, images,
                     run_without_torch, tiny_timm)
from vitport.hub import HubUnreachableError
from vitport.parity import tolerance

# ---------------------------------------------------------------------------- helpers


def save_hub_dir(model, folder: Path, *, safetensors: bool | str = True, **extra) -> Path:
    """A timm model in the hub layout, written by timm itself."""
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=safetensors, **extra)
    return folder


def timm_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def tree_equal(a, b) -> bool:
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    return (len(la) == len(lb) and all(pa == pb and np.asarray(x).dtype == np.asarray(y).dtype
                                       and np.array_equal(np.asarray(x), np.asarray(y))
                                       for (pa, x), (pb, y) in zip(la, lb)))


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "a" * 40) -> None:
    """Put files into a huggingface_hub cache the way hf_hub_download leaves them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, src in files.items():
        shutil.copyfile(src, snapshot / name)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """float32 tiny ViT, DeiT-distilled and CaiT in the hub layout: {name: (timm model, folder)}."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, (arch, kw) in {"vit": ("vit_base_patch16_224", TINY),
                             "deit": ("deit_base_distilled_patch16_224", TINY),
                             "cait": ("cait_s24_224", TINY_CAIT)}.items():
        model = tiny_timm(arch, "float32", **kw)
        out[name] = (model, save_hub_dir(model, root / name))
    return out


# ----------------------------------------------------------------------- hub layout in


@pytest.mark.parametrize("case", HUB_WRITABLE_CASES)
def test_hub_layout_folder_loads_like_timm(case, tmp_path):
    """Every option vitport implements: timm's hub writer -> vitport.load -> logits (float64)."""
    arch, kw = TINY_CASES[case]
    model = tiny_timm(arch, "float64", **kw)
    folder = save_hub_dir(model, tmp_path / case)
    for framework in FRAMEWORKS:
        jm = vitport.load(folder, framework)
        assert jm.framework == framework and jm.architecture == arch
        assert jm.dtype == np.float64
        x = images(jm.spec, 2, "float64")
        ref = timm_logits(model, x)
        assert max_abs(jm(x), ref) < tolerance(jm.spec, "float64") * max(1.0, np.abs(ref).max()), (case, framework)


def test_hub_config_gives_timms_spec_and_preprocessing(tiny_dirs):
    from vitport.timm_bridge import from_timm

    for name, (model, folder) in tiny_dirs.items():
        cfg = json.loads((folder / "config.json").read_text())
        arch, spec, pretrained_cfg, _ = spec_from_hub_config(cfg)
        live = from_timm(model).spec  # CaiT's init_values is read off the (perturbed) gammas there
        assert spec == dataclasses.replace(live, init_values=spec.init_values), name
        jm = vitport.load(folder)
        assert jm.pretrained_cfg["input_size"] == [3, 32, 32]
        for key in ("mean", "std", "crop_pct", "interpolation"):
            want = model.pretrained_cfg[key]
            assert jm.pretrained_cfg[key] == (list(want) if isinstance(want, tuple) else want), (name, key)
    assert vitport.load(tiny_dirs["vit"][1]).pretrained_cfg["mean"] == [0.5, 0.5, 0.5]
    assert vitport.load(tiny_dirs["cait"][1]).pretrained_cfg["crop_pct"] == 1.0


def test_label_names_are_kept(tmp_path):
    model = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    labels = [f"class_{i}" for i in range(10)]
    folder = save_hub_dir(model, tmp_path / "labelled", model_config={"label_names": labels})
    out = tmp_path / "converted"
    vitport.convert(folder, out)
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["label_names"] == labels
    assert vitport.load(out).pretrained_cfg["label_names"] == labels


def test_bin_only_hub_folder_and_preference_for_safetensors(tiny_dirs, tmp_path):
    model, folder = tiny_dirs["cait"]
    bin_only = save_hub_dir(model, tmp_path / "bin", safetensors=False)
    assert (bin_only / "pytorch_model.bin").exists() and not (bin_only / "model.safetensors").exists()
    assert tree_equal(vitport.load(bin_only).params, vitport.load(folder).params)
    both = save_hub_dir(model, tmp_path / "both", safetensors="both")
    (both / "pytorch_model.bin").write_bytes(b"not read: safetensors comes first")
    assert tree_equal(vitport.load(both).params, vitport.load(folder).params)


# ------------------------------------------------------------------------ single files


def test_single_files_need_and_take_arch(tiny_dirs, tmp_path):
    import torch

    model, folder = tiny_dirs["cait"]
    reference = vitport.load(folder, "haiku").params
    sd = model.state_dict()
    st = tmp_path / "weights.safetensors"
    shutil.copyfile(folder / "model.safetensors", st)
    # The original DeiT/CaiT releases: {'model': ...} with DataParallel's 'module.' prefix.
    original = tmp_path / "S24_224.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 300}, original)
    plain_bin = tmp_path / "weights.bin"
    torch.save(sd, plain_bin)
    for path in (st, original, plain_bin):
        with pytest.raises(CheckpointError, match="--arch"):
            vitport.load(path)
        jm = vitport.load(path, "haiku", arch="cait_s24_224", model_args=TINY_CAIT)
        assert tree_equal(jm.params, reference), path
        assert jm.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]  # the default tag's preprocessing


def test_unwrap_follows_timm():
    t = np.zeros(2)
    assert unwrap_state_dict({"model": {"module.a": t}})[0].keys() == {"a"}
    assert unwrap_state_dict({"state_dict": {"a": t}, "model": {"b": t}})[1] == "state_dict"
    assert unwrap_state_dict({"model_ema": {"a": t}, "model": {"b": t}})[1] == "model_ema"
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        unwrap_state_dict({"a": t, "epoch": 3})


def test_bfloat16_checkpoints_stay_bfloat16(tiny_dirs, tmp_path):
    import torch

    model, _ = tiny_dirs["vit"]
    bf = tiny_timm("vit_base_patch16_224", "float32", **TINY).to(torch.bfloat16)
    folder = save_hub_dir(bf, tmp_path / "bf16")
    torch.save(bf.state_dict(), tmp_path / "bf16.pth")
    jm = vitport.load(folder, "flax")
    assert jm.dtype == jax.numpy.bfloat16
    assert tree_equal(vitport.load(tmp_path / "bf16.pth", "flax", arch="vit_base_patch16_224",
                                   model_args=TINY).params, jm.params)
    out = tmp_path / "bf16.safetensors"
    vitport.export_timm(folder, out)
    assert_timm_loads_equal(bf, "vit_base_patch16_224", TINY, out)


# -------------------------------------------------------------------------- the hub


def test_timm_names_and_hf_hub_ids_resolve_through_the_hub_cache(tiny_dirs, hub_cache):
    model, folder = tiny_dirs["cait"]
    reference = vitport.load(folder).params
    # The default tag of cait_s24_224 names the repo timm/cait_s24_224.fb_dist_in1k.
    populate_hub_cache(hub_cache, "timm/cait_s24_224.fb_dist_in1k",
                       {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    for source, kw in [("cait_s24_224", dict(model_args=TINY_CAIT)),
                       ("cait_s24_224.fb_dist_in1k", dict(model_args=TINY_CAIT)),
                       ("hf-hub:timm/cait_s24_224.fb_dist_in1k", {})]:
        jm = vitport.load(source, **kw)
        assert tree_equal(jm.params, reference), source
        assert jm.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    # pytorch_model.bin when the repo has no safetensors (timm's fallback).
    vit_model, vit_folder = tiny_dirs["vit"]
    bin_dir = save_hub_dir(vit_model, hub_cache.parent / "vit-bin", safetensors=False)
    populate_hub_cache(hub_cache, "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                       {"config.json": bin_dir / "config.json", "pytorch_model.bin": bin_dir / "pytorch_model.bin"})
    jm = vitport.load("vit_base_patch16_224.augreg2_in21k_ft_in1k", model_args=TINY)
    assert tree_equal(jm.params, vitport.load(vit_folder).params)
    # timm's own create_model(pretrained=True) caches the weights only, no config.json.
    populate_hub_cache(hub_cache, "timm/vit_base_patch16_224.augreg_in21k_ft_in1k",
                       {"model.safetensors": vit_folder / "model.safetensors"})
    jm = vitport.load("vit_base_patch16_224.augreg_in21k_ft_in1k", model_args=TINY)
    assert tree_equal(jm.params, vitport.load(vit_folder).params)
    with pytest.raises(HubUnreachableError):  # a config-driven hf-hub: id does need config.json
        vitport.load("hf-hub:timm/vit_base_patch16_224.augreg_in21k_ft_in1k")


def test_no_network_says_how_to_pass_a_local_file(hub_cache, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(HubUnreachableError) as info:
        vitport.convert("cait_s24_224", out)
    msg = str(info.value)
    assert "timm/cait_s24_224.fb_dist_in1k" in msg and "HF_HUB_OFFLINE" in msg
    assert "vitport convert path/to/folder" in msg and "--arch cait_s24_224" in msg
    assert "\n" not in msg  # one paragraph
    assert not out.exists() and listing(hub_cache) == []
    with pytest.raises(HubUnreachableError, match="vitport.load"):
        vitport.load("hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k")


def test_connection_failures_without_offline_mode(hub_cache, monkeypatch):
    """Online mode but no network: huggingface_hub's own errors and raw connection errors."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("converters.locate.hub_reachable", lambda: True)  # let huggingface_hub fail
    for error in (LocalEntryNotFoundError("cannot find the requested files in the local cache"),
                  ConnectionError("Name or service not known"), TimeoutError("timed out")):
        def fail(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
        with pytest.raises(HubUnreachableError) as info:
            vitport.load("vit_base_patch16_224")
        assert "no network connection" in str(info.value)
        assert "--arch vit_base_patch16_224" in str(info.value)


def test_unknown_names_and_tags():
    with pytest.raises(UnsupportedArchitectureError, match="did you mean"):
        vitport.load("cait_s24_22")
    with pytest.raises(UnsupportedArchitectureError, match="no pretrained tag 'nope'"):
        vitport.load("cait_s24_224.nope")
    with pytest.raises(FileNotFoundError, match="no such file"):
        vitport.load("missing/model.safetensors", arch="cait_s24_224")
    with pytest.raises(FileNotFoundError, match="hf-hub:timm/cait_s24_224.fb_dist_in1k"):
        vitport.load("timm/cait_s24_224.fb_dist_in1k")


# -------------------------------------------------------------- converted folders out


def test_convert_writes_a_folder_that_loads_back_identically(tiny_dirs, tmp_path):
    for name, (model, folder) in tiny_dirs.items():
        for framework in FRAMEWORKS:
            out = tmp_path / f"{name}-{framework}"
            jm = vitport.convert(folder, out, framework)
            assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
            cfg = json.loads((out / "config.json").read_text())
            assert cfg["format"] == "vitport" and cfg["version"] == 1 and cfg["framework"] == framework
            assert cfg["architecture"] == model.pretrained_cfg["architecture"]
            assert cfg["spec"]["dim"] == 32 and cfg["source"] == str(folder)
            assert {"mean", "std", "crop_pct", "interpolation", "input_size"} <= set(cfg["pretrained_cfg"])
            back = vitport.load(out)
            assert back.framework == framework and back.spec == jm.spec
            assert tree_equal(back.params, jm.params)
            x = images(jm.spec, 2, "float32")
            np.testing.assert_array_equal(np.asarray(back(x)), np.asarray(jm(x)))
            ref = timm_logits(model, x)
            assert max_abs(back(x), ref) < 1e-5 * max(1.0, np.abs(ref).max())
            for other in FRAMEWORKS:  # a converted folder also loads into every other front-end
                assert max_abs(vitport.load(out, other)(x), jm(x)) < 1e-5


def test_params_never_share_memory_with_their_source(tmp_path):
    """XLA's CPU client takes suitably aligned host memory as the device buffer: a model from
    ``from_timm`` must not alias the torch tensors (a later in-place update of the timm model
    would rewrite the JAX params), nor a model loaded from a file the arrays of another load."""
    import torch

    model = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    jm = vitport.from_timm(model, "flax")
    before = {k: np.array(v) for k, v in jm.canonical().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    after = jm.canonical()
    assert [k for k in before if not np.array_equal(before[k], np.asarray(after[k]))] == []
    # lazily read tensors are fresh buffers of their own: two loads of one file share nothing
    out = vitport.save(jm, tmp_path / "m")
    a, b = vitport.load(out), vitport.load(out)
    pointers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(a.params)}
    assert not pointers & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(b.params)}


def test_converted_folder_loads_without_torch(tiny_dirs, tmp_path):
    outs, expected = [], []
    x = images(vitport.load(tiny_dirs["cait"][1]).spec, 2, "float32")  # both models take 32x32
    np.save(tmp_path / "x.npy", x)
    pairs = [(name, framework) for name in ("cait", "vit") for framework in FRAMEWORKS]  # every front-end
    for name, framework in pairs:
        out = tmp_path / f"{name}-{framework}"
        jm = vitport.convert(tiny_dirs[name][1], out, framework)
        outs.append(str(out))
        expected.append(np.asarray(jm(x)))
    code = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import numpy as np, vitport\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"for i, d in enumerate({outs!r}):\n"
        f"    np.save({str(tmp_path)!r} + f'/logits{{i}}.npy', np.asarray(vitport.load(d)(x)))\n"
        "assert sys.modules['torch'] is None\n"
    )
    run_without_torch(code)
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(np.load(tmp_path / f"logits{i}.npy"), e)


def assert_timm_loads_equal(original, arch: str, kwargs: dict, file: Path) -> None:
    """timm's own loader reads ``file`` into ``arch`` with every tensor equal to ``original``'s."""
    import timm
    import torch

    dtype = next(original.parameters()).dtype
    loaded = timm.create_model(arch, pretrained=True, **kwargs,
                               pretrained_cfg_overlay=dict(file=str(file), num_classes=kwargs["num_classes"]))
    theirs, ours = original.state_dict(), loaded.to(dtype).state_dict()
    assert theirs.keys() == ours.keys()
    unequal = [k for k in theirs if not torch.equal(theirs[k], ours[k])]
    assert not unequal, unequal


def test_export_to_timm_round_trips_exactly(tiny_dirs, tmp_path):
    for name, (model, folder) in tiny_dirs.items():
        arch = model.pretrained_cfg["architecture"]
        kw = TINY_CAIT if name == "cait" else TINY
        converted = tmp_path / f"{name}-haiku"
        vitport.convert(folder, converted, "haiku")
        out = tmp_path / f"{name}.safetensors"
        path, _ = vitport.export_timm(converted, out)
        assert path == out
        assert_timm_loads_equal(model, arch, kw, out)
        with pytest.raises(OutputExistsError):
            vitport.export_timm(converted, out)


# ------------------------------------------------------------------ resolution change


@pytest.mark.parametrize("arch,new", [("vit_base_patch16_224", 48), ("vit_base_patch16_224", 16),
                                      ("deit_base_distilled_patch16_224", (48, 24)),
                                      ("deit3_base_patch16_224", 40)])
def test_resampled_pos_embed_matches_timm(arch, new, tmp_path):
    """vitport.load(image_size=...) against timm's own resampling at load time (float32)."""
    import timm

    model = tiny_timm(arch, "float32", **TINY)
    folder = save_hub_dir(model, tmp_path / "m")
    size = new if isinstance(new, tuple) else (new, new)
    theirs = timm.create_model(arch, pretrained=True, **dict(TINY, img_size=size),
                               pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                           num_classes=10)).eval()
    for framework in FRAMEWORKS:
        jm = vitport.load(folder, framework, image_size=new)
        assert jm.spec.image_size == size and jm.pretrained_cfg["input_size"] == [3, *size]
        ours = jm.to_timm_state_dict()
        ref_pe = theirs.pos_embed.detach().numpy()
        assert ours["pos_embed"].shape == ref_pe.shape
        assert max_abs(ours["pos_embed"], ref_pe) < 1e-5
        x = images(jm.spec, 2, "float32")
        ref = timm_logits(theirs, x)
        assert max_abs(jm(x), ref) < 1e-5 * max(1.0, np.abs(ref).max())


def test_resampled_cait_matches_timms_resample_function(tiny_dirs, tmp_path):
    """timm's CaiT loader does not resample; its resample_abs_pos_embed is the reference."""
    import timm
    from timm.layers import resample_abs_pos_embed

    model, folder = tiny_dirs["cait"]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (6, 6), (4, 4), num_prefix_tokens=0)
    theirs = timm.create_model("cait_s24_224", **dict(TINY_CAIT, img_size=48)).eval()
    theirs.load_state_dict(sd)
    jm = vitport.load(folder, "haiku", image_size=48)
    assert max_abs(jm.to_timm_state_dict()["pos_embed"], sd["pos_embed"].numpy()) < 1e-5
    x = images(jm.spec, 2, "float32")
    ref = timm_logits(theirs, x)
    assert max_abs(jm(x), ref) < 1e-5 * max(1.0, np.abs(ref).max())
    # A resized folder keeps its new size.
    out = tmp_path / "cait48"
    vitport.convert(folder, out, "flax", image_size=48)
    assert vitport.load(out).spec.image_size == (48, 48)


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def workdir(tmp_path, tiny_dirs):
    """A copy of the tiny ViT's hub folder to damage, and an output path next to it."""
    src = tmp_path / "src"
    shutil.copytree(tiny_dirs["vit"][1], src)
    return src, tmp_path / "out"


def assert_untouched(before: list[str], root: Path) -> None:
    assert listing(root) == before, "the filesystem changed"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header_cut"])
def test_corrupt_safetensors(workdir, damage):
    src, out = workdir
    f = src / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes({"truncated": raw[: len(raw) - 100], "garbage": b"\x13\x37" * 5000, "empty": b"",
                   "header_cut": raw[:50]}[damage])
    before = listing(src.parent)
    with pytest.raises(CheckpointError) as info:
        vitport.convert(src, out)
    assert str(f) in str(info.value) and "truncated or corrupt" in str(info.value)
    assert_untouched(before, src.parent)


def test_checkpoint_for_another_architecture_lists_every_problem(workdir):
    src, out = workdir
    # DeiT-distilled weights, 3 blocks, no qkv bias, 5 classes, in the tiny ViT's folder.
    other = tiny_timm("deit_base_distilled_patch16_224", "float32", **dict(TINY, depth=3, qkv_bias=False, num_classes=5))
    import safetensors.torch

    safetensors.torch.save_file(other.state_dict(), src / "model.safetensors")
    before = listing(src.parent)
    with pytest.raises(ConversionError) as info:
        vitport.convert(src, out)
    problems = info.value.problems
    assert set(problems) == {"missing keys", "unexpected keys", "wrong shapes"}
    assert "blocks.0.attn.qkv.bias" in problems["missing keys"]
    assert {"dist_token", "head_dist.weight", "blocks.2.norm1.weight"} <= set(problems["unexpected keys"])
    assert any(p.startswith("pos_embed: (1, 18, 32)") for p in problems["wrong shapes"])
    assert any(p.startswith("head.weight: (5, 32)") for p in problems["wrong shapes"])
    assert_untouched(before, src.parent)


def test_unsupported_timm_settings_are_named(workdir):
    src, out = workdir
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_args"].update(pos_embed="none", norm_layer="simplenorm", embed_norm_layer="rmsnorm",
                             mystery_option=3)
    (src / "config.json").write_text(json.dumps(cfg))
    before = listing(src.parent)
    with pytest.raises(UnsupportedArchitectureError) as info:
        vitport.convert(src, out)
    for name in ("pos_embed='none'", "norm_layer='simplenorm'", "embed_norm_layer='rmsnorm'", "mystery_option=3"):
        assert name in str(info.value)
    assert_untouched(before, src.parent)


class _Payload:
    """Unpickling this creates a file: the proof that something ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_with_arbitrary_objects_are_refused_unexecuted(tiny_dirs, tmp_path):
    import torch

    marker = tmp_path / "executed"
    pickle.loads(pickle.dumps(_Payload(marker), protocol=2))  # the payload is live...
    assert marker.exists()
    marker.unlink()
    sd = tiny_dirs["cait"][0].state_dict()
    zipped = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": _Payload(marker)}, zipped)
    legacy = tmp_path / "evil.bin"
    with open(legacy, "wb") as f:
        pickle.dump({"model": _Payload(marker)}, f, protocol=2)
    before = listing(tmp_path)
    for path in (zipped, legacy):
        with pytest.raises(CheckpointError) as info:
            vitport.convert(path, tmp_path / "out", arch="cait_s24_224", model_args=TINY_CAIT)
        msg = str(info.value)
        assert "refused" in msg and "nothing in the file was executed" in msg and "weights_only=True" in msg
        assert "Path.touch" in msg or "touch" in msg or "global" in msg.lower()
    assert not marker.exists()  # ...and it did not run
    assert_untouched(before, tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a pickle" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(garbage)


def test_nan_and_inf_are_reported_by_tensor_name(workdir):
    import safetensors.numpy

    src, out = workdir
    sd = safetensors.numpy.load_file(src / "model.safetensors")
    sd["blocks.1.mlp.fc1.weight"][3, :2] = np.nan
    sd["head.bias"][0] = np.inf
    safetensors.numpy.save_file(sd, src / "model.safetensors")
    before = listing(src.parent)
    with pytest.raises(ConversionError) as info:
        vitport.convert(src, out)
    bad = info.value.problems["non-finite tensors"]
    assert bad == ["blocks.1.mlp.fc1.weight (2 of 4096 values)", "head.bias (1 of 10 values)"]
    assert "NaN or Inf" in str(info.value)
    assert_untouched(before, src.parent)


def test_existing_output_is_refused_unless_forced(workdir):
    src, out = workdir
    vitport.convert(src, out, framework="haiku")  # an earlier conversion: what --force may replace
    before = listing(src.parent)
    with pytest.raises(OutputExistsError, match="--force"):
        vitport.convert(src, out)
    assert_untouched(before, src.parent)
    vitport.convert(src, out, force=True)
    assert vitport.load(out).framework == "flax"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in src.parent.iterdir()) == ["out", "src"]  # no temporary leftovers


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion_leaves_nothing_behind(workdir, monkeypatch, exc, existing):
    import vitport.hub

    src, out = workdir
    if existing:
        vitport.convert(src, out, framework="haiku")
    before = listing(src.parent)

    def interrupt(*args, **kwargs):  # after model.safetensors was written, before config.json
        raise exc("interrupted")

    monkeypatch.setattr(vitport.hub, "write_json", interrupt)
    with pytest.raises(exc):
        vitport.convert(src, out, force=existing)
    assert_untouched(before, src.parent)


def test_interrupted_export_leaves_nothing_behind(workdir, monkeypatch):
    import converters.writer as cio

    src, _ = workdir
    target = src.parent / "timm.safetensors"
    before = listing(src.parent)

    def boom(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cio, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        vitport.export_timm(src, target)
    assert_untouched(before, src.parent)


def test_environment_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_each_front_end_is_imported_only_when_used(tiny_dirs, tmp_path):
    """``vitport.frontends`` imports a framework's entry on first use: converting imports no
    front-end at all, and running a converted folder imports its own framework only (Haiku and
    NNX bring flax.linen along themselves). About 2 s of a ``vitport convert`` command's 7 s
    on a 2-core VM (``benchmarks/README.md``, session 12)."""
    source = str(tiny_dirs["vit"][1])
    for fw in FRAMEWORKS:
        vitport.convert(source, tmp_path / fw, fw)
    np.save(tmp_path / "x.npy", images(vitport.load(tmp_path / "flax").spec, 1, "float32"))
    code = (
        "import json, sys, numpy as np, vitport\n"
        "heavy = ('haiku', 'flax.linen', 'flax.nnx', 'optax')\n"
        "fw, folder, x, scratch = sys.argv[1:]\n"
        f"vitport.convert({source!r}, scratch, fw)\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "vitport.load(folder)(np.load(x))\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    not_imported = {"haiku": {"flax.nnx"}, "flax": {"haiku", "flax.nnx"}, "nnx": {"haiku"}}
    own = {"haiku": "haiku", "flax": "flax.linen", "nnx": "flax.nnx"}
    for fw in FRAMEWORKS:
        proc = subprocess.run([sys.executable, "-c", code, fw, str(tmp_path / fw), str(tmp_path / "x.npy"),
                               str(tmp_path / f"scratch-{fw}")],
                              capture_output=True, text=True, timeout=300, env=env_with_test_xla_flags())
        assert proc.returncode == 0, proc.stderr[-3000:]
        imported = set(json.loads(proc.stdout.strip().splitlines()[-1]))
        assert own[fw] in imported and not imported & not_imported[fw], (fw, imported)
