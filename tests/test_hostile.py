"""Hostile input and interrupted runs (issue 14): a clear VitportError every time, nothing
half-written, nothing clobbered, and what timm accepts accepted.

Categories: random bytes as checkpoints and configs (hypothesis), random config.json values
and model_args (hypothesis), unsafe pickles, unknown names, signals at several moments of a
real `vitport convert` (subprocess), SIGKILL leftovers, a full disk (subprocess under
RLIMIT_FSIZE), --force limits, permissions, key prefixes / init_values 0 / timm's MLP width,
fitting model_args for a mismatched checkpoint, and a hub that cannot be reached.
Tiny models only; the whole file runs in about a minute on two cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitport
import vitport_entry
from converters import ConversionError, VitportError
from converters.checkpoint_io import read_state_dict
from converters.errors import (CheckpointError, HubUnreachableError, InvalidArgumentError, OutputExistsError,
                               OutputWriteError)
from converters.validate import KWARG_CHECKS
from converters.writer import clean_leftovers
from helpers import TINY, TINY_CASES, images, tiny_timm
from vitport import cli

HYPOTHESIS = settings(max_examples=30, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def save_hub_dir(model, folder: Path) -> Path:
    from timm.models._hub import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".vitport-" in p.name)


def timm_logits(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A float32 tiny ViT in the hub layout, and that folder converted by vitport."""
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    folder = save_hub_dir(model, root / "hub")
    converted = root / "converted"
    vitport.convert(folder, converted)
    return model, folder, converted


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, " ".join(captured.err.split())


# ----------------------------------------------------------------- 1. bytes, configs, args


@HYPOTHESIS
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"\x80\x02", b"PK\x03\x04", b"\x08\x00\x00\x00\x00\x00\x00\x00{"]),
       ext=st.sampled_from([".pth", ".bin", ".safetensors"]))
def test_random_bytes_are_a_checkpoint_error(tmp_path_factory, data, prefix, ext):
    path = tmp_path_factory.mktemp("bytes") / f"weights{ext}"
    path.write_bytes(prefix + data)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg and "weights_only=False" not in msg


@HYPOTHESIS
@given(data=st.binary(max_size=300))
def test_random_bytes_as_config_json(tmp_path_factory, tiny, data):
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "model.safetensors").write_bytes((tiny[1] / "model.safetensors").read_bytes())
    (folder / "config.json").write_bytes(data)
    try:
        vitport.hub.resolve(folder)
    except VitportError:
        pass


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**9) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@HYPOTHESIS
@given(key=st.sampled_from(sorted(KWARG_CHECKS) + ["bogus_option"]), value=JSON_VALUES,
       where=st.sampled_from(["model_args", "pretrained_cfg", "top"]))
def test_random_config_json_values(tmp_path_factory, tiny, key, value, where):
    """Any value anywhere in config.json: a spec, or one VitportError naming it (never a traceback)."""
    folder = tmp_path_factory.mktemp("cfgval")
    cfg = json.loads((tiny[1] / "config.json").read_text())
    if where == "model_args":
        cfg.setdefault("model_args", {})[key] = value
    elif where == "pretrained_cfg":
        cfg["pretrained_cfg"][key if key in ("num_classes", "input_size") else "input_size"] = value
    else:
        cfg[key if key != "bogus_option" else "num_classes"] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").symlink_to(tiny[1] / "model.safetensors")
    try:
        r = vitport.hub.resolve(folder)
    except VitportError:
        return
    from converters.keymap import key_table

    assert key_table(r.spec)  # a spec that resolves is usable


@HYPOTHESIS
@given(args=st.dictionaries(st.sampled_from(sorted(KWARG_CHECKS)) | st.text(max_size=6), JSON_VALUES, max_size=4))
def test_random_model_args(tiny, args):
    try:
        r = vitport.hub.resolve(tiny[1] / "model.safetensors", arch="vit_base_patch16_224", model_args=args)
    except VitportError:
        return
    assert r.spec.depth >= 1 and r.spec.heads >= 1


