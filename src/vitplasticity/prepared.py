"""The prepared-dataset format shared by every task.

A prepared task is a folder::

    meta.json                 name, classes, splits {split: count}, image_size,
                              checksums {file: sha256}, provenance
    {split}_images.npy        uint8 (N, H, W, 3)
    {split}_labels.npy        int64 (N,)

Arrays are memory-mapped on read; training loops never see PIL or per-sample Python.
The folder is written to a temporary name and renamed, so it exists only when complete.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitplasticity.errors import UserError
from vitplasticity.fileio import atomic_dir, sha256_file

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)


def write_prepared(
    folder: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    provenance: dict,
) -> dict:
    """Write a prepared task of in-memory splits {split: (images, labels)} atomically (through
    `prepared_writer`); returns its meta. Raises ValueError on arrays of the wrong type or shape."""
    for split, (images, labels) in splits.items():
        _check_arrays(split, images, labels, len(classes))
    sizes = sorted({int(images.shape[1]) for images, _ in splits.values()})
    if len(sizes) > 1:
        raise ValueError(f"splits must share one image size, got sizes {sizes}")
    with prepared_writer(folder, classes, provenance, sizes[0] if sizes else 0) as writer:
        for split, (images, labels) in splits.items():
            writer.add_split(split, len(labels))
            writer.append(split, images, labels)
    return writer.meta


class PreparedWriter:
    """Fills a prepared task split by split, chunk by chunk, through memory-mapped arrays."""

    def __init__(self, tmp: Path, image_size: int) -> None:
        self._tmp = tmp
        self._image_size = image_size
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._filled: dict[str, int] = {}
        self.meta: dict | None = None

    def add_split(self, split: str, count: int) -> None:
        """Allocate `count` rows for `split`; meta.json lists splits in the order they are added."""
        if split in self._arrays:
            raise ValueError(f"split {split} added twice")
        size = self._image_size
        images = np.lib.format.open_memmap(
            self._tmp / f"{split}_images.npy", mode="w+", dtype=np.uint8,
            shape=(count, size, size, 3),
        )
        labels = np.lib.format.open_memmap(
            self._tmp / f"{split}_labels.npy", mode="w+", dtype=np.int64, shape=(count,)
        )
        self._arrays[split] = (images, labels)
        self._filled[split] = 0

    def append(self, split: str, images: np.ndarray, labels: np.ndarray) -> None:
        """Write the next rows of `split`: uint8 images (n, S, S, 3) and their labels (n,)."""
        all_images, all_labels = self._arrays[split]
        start = self._filled[split]
        stop = start + len(labels)
        if len(images) != len(labels) or stop > len(all_labels):
            raise ValueError(
                f"{split}: cannot append {len(images)} images and {len(labels)} labels at row "
                f"{start} of {len(all_labels)}"
            )
        all_images[start:stop] = images
        all_labels[start:stop] = labels
        self._filled[split] = stop

    def _finish(self, name: str, classes: list[str], provenance: dict) -> dict:
        meta = {"format_version": FORMAT_VERSION, "name": name, "classes": classes,
                "splits": {}, "checksums": {}, "provenance": provenance}
        for split, (images, labels) in self._arrays.items():
            if self._filled[split] != len(labels):
                raise ValueError(f"{split}: {self._filled[split]} of {len(labels)} rows written")
            _check_arrays(split, images, labels, len(classes))
            images.flush()
            labels.flush()
            meta["splits"][split] = int(len(labels))
            meta["image_size"] = self._image_size
        self._arrays.clear()
        for file in sorted(self._tmp.glob("*.npy")):
            meta["checksums"][file.name] = sha256_file(file)
        (self._tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.meta = meta
        return meta


@contextlib.contextmanager
def prepared_writer(
    folder: str | Path, classes: list[str], provenance: dict, image_size: int
) -> Iterator[PreparedWriter]:
    """Stream a prepared task to disk; on a clean exit it is published as `write_prepared` does.

    The arrays never sit in memory whole, so large datasets fit; meta.json is the same format.
    Nothing appears at `folder` if the block raises.
    """
    with atomic_dir(folder) as tmp:
        writer = PreparedWriter(tmp, image_size)
        yield writer
        writer._finish(Path(folder).name, classes, provenance)


def _check_arrays(split: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{split}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1] != images.shape[2]:
        raise ValueError(f"{split}: images must be square, got {images.shape[1:3]}")
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{split}: labels outside 0..{num_classes - 1}")


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise UserError(f"{folder} is not a prepared task (no meta.json); run its prepare_dataset rule")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); delete {folder} and prepare it again") from exc


def load_split(folder: str | Path, split: str, verify: bool = False) -> Split:
    """Memory-map one split, checking it against meta.json (and its checksums if `verify`)."""
    folder = Path(folder)
    meta = read_meta(folder)
    if split not in meta["splits"]:
        raise UserError(f"{folder} has no '{split}' split (has {sorted(meta['splits'])})")
    arrays = []
    for suffix in ("images", "labels"):
        path = folder / f"{split}_{suffix}.npy"
        if not path.exists():
            raise UserError(f"{path} is missing; delete {folder} and prepare it again")
        if verify and sha256_file(path) != meta["checksums"].get(path.name):
            raise UserError(f"{path} does not match its checksum in meta.json; delete {folder} and prepare it again")
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except (ValueError, EOFError) as exc:  # EOFError: an empty file
            raise UserError(f"{path} is truncated or corrupt ({exc}); delete {folder} and prepare it again") from exc
    images, labels = arrays
    expected = meta["splits"][split]
    if len(images) != expected or len(labels) != expected:
        raise UserError(
            f"{folder}/{split}: meta.json says {expected} samples, arrays hold {len(images)} images "
            f"and {len(labels)} labels; delete {folder} and prepare it again"
        )
    num_classes = len(meta["classes"])
    if len(labels) and (int(np.max(labels)) >= num_classes or int(np.min(labels)) < 0):
        raise UserError(
            f"{folder}/{split}: labels span {int(np.min(labels))}..{int(np.max(labels))} but meta.json lists "
            f"{num_classes} classes; delete {folder} and prepare it again"
        )
    return Split(images=images, labels=labels)
