"""Scale (issue 12): sharded models in every front-end, sharded checkpoints, multi-process embed.

Multi-device checks run in a subprocess that sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported (this process has
imported jax already, with one CPU device). The two-process ``embed`` forms one JAX job over
loopback.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import vitport
from converters import FRAMEWORKS
from converters.errors import InvalidArgumentError, MissingFileError
from helpers import TINY, env_with_test_xla_flags, images, tiny_timm
from test_checkpoints import populate_hub_cache, save_hub_dir, timm_logits, tree_equal

ROOT = Path(__file__).resolve().parents[1]

# One xdist worker runs the whole module: the autouse fixtures start the 8-device checks once.
pytestmark = pytest.mark.xdist_group("scale")


def _env(xla_flags: str = "") -> dict[str, str]:
    return env_with_test_xla_flags(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "tests"),
                                   XLA_FLAGS=xla_flags)


# ---------------------------------------------------------------------- sharded models

STRATEGY_CHECK = r"""
import json, os
assert "jax" not in __import__("sys").modules
import jax, numpy as np
from converters import FRAMEWORKS, flat_keys
import vitport
from vitport.sharding import memory_per_device, model_shardings
assert jax.device_count() == 8, jax.devices()

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=10)
x = np.random.default_rng(0).standard_normal((5, 32, 32, 3)).astype(np.float32)  # 5: not a multiple of 8
report = []
# every strategy in every front-end on ViT; CaiT (talking heads, class attention) under tp; and
# CaiT with its blocks stored stacked for a scan (set_scan_blocks), each strategy once
cases = [("vit_base_patch16_224", {}, [(fw, s) for fw in FRAMEWORKS for s in ("dp", "fsdp", "tp")], False),
         ("cait_s24_224", dict(depth_token_only=1), [("nnx", "tp")], False),
         ("cait_s24_224", dict(depth=2, depth_token_only=2), [("flax", "fsdp"), ("haiku", "tp"), ("nnx", "dp")], True)]
for arch, extra, runs, scan in cases:
    base = vitport.create_model(arch, framework="flax", rng=1, **{**SMALL, **extra})
    ref = np.asarray(base(x))
    for fw, strategy in runs:
        if scan and fw != "flax":  # stacked after sharding: placed again by the strategy
            sm = base.to(fw).shard(strategy=strategy).set_scan_blocks()
        else:
            sm = base.to(fw).set_scan_blocks(scan).shard(strategy=strategy)
        per_block = any("blocks_0/" in k or "blocks/0/" in k for k in flat_keys(sm.params, fw))
        assert sm.config.scan_blocks == scan and per_block != scan, (fw, strategy, scan)
        expected = jax.tree.leaves(model_shardings(sm, sm.mesh, strategy))
        assert all(a.sharding == s for a, s in zip(jax.tree.leaves(sm.params), expected)), (fw, strategy, scan)
        out = np.asarray(sm(x))
        leaves = jax.tree.leaves(sm.params)
        split = sum(a.addressable_shards[0].data.size < a.size for a in leaves)
        qkv = sm.canonical()["blocks.0.attn.qkv", "kernel"]
        per_device = memory_per_device(sm)
        # the feature API goes through the same batch split (checked once: each call compiles)
        feats = np.asarray(sm.forward_features(x)) if (fw, strategy) == ("haiku", "fsdp") else out
        report.append(dict(arch=arch, fw=fw, strategy=strategy, scan=scan, mesh=dict(sm.mesh.shape),
                           diff=float(np.abs(out - ref).max()), shape=out.shape, split=int(split),
                           leaves=len(leaves), qkv_shard=list(qkv.addressable_shards[0].data.shape),
                           qkv=list(qkv.shape), qkv_spec=str(qkv.sharding.spec),
                           max_device_bytes=max(per_device.values()),
                           total_bytes=sum(a.nbytes for a in leaves), features=list(feats.shape)))
