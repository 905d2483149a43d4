"""Images that ship with installed packages, written as PNG files + JSONL rows (no downloads).

- digits: scikit-learn's bundled handwritten digits (`load_digits`, 1,797 8x8 grey images of
  0-9), captioned "a photo of the digit three" and the like; every row keeps its `label`.
- scenes: generated shapes (circle / square / triangle in red / green / blue / yellow), two per
  image, one left and one right, captioned compositionally ("a red circle left of a blue
  square") plus question/answer chat rows ("what color is the circle?" -> "red").

`write(out_dir, ...)` writes `images/*.png`, `train.jsonl`, `val.jsonl`; paths in the rows are
relative to the JSONL file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxcore.io import atomic_dir, write_json, write_jsonl

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}", "a handwritten {}", "the number {}", "an image of a {}")
ZERO_SHOT_TEMPLATE = "a photo of the digit {}"
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 230), "yellow": (235, 215, 20)}
SHAPES = ("circle", "square", "triangle")


def digit_rows(val_fraction: float, seed: int, images_dir: Path, rel: str) -> tuple[list, list]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    n_val = int(round(len(order) * val_fraction))
    rng = np.random.default_rng(seed + 1)
    train, val = [], []
    for rank, i in enumerate(order):
        pixels = (d.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        name = f"digit-{i:05d}.png"
        Image.fromarray(pixels, mode="L").save(images_dir / name)
        label = int(d.target[i])
        held_out = rank < n_val
        template = DIGIT_TEMPLATES[0] if held_out else DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
        row = {"text": template.format(DIGIT_WORDS[label]), "images": [f"{rel}/{name}"], "label": label,
               "task": "digits"}
        (val if held_out else train).append(row)
    return train, val


def draw_scene(rng: np.random.Generator, size: int = 32):
    """(image, left (color, shape), right (color, shape)) of a two-shape scene."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    shapes = rng.choice(len(SHAPES), 2, replace=False)
    colors = rng.choice(len(COLORS), 2, replace=False)
    names = list(COLORS)
    out = []
    for slot, (s, c) in enumerate(zip(shapes, colors)):
        half = size / 2
        r = half * rng.uniform(0.32, 0.42)
        cx = half * slot + half / 2 + rng.uniform(-1, 1)
        cy = half + rng.uniform(-size / 6, size / 6)
        box = [cx - r, cy - r, cx + r, cy + r]
        fill = COLORS[names[c]]
        if SHAPES[s] == "circle":
            draw.ellipse(box, fill=fill)
        elif SHAPES[s] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        out.append((names[c], SHAPES[s]))
    return img, out[0], out[1]


def scene_rows(n: int, val_fraction: float, seed: int, images_dir: Path, rel: str, size: int = 32) -> tuple[list, list]:
    rng = np.random.default_rng(seed + 2)
    n_val = int(round(n * val_fraction))
    train, val = [], []
    for i in range(n):
        img, (lc, ls), (rc, rs) = draw_scene(rng, size)
        name = f"scene-{i:05d}.png"
        img.save(images_dir / name)
        path = f"{rel}/{name}"
        rows = [{"text": f"a {lc} {ls} left of a {rc} {rs}", "images": [path], "task": "caption"}]
        q = int(rng.integers(3))
        question, answer = [(f"what color is the {ls}?", lc), (f"what color is the {rs}?", rc),
                            ("what shape is on the left?", ls)][q]
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": path},
                                                               {"type": "text", "text": question}]},
                                  {"role": "assistant", "content": answer}], "task": "vqa"})
        (val if i < n_val else train).extend(rows)
    return train, val


def write(out_dir: str | Path, *, digits: bool = True, scenes: int = 0, val_fraction: float = 0.2,
          seed: int = 0, scene_size: int = 32) -> dict:
    """Write the synthetic image-text dataset to `out_dir` (atomically); returns its row counts."""
    with atomic_dir(out_dir, replace=True) as tmp:
        images = tmp / "images"
        images.mkdir()
        train, val = [], []
        if digits:
            t, v = digit_rows(val_fraction, seed, images, "images")
            train, val = train + t, val + v
        if scenes:
            t, v = scene_rows(scenes, val_fraction, seed, images, "images", scene_size)
            train, val = train + t, val + v
        order = np.random.default_rng(seed + 3).permutation(len(train))
        write_jsonl(tmp / "train.jsonl", [train[i] for i in order])
        write_jsonl(tmp / "val.jsonl", val)
        counts = {"train": len(train), "val": len(val), "images": len(list(images.iterdir()))}
        write_json(tmp / "counts.json", counts)
    return counts