@pytest.mark.parametrize("key,value,named", [("num_heads", 0, "num_heads=0"), ("depth", "12", "depth='12'"),
                                             ("embed_dim", None, "embed_dim=None"), ("mlp_ratio", -1, "mlp_ratio=-1"),
                                             ("img_size", [32], "img_size=[32]"), ("qkv_bias", "yes", "qkv_bias")])
def test_bad_config_values_are_named(tiny, tmp_path, capsys, key, value, named):
    cfg = json.loads((tiny[1] / "config.json").read_text())
    cfg.setdefault("model_args", {})[key] = value
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "src" / "model.safetensors").symlink_to(tiny[1] / "model.safetensors")
    rc, err = run_cli(capsys, "convert", tmp_path / "src", "--out", tmp_path / "out")
    assert rc == 2 and named in err and "config.json" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


PREPROCESSING_VALUES = (JSON_VALUES | st.floats(1e-6, 1e6) | st.sampled_from(["bilinear", "squash", "border"])
                        | st.lists(st.floats(-2, 2) | st.sampled_from([float("nan"), float("inf"), 0.0]),
                                   min_size=3, max_size=3))


@HYPOTHESIS
@given(key=st.sampled_from(["mean", "std", "crop_pct", "crop_mode", "interpolation"]), value=PREPROCESSING_VALUES,
       layout=st.sampled_from(["hub", "converted"]))