print(json.dumps(report))
"""


FINETUNE_CHECK = r"""
import json, sys
from pathlib import Path
import jax, numpy as np
assert jax.device_count() == 8, jax.devices()
from helpers import TINY_CASES, tiny_timm
from test_checkpoints import save_hub_dir
from test_training import make_dataset
from converters.checkpoint_io import read_safetensors
from vitport import cli
from vitport.finetune import FinetuneConfig, _placement, finetune, load_for_finetuning
from vitport.training import TrainConfig, trainer_for

root = Path(sys.argv[1])
data = make_dataset(root / "data", per_class=(8, 4))
arch, kwargs = TINY_CASES["vit_token"]
source = save_hub_dir(tiny_timm(arch, "float32", **kwargs), root / "source")
report = {"steps": {}}
# One train step per strategy against one device: loss and gradient norm, and whether the
# params and the optimizer state stay split after the step.
x = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
y = np.arange(8, dtype=np.int32) % 3
# "fsdp-scan": the blocks stacked and scanned (--scan-blocks), their weights split by fsdp too.
for shard, scan in ((None, False), ("dp", False), ("fsdp", False), ("tp", False), ("fsdp", True)):
    cfg = FinetuneConfig(batch_size=8, shard=shard, framework="flax", scan_blocks=scan)
    to_devices, jm = _placement(load_for_finetuning(source, cfg, 3), cfg)
    trainer = trainer_for(jm, TrainConfig(total_steps=2, lr=1e-3, warmup_steps=0, layer_decay=0.75))
    state, metrics = trainer.train_step(trainer.init(jm.params), *to_devices(x, y))
    leaves = [a for a in jax.tree.leaves((state.params, state.opt_state)) if a.ndim]
    stacked = "blocks" in state.params["params"]
    report["steps"][str(shard) + ("-scan" if scan else "")] = dict(
        loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]), stacked=stacked,
        split=sum(a.addressable_shards[0].data.size < a.size for a in leaves), leaves=len(leaves))
# The command end to end: one epoch on one device, and with --shard fsdp.
common = ["--epochs", "1", "--lr", "1e-3", "--workers", "2", "--framework", "nnx"]
report["one_device"] = cli.main(["finetune", str(source), str(data), "--out", str(root / "one"), "--batch-size", "8",
                                 *common])
report["fsdp"] = cli.main(["finetune", str(source), str(data), "--out", str(root / "fsdp"), "--batch-size", "8",
                           "--shard", "fsdp", *common])
report["uneven"] = cli.main(["finetune", str(source), str(data), "--out", str(root / "uneven"), "--batch-size", "12",
                             "--shard", "fsdp", *common])
