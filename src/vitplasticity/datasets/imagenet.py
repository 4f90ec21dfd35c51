"""The ImageNet-1k validation images: the plasticity reference stream (a single `test` split).

ImageNet cannot be downloaded without an account, so the task's `path` names a local copy:
the official ``ILSVRC2012_img_val.tar`` or a folder of its images. Images in class
sub-folders are labelled by them; otherwise all take label 0 of the class "imagenet".
`max_images` keeps a seeded random subset (in path order), as for every source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitplasticity.datasets.imagefiles import ImageFiles
from vitplasticity.datasets.images import Decoding, write_splits
from vitplasticity.errors import UserError

REQUIRED = ("store_size", "split_seed")


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    if not task.get("path"):
        raise UserError(
            "ImageNet val cannot be downloaded freely: get ILSVRC2012_img_val.tar from "
            "https://image-net.org (after accepting its terms) and set `path` of the "
            "imagenet_val task in the config to that tar or to a folder of its images"
        )
    path = Path(task["path"]).expanduser()
    if not path.exists():
        raise UserError(
            f"ImageNet val path {path} does not exist; fix `path` of the imagenet_val task"
        )
    with ImageFiles(path, flat_class="imagenet", decoding=Decoding.of_task(task)) as dataset:
        provenance = provenance | {"images_found": len(dataset), "skipped": dict(dataset.skipped)}
        return write_splits(out_dir, {"test": (dataset, np.arange(len(dataset)))}, dataset.classes, provenance,
                            task["store_size"], max_images=task.get("max_images"), seed=task["split_seed"])
