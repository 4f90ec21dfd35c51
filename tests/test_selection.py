"""Hit rate of selection criteria against the finetuning ranking, on a results set checked by hand."""

import math

import pandas as pd
import pytest

from vitplasticity import selection

# Task T: accuracy at the best lr (0.01): mha 92 (seeds 90, 92, 94; std 1.633), fc1 91, fc2 88, ln2 85, ln1 84.
# Task U: the reverse order (ln1 best, with the seed spread), ln1 92, ln2 91, fc2 88, fc1 85, mha 84.
ACC = {"T": {"mha": (90, 92, 94), "fc1": (91,) * 3, "fc2": (88,) * 3, "ln2": (85,) * 3, "ln1": (84,) * 3},
       "U": {"ln1": (90, 92, 94), "ln2": (91,) * 3, "fc2": (88,) * 3, "fc1": (85,) * 3, "mha": (84,) * 3}}
SCORES = {"ordered": {"mha": 5, "fc1": 4, "fc2": 3, "ln2": 2, "ln1": 1},
          "fc1_first": {"fc1": 5, "mha": 4, "fc2": 3, "ln2": 2, "ln1": 1},
          "params": {"mha": 10, "fc1": 10, "fc2": 8, "ln2": 1, "ln1": 1}}


@pytest.fixture(scope="module")
def runs():
    rows = []
    for task, arms in ACC.items():
        for arm, accs in arms.items():
            for seed, acc in zip((0, 42, 3407), accs, strict=True):
                rows.append({"task": task, "arm": arm, "lr": 0.01, "seed": seed, "test_acc": float(acc)})
                rows.append({"task": task, "arm": arm, "lr": 0.03, "seed": seed, "test_acc": 80.0})
        # A better lr where one seed diverged is not eligible.
        rows += [{"task": task, "arm": "fc2", "lr": 0.1, "seed": s, "test_acc": a}
                 for s, a in ((0, 99.0), (42, 99.0), (3407, math.nan))]
        rows += [{"task": task, "arm": "all", "lr": 0.01, "seed": s, "test_acc": 99.0} for s in (0, 42, 3407)]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def criteria():
    return pd.DataFrame([{"task": task, "criterion": name, "component": c, "score": s}
                         for task in ACC for name, scores in SCORES.items() for c, s in scores.items()])


def test_component_accuracy_takes_the_best_eligible_lr(runs):
    acc = selection.component_accuracy(runs[runs["task"] == "T"]).set_index("arm")
    assert acc.loc["mha", "acc"] == 92 and acc.loc["mha", "std"] == pytest.approx(math.sqrt(8 / 3))
    assert acc.loc["fc2", "acc"] == 88 and acc.loc["fc2", "best_lr"] == 0.01  # lr 0.1 had a diverged seed
    assert "all" not in acc.index


def test_hit_rates_by_hand(runs, criteria):
    table = selection.hit_rates(criteria, runs, n_boot=400).set_index(["task", "criterion"])
    t = table.loc["T"]
    assert t.loc["ordered", "spearman"] == pytest.approx(1.0)
    assert t.loc["fc1_first", "spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24))  # 0.9: top two swapped
    # Ties get average ranks: score ranks (4.5, 4.5, 3, 1.5, 1.5) against (5, 4, 3, 2, 1): r = 9 / sqrt(90).
    assert t.loc["params", "spearman"] == pytest.approx(9 / math.sqrt(90))
    assert t.loc["ordered", "top1"] == 1.0
    assert t.loc["fc1_first", "top1"] == 1.0  # 91 >= 92 - 1.633: within one std of the best
    assert t.loc["params", "top1"] == 1.0  # mha and fc1 tie for first, both hits
    assert t.loc["random", "spearman"] == 0.0 and t.loc["random", "top1"] == pytest.approx(2 / 5)
    assert t.loc["fc1_first", "choice"] == "fc1" and t.loc["fc1_first", "best_arm"] == "mha"
    u = table.loc["U"]
    assert u.loc["ordered", "spearman"] == pytest.approx(-1.0) and u.loc["ordered", "top1"] == 0.0
    # Bootstrap over seeds: mha's mean of 3 draws from (90, 92, 94) falls below fc1's 91 with probability
    # 4/27, which swaps the top two: Spearman is then 0.9, else 1.0; so the 95% interval is [0.9, 1.0].
    assert (t.loc["ordered", "spearman_low"], t.loc["ordered", "spearman_high"]) == pytest.approx((0.9, 1.0))


def test_summary_averages_over_tasks(runs, criteria):
    summary = selection.summary(selection.hit_rates(criteria, runs, n_boot=50)).set_index("criterion")
    assert summary.loc["ordered", "spearman"] == pytest.approx(0.0)  # +1 on T, -1 on U
    assert summary.loc["ordered", "top1"] == pytest.approx(0.5)
    assert summary.loc["random", "top1"] == pytest.approx(0.4) and summary.loc["random", "n_tasks"] == 2


def test_constant_scores_have_no_correlation():
    acc = pd.Series({"mha": 92.0, "fc1": 91.0})
    assert math.isnan(selection.spearman(pd.Series({"mha": 1.0, "fc1": 1.0}), acc))