report["uneven_left"] = (root / "uneven").exists() or (root / "uneven.partial").exists()
history = [json.loads((root / o / "training.json").read_text())["history"][0] for o in ("one", "fsdp")]
report["history"] = history
a, b = (read_safetensors(root / o / "model.safetensors") for o in ("one", "fsdp"))
report["same_keys"] = a.keys() == b.keys()
report["max_weight_diff"] = max(float(np.abs(a[k] - b[k]).max()) for k in a)
print(json.dumps(report))
"""


@pytest.fixture(scope="module", autouse=True)
def strategy_run():
    """Started when the module starts, so the 8-device run overlaps the other tests; read by
    the last test."""
    proc = subprocess.Popen([sys.executable, "-c", STRATEGY_CHECK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env("--xla_force_host_platform_device_count=8"), cwd=ROOT)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def finetune_run(tmp_path_factory):
    """The sharded fine-tuning check, started with the module like ``strategy_run``."""
    root = tmp_path_factory.mktemp("sharded-finetune")
    proc = subprocess.Popen([sys.executable, "-c", FINETUNE_CHECK, str(root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=_env("--xla_force_host_platform_device_count=8"))
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def strategy_report(strategy_run) -> list[dict]:
    out, err = strategy_run.communicate(timeout=600)
    assert strategy_run.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small():
    return vitport.create_model("vit_base_patch16_224", framework="haiku", **dict(TINY, depth=1))


def test_partition_rule_is_written_once_on_the_key_table(small):
    """The tp rule, read off the canonical table: column-parallel qkv/fc1, row-parallel proj/fc2,
    conv and norms whole; the same rule lands on every front-end's path."""
    import jax
    from jax.sharding import Mesh

    from converters import framework_path, key_table
    from vitport.sharding import partition_spec, param_shardings

    spec = small.spec
    sizes = {"data": 2, "model": 4}
    specs = {e.timm_key: tuple(partition_spec(e, "tp", sizes)) for e in key_table(spec)}
    assert specs["blocks.0.attn.qkv.weight"] == (None, "model") and specs["blocks.0.attn.qkv.bias"] == ("model",)
    assert specs["blocks.0.mlp.fc1.weight"] == (None, "model")
    assert specs["blocks.0.attn.proj.weight"] == ("model", None) and specs["blocks.0.attn.proj.bias"] == ()
    assert specs["blocks.0.mlp.fc2.weight"] == ("model", None)
    assert specs["patch_embed.proj.weight"] == () and specs["blocks.0.norm1.weight"] == ()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    for fw in FRAMEWORKS:
        tree = param_shardings(spec, fw, mesh, "tp")
        for e in key_table(spec):
            node = tree
            for p in framework_path(e, spec, fw):
                node = node[p]
            assert node.mesh is mesh
    with pytest.raises(InvalidArgumentError, match="strategy must be one of"):
        small.shard(strategy="zero3")
    with pytest.raises(InvalidArgumentError, match="'model' axis"):
        small.shard(Mesh(np.array(jax.devices()), ("data",)), strategy="tp")


def test_one_device_shard_equals_unsharded(small):
    jm = small
    x = images(jm.spec, 3, "float32")
    sm = jm.shard(strategy="fsdp")
    assert np.array_equal(np.asarray(sm(x)), np.asarray(jm(x)))
    assert tree_equal(sm.unshard().params, jm.params)
    assert tree_equal(sm.to("nnx").canonical(), jm.canonical())


# ------------------------------------------------------------------ sharded checkpoints


@pytest.fixture(scope="module")
def sharded_hub(tmp_path_factory):
    """A tiny float32 ViT whose hub folder holds safetensors shards and an index, written by
    huggingface_hub's ``save_torch_state_dict``; and the same as pytorch_model-*.bin shards."""
    from huggingface_hub import save_torch_state_dict

    root = tmp_path_factory.mktemp("sharded")
    model = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    folder = save_hub_dir(model, root / "st")
    (folder / "model.safetensors").unlink()
    save_torch_state_dict(model.state_dict(), folder, max_shard_size="20KB")
    binf = root / "bin"
    binf.mkdir()
    save_torch_state_dict(model.state_dict(), binf, max_shard_size="20KB", safe_serialization=False)
    (binf / "config.json").write_bytes((folder / "config.json").read_bytes())
    return model, folder, binf


