"""Oxford-IIIT Pet: official trainval split 80/20 into train/val, official test.

Read with torchvision's reader from the two official archives, downloaded and verified by
`download`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import OxfordIIITPet

from vitplasticity.datasets.archives import extract
from vitplasticity.datasets.download import Resource, fetch, locked, resolve
from vitplasticity.datasets.images import Decoding, read_image, write_splits
from vitplasticity.datasets.splits import train_val
from vitplasticity.errors import UserError

REQUIRED = ("store_size", "split_seed", "val_fraction")
BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/"
OFFICIAL = [
    Resource("images.tar.gz", BASE_URL + "images.tar.gz", "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c"),
    Resource("annotations.tar.gz", BASE_URL + "annotations.tar.gz",
             "md5:95a8c909bbe2e81eed6a22bccdf3f68f"),
]
FOLDER = "oxford-iiit-pet"  # where torchvision's reader looks, below its root


class _OxfordIIITPet(OxfordIIITPet):
    """torchvision's reader (category labels), decoding its images with `read_image`."""

    decoding = Decoding()

    def __getitem__(self, index: int) -> tuple:
        path = self._images[index]
        return read_image(path, str(path), self.decoding), self._labels[index]


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    resources = resolve(OFFICIAL, task)
    folder = raw_dir / FOLDER
    with locked(raw_dir):
        for resource in resources:
            extract(fetch(resource, folder), folder, resource.checksum)
    try:
        trainval = _OxfordIIITPet(raw_dir, split="trainval")
        test = _OxfordIIITPet(raw_dir, split="test")
        trainval.decoding = test.decoding = Decoding.of_task(task)
    except (RuntimeError, OSError, ValueError) as exc:
        raise UserError(
            f"{folder} lacks Oxford-IIIT Pet's files ({exc!r}); delete {raw_dir} and run again"
        ) from exc
    kept, val = train_val(np.arange(len(trainval)), task, np.asarray(trainval._labels), trainval.classes)
    parts = {"train": (trainval, kept), "val": (trainval, val),
             "test": (test, np.arange(len(test)))}
    provenance = provenance | {"files": [vars(resource) for resource in resources]}
    return write_splits(out_dir, parts, list(trainval.classes), provenance, task["store_size"],
                        max_images=task.get("max_images"), seed=task.get("split_seed", 0))
