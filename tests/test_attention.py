"""Attention rollout and last-block maps equal a plain numpy reference computed from timm's own
attention weights; `vitport attention` writes the picture atomically (tiny models, offline)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TINY, TINY_CAIT, images, tiny_timm
from PIL import Image
from test_features import timm_attention, torch_nchw

import vitport
from converters import FRAMEWORKS
from converters.errors import InvalidArgumentError, OutputExistsError
from vitport import cli
from vitport.attention import (MIN_PANEL_SIDE, OVERLAY_ALPHA, PANEL_GAP, AttentionMapError, attention_image,
                               colour_map, patch_attention, patch_weights, write_attention_image)
from vitport.preprocess import ImageError

# (timm architecture, kwargs, the query rows the classifier reads, front-end)
CASES = {
    "class_token": ("vit_base_patch16_224", TINY, "cls", "flax"),
    "class_token_reg_tokens": ("vit_base_patch16_224", dict(TINY, reg_tokens=3), "cls", "haiku"),
    "reg_tokens_avg_pool": ("vit_base_patch16_reg4_gap_256", TINY, "patches", "nnx"),
    "no_class_token_avg_pool": ("vit_base_patch16_224", dict(TINY, class_token=False, global_pool="avg"),
                                "patches", "flax"),
    "distilled": ("deit_base_distilled_patch16_224", TINY, "cls+dist", "haiku"),
}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)


# --------------------------------------------------------------------- numpy reference


def reference_rollout(layers: list[np.ndarray]) -> np.ndarray:
    """Abnar & Zuidema, one image at a time, written out: (T, T)."""
    joint = None
    for a in layers:
        a = a.mean(axis=0)  # heads
        a = a + np.eye(len(a))
        a = a / a.sum(axis=-1, keepdims=True)
        joint = a if joint is None else a @ joint
    return joint


def reference_vit(timm_maps: dict, model, read: str, method: str) -> np.ndarray:
    depth = len(model.blocks)
    layers = [timm_maps[f"blocks.{i}"] for i in range(depth)]
    prefix = model.num_prefix_tokens
    out = []
    for b in range(layers[0].shape[0]):
        m = reference_rollout([a[b] for a in layers]) if method == "rollout" else layers[-1][b].mean(0)
        if read == "cls":
            row = m[0]
        elif read == "cls+dist":
            row = (m[0] + m[1]) / 2
        else:
            row = m[prefix:].mean(0)
        out.append(row[prefix:])
    return np.stack(out)


def reference_cait_rollout(timm_maps: dict, model) -> np.ndarray:
    """CaiT: the patches' rollout, then each class-attention block as a (1+N) x (1+N) matrix
    whose first row is (attn + e_cls) / 2 and whose other rows are the identity."""
    patches = [timm_maps[f"blocks.{i}"] for i in range(len(model.blocks))]
    cls_blocks = [timm_maps[f"blocks_token_only.{j}"] for j in range(len(model.blocks_token_only))]
    out = []
    for b in range(patches[0].shape[0]):
        r = reference_rollout([a[b] for a in patches])
        n = len(r)
        joint = np.eye(1 + n)
        joint[1:, 1:] = r
        for c in cls_blocks:
            step = np.eye(1 + n)
            row = c[b][:, 0].mean(0) + np.eye(1 + n)[0]
            step[0] = row / row.sum()
            joint = step @ joint
        out.append(joint[0, 1:])
    return np.stack(out)


def close(ours, theirs, what, tol=1e-10):
    ours = np.asarray(ours).reshape(theirs.shape)
    err = float(np.abs(ours - theirs).max())
    assert err <= tol * max(1.0, float(np.abs(theirs).max())), f"{what}: max abs {err:.3e}"


@pytest.mark.parametrize("case", CASES)
def test_vit_equals_numpy_reference_on_timm_weights(case):
    arch, kwargs, read, framework = CASES[case]
    model = tiny_timm(arch, "float64", **kwargs)
    jm = vitport.from_timm(model, framework)  # one front-end each: the maps' parity is test_features' job
    x = images(jm.spec, dtype="float64")
    maps = timm_attention(model, torch_nchw(x))
    grid = (2, 1, *jm.spec.grid_size)
    for method in ("rollout", "last"):
        theirs = reference_vit(maps, model, read, method)
        ours = patch_attention(jm, x, method)
        assert ours.shape == grid
        close(ours, theirs, f"{case} {method}")
        if jm.spec.num_prefix_tokens and method == "rollout":  # rows of stochastic matrices, less the prefix keys
            assert (theirs > 0).all() and (theirs.sum(-1) < 1).all()
    # --heads: the last block split by head (rollout: earlier blocks head-averaged). The heads'
    # mean of (attn_h + I) / 2 is the head-averaged step, so the panels average to the rollout.
    last = maps[f"blocks.{len(model.blocks) - 1}"]
    per_head = patch_attention(jm, x, "last", heads=True)
    assert per_head.shape == (2, TINY["num_heads"], *jm.spec.grid_size)
    rows = {"cls": [0], "cls+dist": [0, 1], "patches": slice(model.num_prefix_tokens, None)}[read]
    close(per_head, last[:, :, rows, model.num_prefix_tokens:].mean(2), f"{case} last per head")
    rolled = patch_attention(jm, x, "rollout", heads=True)
    close(rolled.mean(1), patch_attention(jm, x, "rollout")[:, 0], f"{case} rollout heads average")


def test_cait_last_and_rollout_equal_numpy_reference():
    model = tiny_timm("cait_s24_224", "float64", **TINY_CAIT)
    jm = vitport.from_timm(model, "haiku")
    x = images(jm.spec, dtype="float64")
    maps = timm_attention(model, torch_nchw(x))
    last = maps[f"blocks_token_only.{len(model.blocks_token_only) - 1}"]  # (B, heads, 1, 1 + N)
    close(patch_attention(jm, x, "last"), last[:, :, 0, 1:].mean(1), "cait last")
    close(patch_attention(jm, x, "last", heads=True), last[:, :, 0, 1:], "cait last per head")
    close(patch_attention(jm, x, "rollout"), reference_cait_rollout(maps, model), "cait rollout")
    with pytest.raises(InvalidArgumentError, match="rollout, last"):
        patch_attention(jm, x, "gradcam")


def test_colour_map_ends():
    ends = colour_map(np.array([0.0, 1.0, -3.0, 7.0]))
    assert ends.tolist() == [[68, 1, 84], [253, 231, 37], [68, 1, 84], [253, 231, 37]]


# ------------------------------------------------------------------------------- CLI


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 70x50 RGB image: timm's resize (crop_pct 0.9) and centre crop make it 32x32."""
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny converted folders, one per front-end (ViT), plus a CaiT one."""
    from vitport.hub import save

    root = tmp_path_factory.mktemp("models")
    vit = tiny_timm("vit_base_patch16_224", "float32", **TINY)
    out = {fw: save(vitport.from_timm(vit, fw), root / f"vit-{fw}") for fw in FRAMEWORKS}
    out["cait"] = save(vitport.from_timm(tiny_timm("cait_s24_224", "float32", **TINY_CAIT), "nnx"), root / "cait")
    return out


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cli_writes_a_png_of_the_right_size_and_refuses_an_existing_out(framework, folders, photo, tmp_path,
                                                                        capsys):
    out = tmp_path / "map.png"
    out.write_bytes(b"mine")
    rc, _, err = run(capsys, "attention", folders[framework], photo, "--out", out)
    assert rc == 2 and "already exists" in err and out.read_bytes() == b"mine"
    rc, text, err = run(capsys, "attention", folders[framework], photo, "--out", out, "--force")
    assert rc == 0, err
    side = 32 * -(-MIN_PANEL_SIDE // 32)  # the 32x32 input enlarged by an integer factor to >= 224
    with Image.open(out) as img:
        assert (img.format, img.mode, img.size) == ("PNG", "RGB", (side, side))
    assert "attention rollout" in text and "4x4 patch grid" in text and "class token's row" in text
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]  # no temporary left


def test_cli_heads_grid_and_last_on_cait(folders, photo, tmp_path, capsys):
    out = tmp_path / "heads.png"
    rc, text, err = run(capsys, "attention", folders["cait"], photo, "--out", out, "--method", "last", "--heads")
    assert rc == 0, err
    side = 32 * -(-MIN_PANEL_SIDE // 32)
    with Image.open(out) as img:  # 4 heads: a 2 x 2 grid
        assert img.size == (2 * side + PANEL_GAP, 2 * side + PANEL_GAP)
        grid = np.asarray(img)
    assert (grid[side:side + PANEL_GAP] == 255).all()  # the gap between the panel rows
    assert "one panel per head (4)" in text and "last block's attention" in text


def test_picture_matches_the_map(folders):
    """On a grey image each patch centre is 0.45 grey + 0.55 viridis(map, stretched to 0..1)."""
    jm = vitport.load(folders["flax"])
    pic = attention_image(jm, Image.new("RGB", (32, 32), (128, 128, 128)))
    grid = pic.maps[0]
    patch = jm.spec.patch_size * pic.scale
    picture = np.asarray(pic.image).astype(float)
    # the 2 x 2 pixels around each patch centre, which lies between them: their mean is the map's
    # value up to the bilinear kink there, which the steep top of viridis turns into a few levels
    centres = sum(picture[patch // 2 - di::patch, patch // 2 - dj::patch] for di in (0, 1) for dj in (0, 1)) / 4
    stretched = (grid - grid.min()) / (grid.max() - grid.min())
    expected = (1 - OVERLAY_ALPHA) * 128 + OVERLAY_ALPHA * colour_map(stretched)
    assert np.abs(centres - expected).max() <= 4


def test_bad_input_is_one_error(folders, photo, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(photo.read_bytes()[:100])
    cases = [
        ([folders["flax"], corrupt, "--out", tmp_path / "a.png"], "corrupt.png"),
        ([folders["flax"], tmp_path / "missing.jpg", "--out", tmp_path / "a.png"], "missing.jpg: no such file"),
        ([folders["flax"], photo, "--out", tmp_path / "a.xyz"], "not .xyz; use .png"),
        ([folders["flax"], photo, "--out", photo, "--force"], "source being read"),
        ([folders["flax"], photo, "--out", tmp_path / "nowhere" / "a.png"], "does not exist"),
    ]
    for argv, message in cases:
        rc, out, err = run(capsys, "attention", *argv)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) <= 3, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.png"]


def test_ctrl_c_while_writing_leaves_nothing(folders, photo, tmp_path, capsys, monkeypatch):
    import vitport.attention as attention

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    picture = attention.AttentionPicture(Image.new("RGB", (8, 8)), np.zeros((1, 4, 4)), "rollout", "", (8, 8), 1)
    monkeypatch.setattr(attention, "attention_image", lambda *a, **k: picture)  # no model run needed here
    monkeypatch.setattr(Image.Image, "save", interrupt)
    rc, _, err = run(capsys, "attention", folders["flax"], photo, "--out", tmp_path / "map.png")
    assert rc == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_library_errors(folders):
    jm = vitport.load(folders["flax"])
    with pytest.raises(ImageError, match="not an image"):
        attention_image(jm, __file__)
    with pytest.raises(OutputExistsError):
        write_attention_image(jm, Image.new("RGB", (40, 40)), __file__)
    with pytest.raises(AttentionMapError, match="no attention blocks"):
        patch_weights({}, jm.spec)
    jm.attention_maps = lambda x: {"blocks.0": np.full((1, 4, 10, 10), 0.1)}  # 9 patch tokens, not 4x4
    with pytest.raises(AttentionMapError, match="do not form the 4x4 patch grid"):
        attention_image(jm, Image.new("RGB", (40, 40)))