def test_sharded_hub_checkpoint_converts_and_exports(sharded_hub, tmp_path):
    from safetensors.numpy import load_file

    from converters.sharded import SAFETENSORS_INDEX, read_index
    from vitport.hub import describe, memory_needed

    model, folder, binf = sharded_hub
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (folder / SAFETENSORS_INDEX).is_file()
    x = images(vitport.load(folder).spec, 2, "float32")
    ref = timm_logits(model, x)
    nbytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert memory_needed(folder) == nbytes  # from the shard headers, no data read
    assert describe(folder)["memory"] == nbytes and describe(folder)["problems"] == {}
    for source, fw in ((folder, "haiku"), (binf, "nnx")):
        out = tmp_path / f"conv-{fw}"
        jm = vitport.convert(source, out, fw, max_shard_size="40KB")
        files = sorted(p.name for p in out.iterdir())
        assert SAFETENSORS_INDEX in files and sum(f.startswith("model-0") for f in files) >= 2, files
        assert set(read_index(out / SAFETENSORS_INDEX).values()) == {out / f for f in files if f.startswith("model-")}
        back = vitport.load(out)
        assert back.framework == fw and tree_equal(back.params, jm.params)
        assert np.max(np.abs(np.asarray(back(x)) - ref)) <= 1e-5
        exported, _ = vitport.export_timm(out, tmp_path / f"{fw}.safetensors")
        sd = load_file(str(exported))
        assert all(np.array_equal(sd[k], v.numpy()) for k, v in model.state_dict().items())
    # under the threshold: one model.safetensors as before; --force replaces a sharded folder
    vitport.convert(folder, tmp_path / "conv-haiku", "flax", force=True)
    assert sorted(p.name for p in (tmp_path / "conv-haiku").iterdir()) == ["config.json", "model.safetensors"]


def test_sharded_hub_repo_from_cache_and_missing_shard(sharded_hub, hub_cache, tmp_path, capsys, monkeypatch):
    from vitport import cli

    monkeypatch.setattr(cli.err_console, "width", 250)
    model, folder, _ = sharded_hub
    populate_hub_cache(hub_cache, "someone/tiny-sharded", {p.name: p for p in folder.iterdir()})
    jm = vitport.load("hf-hub:someone/tiny-sharded")
    x = images(jm.spec, 2, "float32")
    assert np.max(np.abs(np.asarray(jm(x)) - timm_logits(model, x))) <= 1e-5
    rc = cli.main(["convert", "hf-hub:someone/tiny-sharded", "--out", str(tmp_path / "c"), "--max-shard-size", "1MB"])
    err = capsys.readouterr().err
    assert rc == 0 and "the weights need 130.22 KB of memory" in err and "shards, read one at a time" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in folder.iterdir():
        if not p.name.startswith("model-00002"):
            (broken / p.name).write_bytes(p.read_bytes())
    with pytest.raises(MissingFileError, match="model-00002-of"):
        vitport.load(broken)


