"""The vitport command line: convert, verify, export, info, list, --help; bad input ends in one
error paragraph (exit 2) with the filesystem as it was; full-size cait_s24_224 and
vit_base_patch16_224 go hub layout -> JAX folder -> (no torch) logits -> timm and back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import vitport
from helpers import TINY, TINY_CAIT, images, run_without_torch, tiny_timm
from test_checkpoints import (_Payload, assert_timm_loads_equal, listing, max_abs, populate_hub_cache,
                              save_hub_dir, timm_logits, tree_equal)
from vitport import cli

TINY_JSON = json.dumps(TINY)
TINY_CAIT_JSON = json.dumps(TINY_CAIT)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Tables and messages unwrapped, so assertions can look for whole lines."""
    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-tiny")
    vit = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    cait = tiny_timm("cait_s24_224", "float32", **TINY_CAIT)
    return {"vit": (vit, save_hub_dir(vit, root / "vit")), "cait": (cait, save_hub_dir(cait, root / "cait"))}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [None, "convert", "verify", "export", "info", "list"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: vitport {command or ''}".rstrip())
    if command in ("convert", "export", "info"):
        assert "--arch" in out and "--model-args" in out and "--revision" in out
    if command in ("convert", "export"):
        assert "--force" in out and "--out" in out


def test_list(capsys):
    rc, out, _ = run(capsys, "list", "cait_s24_*")
    assert rc == 0
    assert "cait_s24_224" in out and "cait_s24_384" in out and "fb_dist_in1k" in out
    assert "2 architectures" in out


# ---------------------------------------------------------------------- happy paths


def test_convert_info_export(tiny, tmp_path, capsys):
    model, folder = tiny["cait"]
    out = tmp_path / "cait-haiku"
    rc, text, _ = run(capsys, "convert", folder, "--framework", "haiku", "--out", out)
    assert rc == 0, text
    assert "cait_s24_224" in text and "haiku" in text and f"{58266:,}" in text
    assert "[0.485, 0.456, 0.406]" in text and "bicubic" in text
    jm = vitport.load(out)
    assert jm.framework == "haiku"
    x = images(jm.spec, 2, "float32")
    ref = timm_logits(model, x)
    assert max_abs(jm(x), ref) < 1e-5 * max(1.0, np.abs(ref).max())

    rc, text, _ = run(capsys, "info", out)
    assert rc == 0
    for line in ("vitport folder (haiku params)", "cait_s24_224", "80", "58,266", "float32 (80)",
                 "matches architecture", "cls_depth", "crop_pct"):
        assert line in text, line
    rc, text, _ = run(capsys, "info", folder / "model.safetensors", "--arch", "cait_s24_224",
                      "--model-args", TINY_CAIT_JSON)
    assert rc == 0 and "single weights file" in text and "yes" in text

    exported = tmp_path / "cait.safetensors"
    rc, text, _ = run(capsys, "export", out, "--to", "timm", "--out", exported)
    assert rc == 0 and "timm.create_model('cait_s24_224', pretrained=True" in text
    assert_timm_loads_equal(model, "cait_s24_224", TINY_CAIT, exported)
    # The printed snippet is the real thing.
    import timm

    snippet = text.split("load it in timm with:")[1].strip()
    assert max_abs(timm_logits(eval(snippet, {"timm": timm}).eval(), x), ref) == 0


def test_convert_with_new_image_size_and_dtype(tiny, tmp_path, capsys):
    _, folder = tiny["vit"]
    out = tmp_path / "vit-48-bf16"
    rc, text, _ = run(capsys, "convert", folder, "--out", out, "--img-size", "48", "--dtype", "bfloat16")
    assert rc == 0, text
    assert "bfloat16, accumulating in float32; float32 activations" in text
    jm = vitport.load(out)
    assert jm.spec.image_size == (48, 48) and jm.pretrained_cfg["input_size"] == [3, 48, 48]
    # --dtype bfloat16 is JaxModel.astype(bfloat16)'s bf16 mode, and the folder keeps it
    assert str(jm.dtype) == "bfloat16" and jm.config.matmul_dtype == "bfloat16"
    assert str(jm.params["params"]["pos_embed"].dtype) == "float32"
    rc, text, _ = run(capsys, "info", out)
    assert rc == 0 and "bfloat16, accumulating in float32; float32 activations" in text


def test_info_reports_a_mismatch(tiny, tmp_path, capsys):
    _, folder = tiny["vit"]
    rc, text, _ = run(capsys, "info", folder / "model.safetensors", "--arch", "cait_s24_224",
                      "--model-args", TINY_CAIT_JSON)
    assert rc == 1
    assert "NO: missing keys (48): blocks.0.gamma_1" in text and "pos_embed: (1, 17, 32), (1, 16, 32) expected" in text
    assert "num_classes   │ 10 " in text  # the preprocessing follows --model-args


def test_verify_real_weights(tiny, hub_cache, capsys, tmp_path):
    model, folder = tiny["cait"]
    rc, text, _ = run(capsys, "verify", "--checkpoint", folder, "--framework", "haiku", "--dtype", "both")
    assert rc == 0, text
    assert "weights (80 tensors, 58,266 values)" in text and "blocks_token_only.1" in text and "PASS" in text
    # Through the hub cache, by timm name: timm and vitport each find the weights themselves.
    populate_hub_cache(hub_cache, "timm/cait_s24_224.fb_dist_in1k",
                       {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    rc, text, _ = run(capsys, "verify", "--pretrained", "cait_s24_224", "--model-args", TINY_CAIT_JSON,
                      "--framework", "flax", "--dtype", "float32")
    assert rc == 0, text
    # A bare file, and a converted folder.
    rc, text, _ = run(capsys, "verify", "--checkpoint", folder / "model.safetensors", "--arch", "cait_s24_224",
                      "--model-args", TINY_CAIT_JSON, "--framework", "haiku", "--dtype", "float32")
    assert rc == 0, text
    vitport.convert(folder, tmp_path / "conv", "flax")
    rc, text, _ = run(capsys, "verify", "--checkpoint", tmp_path / "conv", "--dtype", "float32")
    assert rc == 0, text


def test_verify_catches_a_misread_checkpoint(tiny, capsys, monkeypatch):
    """If vitport read gamma_1 where gamma_2 is, verify must fail, and say where."""
    import vitport.hub

    real = vitport.hub.read_canonical

    def swapped(r, progress=None):
        tree = dict(real(r, progress))
        a, b = ("blocks.1", "gamma_1"), ("blocks.1", "gamma_2")
        tree[a], tree[b] = tree[b], tree[a]
        return tree

    monkeypatch.setattr(vitport.hub, "read_canonical", swapped)
    _, folder = tiny["cait"]
    rc, text, _ = run(capsys, "verify", "--checkpoint", folder, "--framework", "haiku", "--dtype", "float32")
    assert rc == 1 and "FAIL" in text


# ------------------------------------------------------------------------ bad input


def _bad_inputs(tiny, tmp: Path, hub_cache: Path):
    """(name, argv, expected text) for every bad input; each builds its files under tmp."""
    import safetensors.numpy
    import torch

    _, vit_dir = tiny["vit"]
    cait_model, _ = tiny["cait"]
    out = tmp / "out"

    def copy(name):
        dst = tmp / name
        shutil.copytree(vit_dir, dst)
        return dst

    corrupt = copy("corrupt")
    raw = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(raw[:-64])

    other = copy("other")
    deit = tiny_timm("deit_base_distilled_patch16_224", "float32", **dict(TINY, depth=3, num_classes=5))
    import safetensors.torch

    safetensors.torch.save_file(deit.state_dict(), other / "model.safetensors")

    unsupported = copy("unsupported")
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["model_args"]["norm_layer"] = "simplenorm"
    (unsupported / "config.json").write_text(json.dumps(cfg))

    evil = tmp / "evil.pth"
    torch.save({"model": cait_model.state_dict(), "x": _Payload(tmp / "executed")}, evil)

    nan = copy("nan")
    sd = safetensors.numpy.load_file(nan / "model.safetensors")
    sd["blocks.0.attn.proj.weight"][0, 0] = np.nan
    safetensors.numpy.save_file(sd, nan / "model.safetensors")

    bare = tmp / "bare.safetensors"
    shutil.copyfile(vit_dir / "model.safetensors", bare)

    existing = tmp / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")

    return [
        ("corrupt", ["convert", corrupt, "--out", out], "truncated or corrupt"),
        ("other-architecture", ["convert", other, "--out", out], "unexpected keys"),
        ("unsupported-setting", ["convert", unsupported, "--out", out], "norm_layer='simplenorm'"),
        ("arbitrary-pickle", ["convert", evil, "--arch", "cait_s24_224", "--model-args", TINY_CAIT_JSON,
                              "--out", out], "nothing in the file was executed"),
        ("nan", ["convert", nan, "--out", out], "blocks.0.attn.proj.weight (1 of 1024 values)"),
        ("existing-output", ["convert", vit_dir, "--out", existing], "already exists"),
        ("no-network", ["convert", "cait_s24_224", "--out", out], "--arch cait_s24_224"),
        ("bare-file-no-arch", ["convert", bare, "--out", out], "--arch NAME"),
        ("bad-model-args", ["convert", vit_dir, "--model-args", "{num_classes: 3}", "--out", out], "JSON object"),
        ("export-existing", ["export", vit_dir, "--out", existing / "keep.txt"], "must name a .safetensors"),
        ("unknown-name", ["info", "vit_base_patch16_2244"], "did you mean"),
    ]


def test_every_bad_input_is_one_error_paragraph_and_changes_nothing(tiny, tmp_path, hub_cache, capsys):
    cases = _bad_inputs(tiny, tmp_path, hub_cache)
    before = listing(tmp_path)
    for name, argv, expected in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == 2, (name, out, err)
        # The only line allowed before the error is the memory note printed before loading.
        note, _, error = err.rpartition("error: ")
        assert error and (not note or " ".join(note.split()).startswith("the weights need")), (name, err)
        assert expected in " ".join(error.split()), (name, err)
        assert "\n\n" not in err.strip() and "Traceback" not in err, (name, err)
        assert listing(tmp_path) == before, name
    assert not (tmp_path / "executed").exists()
    assert (tmp_path / "existing" / "keep.txt").read_text() == "keep"


def test_force_replaces_an_existing_output(tiny, tmp_path, capsys):
    _, folder = tiny["vit"]
    out = tmp_path / "out"
    assert run(capsys, "convert", folder, "--out", out, "--framework", "haiku")[0] == 0
    rc, _, _ = run(capsys, "convert", folder, "--out", out, "--force")
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["framework"] == "flax"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_ctrl_c_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    import vitport.hub

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vitport.hub, "write_json", interrupt)
    rc, _, err = run(capsys, "convert", tiny["vit"][1], "--out", tmp_path / "out")
    assert rc == 130 and "interrupted" in err
    assert listing(tmp_path) == []


# ---------------------------------------------------------------------------- full size

FULL = {"cait_s24_224": "haiku", "vit_base_patch16_224": "flax"}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """Full-size cait_s24_224 and vit_base_patch16_224, bug-sensitive random weights, in the hub
    layout (timm's writer), converted once through the CLI."""
    root = tmp_path_factory.mktemp("full")
    out = {}
    for arch, framework in FULL.items():
        model = tiny_timm(arch, "float32")  # full size: no kwargs
        folder = save_hub_dir(model, root / arch)
        converted = root / f"{arch}-{framework}"
        assert cli.main(["convert", str(folder), "--framework", framework, "--out", str(converted)]) == 0
        out[arch] = (model, folder, converted)
    return out


@pytest.mark.slow
def test_full_size_convert_load_without_torch_and_export(full_size, tmp_path, capsys):
    from vitport.parity import TOLERANCES

    x = images(vitport.load(full_size["cait_s24_224"][2]).spec, 2, "float32")
    np.save(tmp_path / "x.npy", x)
    logits = {}
    for arch, (model, folder, converted) in full_size.items():
        jm = vitport.load(converted)
        assert jm.framework == FULL[arch] and jm.architecture == arch
        assert jm.num_params() == {"cait_s24_224": 46_916_200, "vit_base_patch16_224": 86_567_656}[arch]
        logits[arch] = np.asarray(jm(x))
        ref = timm_logits(model, x)
        err = max_abs(logits[arch], ref)
        with capsys.disabled():
            print(f"\n{arch} [{FULL[arch]}, float32]: max |logits - timm| = {err:.3e} "
                  f"(max |timm| {np.abs(ref).max():.3g})")
        assert err <= TOLERANCES["float32"] * max(1.0, np.abs(ref).max())
        # The Python API gives the same params as the CLI's folder.
        assert tree_equal(vitport.load(folder, FULL[arch]).params, jm.params)
        # Export back: timm's loader, every tensor equal.
        exported = tmp_path / f"{arch}.safetensors"
        assert cli.main(["export", str(converted), "--to", "timm", "--out", str(exported)]) == 0
        assert_timm_loads_equal(model, arch, {"num_classes": 1000}, exported)
    capsys.readouterr()

    # Loading needs no torch: identical logits in a process where torch and timm cannot import.
    dirs = {arch: str(c) for arch, (_, _, c) in full_size.items()}
    code = (
        "import jax; jax.config.update('jax_enable_x64', True)\n"
        "import numpy as np, vitport\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
        f"for arch, d in {dirs!r}.items():\n"
        f"    np.save({str(tmp_path)!r} + f'/{{arch}}.npy', np.asarray(vitport.load(d)(x)))\n"
        "assert sys.modules['torch'] is None and sys.modules['timm'] is None\n"
    )
    run_without_torch(code, timeout=600)
    for arch in FULL:
        np.testing.assert_array_equal(np.load(tmp_path / f"{arch}.npy"), logits[arch])


@pytest.mark.slow
def test_full_size_by_timm_name_through_the_hub_cache(full_size, hub_cache, tmp_path, capsys):
    """`vitport convert cait_s24_224` resolves timm's default tag and reads huggingface_hub's cache."""
    _, folder, converted = full_size["cait_s24_224"]
    populate_hub_cache(hub_cache, "timm/cait_s24_224.fb_dist_in1k",
                       {"config.json": folder / "config.json", "model.safetensors": folder / "model.safetensors"})
    out = tmp_path / "by-name"
    rc, text, err = run(capsys, "convert", "cait_s24_224", "--framework", "haiku", "--out", out)
    assert rc == 0, err
    assert "hf-hub:timm/cait_s24_224.fb_dist_in1k" in text
    assert tree_equal(vitport.load(out).params, vitport.load(converted).params)
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 1.0



def test_compilation_cache_folder_follows_the_environment(tmp_path):
    """``vitport.compile_cache``: one folder per jax version and CPU under
    ``$XDG_CACHE_HOME/vitport/xla`` or ``VITPORT_COMPILATION_CACHE``; off values and jax's own
    ``JAX_COMPILATION_CACHE_DIR`` leave jax alone; an unwritable folder leaves the cache off."""
    from vitport import compile_cache

    tag = compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}).name
    assert tag.startswith(f"jax-{jax.__version__}-") and tag.endswith(compile_cache.machine_tag())
    assert compile_cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "vitport" / "xla" / tag
    assert compile_cache.cache_dir({"VITPORT_COMPILATION_CACHE": str(tmp_path / "c")}) == tmp_path / "c" / tag
    for off in ("0", "off", "OFF", "false", "no", ""):
        assert compile_cache.cache_dir({"VITPORT_COMPILATION_CACHE": off}) is None
    assert compile_cache.cache_dir({"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "j")}) is None
    env = {"VITPORT_COMPILATION_CACHE": str(tmp_path / "c")}
    assert compile_cache.enable(env) == tmp_path / "c" / tag and (tmp_path / "c" / tag).is_dir()
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "c" / tag)
    (tmp_path / "file").write_text("not a folder")
    env = {"VITPORT_COMPILATION_CACHE": str(tmp_path / "file")}
    assert compile_cache.enable(env) is None and "JAX_COMPILATION_CACHE_DIR" not in env
