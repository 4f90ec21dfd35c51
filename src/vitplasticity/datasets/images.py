"""From decoded images to a prepared task: square uint8 arrays, streamed in chunks.

Every real source reaches this module as a dataset in torchvision's sense
(``dataset[i]`` → (PIL image or uint8 array, label)) plus the rows each split takes.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vitplasticity.errors import UserError
from vitplasticity.prepared import prepared_writer

CHUNK = 256
PROGRESS_SECONDS = 10.0

Part = tuple[Sequence, np.ndarray]  # a dataset and the rows of it that form one split


def fit_square(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bilinear, antialiased), centre-crop. (size, size, 3)"""
    if isinstance(image, np.ndarray):
        if image.shape == (size, size, 3) and image.dtype == np.uint8:
            return image
        image = Image.fromarray(image)
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        # PIL's bilinear filter widens with the scale, so shrinking is antialiased.
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def write_splits(
    out_dir: Path, parts: dict[str, Part], classes: list[str], provenance: dict, size: int,
    workers: int | None = None,
) -> dict:
    """Fit and store each split's rows of its dataset as a prepared task; returns its meta.

    Images are decoded by a thread pool (PIL releases the GIL) a chunk at a time, so only
    one chunk is ever in memory.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    name = Path(out_dir).name
    with (
        prepared_writer(out_dir, classes, provenance, size) as writer,
        ThreadPoolExecutor(workers) as pool,
    ):
        for split, (dataset, rows) in parts.items():
            writer.add_split(split, len(rows))
            load = functools.partial(_load, dataset, size)
            last = time.monotonic()
            for start in range(0, len(rows), CHUNK):
                loaded = list(pool.map(load, rows[start : start + CHUNK]))
                images = np.stack([image for image, _ in loaded])  # (n, size, size, 3)
                labels = np.array([label for _, label in loaded], dtype=np.int64)
                writer.append(split, images, labels)
                done = start + len(loaded)
                if done == len(rows) or time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    print(f"prepare {name} {split}: {done}/{len(rows)} images", file=sys.stderr,
                          flush=True)
    return writer.meta


def _load(dataset: Sequence, size: int, row: int) -> tuple[np.ndarray, int]:
    try:
        image, label = dataset[int(row)]
        return fit_square(image, size), int(label)
    except (OSError, SyntaxError) as exc:  # what PIL raises for a damaged image
        raise UserError(
            f"cannot decode image {row} of {type(dataset).__name__} ({exc}); the raw data is "
            "damaged: delete it and run again"
        ) from exc
