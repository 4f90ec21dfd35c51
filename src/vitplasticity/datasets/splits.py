"""Fixed random splits: the same seed and size give the same split on every machine."""

from __future__ import annotations

import numpy as np


def holdout(indices: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split `indices` into (kept, held out): round(len × fraction) held out at random.

    Both parts keep the original order, so reading them streams through the source.
    """
    indices = np.asarray(indices, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(indices))
    held = round(len(indices) * fraction)
    return np.sort(indices[order[held:]]), np.sort(indices[order[:held]])


def train_val_test(count: int, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Rows 0..count-1 → test held out first, then val held out of the rest. {split: indices}"""
    rest, test = holdout(np.arange(count), test_fraction, seed)
    train, val = holdout(rest, val_fraction, seed)
    return {"train": train, "val": val, "test": test}


def cap(rows: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` of `rows`, a seeded random subset kept in the order of `rows` (all of them when None)."""
    rows = np.asarray(rows, dtype=np.int64)
    if limit is None or limit >= len(rows):
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))]
