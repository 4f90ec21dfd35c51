"""DomainNet (Peng et al., 2019): one domain, split 80/20 train/test, train 80/20 train/val.

The official ``<domain>.zip`` holds ``<domain>/<class>/<image>.jpg``; it is read in place
(never unpacked); classes are the 345 class folder names, sorted.
"""

from __future__ import annotations

from pathlib import Path

from vitplasticity.datasets.download import Resource, fetch, locked, resolve
from vitplasticity.datasets.imagefiles import ImageFiles
from vitplasticity.datasets.images import Decoding, write_splits
from vitplasticity.datasets.splits import train_val_test
from vitplasticity.errors import UserError

REQUIRED = ("store_size", "split_seed", "val_fraction", "test_fraction", "domain")
BASE_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
# domain → (path below BASE_URL, md5): the official archives ("groundtruth" = cleaned version).
DOMAINS = {
    "clipart": ("groundtruth/clipart.zip", "cd0d8f2d77a4e181449b78ed62bccf1e"),
    "infograph": ("infograph.zip", "720380b86f9e6ab4805bb38b6bd135f8"),
    "painting": ("groundtruth/painting.zip", "1ae32cdb4f98fe7ab5eb0a351768abfd"),
    "quickdraw": ("quickdraw.zip", "bdc1b6f09f277da1a263389efe0c7a66"),
    "real": ("real.zip", "dcc47055e8935767784b7162e7c7cca6"),
    "sketch": ("sketch.zip", "658d8009644040ff7ce30bb2e820850f"),
}


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    domain = task["domain"]
    if domain not in DOMAINS:
        raise UserError(f"DomainNet domain '{domain}' unknown; allowed: {', '.join(DOMAINS)}")
    path, md5 = DOMAINS[domain]
    (resource,) = resolve([Resource(f"{domain}.zip", BASE_URL + path, f"md5:{md5}")], task)
    with locked(raw_dir):
        archive = fetch(resource, raw_dir)
    with ImageFiles(archive, root=domain, decoding=Decoding.of_task(task)) as dataset:
        splits = train_val_test(task, dataset.labels, dataset.classes)
        parts = {split: (dataset, rows) for split, rows in splits.items()}
        provenance = provenance | {"files": [vars(resource)], "skipped": dict(dataset.skipped)}
        return write_splits(out_dir, parts, dataset.classes, provenance, task["store_size"],
                            max_images=task.get("max_images"), seed=task.get("split_seed", 0))
