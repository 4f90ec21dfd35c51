"""A deterministic procedural image source and shifted downstream tasks (the quick study).

The source task (the "pretraining distribution") shows one of five filled shapes, light
on a darker, smoothly varying background, with pixel noise; size, position, tilt and both
colours vary. Downstream tasks shift it the way the
paper's task families do:

- ``novel``: five new shape classes in the source's rendering (new classes, as CIFAR-100);
- ``corrupt``: the source classes under a corruption at a severity (as CIFAR-10-C);
- ``sketch``: the source classes drawn as dark outlines on paper (style, as DomainNet sketch).

With a ``subset``, the generated train and val images are pooled, the class-balanced subset is
drawn from them and ``val_fraction`` of it held out (`splits.train_val`).

Same seed, same arguments → same bytes.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from vitplasticity.datasets.splits import train_val
from vitplasticity.prepared import write_prepared

SOURCE_SHAPES = ("circle", "square", "triangle", "cross", "ring")
NOVEL_SHAPES = ("diamond", "hexagon", "bar", "half_disk", "tee")
KINDS = ("source", "novel", "corrupt", "sketch")
CORRUPTIONS = ("gaussian_noise", "motion_blur", "contrast")
# Per-severity parameters (1..5), in the spirit of CIFAR-10-C's.
_NOISE_SIGMA = (0.04, 0.06, 0.08, 0.10, 0.13)
_BLUR_LENGTH = (2, 3, 4, 5, 7)
_CONTRAST = (0.5, 0.4, 0.3, 0.2, 0.12)
# Nuisance ranges of a drawn shape, in image coordinates ([-1, 1] across the image): its
# half-size, the offset of its centre, and its tilt from upright (radians, either way).
SCALE = (0.55, 0.85)
SHIFT = 0.2
TILT = np.pi / 8
DARK, LIGHT = 0.5, 0.6  # background channels lie in [0, DARK], the shape's in [LIGHT, 1]
BACKGROUND_CELLS = 2  # the background's colour varies smoothly between this many points a side
REQUIRED = ("kind", "n_train", "n_val", "n_test", "image_size")


def _sdf(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of a unit-sized shape."""
    au, av = np.abs(u), np.abs(v)
    radius = np.sqrt(u * u + v * v)
    if shape == "circle":
        return radius - 0.9
    if shape == "square":
        return np.maximum(au, av) - 0.75
    if shape == "triangle":
        return np.maximum(au * 0.866 + v * 0.5, -v) - 0.5
    if shape == "cross":
        return np.minimum(np.maximum(au - 1.0, av - 0.3), np.maximum(au - 0.3, av - 1.0))
    if shape == "ring":
        return np.abs(radius - 0.7) - 0.22
    if shape == "diamond":
        return (au + av) - 1.0
    if shape == "hexagon":
        return np.maximum(au * 0.866 + av * 0.5, av) - 0.8
    if shape == "bar":
        return np.maximum(au - 1.0, av - 0.3)
    if shape == "half_disk":
        return np.maximum(radius - 1.0, -v)
    if shape == "tee":
        top = np.maximum(au - 1.0, np.abs(v + 0.7) - 0.28)
        stem = np.maximum(au - 0.28, np.abs(v - 0.15) - 0.85)
        return np.minimum(top, stem)
    raise ValueError(f"unknown shape {shape}")


