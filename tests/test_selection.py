"""Hit rate of selection criteria against the finetuning ranking, on a results set checked by hand."""

import math

import pandas as pd
import pytest

from vitplasticity import registry, selection
from vitplasticity.errors import UserError

# Task T: accuracy at the best lr (0.01): mha 92 (seeds 90, 92, 94; std 1.633), fc1 91, fc2 88, ln2 85, ln1 84.
# Task U: the reverse order (ln1 best, with the seed spread), ln1 92, ln2 91, fc2 88, fc1 85, mha 84.
ACC = {"T": {"mha": (90, 92, 94), "fc1": (91,) * 3, "fc2": (88,) * 3, "ln2": (85,) * 3, "ln1": (84,) * 3},
       "U": {"ln1": (90, 92, 94), "ln2": (91,) * 3, "fc2": (88,) * 3, "fc1": (85,) * 3, "mha": (84,) * 3}}
# Scores under real criterion names, whose direction comes from registry.CRITERIA: ORDERED, FC1_FIRST and PARAMS
# are higher-first criteria, kappatune lower-first with no score for the LayerNorms.
ORDERED, FC1_FIRST, PARAMS = "plasticity_embedding", "relative_gradient_norm", "trainable_params"
SCORES = {ORDERED: {"mha": 5, "fc1": 4, "fc2": 3, "ln2": 2, "ln1": 1},
          FC1_FIRST: {"fc1": 5, "mha": 4, "fc2": 3, "ln2": 2, "ln1": 1},
          PARAMS: {"mha": 10, "fc1": 10, "fc2": 8, "ln2": 1, "ln1": 1},
          "kappatune": {"mha": 1, "fc1": 2, "fc2": 3, "ln2": math.nan, "ln1": math.nan}}


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
    assert t.loc[ORDERED, "spearman"] == pytest.approx(1.0)
    assert t.loc[FC1_FIRST, "spearman"] == pytest.approx(1 - 6 * 2 / (5 * 24))  # 0.9: top two swapped
    # Ties get average ranks: score ranks (4.5, 4.5, 3, 1.5, 1.5) against (5, 4, 3, 2, 1): r = 9 / sqrt(90).
    assert t.loc[PARAMS, "spearman"] == pytest.approx(9 / math.sqrt(90))
    assert t.loc[ORDERED, "top1"] == 1.0
    assert t.loc[FC1_FIRST, "top1"] == 1.0  # 91 >= 92 - 1.633: within one std of the best
    assert t.loc[PARAMS, "top1"] == 1.0  # mha and fc1 tie for first, both hits
    assert t.loc["random", "spearman"] == 0.0 and t.loc["random", "top1"] == pytest.approx(2 / 5)
    assert t.loc[FC1_FIRST, "choice"] == "fc1" and t.loc[FC1_FIRST, "best_arm"] == "mha"
    u = table.loc["U"]
    assert u.loc[ORDERED, "spearman"] == pytest.approx(-1.0) and u.loc[ORDERED, "top1"] == 0.0
    # Bootstrap over seeds: mha's mean of 3 draws from (90, 92, 94) falls below fc1's 91 with probability
    # 4/27, which swaps the top two: Spearman is then 0.9, else 1.0; so the 95% interval is [0.9, 1.0].
    assert (t.loc[ORDERED, "spearman_low"], t.loc[ORDERED, "spearman_high"]) == pytest.approx((0.9, 1.0))


def test_summary_averages_over_tasks(runs, criteria):
    summary = selection.summary(selection.hit_rates(criteria, runs, n_boot=50)).set_index("criterion")
    assert summary.loc[ORDERED, "spearman"] == pytest.approx(0.0)  # +1 on T, -1 on U
    assert summary.loc[ORDERED, "top1"] == pytest.approx(0.5)
    assert summary.loc["random", "top1"] == pytest.approx(0.4) and summary.loc["random", "n_tasks"] == 2
    # Two tasks: t(0.975, 1) = 12.706; Spearman +1 and -1 (s = sqrt 2): 0 ± 12.706 * sqrt 2 / sqrt 2.
    t_1 = 12.706205
    assert summary.loc[ORDERED, ["spearman_low", "spearman_high"]].tolist() == pytest.approx([-t_1, t_1])
    # top-1 1 and 0 (s = sqrt 0.5): 0.5 ± 12.706 * 0.7071 / 1.4142 = 0.5 ± 6.353.
    assert summary.loc[ORDERED, ["top1_low", "top1_high"]].tolist() == pytest.approx([0.5 - t_1 / 2, 0.5 + t_1 / 2])
    # random's Spearman is 0 on both tasks: no spread, the interval is the point.
    assert summary.loc["random", ["spearman_low", "spearman_high"]].tolist() == [0.0, 0.0]


