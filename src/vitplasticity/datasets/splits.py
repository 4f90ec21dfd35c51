"""Fixed random splits: the same seed and size give the same split on every machine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vitplasticity.errors import UserError


def holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (kept, held out): round(len × fraction) held out at random.

    Both parts keep the original order, so reading them streams through the source.
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(indices))
    held = round(len(indices) * fraction)
    return np.sort(indices[order[held:]]), np.sort(indices[order[:held]])


def balanced_subset(rows: np.ndarray, labels: np.ndarray, classes: Sequence[str], subset: dict) -> np.ndarray:
    """A class-balanced subset of `rows`, in order: the same number of rows of every class.

    `labels` (same length as `rows`) are the rows' class indices into `classes`; `subset` is a task's
    ``{images | per_class, seed}``: ``images // len(classes)`` rows of each class, or ``per_class``. The
    rows of each class are drawn without replacement by one generator, ``numpy.random.default_rng(seed)``,
    class by class in label order (the low-data ablation of the authors' development branch: 1,000
    images, ``1000 // classes`` per class, 10 per class on DomainNet, seed 42). Raises `UserError` when
    `images` is below the class count or a class holds fewer rows than its share.
    """
    rows, labels = np.asarray(rows, dtype=np.int64), np.asarray(labels)
    if "per_class" in subset:
        per_class, share = subset["per_class"], "subset.per_class"
    else:
        per_class = subset["images"] // len(classes)
        share = f"subset.images {subset['images']} // {len(classes)} classes"
        if per_class == 0:
            raise UserError(f"subset.images {subset['images']} is fewer than the task's {len(classes)} classes, so no "
                            f"class gets an image; set subset.images to at least {len(classes)}")
    rng = np.random.default_rng(subset["seed"])
    chosen = []
    for label, name in enumerate(classes):
        members = rows[labels == label]
        if len(members) < per_class:
            raise UserError(f"class '{name}' has {len(members)} training images, fewer than the subset's {per_class} "
                            f"per class ({share}); lower {share.split()[0]}")
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def train_val(
    rows: np.ndarray, task: dict, labels: np.ndarray, classes: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    """A task's training pool `rows` → (train, val): `val_fraction` held out (`holdout`, seeded by
    `split_seed`), after drawing the task's `subset` from the pool when it has one (`balanced_subset`).
    `labels` are the labels of every row of the dataset (indexed by row).
    """
    rows = np.asarray(rows, dtype=np.int64)
    if task.get("subset"):
        rows = balanced_subset(rows, np.asarray(labels)[rows], classes, task["subset"])
    return holdout(rows, task["val_fraction"], task["split_seed"])


def train_val_test(task: dict, labels: np.ndarray, classes: Sequence[str]) -> dict:
    """Rows 0..len(labels)-1 → `test_fraction` held out first, then train and val of the rest
    (`train_val`: the task's subset, then `val_fraction`), all seeded by `split_seed`. {split: indices}"""
    rest, test = holdout(np.arange(len(labels)), task["test_fraction"], task["split_seed"])
    train, val = train_val(rest, task, labels, classes)
    return {"train": train, "val": val, "test": test}


def cap(rows: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` of `rows`, a seeded random subset kept in the order of `rows` (all of them when None)."""
    rows = np.asarray(rows, dtype=np.int64)
    if limit is None or limit >= len(rows):
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))]
