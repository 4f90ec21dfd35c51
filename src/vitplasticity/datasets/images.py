"""From image files to a prepared task: decoding to RGB, square uint8 arrays, streamed in chunks.

Every real source reaches this module as a dataset in torchvision's sense
(``dataset[i]`` → (PIL image or uint8 array, label)) plus the rows each split takes.
Every image file any source reads is decoded by `read_image`, the one place that turns
PIL's image modes into 8-bit RGB.
"""

from __future__ import annotations

import functools
import io
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

from vitplasticity.datasets.splits import cap
from vitplasticity.errors import UserError
from vitplasticity.prepared import prepared_writer

CHUNK = 256
PROGRESS_SECONDS = 10.0

Part = tuple[Sequence, np.ndarray]  # a dataset and the rows of it that form one split

# PIL's guard against decompression bombs (89,478,485 pixels). `read_image` applies it per task
# (the task's max_image_pixels), so PIL's own process-wide check, which warns at this size and
# raises at twice it, is switched off.
DEFAULT_MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = None
# Single-channel modes of more than 8 bits, and the value range that maps to 0..255 by default
# (16-bit: x / 257, the inverse of the 8 → 16-bit expansion x · 257; 32-bit modes have none).
_WIDE_MODES = {"I;16": (0, 65535), "I;16L": (0, 65535), "I;16B": (0, 65535), "I;16N": (0, 65535),
               "I": None, "F": None}
_WIDE_NAMES = {"I": "32-bit integer", "F": "32-bit float"}


@dataclass(frozen=True)
class Decoding:
    """How a task's image files are decoded (task config keys of the same names).

    max_image_pixels: images with more pixels (width × height) are refused, PIL's guard
    against decompression bombs; raise it for trusted local data only.
    pixel_range: (low, high), the values of single-channel images of more than 8 bits (PIL
    modes I;16*, I, F) that map linearly to 0 and 255; 16-bit images default to (0, 65535),
    32-bit integer and float images must declare it.
    """

    max_image_pixels: int = DEFAULT_MAX_PIXELS
    pixel_range: tuple[float, float] | None = None

    @classmethod
    def of_task(cls, task: dict) -> Decoding:
        pixel_range = task.get("pixel_range")
        if pixel_range is not None and not pixel_range[0] < pixel_range[1]:
            raise UserError(f"task key pixel_range: {list(pixel_range)} must be [low, high] with low < high; fix it")
        return cls(max_image_pixels=task.get("max_image_pixels") or DEFAULT_MAX_PIXELS,
                   pixel_range=tuple(pixel_range) if pixel_range is not None else None)


def read_image(file: bytes | Path, name: str, decoding: Decoding | None = None) -> Image.Image:
    """Decode one image file (its bytes or its path) to an 8-bit RGB PIL image.

    Raises UserError naming `name` when the file is not a readable image, is larger than
    `decoding.max_image_pixels` (checked from its header, before decoding) or has a mode
    `to_rgb` cannot convert without a declared range.
    """
    decoding = decoding or Decoding()
    try:
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as image:
            width, height = image.size
            if width * height > decoding.max_image_pixels:
                raise UserError(
                    f"image {name} is {width:,} × {height:,} = {width * height:,} pixels, more than "
                    f"max_image_pixels ({decoding.max_image_pixels:,}, PIL's guard against decompression "
                    f"bombs); remove it, or for trusted local data set the task's max_image_pixels to at "
                    f"least {width * height}"
                )
            image.load()  # decode now: the file closes on leaving this block
            return to_rgb(image, name, decoding.pixel_range)
    except (OSError, SyntaxError, ValueError) as exc:  # what PIL raises for a damaged image
        raise UserError(f"cannot read image {name} ({exc}); replace or remove it, then rerun") from exc


def to_rgb(image: Image.Image, name: str, pixel_range: tuple[float, float] | None = None) -> Image.Image:
    """`image` in PIL mode RGB, values preserved (the one conversion every image goes through).

    8-bit modes convert as PIL's ``convert("RGB")`` does, alpha dropped without compositing
    (P, PA, LA, La, RGBA, RGBa: the colour values stay as stored); LAB goes through an
    ICC transform to sRGB; single-channel modes of more than 8 bits map `pixel_range`
    (default (0, 65535) for I;16*) linearly onto 0..255, rounded; I and F without a range
    raise UserError.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _WIDE_MODES:
        low, high = pixel_range or _WIDE_MODES[mode] or (None, None)
        if low is None:
            raise UserError(
                f"image {name} has {_WIDE_NAMES[mode]} pixels (PIL mode {mode}), whose value range is not "
                "defined; declare it with the task's pixel_range: [low, high] (mapped to 0..255)"
            )
        values = (np.asarray(image, dtype=np.float64) - low) * (255 / (high - low))
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "LAB":
        return ImageCms.applyTransform(image, _lab_to_srgb())
    if mode == "La":
        image = image.convert("LA")
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # what PIL asks for palette transparency; same colours
    return image.convert("RGB")


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")


def fit_square(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to `size` (bilinear, antialiased), centre-crop. (size, size, 3)"""
    if isinstance(image, np.ndarray):
        if image.shape == (size, size, 3) and image.dtype == np.uint8:
            return image
        image = Image.fromarray(image)
    image = to_rgb(image, "in memory")
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
    workers: int | None = None, max_images: int | None = None, seed: int = 0,
) -> dict:
    """Fit and store each split's rows of its dataset as a prepared task; returns its meta.

    `max_images` keeps at most that many rows of each split (`splits.cap`, seeded by `seed`);
    the classes stay those of the whole dataset, so a model's head keeps its size.

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
            rows = cap(rows, max_images, seed)
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
