"""Fixed random splits (datasets.splits): sizes by hand, the seed's effect, and seed 42's split pinned.

The pinned indices are numpy's PCG64 draws for seed 42 (`default_rng` streams are stable across numpy
versions); a change of them changes every prepared dataset of the study.
"""

import numpy as np
import pytest

from vitplasticity.datasets.splits import cap, holdout, train_val_test


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
        assert not np.array_equal(train_val_test(100, 0.2, 0.2, seed=1)[split],
                                  train_val_test(100, 0.2, 0.2, seed=2)[split])


def test_train_val_test_holds_out_test_first_then_val_of_the_rest():
    """10 rows, test 0.2 → 2 rows; val 0.25 of the 8 left → 2 rows; 6 train."""
    parts = train_val_test(10, 0.25, 0.2, seed=42)
    assert {k: v.tolist() for k, v in parts.items()} == {"train": [0, 1, 2, 7, 8, 9], "val": [3, 4], "test": [5, 6]}
    big = train_val_test(1000, 0.1, 0.3, seed=5)
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
