"""The ImageNet-1k validation images: the plasticity reference stream (a single `test` split).

ImageNet cannot be downloaded without an account, so the task's `path` names a local copy,
either

- (a) the official flat ``ILSVRC2012_img_val.tar`` with `devkit` naming the official
  ``ILSVRC2012_devkit_t12.tar.gz``: both are checked against the md5 sums torchvision lists
  (``torchvision.datasets.imagenet.ARCHIVE_META``; one line names a file that differs, before
  anything is unpacked), then torchvision's own helpers read the devkit (`parse_devkit_archive`:
  the WordNet id of every validation image) and unpack the tar into one folder per WordNet id
  (`parse_val_archive`, which hashes the archives again), in a scratch folder under the download
  folder (6.4 GB while the task is prepared, removed afterwards); or
- (b) a tree of class folders, one per WordNet id (torchvision's `ImageNet` layout and the common
  extraction script's), as a folder, a tar or a zip.

`order` sets the stream's order, which decides the images plasticity pairs (its first `n_pairs`):

- ``imagefolder`` (the default): torchvision ImageFolder's, class folders sorted by WordNet id
  and files sorted within each (paths sorted, which for WordNet ids is the same). It is the
  authors' order: their 12,800 reference images are all 50 images of each of the first 256
  classes. It needs (a) or (b); a flat tar or folder without `devkit` is refused with one line.
- ``file_name``: the images sorted by file name (``ILSVRC2012_val_00000001`` …, all 1,000
  classes mixed), the only order a flat tar without devkit has; not the authors'.

Images are labelled by their class folder (the index of its WordNet id among the sorted ones,
as ImageFolder and torchvision's `ImageNet` number them); a flat tar or folder read in
file-name order labels all images 0, class "imagenet". The provenance records `order` and the
md5 sums checked. `max_images` keeps a seeded random subset (in stream order), as for every
source: such a subset spans all classes, so it is not the authors' reference stream.
"""

from __future__ import annotations

import posixpath
import tempfile
from pathlib import Path

import numpy as np
from torchvision.datasets import imagenet as tv_imagenet
from torchvision.datasets.utils import calculate_md5

from vitplasticity.datasets.imagefiles import ImageFiles
from vitplasticity.datasets.images import Decoding, write_splits
from vitplasticity.errors import UserError

REQUIRED = ("store_size", "split_seed")
ORDERS = ("imagefolder", "file_name")
# ARCHIVE_META key → the task key that names that archive
ARCHIVES = {"devkit": "devkit", "val": "path"}


def prepare(task: dict, out_dir: Path, raw_dir: Path | None, provenance: dict) -> dict:
    if not task.get("path"):
        raise UserError(
            "ImageNet val cannot be downloaded freely: get ILSVRC2012_img_val.tar and "
            "ILSVRC2012_devkit_t12.tar.gz from https://image-net.org (after accepting its terms) and set "
            "`path` and `devkit` of the imagenet_val task in the config to them, or `path` to a folder "
            "of class folders"
        )
    order = task.get("order", "imagefolder")
    if order not in ORDERS:
        raise UserError(f"`order` of the imagenet_val task is {order!r}; allowed: {', '.join(ORDERS)}")
    paths = {"val": _existing(task["path"], "path")}
    if not task.get("devkit"):
        return _write(paths["val"], task, order, out_dir, provenance)
    paths["devkit"] = _existing(task["devkit"], "devkit")
    if not paths["val"].is_file():
        raise UserError(
            f"`devkit` sorts the official ILSVRC2012_img_val.tar into class folders, but `path` "
            f"{paths['val']} is a folder; point `path` at that tar, or remove `devkit` if the folder "
            "holds class folders"
        )
    checked = {key: _checked_md5(paths[key], key) for key in ("devkit", "val")}
    scratch = Path(raw_dir) if raw_dir is not None else Path(out_dir).parent
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imagenet_val-", dir=scratch) as root:
        for key, path in paths.items():  # torchvision's helpers read the archives from `root`
            (Path(root) / tv_imagenet.ARCHIVE_META[key][0]).symlink_to(path.resolve())
        tv_imagenet.parse_devkit_archive(root)
        tv_imagenet.parse_val_archive(root)
        return _write(Path(root) / "val", task, order, out_dir, provenance | {"md5": checked})


def _existing(value: str, key: str) -> Path:
    path = Path(value).expanduser()
    if not path.exists():
        raise UserError(f"ImageNet val {key} {path} does not exist; fix `{key}` of the imagenet_val task")
    return path


def _checked_md5(path: Path, key: str) -> str:
    """`path`'s md5 when it is the one torchvision lists for archive `key`; else one line."""
    name, official = tv_imagenet.ARCHIVE_META[key]
    found = calculate_md5(path)
    if found != official:
        raise UserError(
            f"{path} has md5 {found}, not {official}, which torchvision lists for the official {name}: "
            f"point `{ARCHIVES[key]}` of the imagenet_val task at the official file (download it again "
            "if it is damaged)"
        )
    return found


def _write(source: Path, task: dict, order: str, out_dir: Path, provenance: dict) -> dict:
    with ImageFiles(source, flat_class="imagenet", decoding=Decoding.of_task(task)) as dataset:
        flat = "/" not in dataset.names[0]
        if flat and order == "imagefolder":
            raise UserError(
                f"{source} holds ImageNet val images without classes (no class folders, no `devkit`), so "
                "the authors' order cannot be formed: in it (ImageFolder's: class folders sorted by WordNet "
                "id) the first 12,800 images are the 50 of each of the first 256 classes, in file-name order "
                "they mix all 1,000; set `devkit` of the imagenet_val task to ILSVRC2012_devkit_t12.tar.gz, "
                "or set `order: file_name` to pair in file-name order on purpose"
            )
        rows = np.arange(len(dataset))
        if order == "file_name":
            rows = np.argsort([posixpath.basename(name) for name in dataset.names], kind="stable")
        provenance = provenance | {"order": order, "images_found": len(dataset), "skipped": dict(dataset.skipped)}
        return write_splits(out_dir, {"test": (dataset, rows)}, dataset.classes, provenance,
                            task["store_size"], max_images=task.get("max_images"), seed=task["split_seed"])
