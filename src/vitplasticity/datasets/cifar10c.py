"""CIFAR-10-C (Hendrycks & Dietterich, 2019): one corruption at one severity.

Each ``CIFAR-10-C/<corruption>.npy`` stacks the 10,000 CIFAR-10 test images at severities
1..5 (rows 40000:50000 are severity 5); ``labels.npy`` matches it row for row. The chosen
severity's images are split 80/20 into train/test, train again 80/20 into train/val.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from vitplasticity.datasets.download import Resource, fetch, locked, resolve
from vitplasticity.datasets.images import write_splits
from vitplasticity.datasets.splits import train_val_test
from vitplasticity.errors import UserError

REQUIRED = ("store_size", "split_seed", "val_fraction", "test_fraction", "corruption", "severity")
OFFICIAL = Resource(
    "CIFAR-10-C.tar",
    "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar?download=1",
    "md5:56bf5dcef84df0e2308c6dcbcbbd8499",
)
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SEVERITIES = 5


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    (resource,) = resolve([OFFICIAL], task)
    with locked(raw_dir):
        archive = fetch(resource, raw_dir)
    images, labels = read_severity(archive, task["corruption"], task["severity"])
    dataset = list(zip(images, labels, strict=True))
    splits = train_val_test(task, labels, CLASSES)
    parts = {split: (dataset, rows) for split, rows in splits.items()}
    provenance = provenance | {"files": [vars(resource)]}
    return write_splits(out_dir, parts, CLASSES, provenance, task["store_size"],
                        max_images=task.get("max_images"), seed=task.get("split_seed", 0))


def read_severity(archive: Path, corruption: str, severity: int) -> tuple[np.ndarray, np.ndarray]:
    """One severity's images (N, 32, 32, 3) and labels (N,), read from the tar in place."""
    if not 1 <= severity <= SEVERITIES:
        raise UserError(f"severity must be 1..{SEVERITIES}, got {severity}; fix the task's config")
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
        arrays = []
        for stem in (corruption, "labels"):
            member = members.get(f"CIFAR-10-C/{stem}.npy")
            if member is None:
                known = sorted(Path(n).stem for n in members if n.endswith(".npy"))
                raise UserError(
                    f"{archive.name} has no CIFAR-10-C/{stem}.npy; corruptions in it: {known}"
                )
            arrays.append(np.load(io.BytesIO(tar.extractfile(member).read())))
    images, labels = arrays
    if len(images) != len(labels) or len(images) % SEVERITIES:
        raise UserError(
            f"{archive.name}: {corruption}.npy has {len(images)} rows, labels.npy {len(labels)}; "
            f"expected equal counts divisible by {SEVERITIES}; delete {archive} and run again"
        )
    per = len(images) // SEVERITIES
    rows = slice((severity - 1) * per, severity * per)
    return images[rows], labels[rows]