def test_the_interval_over_tasks_is_students_t_of_the_mean():
    # 1, 2, 3: mean 2, s = 1, n = 3, t(0.975, 2) = 4.3027: 2 ± 4.3027 / sqrt 3 = 2 ± 2.4841.
    assert selection.interval_over_tasks(pd.Series([1.0, 2.0, 3.0])) == pytest.approx((2 - 2.484138, 2 + 2.484138))
    # A task without a value (Spearman undefined) is left out: the same three values.
    assert selection.interval_over_tasks(pd.Series([1.0, math.nan, 2.0, 3.0])) == pytest.approx(
        (2 - 2.484138, 2 + 2.484138))
    # 90%: t(0.95, 2) = 2.9200: 2 ± 2.9200 / sqrt 3 = 2 ± 1.6859.
    assert selection.interval_over_tasks(pd.Series([1.0, 2.0, 3.0]), 0.9) == pytest.approx((0.314146, 3.685854),
                                                                                          abs=1e-6)
    assert all(math.isnan(end) for end in selection.interval_over_tasks(pd.Series([4.0, math.nan])))


def test_constant_scores_have_no_correlation():
    acc = pd.Series({"mha": 92.0, "fc1": 91.0})
    assert math.isnan(selection.spearman(pd.Series({"mha": 1.0, "fc1": 1.0}), acc))


def test_kappatune_is_ranked_lowest_first_with_layernorms_tied_last(runs, criteria):
    table = selection.hit_rates(criteria, runs, n_boot=50).set_index(["task", "criterion"])
    # Oriented ranks (mha 5, fc1 4, fc2 3, ln2 1.5, ln1 1.5) against T's accuracies (5, 4, 3, 2, 1):
    # deviations (2, 1, 0, -1.5, -1.5) and (2, 1, 0, -1, -2), r = 9.5 / sqrt(9.5 * 10).
    t, u = table.loc[("T", "kappatune")], table.loc[("U", "kappatune")]
    assert t["spearman"] == pytest.approx(9.5 / math.sqrt(95))
    assert t["choice"] == "mha" and t["top1"] == 1.0  # the lowest score, not fc2's highest
    assert u["spearman"] == pytest.approx(-9.5 / math.sqrt(95))  # U's order is T's reversed
    assert u["choice"] == "mha" and u["top1"] == 0.0  # ln1 is best on U, and kappatune never chooses it


DIRECTIONS = {"plasticity_embedding": "higher", "plasticity_hidden": "higher", "plasticity_scale_free": "higher",
              "relative_gradient_norm": "higher", "fisher": "higher", "fps": "higher", "kappatune": "lower",
              "trainable_params": "higher"}


def test_each_criterion_declares_the_end_chosen_first():
    # More plastic, more sensitive, more important, larger: first; better conditioned (lower κ rank): first.
    assert registry.CRITERIA == DIRECTIONS


@pytest.mark.parametrize("criterion", list(DIRECTIONS))
def test_the_first_choice_follows_the_criterion_direction(criterion):
    scores = pd.Series({"ln1": 1.0, "mha": 2.0, "ln2": 3.0, "fc1": 4.0, "fc2": 5.0})
    turned = selection.oriented(scores, criterion)
    assert turned.idxmax() == ("ln1" if DIRECTIONS[criterion] == "lower" else "fc2")


def test_an_unscored_component_comes_after_every_scored_one():
    turned = selection.oriented(pd.Series({"mha": -50.0, "ln1": math.nan, "fc1": 3.0}), PARAMS)
    assert list(turned.sort_values(ascending=False).index) == ["fc1", "mha", "ln1"]
    assert selection.oriented(pd.Series({"ln1": math.nan}), "kappatune").isna().all()  # nothing to rank


def test_an_unknown_criterion_is_named_with_the_known_ones():
    with pytest.raises(UserError, match=r"^unknown selection criterion 'ordered'; known: plasticity_embedding, "):
        selection.oriented(pd.Series({"mha": 1.0}), "ordered")
