"""CIFAR-10 and CIFAR-100: official train split 80/20 into train/val, official test.

Read with torchvision's CIFAR readers from the official archive, downloaded and verified by
`download` (the archive's checksum covers its members, so the readers' own per-file md5
checks are off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100

from vitplasticity.datasets.archives import extract
from vitplasticity.datasets.download import Resource, fetch, locked, resolve
from vitplasticity.datasets.images import write_splits
from vitplasticity.datasets.splits import train_val
from vitplasticity.errors import UserError

REQUIRED = ("store_size", "split_seed", "val_fraction")


class _CIFAR10(CIFAR10):
    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _CIFAR100(CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    reader = _CIFAR100 if task["source"] == "cifar100" else _CIFAR10
    official = Resource(reader.filename, reader.url, f"md5:{reader.tgz_md5}")
    (resource,) = resolve([official], task)
    with locked(raw_dir):
        extract(fetch(resource, raw_dir), raw_dir, resource.checksum)
    try:
        train, test = reader(raw_dir, train=True), reader(raw_dir, train=False)
    except RuntimeError as exc:
        raise UserError(
            f"{raw_dir} lacks files of {resource.filename} ({exc}); delete {raw_dir} and run again"
        ) from exc
    kept, val = train_val(np.arange(len(train)), task, np.asarray(train.targets), train.classes)
    parts = {"train": (train, kept), "val": (train, val), "test": (test, np.arange(len(test)))}
    provenance = provenance | {"files": [vars(resource)]}
    return write_splits(out_dir, parts, list(train.classes), provenance, task["store_size"],
                        max_images=task.get("max_images"), seed=task.get("split_seed", 0))
