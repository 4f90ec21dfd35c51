"""VTAB-1k (Zhai et al. 2019): one task of the processed copy the parameter-efficient finetuning code bases read.

``path`` names the folder holding one sub-folder per task, ``vtab_task`` the task (one of `TASKS`). A task
folder holds its images and four split lists, ``train800.txt``, ``val200.txt``, ``train800val200.txt`` and
``test.txt``, each line ``relative/path label`` (the path relative to the task folder, the label an integer
in 0..classes-1, the last field of the line), as the readers of the parameter-efficient finetuning code bases
(FacT's ``vtab.py`` among them) parse them. The prepared task's
train split is ``train800``, val is ``val200`` (where the learning rate is chosen) and test is ``test``;
``train800val200`` must hold exactly the lines of train800 and val200 (checked, not stored), and no test
image may be listed for training.

Before any image is decoded, every list is checked (present, two fields a line, integer labels in range),
every listed file must exist inside the task folder (a link may point anywhere: the folder is the user's
own), and the lists and image bytes are hashed into one checksum recorded in the provenance. Images are
decoded by `images.read_image` (every PIL mode, the decompression-bomb guard) and resized to
``store_size`` × ``store_size`` without cropping, bicubic, as those code bases feed the model
(``transforms.Resize((224, 224), interpolation=3)``).
"""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path

import numpy as np
from PIL import Image

from vitplasticity.datasets.images import Decoding, read_image, write_splits
from vitplasticity.errors import UserError

REQUIRED = ("path", "vtab_task", "store_size")
# The 19 tasks in the order the VTAB tables list them: task -> (group, number of classes).
TASKS = {
    "cifar": ("Natural", 100),
    "caltech101": ("Natural", 102),
    "dtd": ("Natural", 47),
    "oxford_flowers102": ("Natural", 102),
    "oxford_iiit_pet": ("Natural", 37),
    "svhn": ("Natural", 10),
    "sun397": ("Natural", 397),
    "patch_camelyon": ("Specialized", 2),
    "eurosat": ("Specialized", 10),
    "resisc45": ("Specialized", 45),
    "diabetic_retinopathy": ("Specialized", 5),
    "clevr_count": ("Structured", 8),
    "clevr_dist": ("Structured", 6),
    "dmlab": ("Structured", 6),
    "kitti": ("Structured", 4),
    "dsprites_loc": ("Structured", 16),
    "dsprites_ori": ("Structured", 16),
    "smallnorb_azi": ("Structured", 18),
    "smallnorb_ele": ("Structured", 9),
}
GROUPS = ("Natural", "Specialized", "Structured")
LISTS = ("train800", "val200", "train800val200", "test")
SPLITS = {"train": "train800", "val": "val200", "test": "test"}  # prepared split -> list it holds


def check_task(name: str, data: dict) -> None:
    """Raise UserError in one line when task `name`'s data keys cannot name a VTAB-1k task."""
    for key in REQUIRED:
        if data.get(key) is None:
            raise UserError(f"config key 'tasks.{name}.data.{key}': required for vtab1k tasks; add it")
    if data["vtab_task"] not in TASKS:
        raise UserError(f"config key 'tasks.{name}.data.vtab_task': '{data['vtab_task']}' is not a VTAB-1k task; "
                        f"allowed: {', '.join(TASKS)}")


def read_list(file: Path, classes: int) -> list[tuple[str, int]]:
    """The (path, label) lines of split list `file`, in order; UserError naming the first bad line."""
    if not file.is_file():
        raise UserError(f"VTAB-1k split list {file} is missing; restore it from the processed VTAB-1k copy")
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {file} ({exc.strerror}); fix its permissions or restore it, then rerun") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)  # the label last; a path may hold spaces
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise UserError(f"{file}:{number}: '{line.strip()}' is not 'relative/path label'; fix or remove the line")
        relative, label = fields[0], int(fields[1])
        clean = posixpath.normpath(relative)
        if relative.startswith("/") or clean == ".." or clean.startswith("../"):
            raise UserError(f"{file}:{number}: {relative} lies outside the task folder; list paths relative to it")
        if not 0 <= label < classes:
            raise UserError(f"{file}:{number}: label {label} is outside 0..{classes - 1} ({classes} classes); "
                            "fix the line or the task's vtab_task")
        rows.append((clean, label))
    if not rows:
        raise UserError(f"VTAB-1k split list {file} lists no images; restore it from the processed VTAB-1k copy")
    return rows


class _Listed:
    """One split list's images as a dataset: ``dataset[i]`` -> (RGB PIL image size × size, label)."""

    def __init__(self, folder: Path, rows: list[tuple[str, int]], size: int, decoding: Decoding) -> None:
        self.folder, self.rows, self.size, self.decoding = folder, rows, size, decoding

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        relative, label = self.rows[index]
        path = self.folder / relative
        image = read_image(path, str(path), self.decoding)
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC), label


def prepare(task: dict, out_dir: Path, raw_dir: Path, provenance: dict) -> dict:
    check_task(provenance["task"], task)
    name = task["vtab_task"]
    group, classes = TASKS[name]
    folder = Path(task["path"]).expanduser() / name
    if not folder.is_dir():
        raise UserError(f"VTAB-1k task folder {folder} does not exist; set `path` to the folder holding the "
                        f"processed VTAB-1k task folders ({name}/ among them)")
    lists = {split: read_list(folder / f"{split}.txt", classes) for split in LISTS}
    if sorted(lists["train800val200"]) != sorted(lists["train800"] + lists["val200"]):
        raise UserError(f"{folder}/train800val200.txt does not hold exactly the lines of train800.txt and "
                        "val200.txt; restore the lists from the processed VTAB-1k copy")
    shared = sorted({path for path, _ in lists["train800val200"]} & {path for path, _ in lists["test"]})
    if shared:
        raise UserError(f"{folder}/test.txt lists {len(shared)} image(s) that train800val200.txt lists too "
                        f"({shared[0]} first): test images must be unseen; restore the lists from the processed "
                        "VTAB-1k copy")
    files = sorted({relative for rows in lists.values() for relative, _ in rows})
    missing = [relative for relative in files if not (folder / relative).is_file()]
    if missing:
        raise UserError(f"VTAB-1k task {name}: listed image {folder / missing[0]} is missing ({len(missing)} of "
                        f"{len(files)} listed files missing); restore them from the processed VTAB-1k copy")
    digest = hashlib.sha256()
    for relative in [f"{split}.txt" for split in LISTS] + files:
        try:
            content = (folder / relative).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {folder / relative} ({exc.strerror}); fix its permissions or restore "
                            "it, then rerun") from exc
        digest.update(f"{relative}\0".encode() + hashlib.sha256(content).digest())
    size, decoding = task["store_size"], Decoding.of_task(task)
    parts = {split: (_Listed(folder, lists[listed], size, decoding), np.arange(len(lists[listed])))
             for split, listed in SPLITS.items()}
    provenance = provenance | {"group": group, "lists": {split: len(rows) for split, rows in lists.items()},
                               "files_checksum": f"sha256:{digest.hexdigest()}"}
    return write_splits(out_dir, parts, [str(label) for label in range(classes)], provenance, size,
                        max_images=task.get("max_images"), seed=task.get("split_seed", 0))
