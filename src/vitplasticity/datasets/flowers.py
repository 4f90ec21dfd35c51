"""Oxford Flowers102: the official train / val / test splits, read with torchvision's reader.

The three official files are downloaded and verified by `download`; the reader's own md5
checks are off (they would repeat that check against the official checksums only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import Flowers102

from vitplasticity.datasets.archives import extract
from vitplasticity.datasets.download import Resource, fetch, locked, resolve
from vitplasticity.datasets.images import Decoding, read_image, write_splits
from vitplasticity.errors import UserError

REQUIRED = ("store_size",)
BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
OFFICIAL = [
    Resource("102flowers.tgz", BASE_URL + "102flowers.tgz", "md5:52808999861908f626f3c1f4e79d11fa"),
    Resource("imagelabels.mat", BASE_URL + "imagelabels.mat",
             "md5:e0620be6f572b9609742df49c70aed4d"),
    Resource("setid.mat", BASE_URL + "setid.mat", "md5:a5357ecc9cb78c4bef273ce3793fc85c"),
]
FOLDER = "flowers-102"  # where torchvision's reader looks, below its root


class _Flowers102(Flowers102):
    """torchvision's reader, decoding its images with `read_image`."""

    _file_dict = {key: (filename, None) for key, (filename, _) in Flowers102._file_dict.items()}
    decoding = Decoding()

    def __getitem__(self, index: int) -> tuple:
        path = self._image_files[index]
        return read_image(path, str(path), self.decoding), self._labels[index]


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    resources = resolve(OFFICIAL, task)
    folder = raw_dir / FOLDER
    with locked(raw_dir):
        paths = {resource.filename: fetch(resource, folder) for resource in resources}
        extract(paths["102flowers.tgz"], folder, resources[0].checksum)
    try:
        datasets = {split: _Flowers102(raw_dir, split=split) for split in ("train", "val", "test")}
        for dataset in datasets.values():
            dataset.decoding = Decoding.of_task(task)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"{folder} does not hold Flowers102's files ({exc!r}); delete {raw_dir} and run again"
        ) from exc
    parts = {split: (data, np.arange(len(data))) for split, data in datasets.items()}
    provenance = provenance | {"files": [vars(resource) for resource in resources]}
    return write_splits(out_dir, parts, list(Flowers102.classes), provenance, task["store_size"],
                        max_images=task.get("max_images"), seed=task.get("split_seed", 0))