def test_random_preprocessing_values(tmp_path_factory, tiny, key, value, layout):
    """Any preprocessing value in a hub config.json or a converted folder's: refused when the
    source is resolved, naming it, or an image comes out as finite pixels of the model's size."""
    from vitport.preprocess import EvalTransform

    source = tiny[1] if layout == "hub" else tiny[2]
    folder = tmp_path_factory.mktemp("preprocessing")
    cfg = json.loads((source / "config.json").read_text())
    cfg["pretrained_cfg"][key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").symlink_to(source / "model.safetensors")
    try:
        r = vitport.hub.resolve(folder)
    except VitportError as e:
        assert f"{key}=" in str(e) and "config.json" in str(e), e
        return
    transform = EvalTransform.from_pretrained_cfg(r.pretrained_cfg, r.spec.image_size)
    x = transform(Image.new("RGB", (37, 53), (10, 200, 30)))
    assert x.shape == (*r.spec.image_size, 3) and np.isfinite(x).all()


@pytest.mark.parametrize("key,value", [("heads", 0), ("heads", "4"), ("dim", 0), ("image_size", [32, 0]),
                                       ("patch_size", None), ("depth", -1)])
def test_bad_spec_values_in_a_converted_folder_are_named(tiny, tmp_path, capsys, key, value):
    """A hand-edited spec is refused before the spec is built from it (its own checks would
    divide by ``heads``), in every command."""
    cfg = json.loads((tiny[2] / "config.json").read_text())
    cfg["spec"][key] = value
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").symlink_to(tiny[2] / "model.safetensors")
    for argv in (["info", folder], ["export", folder, "--out", tmp_path / "x.safetensors"]):
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and f"{key}=" in err and "config.json" in err and "Traceback" not in err, err


def test_unknown_model_in_verify(capsys):
    rc, err = run_cli(capsys, "verify", "vit_no_such_model")
    assert rc == 2 and "unknown architecture 'vit_no_such_model'" in err


def test_unsafe_pickle_is_refused_for_safety_not_called_corrupt(tmp_path):
    import torch

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"w": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        vitport.load(path, arch="vit_base_patch16_224")
    msg = str(info.value)
    assert "refused" in msg and "posix.system" in msg and "nothing in the file was executed" in msg
    assert "corrupt" not in msg and "weights_only=False" not in msg
    assert not marker.exists()


# ------------------------------------------------------------------------ 2. signals, SIGKILL

CONVERT = [sys.executable, "-m", "vitport_entry", "convert"]  # what the `vitport` script runs


def _start(tiny, out: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(CONVERT + [str(tiny[1]), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def convert_seconds(tiny, tmp_path_factory):
    """How long an uninterrupted `vitport convert` of the tiny model takes here."""
    out = tmp_path_factory.mktemp("timing") / "out"
    t0 = time.monotonic()
    proc = _start(tiny, out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return time.monotonic() - t0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("moment", [0.02, 0.6, 0.9])
def test_signal_at_any_moment_leaves_nothing(tiny, tmp_path, convert_seconds, signum, moment):
    out = tmp_path / "out"
    proc = _start(tiny, out)
    time.sleep(moment * convert_seconds)
    sent = proc.poll() is None
    if sent:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert leftovers(tmp_path) == []
    # Exit 0 only when the process ended before the signal (this run was quicker than the timing
    # run) or between poll() and send_signal (Popen does not signal an exited process): then the
    # output must be complete, as below.
    assert proc.returncode != 0 or out.exists(), err
    assert sent or proc.returncode == 0, err
    # Even while Python is still importing vitport (before main installs its handlers), the
    # entry point turns Ctrl-C into one line (vitport_entry.py). A signal that lands before the
    # interpreter has reached the entry point (while it imports runpy) is Python's own start-up:
    # no vitport code has run and none is in the traceback; that one is allowed.
    if not interrupted_before_the_entry_point(err):
        assert "Traceback" not in err, err
    # Before the commit nothing is there; a signal after it finds the output complete.
    if out.exists():
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        vitport.hub.resolve(out)


def interrupted_before_the_entry_point(err: str) -> bool:
    """Whether a traceback shows Python's start-up interrupted, before any of vitport's code ran."""
    ours = (Path(vitport_entry.__file__).resolve(), Path(vitport.__file__).resolve().parent)
    frames = [Path(f).resolve() for f in re.findall(r'File "([^"<]+)"', err)]
    return "Traceback" in err and not any(f == ours[0] or ours[1] in f.parents for f in frames)


def test_only_pythons_own_start_up_may_end_in_a_traceback():
    start_up = ('Could not import runpy module\nTraceback (most recent call last):\n'
                '  File "<frozen runpy>", line 15, in <module>\n'
                f'  File "{Path(re.__file__)}", line 7, in <module>\nKeyboardInterrupt\n')
    assert interrupted_before_the_entry_point(start_up)
    in_entry = start_up.replace("<frozen runpy>", vitport_entry.__file__)
    in_package = start_up.replace("<frozen runpy>", str(Path(cli.__file__)))
    assert not interrupted_before_the_entry_point(in_entry)
    assert not interrupted_before_the_entry_point(in_package)
    assert not interrupted_before_the_entry_point("interrupted: no output was written\n")


def test_sigkill_leftovers_are_cleaned_by_the_next_run(tiny, tmp_path, convert_seconds):
    out = tmp_path / "out"
    proc = _start(tiny, out)
    time.sleep(0.8 * convert_seconds)
    proc.kill()
    proc.communicate(timeout=60)
    dead = proc.pid  # reaped: no process has this pid now
    (tmp_path / f".out.vitport-tmp-{dead}-0123abcd").mkdir()  # as if it died while writing
    (tmp_path / f".other.vitport-tmp-{dead}-0123abcd").write_bytes(b"half")
    alive = tmp_path / f".out.vitport-tmp-{os.getppid()}-0123abcd"  # a live writer's: kept
    alive.mkdir()
    vitport.convert(tiny[1], out, force=out.exists())
    assert leftovers(tmp_path) == [alive.name]
    assert clean_leftovers(tmp_path) == []


def test_moved_aside_output_of_a_killed_run_is_restored(tiny, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "pass"])
    assert proc.returncode == 0
    dead = 2**22 + 17  # above the default pid_max of small machines: never running
    aside = tmp_path / f".out.vitport-old-{dead}-0123abcd"
    vitport.convert(tiny[1], aside)
    clean_leftovers(tmp_path)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------ 3. disk, force, umask


@pytest.mark.parametrize("command", ["convert", "export"])
def test_full_disk_is_one_error_and_leaves_nothing(tiny, tmp_path, command):
    out = tmp_path / ("out" if command == "convert" else "out.safetensors")
    src = tiny[1] if command == "convert" else tiny[2]
    # A file-size limit of a few KB: writing the weights fails with EFBIG as on a full disk
    # (Python ignores SIGXFSZ, so the write returns the error instead of killing the process).
    script = 'ulimit -f 8 && exec "$@"'
    proc = subprocess.run(["sh", "-c", script, "sh", sys.executable, "-m", "vitport.cli", command, str(src),
                           "--out", str(out)], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, err
    assert "could not write" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_disk_errors_in_process(tiny, tmp_path, monkeypatch):
    import errno

    import converters.writer as writer
    from safetensors import SafetensorError

    for exc in (OSError(errno.ENOSPC, "No space left on device"), SafetensorError("No space left on device (os error 28)")):
        def fail(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(writer, "write_safetensors", fail)
        with pytest.raises(OutputWriteError, match="the disk is full"):
            vitport.export_timm(tiny[2], tmp_path / "x.safetensors")
        assert list(tmp_path.iterdir()) == []


def test_force_never_replaces_foreign_things(tiny, tmp_path, capsys):
    other = tmp_path / "mine.safetensors"  # a folder, named like an export target
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    cases = [
        (["convert", tiny[1], "--out", "/dev/null", "--force"], "character device"),
        (["convert", tiny[1], "--out", other, "--force"], "holds files vitport did not write"),
        (["export", tiny[2], "--out", other, "--force"], "a folder"),
        (["convert", tiny[2], "--out", tiny[2], "--force", "--framework", "haiku"], "source being read"),
        (["convert", tiny[1], "--out", tiny[1], "--force"], "source being read"),
        (["export", tiny[1] / "model.safetensors", "--arch", "vit_base_patch16_224", "--out",
          tiny[1] / "model.safetensors", "--force"], "source being read"),
    ]
    before = {p: p.stat().st_mtime_ns for p in (*tiny[1].iterdir(), *tiny[2].iterdir())}
    for argv, expected in cases:
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and expected in err, (argv, err)
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert (other / "notes.txt").read_text() == "keep" and len(list(other.iterdir())) == 1
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert leftovers(tmp_path) == [] and leftovers(tiny[1].parent) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_permissions_follow_the_umask(tiny, tmp_path, umask):
    old = os.umask(umask)
    try:
        vitport.convert(tiny[1], tmp_path / "out")
        vitport.export_timm(tmp_path / "out", tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    for f in (tmp_path / "out" / "config.json", tmp_path / "out" / "model.safetensors", tmp_path / "t.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------- 4. accept what timm accepts


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_wrapper_prefixes_are_stripped(tiny, tmp_path, prefix, fmt):
    import safetensors.numpy
    import torch

    model = tiny[0]
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    else:
        safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()}, str(path))
    jm = vitport.load(path, arch="vit_base_patch16_224", model_args=TINY)
    x = images(jm.spec, dtype="float32")
    np.testing.assert_allclose(np.asarray(jm(x)), timm_logits(model, x), atol=1e-4)


@pytest.mark.parametrize("kwargs", [dict(init_values=0), dict(embed_dim=60, mlp_ratio=2.05)],
                         ids=["init_values_0", "mlp_width_int"])
def test_timm_settings_accepted_with_timms_result(tmp_path, kwargs):
    model = tiny_timm("vit_base_patch16_224", "float32", **dict(TINY, **kwargs))
    folder = save_hub_dir(model, tmp_path / "hub")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_args"] = dict(cfg.get("model_args") or {}, **kwargs)  # as a user would write it
    (folder / "config.json").write_text(json.dumps(cfg))
    jm = vitport.load(folder)
    x = images(jm.spec, dtype="float32")
    np.testing.assert_allclose(np.asarray(jm(x)), timm_logits(model, x), atol=1e-4)
    if "init_values" in kwargs:
        assert jm.spec.init_values is None
    else:
        assert jm.spec.mlp_dim == int(60 * 2.05) == 122


def test_mismatched_checkpoint_says_which_model_args_fit(tmp_path, capsys):
    import safetensors.numpy

    model = tiny_timm("vit_base_patch16_224", "float32", **dict(TINY, num_classes=21, img_size=48))
    path = tmp_path / "w.safetensors"
    safetensors.numpy.save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(ConversionError) as info:
        vitport.load(path, arch="vit_base_patch16_224", model_args=TINY)
    assert info.value.fitting_model_args == {"num_classes": 21, "img_size": 48}
    assert """--model-args '{"num_classes": 21, "img_size": 48}'""" in str(info.value)
    vitport.load(path, arch="vit_base_patch16_224", model_args=dict(TINY, **info.value.fitting_model_args))


# ------------------------------------------------------------------------------ 6. no network


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "https://hub.invalid"])
def test_unreachable_hub_fails_fast_with_offline_instructions(hub_cache, monkeypatch, endpoint):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    t0 = time.monotonic()
    with pytest.raises(HubUnreachableError) as info:
        vitport.load("vit_base_patch16_224")
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "HF_HUB_OFFLINE=1" in msg and "hf download" in msg and "--arch vit_base_patch16_224" in msg


def test_invalid_arguments_are_named(tiny, tmp_path, capsys):
    for argv, expected in [
        (["convert", tiny[1], "--out", tmp_path / "o", "--model-args", "[1]"], "--model-args must be a JSON object"),
        (["convert", tiny[1] / "model.safetensors", "--arch", "vit_base_patch16_224", "--out", tmp_path / "o",
          "--model-args", '{"depth": 0}'], "depth=0"),
        (["convert", tiny[1], "--out", tmp_path / "no" / "such" / "o"], "does not exist"),
    ]:
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and expected in err, (argv, err)
    assert isinstance(InvalidArgumentError("x"), ValueError) and isinstance(OutputExistsError("x"), OSError)


@pytest.mark.parametrize("size", ["abc", (64, 64, 3), 64.5, 0, 10**8, (9000, 9000)])
def test_resampled_sizes_are_checked(tiny, size):
    """``image_size`` resamples pos_embed: a size that is no size, or one whose position
    embedding could not fit in memory (10**8 reached XLA and aborted the process), is refused."""
    with pytest.raises(InvalidArgumentError, match="image_size="):
        vitport.load(tiny[2], image_size=size)


def test_resampled_size_on_the_command_line(tiny, tmp_path, capsys):
    rc, err = run_cli(capsys, "convert", tiny[2], "--out", tmp_path / "out", "--img-size", "99999999")
    assert rc == 2 and "image_size=" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_integer_weights_are_refused_not_narrowed(tiny, tmp_path, capsys):
    """An int64 tensor where timm has float weights would reach the device as int32, wrapped
    (2**32 + 5 -> 5); it is refused, named."""
    from safetensors.numpy import load_file, save_file

    weights = load_file(tiny[1] / "model.safetensors")
    weights["head.bias"] = np.full(weights["head.bias"].shape, 2**32 + 5, np.int64)
    save_file(weights, tmp_path / "int.safetensors")
    with pytest.raises(ConversionError, match="not floating-point") as e:
        vitport.load(tmp_path / "int.safetensors", arch="vit_base_patch16_224", model_args=TINY)
    assert e.value.problems["wrong dtypes"] == [f"head.bias: int64 in {tmp_path / 'int.safetensors'}, "
                                                "a floating-point tensor expected"]


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_sparse_tensors_in_a_pth_are_named(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    weights = load_file(tiny[1] / "model.safetensors")
    weights["head.weight"] = weights["head.weight"].to_sparse()
    torch.save(weights, tmp_path / "sparse.pth")
    with pytest.raises(CheckpointError, match=r"sparse\.pth: head\.weight is a sparse_coo tensor.*to_dense"):
        vitport.load(tmp_path / "sparse.pth", arch="vit_base_patch16_224", model_args=TINY)


@pytest.mark.parametrize("argv", [["verify", "--batch", "0"], ["verify", "--seed", "-1"],
                                  ["verify", "--batch", "x"], ["finetune", "m", "d", "--seed", "-1"]])
def test_counts_on_the_command_line_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".ico", ".blp", ".xbm", ".msp", ".h5"])
def test_attention_pictures_only_in_formats_that_hold_them(tiny, tmp_path, capsys, suffix):
    """ICO would shrink the picture to 256 pixels, BLP refuses RGB, XBM and MSP are 1-bit:
    refused before the model loads."""
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    rc, err = run_cli(capsys, "attention", tiny[2], image, "--out", tmp_path / f"a{suffix}")
    assert rc == 2 and f"not {suffix}" in err and "weights need" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_image_api_inputs_are_named(tiny):
    import io

    from vitport.preprocess import ImageError

    jm = vitport.load(tiny[2])
    for bad in (b"\x89PNG", io.BytesIO(b"x"), 3):
        with pytest.raises(InvalidArgumentError, match=f"got {type(bad).__name__}; open bytes"):
            jm.predict(bad)
    with pytest.raises(ImageError, match="empty"):
        jm.predict(Image.new("RGB", (0, 0)))
    for k in (2.5, None, True, 0):
        with pytest.raises(InvalidArgumentError, match="top_k must be an integer"):
            jm.predict(Image.new("RGB", (30, 30)), top_k=k)
    assert len(jm.predict(Image.new("RGB", (30, 30)), top_k=np.int64(2))[0]) == 2


def test_a_converted_folder_keeps_its_architecture(tiny, tmp_path, capsys):
    """``--arch`` cannot relabel a converted folder; a config.json whose ``architecture`` is no
    name is refused, and one without any gets no made-up timm snippet from export."""
    rc, err = run_cli(capsys, "info", tiny[2], "--arch", "vit_small_patch16_224")
    assert rc == 2 and "cannot change it" in err, err
    assert vitport.hub.resolve(tiny[2], arch="vit_base_patch16_224").architecture == "vit_base_patch16_224"
    cfg = json.loads((tiny[2] / "config.json").read_text())
    for value, rc_expected in (({"a": 1}, 2), (None, 0)):
        folder = tmp_path / f"m{rc_expected}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, "architecture": value}))
        (folder / "model.safetensors").symlink_to(tiny[2] / "model.safetensors")
        rc = cli.main(["export", str(folder), "--out", str(tmp_path / f"x{rc_expected}.safetensors")])
        out, err = capsys.readouterr()
        assert rc == rc_expected, err
        assert ("'architecture' must be a timm model name" in err) if rc else ("names no timm architecture" in out
                                                                               and "create_model(''" not in out)


def test_force_names_what_it_will_not_replace(tiny, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    rc, err = run_cli(capsys, "convert", tiny[2], "--out", tmp_path / "file.txt", "--force")
    assert rc == 2 and "is a file; --force only replaces a folder" in err, err
    assert (tmp_path / "file.txt").read_text() == "mine"


def test_resampling_models_without_a_learned_position_embedding(tmp_path):
    """DINOv3 places tokens by rotary embedding only: a new image size changes no tensor, and the
    model equals timm's built at that size. A relative-position ViT's tables are sized by the grid:
    refused, named (both were tracebacks)."""
    import timm
    import torch

    from converters.errors import UnsupportedArchitectureError

    arch, kwargs = TINY_CASES["eva_dinov3_swiglu_reg"]
    model = tiny_timm(arch, "float32", **kwargs)
    vitport.save(vitport.from_timm(model, "flax"), tmp_path / "dinov3")
    new = tuple(2 * s for s in vitport.load(tmp_path / "dinov3").spec.image_size)
    jm = vitport.load(tmp_path / "dinov3", image_size=new)
    theirs = timm.create_model(arch, pretrained=False, **dict(kwargs, img_size=new)).eval()
    theirs.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).standard_normal((2, *new, 3)).astype(np.float32)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(np.asarray(jm(x)) - ref).max() <= 1e-5 * np.abs(ref).max()
    arch, kwargs = TINY_CASES["relpos_mlp_res_post_cls_token"]
    vitport.save(vitport.from_timm(tiny_timm(arch, "float32", **kwargs), "flax"), tmp_path / "relpos")
    with pytest.raises(UnsupportedArchitectureError, match="relative-position"):
        vitport.load(tmp_path / "relpos", image_size=64)
