"""The registry of task sources: generate, or download, verify and split, then store a prepared task.

Each source is a module of this package with ``REQUIRED`` (its config keys without a default) and
``prepare(task, out_dir, raw_dir, provenance) -> meta``. A task's config keys (see each source's
module for its split rule and official files):

- ``source``: synthetic (the quick study's images, `vitplasticity.datasets.synthetic`), cifar10,
  cifar100, cifar10c, domainnet, flowers102, oxford_pets, imagenet_val, imagefolder (a user's
  ImageFolder tree, `vitplasticity.datasets.imagefolder`), vtab1k (a task of the processed VTAB-1k
  copy, `vitplasticity.datasets.vtab1k`)
- ``store_size``: images are stored square: shorter side resized to it, then centre-cropped
- ``split_seed``, ``val_fraction``, ``test_fraction``: the fixed random splits
- ``max_images``: keep at most this many images of each split (a seeded random subset, in
  order); the classes stay all of the dataset's
- ``subset`` ({images or per_class, seed}): train on a class-balanced subset of the training
  pool, ``images // classes`` (or ``per_class``) images of every class drawn with ``seed``, of
  which ``val_fraction``
  is held out for validation (`splits.balanced_subset`; sources in ``SUBSET_SOURCES``); the
  test split stays whole
- ``corruption``, ``severity`` (cifar10c); ``domain`` (domainnet); ``path`` (imagenet_val,
  imagefolder, vtab1k); ``vtab_task`` (vtab1k); ``devkit``, ``order`` (imagenet_val: the
  reference stream's classes and order)
- ``max_image_pixels``, ``pixel_range`` (sources read from image files: domainnet, flowers102,
  oxford_pets, imagenet_val, imagefolder, vtab1k): how images are decoded
  (`vitplasticity.datasets.images.Decoding`)
- ``url`` and ``checksum`` (``md5:<hex>`` or ``sha256:<hex>``) replace the official URL and
  checksum of a single-file source; ``urls`` and ``checksums`` ({filename: value}) those of
  any source's named files (flowers102: 102flowers.tgz, imagelabels.mat, setid.mat;
  oxford_pets: images.tar.gz, annotations.tar.gz).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from vitplasticity.datasets.download import DownloadError
from vitplasticity.errors import UserError

# Source name -> its module in this package, imported only when a task of it is prepared (a
# synthetic task's job then never loads torchvision).
SOURCES = {
    "synthetic": "synthetic",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "cifar10c": "cifar10c",
    "domainnet": "domainnet",
    "flowers102": "flowers",
    "oxford_pets": "pets",
    "imagenet_val": "imagenet",
    "imagefolder": "imagefolder",
    "vtab1k": "vtab1k",
}
# Sources generated here or read from a local path: they need no download folder.
LOCAL_SOURCES = ("synthetic", "imagenet_val", "imagefolder", "vtab1k")
# Sources whose train and validation images come from one pool, which a `subset` is drawn from.
SUBSET_SOURCES = ("synthetic", "cifar10", "cifar100", "cifar10c", "domainnet", "oxford_pets")
# The keys that shape the prepared data; they are recorded in its provenance.
DATA_KEYS = ("source", "store_size", "split_seed", "val_fraction", "test_fraction", "corruption",
             "severity", "domain", "path", "vtab_task", "devkit", "order", "max_images", "max_image_pixels",
             "pixel_range", "subset")


def prepare_task(name: str, task: dict, out_dir: Path, raw_dir: Path | None) -> dict:
    """Prepare task `name` into `out_dir` (published whole, or not at all); returns its meta.

    Downloads and unpacked files go to `raw_dir`, which tasks of the same source may share:
    a lock makes their jobs take turns there.
    """
    source = task.get("source")
    if source not in SOURCES:
        raise UserError(f"task {name}: source '{source}' unknown; allowed: {', '.join(SOURCES)}")
    module = importlib.import_module(f"vitplasticity.datasets.{SOURCES[source]}")
    missing = [key for key in module.REQUIRED if task.get(key) is None]
    if missing:
        raise UserError(f"task {name} ({source}) needs {', '.join(missing)}; set it in the config")
    if raw_dir is None and source not in LOCAL_SOURCES:
        raise UserError(f"task {name} ({source}) is downloaded: give a download folder with --raw, e.g. "
                        f"--raw data/raw/{source}")
    provenance = {"task": name} | {key: task[key] for key in DATA_KEYS if task.get(key) is not None}
    try:
        return module.prepare(task, Path(out_dir), raw_dir and Path(raw_dir), provenance)
    except DownloadError as error:
        # A source of several files lists them as OFFICIAL (flowers102, oxford_pets): overridden by file name.
        raise UserError(error.for_task(name, isinstance(getattr(module, "OFFICIAL", None), list))) from error