def task_seed(name: str, seed: int, split: str) -> int:
    """A stable per-(task, split) seed; independent of Python's hash randomisation."""
    digest = hashlib.sha256(f"{name}/{split}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _smooth_noise(rng: np.random.Generator, count: int, size: int, cells: int) -> np.ndarray:
    """Low-frequency colour texture in [0, 1]. (count, size, size, 3)"""
    coarse = rng.random((count, cells, cells, 3))
    index = np.linspace(0, cells - 1, size)
    low, frac = np.floor(index).astype(int), index - np.floor(index)
    high = np.minimum(low + 1, cells - 1)
    rows = coarse[:, low] * (1 - frac)[None, :, None, None] + coarse[:, high] * frac[None, :, None, None]
    cols = rows[:, :, low] * (1 - frac)[None, None, :, None] + rows[:, :, high] * frac[None, None, :, None]
    return cols


def render(
    rng: np.random.Generator, labels: np.ndarray, shapes: tuple[str, ...], size: int, style: str
) -> np.ndarray:
    """Draw one shape per label. Returns float images in [0, 1]. (count, size, size, 3)"""
    count = len(labels)
    grid = (np.arange(size) + 0.5) / size * 2 - 1  # pixel centres in [-1, 1]
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    scale = rng.uniform(*SCALE, count)[:, None, None]
    cx, cy = (rng.uniform(-SHIFT, SHIFT, (2, count)))[:, :, None, None]
    angle = rng.uniform(-TILT, TILT, count)[:, None, None]
    dx, dy = gx[None] - cx, gy[None] - cy
    u = (np.cos(angle) * dx + np.sin(angle) * dy) / scale
    v = (-np.sin(angle) * dx + np.cos(angle) * dy) / scale
    sdf = np.empty((count, size, size))
    for index, shape in enumerate(shapes):
        chosen = labels == index
        sdf[chosen] = _sdf(shape, u[chosen], v[chosen])
    pixel = 2.0 / size  # one pixel in image coordinates
    distance_px = sdf * scale / pixel
    if style == "sketch":
        stroke = rng.uniform(0.6, 1.4, count)[:, None, None]
        alpha = np.clip(stroke + 0.5 - np.abs(distance_px), 0, 1)[..., None]
        paper = 0.85 + 0.1 * _smooth_noise(rng, count, size, 3).mean(-1, keepdims=True)
        ink = rng.uniform(0.0, 0.25, (count, 1, 1, 1))
        image = paper * (1 - alpha) + ink * alpha
        image = np.repeat(image, 3, axis=-1)
    else:
        alpha = np.clip(0.5 - distance_px, 0, 1)[..., None]
        # A light shape on a darker background in every channel, whatever the two colours.
        background = DARK * _smooth_noise(rng, count, size, BACKGROUND_CELLS)
        colour = rng.uniform(LIGHT, 1.0, (count, 1, 1, 3))
        image = background * (1 - alpha) + colour * alpha
    image = image + rng.normal(0, 0.04, image.shape)
    return np.clip(image, 0, 1)


def corrupt(rng: np.random.Generator, images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """Apply a corruption at severity 1..5 to float images in [0, 1]."""
    level = severity - 1
    if name == "gaussian_noise":
        out = images + rng.normal(0, _NOISE_SIGMA[level], images.shape)
    elif name == "contrast":
        mean = images.mean(axis=(1, 2, 3), keepdims=True)
        out = (images - mean) * _CONTRAST[level] + mean
    elif name == "motion_blur":
        length = _BLUR_LENGTH[level]
        horizontal = rng.random(len(images)) < 0.5
        out = np.empty_like(images)
        for axis, chosen in ((2, horizontal), (1, ~horizontal)):
            part = images[chosen]
            acc = np.zeros_like(part)
            for shift in range(length):
                acc += np.roll(part, shift - length // 2, axis=axis)
            out[chosen] = acc / length
    else:
        raise ValueError(f"unknown corruption {name}; allowed: {CORRUPTIONS}")
    return np.clip(out, 0, 1)


def generate(
    name: str, kind: str, split: str, count: int, size: int, seed: int,
    corruption: str | None = None, severity: int = 5,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Generate one split of a synthetic task: uint8 images (N, H, W, 3), int64 labels, classes."""
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind}; allowed: {KINDS}")
    rng = np.random.default_rng(task_seed(name, seed, split))
    shapes = NOVEL_SHAPES if kind == "novel" else SOURCE_SHAPES
    labels = np.arange(count) % len(shapes)
    rng.shuffle(labels)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    chunk = 512
    for start in range(0, count, chunk):
        part = labels[start : start + chunk]
        drawn = render(rng, part, shapes, size, "sketch" if kind == "sketch" else "filled")
        if kind == "corrupt":
            drawn = corrupt(rng, drawn, corruption, severity)
        images[start : start + chunk] = np.round(drawn * 255).astype(np.uint8)
    return images, labels.astype(np.int64), list(shapes)


def prepare(task: dict, out_dir: Path, raw_dir: Path | None, provenance: dict) -> dict:
    """Generate the train, val and test splits of task `provenance["task"]` into `out_dir`; returns its meta."""
    name = provenance["task"]
    splits, classes = {}, []
    for split in ("train", "val", "test"):
        images, labels, classes = generate(
            name, task["kind"], split, task[f"n_{split}"], task["image_size"], task.get("seed", 0),
            **{key: task[key] for key in ("corruption", "severity") if key in task})
        splits[split] = (images, labels)
        print(f"{name}: generated {split} ({len(labels)} images)", file=sys.stderr, flush=True)
    if task.get("subset"):
        # The generated train and val images are the training pool the subset is drawn from.
        images, labels = (np.concatenate([splits["train"][i], splits["val"][i]]) for i in (0, 1))
        for split, rows in zip(("train", "val"), train_val(np.arange(len(labels)), task, labels, classes),
                               strict=True):
            splits[split] = (images[rows], labels[rows])
    return write_prepared(out_dir, splits, classes, {"generator": __name__, **task})
