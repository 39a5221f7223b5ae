"""Make docs/attention.png: `vitport attention` on a tiny ViT trained here, offline, on CPU.

No pretrained weights can be downloaded where this project is built, so the picture comes from
a model whose right answer is known: a 4-block ViT (64x64 input, 8x8 patches, dim 64, 4 heads,
class token) trained from scratch for a few hundred steps on generated images. Each image is
grey clutter (a smooth noise background and a few grey squares) with one small coloured square
somewhere; the class is the colour of that square (red, green or blue). Only those few
patches decide the class, so a model that learnt the task has reason to attend to them, and
the rollout can be checked by eye against where the square is.

    uv run python docs/make_attention_picture.py            # writes docs/attention.png
    uv run python docs/make_attention_picture.py --heads    # also docs/attention_heads.png

Prints the training loss, the held-out accuracy and the commands it ran. Training is 400 steps
of batch 64 (about 2 CPU-minutes; 7 minutes of wall time on a shared, loaded 2-core machine).
The scenes are seeded; the weights, and so the picture, can differ in the last digits between
machines (floating-point reduction order).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE, PATCH, SQUARE = 64, 8, 10
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230)}
DOCS = Path(__file__).resolve().parent


def scene(rng: np.random.Generator) -> tuple[np.ndarray, int, tuple[int, int]]:
    """One uint8 (SIZE, SIZE, 3) image, its class, and the square's top-left corner (y, x)."""
    coarse = rng.uniform(60, 200, (4, 4)).astype(np.float32)  # smooth grey background
    back = np.asarray(Image.fromarray(coarse, "F").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    img = np.repeat(np.clip(back + rng.normal(0, 6, (SIZE, SIZE)), 0, 255)[..., None], 3, axis=-1)
    for _ in range(rng.integers(2, 5)):  # grey distractors of the same size
        y, x = rng.integers(0, SIZE - SQUARE, 2)
        img[y:y + SQUARE, x:x + SQUARE] = rng.uniform(30, 230)
    label = int(rng.integers(len(COLOURS)))
    y, x = (int(v) for v in rng.integers(0, SIZE - SQUARE, 2))
    img[y:y + SQUARE, x:x + SQUARE] = list(COLOURS.values())[label]
    return img.round().astype(np.uint8), label, (y, x)


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = zip(*((p, c) for p, c, _ in (scene(rng) for _ in range(n))))
    x = (np.stack(pixels).astype(np.float32) / 255 - 0.5) / 0.5  # = the model's eval transform (mean = std = 0.5)
    return x, np.array(labels)


def train(steps: int, seed: int):
    import jax
    import jax.numpy as jnp
    import optax

    import vitport

    jm = vitport.create_model("vit_base_patch16_224", "flax", rng=seed, img_size=SIZE, patch_size=PATCH,
                              embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=len(COLOURS))
    jm = dataclasses.replace(jm, pretrained_cfg=dict(
        jm.pretrained_cfg, input_size=(3, SIZE, SIZE), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3,
        num_classes=len(COLOURS), label_names=list(COLOURS)))
    apply = jm.front_end_apply
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 30, steps), weight_decay=0.05)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    params, state = jm.params, opt.init(jm.params)
    start = time.perf_counter()
    for i in range(steps):
        x, y = batch(rng, 64)
        params, state, loss = step(params, state, jnp.asarray(x), jnp.asarray(y))
        if i % 100 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    jm = jm.with_params(params)
    x, y = batch(np.random.default_rng(seed + 1), 512)  # held out: another stream of scenes
    accuracy = float((np.asarray(jm(x)).argmax(-1) == y).mean())
    print(f"held-out accuracy on 512 new scenes: {accuracy:.3f}")
    return jm


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", action="store_true", help="also write docs/attention_heads.png")
    parser.add_argument("--out", default=str(DOCS / "attention.png"))
    args = parser.parse_args(argv)

    from vitport import cli
    from vitport.hub import save

    jm = train(args.steps, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save(jm, Path(tmp) / "colour-square-vit")
        img, label, (y, x) = scene(np.random.default_rng(12345))
        Image.fromarray(img).save(Path(tmp) / "scene.png")
        print(f"test scene: a {list(COLOURS)[label]} square at rows {y}-{y + SQUARE - 1}, "
              f"columns {x}-{x + SQUARE - 1} of the {SIZE}x{SIZE} image")
        runs = [["attention", str(folder), str(Path(tmp) / "scene.png"), "--out", args.out, "--force"]]
        if args.heads:
            runs.append([*runs[0][:4], str(Path(args.out).with_name("attention_heads.png")), "--force", "--heads"])
        for argv_ in [["predict", str(folder), str(Path(tmp) / "scene.png"), "--top-k", "3"], *runs]:
            print("$ vitport " + " ".join(a.replace(tmp, "<tmp>") for a in argv_))
            if cli.main(argv_) != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
