"""Fixed random splits (datasets.splits): sizes by hand, the seed's effect, and seed 42's split pinned.

The pinned indices are numpy's PCG64 draws for seed 42 (`default_rng` streams are stable across numpy
versions); a change of them changes every prepared dataset of the study.
"""

import numpy as np
import pytest

from vitplasticity.datasets.splits import balanced_subset, cap, holdout, train_val, train_val_test
from vitplasticity.errors import UserError


def _task(val_fraction: float, test_fraction: float, seed: int, **keys) -> dict:
    return {"val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": seed, **keys}


def test_holdout_holds_out_round_count_times_fraction_in_order():
    kept, held = holdout(np.arange(10, 20), 0.3, seed=42)
    assert (len(kept), len(held)) == (7, 3)  # round(10 x 0.3)
    assert sorted([*kept, *held]) == list(range(10, 20))
    assert list(kept) == sorted(kept) and list(held) == sorted(held)
    assert kept.dtype == np.int64 and held.dtype == np.int64


def test_holdout_with_seed_42_is_pinned():
    kept, held = holdout(np.arange(10), 0.3, seed=42)
    assert (kept.tolist(), held.tolist()) == ([1, 2, 3, 4, 7, 8, 9], [0, 5, 6])
    # The held-out rows are positions, not values: the same draw on other indices picks the same places.
    assert holdout(np.arange(10, 20), 0.3, seed=42)[1].tolist() == [10, 15, 16]


def test_two_split_seeds_give_two_splits():
    assert holdout(np.arange(10), 0.3, seed=7)[1].tolist() == [0, 7, 8]
    for split in ("train", "val", "test"):
        assert not np.array_equal(train_val_test(_task(0.2, 0.2, 1), np.zeros(100), ["x"])[split],
                                  train_val_test(_task(0.2, 0.2, 2), np.zeros(100), ["x"])[split])


def test_train_val_test_holds_out_test_first_then_val_of_the_rest():
    """10 rows, test 0.2 → 2 rows; val 0.25 of the 8 left → 2 rows; 6 train."""
    parts = train_val_test(_task(0.25, 0.2, 42), np.zeros(10), ["x"])
    assert {k: v.tolist() for k, v in parts.items()} == {"train": [0, 1, 2, 7, 8, 9], "val": [3, 4], "test": [5, 6]}
    big = train_val_test(_task(0.1, 0.3, 5), np.zeros(1000), ["x"])
    assert (len(big["train"]), len(big["val"]), len(big["test"])) == (630, 70, 300)  # 300; round(700 x 0.1)
    assert sorted(np.concatenate(list(big.values())).tolist()) == list(range(1000))


@pytest.mark.parametrize("limit", [None, 10, 12])
def test_cap_keeps_every_row_when_the_limit_allows(limit):
    rows = np.arange(100, 110)
    assert cap(rows, limit, seed=42).tolist() == rows.tolist()


def test_cap_keeps_a_seeded_subset_in_order():
    rows = np.arange(100, 110)
    assert cap(rows, 4, seed=42).tolist() == [100, 104, 105, 106]
    assert cap(rows, 4, seed=42).tolist() != cap(rows, 4, seed=3).tolist()
    assert len(cap(rows, 9, seed=0)) == 9


def test_cap_keeps_the_order_of_rows_given_out_of_order():
    """A stream in its own order (ImageNet val by file name over class folders) stays in that order."""
    rows = np.array([9, 3, 7, 1, 5, 0, 8])
    positions = cap(np.arange(7), 4, seed=42)
    assert positions.tolist() == [0, 3, 5, 6]
    assert cap(rows, 4, seed=42).tolist() == rows[positions].tolist() == [9, 1, 0, 8]


# Rows 0..11 labelled 0, 1, 2, 0, 1, 2, ...: class 0 holds rows 0, 3, 6, 9; class 1 rows 1, 4, 7, 10; class 2 the rest.
CLASSES = ["a", "b", "c"]
LABELS = np.array([0, 1, 2] * 4)


def test_balanced_subset_takes_images_over_classes_of_each_class_pinned_for_seed_42():
    rows = balanced_subset(np.arange(12), LABELS, CLASSES, {"images": 7, "seed": 42})  # 7 // 3 = 2 per class
    assert rows.tolist() == [0, 2, 4, 8, 9, 10]  # class 0: 0, 9; class 1: 4, 10; class 2: 2, 8
    assert np.bincount(LABELS[rows]).tolist() == [2, 2, 2]
    assert balanced_subset(np.arange(12), LABELS, CLASSES, {"images": 7, "seed": 43}).tolist() == [1, 2, 3, 6, 7, 11]
    # per_class instead of images (the authors' DomainNet: 10 a class whatever the class count): the same draw.
    assert balanced_subset(np.arange(12), LABELS, CLASSES, {"per_class": 2, "seed": 42}).tolist() == [0, 2, 4, 8, 9, 10]
    # Positions, not values: the same draw on other row numbers picks the same places.
    shifted = balanced_subset(np.arange(100, 112), LABELS, CLASSES, {"images": 7, "seed": 42})
    assert shifted.tolist() == [100, 102, 104, 108, 109, 110]


def test_train_val_draws_the_subset_then_holds_out_val_fraction_of_it():
    task = _task(0.25, 0.2, 42, subset={"images": 12, "seed": 42})  # 4 per class: every row
    train, val = train_val(np.arange(12), task, LABELS, CLASSES)
    assert (len(train), len(val)) == (9, 3) and sorted([*train, *val]) == list(range(12))
    assert [train.tolist(), val.tolist()] == [r.tolist() for r in holdout(np.arange(12), 0.25, 42)]
    small = train_val(np.arange(12), _task(0.5, 0.2, 42, subset={"images": 3, "seed": 42}), LABELS, CLASSES)
    assert sorted(LABELS[np.concatenate(small)].tolist()) == [0, 1, 2] and len(small[1]) == 2  # round(3 × 0.5)
    # Without a subset, the whole pool is split as before.
    assert [r.tolist() for r in train_val(np.arange(12), _task(0.25, 0.2, 42), LABELS, CLASSES)] == \
        [r.tolist() for r in holdout(np.arange(12), 0.25, 42)]


def test_a_subset_too_small_or_too_large_for_the_classes_is_one_line():
    with pytest.raises(UserError, match=r"^subset.images 2 is fewer than the task's 3 classes, so no class gets an "
                       r"image; set subset.images to at least 3$"):
        balanced_subset(np.arange(12), LABELS, CLASSES, {"images": 2, "seed": 42})
    with pytest.raises(UserError, match=r"^class 'a' has 4 training images, fewer than the subset's 5 per class "
                       r"\(subset.images 15 // 3 classes\); lower subset.images$"):
        balanced_subset(np.arange(12), LABELS, CLASSES, {"images": 15, "seed": 42})
    with pytest.raises(UserError, match=r"^class 'a' has 4 training images, fewer than the subset's 5 per class "
                       r"\(subset.per_class\); lower subset.per_class$"):
        balanced_subset(np.arange(12), LABELS, CLASSES, {"per_class": 5, "seed": 42})
