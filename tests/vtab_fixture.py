"""A generated copy of the processed VTAB-1k layout: any of the 19 tasks, each a folder of images and four split lists.

Real formats: JPEG colour images of odd sizes (dtd), grayscale PNG (svhn), RGBA PNG wider than tall
(clevr_count); every other task takes one of these three kinds. Each image is filled with one grey level
(10 × its number + its task's `SHADE`) so a test can tell which image landed where (and two tasks' images
differ); labels are `label_of(number)`, within each task's class count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vitplasticity.datasets.vtab1k import TASKS

# The three kinds of file: task -> (image format, PIL mode, (width, height)) of its files.
SHAPES = {
    "dtd": ("JPEG", "RGB", (37, 23)),
    "svhn": ("PNG", "L", (32, 32)),
    "clevr_count": ("PNG", "RGBA", (48, 32)),
}
# Every task's kind: the three above their own, the others the three in turn, in VTAB's order.
FORMATS = {task: SHAPES.get(task, list(SHAPES.values())[index % len(SHAPES)]) for index, task in enumerate(TASKS)}
# A grey level of its own per task: dtd 0, svhn 2, clevr_count 4, then the others 6, 8, ... in VTAB's order.
SHADE = {task: 2 * index for index, task in enumerate([*SHAPES, *(task for task in TASKS if task not in SHAPES)])}
COUNTS = {"train800": 4, "val200": 2, "test": 3}  # images per list, numbered in this order from 0


def label_of(number: int, classes: int) -> int:
    return (number * 3) % classes


def make_task(root: Path, task: str, classes: int) -> dict[str, list[tuple[str, int]]]:
    """Write task `task` under `root`; returns its lists {list: [(relative path, label)]}."""
    kind, mode, size = FORMATS[task]
    folder = root / task
    lists: dict[str, list[tuple[str, int]]] = {}
    number = 0
    for name, count in COUNTS.items():
        rows = []
        for _ in range(count):
            relative = f"images/{name}/{number:04d}.{'jpg' if kind == 'JPEG' else 'png'}"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            level = 10 * number + SHADE[task]
            pixel = {"RGB": (level, level, level), "L": level, "RGBA": (level, level, level, 255)}[mode]
            Image.new(mode, size, pixel).save(folder / relative, kind, quality=100)
            rows.append((relative, label_of(number, classes)))
            number += 1
        lists[name] = rows
    lists["train800val200"] = lists["train800"] + lists["val200"]
    for name, rows in lists.items():
        (folder / f"{name}.txt").write_text("".join(f"{path} {label}\n" for path, label in rows))
    return lists


def make_vtab(root: Path, tasks: tuple[str, ...] = tuple(SHAPES)) -> Path:
    """`tasks` (default: one of each kind of file, `SHAPES`) under `root`, with their real class counts; returns
    `root`."""
    for task in tasks:
        make_task(root, task, TASKS[task][1])
    return root


def grey_levels(images: np.ndarray) -> list[int]:
    """The grey level of each stored image (its centre pixel's red value)."""
    size = images.shape[1]
    return [int(image[size // 2, size // 2, 0]) for image in images]