# --------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_embed_equals_one_process(tmp_path):
    from PIL import Image

    from vitport import cli

    model = tiny_timm("vit_base_patch16_224", "float32", **dict(TINY, depth=1))
    save_hub_dir(model, tmp_path / "hub")
    assert cli.main(["convert", str(tmp_path / "hub"), "--framework", "nnx", "--out", str(tmp_path / "m")]) == 0
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(
            photos / ("sub" if i % 2 else "") / f"im{i}.png")
    (photos / "bad.png").write_bytes(b"not a png")
    args = [str(tmp_path / "m"), str(photos), "--batch-size", "3"]
    assert cli.main(["embed", *args, "--out", str(tmp_path / "one.npz")]) == 0

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "vitport.cli", "embed", *args, "--out", str(tmp_path / "two.npz"),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(k)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
             for k in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    said = " ".join(outs[0][0].split())  # rich wraps lines at 80 columns without a terminal
    assert "dp over 2 device(s), 2 process(es)" in said and "skipped 1" in said and "wrote" not in outs[1][0]  # gloo prints its own lines
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert list(one["paths"]) == list(two["paths"]) and len(one["paths"]) == 7
        assert one["features"].dtype == two["features"].dtype
        # each process runs its own slice (other batch sizes, other XLA kernels): equal to float32 rounding
        np.testing.assert_allclose(one["features"], two["features"], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["one.npz", "two.npz"]  # nothing else written


def test_multi_process_flags_are_checked(capsys):
    from vitport import cli

    for argv, msg in ((["--num-processes", "2"], "need --coordinator"),
                      (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
                      (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
                       "--process-id must be in 0..1")):
        assert cli.main(["predict", "vit_base_patch16_224", "x.png", *argv]) == 2
        assert msg in capsys.readouterr().err


def test_strategy_names_agree():
    from vitport.cli_scale import STRATEGIES as CLI
    from vitport.sharding import STRATEGIES

    assert CLI == STRATEGIES


# --------------------------------------------- the 8-device run (started with the module)


def test_every_strategy_equals_unsharded_in_every_front_end(strategy_report):
    seen = {(r["fw"], r["strategy"]) for r in strategy_report if r["arch"].startswith("vit")}
    assert seen == {(fw, s) for fw in FRAMEWORKS for s in ("dp", "fsdp", "tp")}
    assert {r["strategy"] for r in strategy_report if r["scan"]} == {"dp", "fsdp", "tp"}
    for r in strategy_report:
        assert r["shape"] == [5, 10] and r["features"][0] == 5, r  # padded to 8, trimmed back to 5
        assert r["diff"] <= 1e-5, r
        if r["strategy"] == "dp":
            assert r["mesh"] == {"data": 8} and r["split"] == 0 and r["max_device_bytes"] == r["total_bytes"], r
        elif r["strategy"] == "fsdp":  # every weight with a dimension divisible by 8 is split
            assert r["mesh"] == {"data": 8} and r["split"] >= r["leaves"] // 2, r
            assert r["qkv_shard"] == [32, 12] and r["max_device_bytes"] < r["total_bytes"] / 4, r
        else:  # heads=4 -> model axis 4, data 2; qkv split by output columns
            assert r["mesh"] == {"data": 2, "model": 4} and r["split"] > 0, r
            assert r["qkv_shard"] == [32, 24] and "model" in r["qkv_spec"], r
            assert r["max_device_bytes"] < r["total_bytes"], r


def test_finetune_shards_params_and_optimizer_state_and_matches_one_device(finetune_run):
    """`vitport finetune --shard`: one train step under each strategy (and fsdp over stacked,
    scanned blocks) gives one device's loss and gradient norm; fsdp and tp leave the params and AdamW state split after the step; the
    fsdp command ends with a model equal to the one-device run to float32 reduction order
    (AdamW normalises each update, so weights may differ by a few ulps of lr per step)."""
    out, err = finetune_run.communicate(timeout=600)
    assert finetune_run.returncode == 0, err[-3000:]
    r = json.loads(out.strip().splitlines()[-1])
    one = r["steps"]["None"]
    for strategy in ("dp", "fsdp", "tp", "fsdp-scan"):
        step = r["steps"][strategy]
        assert abs(step["loss"] - one["loss"]) <= 1e-5 * abs(one["loss"]), (strategy, step, one)
        assert abs(step["grad_norm"] - one["grad_norm"]) <= 1e-4 * one["grad_norm"], (strategy, step, one)
    assert one["split"] == 0 and r["steps"]["dp"]["split"] == 0
    assert r["steps"]["fsdp"]["split"] >= r["steps"]["fsdp"]["leaves"] // 2, r["steps"]["fsdp"]
    scanned = r["steps"]["fsdp-scan"]
    assert scanned["stacked"] and not r["steps"]["fsdp"]["stacked"], r["steps"]
    assert scanned["split"] >= scanned["leaves"] // 2 and scanned["leaves"] < r["steps"]["fsdp"]["leaves"], scanned
    assert r["steps"]["tp"]["split"] > 0, r["steps"]["tp"]
    assert r["one_device"] == 0 and r["fsdp"] == 0, r
    one_epoch, fsdp_epoch = r["history"]
    assert abs(one_epoch["train_loss"] - fsdp_epoch["train_loss"]) <= 1e-4, r["history"]
    assert abs(one_epoch["val_loss"] - fsdp_epoch["val_loss"]) <= 1e-3, r["history"]
    assert r["same_keys"] and r["max_weight_diff"] <= 1e-3 * 3, r  # lr 1e-3, 3 steps
    assert r["uneven"] == 2 and not r["uneven_left"], r  # 12 does not split over 8 devices: one error, nothing written
