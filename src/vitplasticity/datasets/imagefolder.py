"""A user's own images: an ImageFolder tree (one sub-folder per class) as a prepared task.

``path`` names the folder. When it holds ``train/`` (and optionally ``val/`` and ``test/``)
sub-folders, each is a split of class sub-folders and is kept as given; a missing ``test``
is held out of train (``test_fraction``), then a missing ``val`` out of the rest
(``val_fraction``), at random with ``split_seed``. Without split folders, the class
sub-folders are split the same way (test first, then val). Images directly in the folder
(no class sub-folders) form the single class "images" (a plasticity reference stream).
Classes are the sorted sub-folder names of ``train`` (or of the folder); a class found
only in val or test is an error.

``reference_stream: true`` puts every image in the test split, the split plasticity reads
(`jobs.measure_plasticity`), and leaves train and val empty: a plasticity reference stream that
uses every image it is given. Such a task can only be ``plasticity.reference_task``
(`config.check_reference_stream`); it takes no split sub-folders, ``test_fraction`` or
``val_fraction``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitplasticity.datasets.imagefiles import ImageFiles
from vitplasticity.datasets.images import Decoding, write_splits
from vitplasticity.datasets.splits import holdout
from vitplasticity.errors import UserError

REQUIRED = ("path", "store_size", "split_seed")
SPLITS = ("train", "val", "test")
FLAT_CLASS = "images"


class _Relabelled:
    """A split's `ImageFiles` with labels renumbered to the train split's classes."""

    def __init__(self, files: ImageFiles, classes: list[str]) -> None:
        self.files = files
        self._map = np.array([classes.index(name) for name in files.classes], dtype=np.int64)
        self.labels = self._map[files.labels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        image, label = self.files[index]
        return image, int(self._map[label])


def class_folders(path: Path) -> list[str] | None:
    """The class sub-folders `prepare` reads from the local folder `path` (those of ``train/`` when the
    folder is split), sorted; None when `path` is not a local folder (an archive: `prepare` reads it)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    top = path / "train" if (path / "train").is_dir() else path
    return sorted(entry.name for entry in top.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _split_folders(path: Path) -> list[str]:
    return [split for split in SPLITS if (path / split).is_dir()]


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    path = Path(task["path"]).expanduser()
    if not path.is_dir():
        raise UserError(f"image folder {path} does not exist or is not a folder; fix `path` of the imagefolder task")
    given = _split_folders(path)
    if given and "train" not in given:
        raise UserError(f"image folder {path} has {'/'.join(given)} but no train/ sub-folder; add train/ "
                        "or remove the split sub-folders")
    if task.get("reference_stream"):
        clash = [f"{split}/ sub-folder" for split in given] + [key for key in ("test_fraction", "val_fraction")
                                                               if key in task]
        if clash:
            raise UserError(f"image folder {path}: reference_stream puts every image in the test split, so it "
                            f"takes no {' or '.join(clash)}; remove {'them' if len(clash) > 1 else 'it'} or "
                            "reference_stream")
    opened: dict[str, ImageFiles] = {}
    try:
        for split in given or ["all"]:
            opened[split] = ImageFiles(path, root="" if split == "all" else split, flat_class=FLAT_CLASS,
                                       decoding=Decoding.of_task(task))
        classes = opened["train" if given else "all"].classes
        for split, files in opened.items():
            stray = sorted(set(files.classes) - set(classes))
            if stray:
                raise UserError(f"image folder {path}/{split} has classes {stray} that train/ lacks; "
                                "add them to train/ or remove them")
        datasets = {split: _Relabelled(files, classes) for split, files in opened.items()}
        base = datasets["train" if given else "all"]
        rows = {"train": np.arange(len(base))}
        seed = task["split_seed"]
        if task.get("reference_stream"):
            rows = {"train": rows["train"][:0], "val": rows["train"][:0], "test": rows["train"]}
        if "test" not in given and "test" not in rows:
            rows["train"], rows["test"] = holdout(rows["train"], task.get("test_fraction", 0.2), seed)
        if "val" not in given and "val" not in rows:
            rows["train"], rows["val"] = holdout(rows["train"], task.get("val_fraction", 0.2), seed)
        parts = {split: (datasets[split], np.arange(len(datasets[split]))) if split in given and split != "train"
                 else (base, rows[split]) for split in SPLITS}
        empty = [split for split, (_, r) in parts.items() if len(r) == 0 and not (task.get("reference_stream")
                                                                                 and split != "test")]
        if empty:
            raise UserError(f"image folder {path}: split(s) {', '.join(empty)} would be empty "
                            f"({len(base)} images); add images or raise val_fraction/test_fraction")
        provenance = provenance | {"split_folders": given, "images_found": {s: len(d) for s, d in datasets.items()},
                                   "skipped": {s: dict(files.skipped) for s, files in opened.items()}}
        return write_splits(out_dir, parts, classes, provenance, task["store_size"],
                            max_images=task.get("max_images"), seed=task.get("split_seed", 0))
    finally:
        for files in opened.values():
            files.close()
