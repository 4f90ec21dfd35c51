"""Selection at a parameter budget: greedy fill of (component, layer) units, checked by hand."""

import math

import pandas as pd
import pytest
from helpers import tiny_vit

from vitplasticity import budget, registry
from vitplasticity.aggregate import _selection_view, main_table, selection_table
from vitplasticity.components import block_parameters, set_trainable
from vitplasticity.config import check_selection
from vitplasticity.errors import UserError
from vitplasticity.jobs import budget_units

# Two blocks; per block LN1 1, MHA 10, LN2 1, FC1 8, FC2 8 parameters: 56 in all.
SIZES = {(c, layer): n for layer in (0, 1) for c, n in (("ln1", 1), ("mha", 10), ("ln2", 1), ("fc1", 8), ("fc2", 8))}
# One score per unit, 9 (mha.1) down to 0 (fc2.1).
SCORES = {("mha", 1): 9, ("fc1", 1): 8, ("ln2", 0): 7, ("fc2", 0): 6, ("ln1", 1): 5, ("mha", 0): 4, ("ln1", 0): 3,
          ("fc1", 0): 2, ("ln2", 1): 1, ("fc2", 1): 0}


def labels(units):
    return [budget.unit_label(unit) for unit in units]


def chosen(selector, fraction, scores=None, draw=None):
    spec = {"selector": selector, "budget": fraction} | ({"draw": draw} if draw is not None else {})
    return labels(budget.select(spec, SIZES, scores))


def test_a_higher_first_criterion_fills_the_budget_greedily_skipping_what_does_not_fit():
    # 0.25 x 56 = 14 parameters: mha.1 (10), fc1.1 would make 18: skipped, ln2.0 (11), fc2.0 skipped, ln1.1 (12),
    # mha.0 skipped, ln1.0 (13), fc1.0 skipped, ln2.1 (14), fc2.1 skipped.
    assert budget.limit(0.25, SIZES) == 14
    assert chosen("fisher", 0.25, SCORES) == ["mha.1", "ln2.0", "ln1.1", "ln1.0", "ln2.1"]


def test_a_lower_first_criterion_takes_its_smallest_scores_and_unscored_units_last():
    # kappatune: lowest first, fc2.1 (0, 8 params), fc1.0 (2) would make 16, mha.0, fc2.0, fc1.1, mha.1 do not fit;
    # the LayerNorms (no κ) come after every scored unit, in canonical order, and fill 9 … 12.
    kappa = {unit: (math.nan if unit[0] in ("ln1", "ln2") else score) for unit, score in SCORES.items()}
    assert chosen("kappatune", 0.25, kappa) == ["fc2.1", "ln1.0", "ln2.0", "ln1.1", "ln2.1"]


def test_tied_scores_keep_the_canonical_order_layer_then_component():
    # trainable_params: mha.0 and mha.1 tie at 10, the MLP layers at 8: mha.0 first, then only LayerNorms fit.
    assert chosen("trainable_params", 0.25, {unit: float(n) for unit, n in SIZES.items()}) == [
        "mha.0", "ln1.0", "ln2.0", "ln1.1", "ln2.1"]


def test_last_k_fills_from_the_top_block_and_attention_top_takes_mha_only():
    # Block 1 first: ln1.1 (1), mha.1 (11), ln2.1 (12), fc1.1 and fc2.1 skipped; block 0: ln1.0 (13), ln2.0 (14).
    assert chosen("last_k", 0.25) == ["ln1.1", "mha.1", "ln2.1", "ln1.0", "ln2.0"]
    assert chosen("attention_top", 0.25) == ["mha.1"]
    assert chosen("attention_top", 0.4) == ["mha.1", "mha.0"]  # 22 parameters: both MHAs (20)


def test_random_draws_are_seeded_permutations_that_differ_between_draws():
    first = budget.order(budget.RANDOM, SIZES, draw=0)
    assert first == budget.order(budget.RANDOM, SIZES, draw=0)
    assert sorted(first) == sorted(SIZES)
    assert first != budget.order(budget.RANDOM, SIZES, draw=1)
    assert labels(budget.select({"selector": "random", "budget": 0.25, "draw": 0}, SIZES)) == labels(
        budget.greedy(first, SIZES, 14))


@pytest.mark.parametrize("criterion", list(registry.CRITERIA))
def test_every_criterion_chooses_the_end_of_its_scale_its_direction_declares(criterion):
    # Only one unit fits (10 of 56 parameters); the scores make mha.0 the largest and mha.1 the smallest.
    scores = {unit: 5.0 for unit in SIZES} | {("mha", 0): 9.0, ("mha", 1): 1.0}
    expected = ["mha.0"] if registry.CRITERIA[criterion] == "higher" else ["mha.1"]
    assert chosen(criterion, 10 / 56, scores)[:1] == expected


def test_a_budget_below_every_unit_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"^selection budget 0.01 allows 0 block parameters, fewer than the smallest "
                                        r"unit fisher takes \(1\); raise selection.budgets$"):
        budget.select({"selector": "fisher", "budget": 0.01}, SIZES, SCORES)
    with pytest.raises(UserError, match="^criterion 'fisher' scores no unit of this model"):
        budget.select({"selector": "fisher", "budget": 0.5}, SIZES, {})


def test_arm_names_and_the_arms_a_selection_section_declares():
    arms = budget.arms({"budgets": [0.085, 0.1], "criteria": ["fisher", "random"], "random_draws": 2})
    assert list(arms) == ["fisher_8.5pct", "random_8.5pct_draw0", "random_8.5pct_draw1",
                          "fisher_10pct", "random_10pct_draw0", "random_10pct_draw1"]
    assert arms["random_10pct_draw1"] == {"selector": "random", "budget": 0.1, "draw": 1}
    assert arms["fisher_8.5pct"] == {"selector": "fisher", "budget": 0.085}


def test_a_unit_arm_trains_exactly_its_units_and_the_head():
    model = tiny_vit(num_classes=3)
    names = set(set_trainable(model, [], [("mha", 1), ("ln1", 0)]))
    groups = block_parameters(model)
    expected = ({n for n, _ in groups[("mha", 1)]} | {n for n, _ in groups[("ln1", 0)]}
                | {"norm.weight", "norm.bias", "head.weight", "head.bias"})
    assert names == expected
    assert {"blocks.1.attn.qkv.weight", "blocks.0.norm1.weight"} <= names and "blocks.0.attn.qkv.weight" not in names
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    with pytest.raises(UserError, match=r"^unit\(s\) fc1.7 are not block components of this model \(2 blocks"):
        set_trainable(model, [], [("fc1", 7)])


def test_the_finetune_job_selects_from_the_criteria_table(tmp_path):
    model = tiny_vit(num_classes=3)  # width 32: LN 64, MHA 4,224, FC1 4,224, FC2 4,128 parameters a block
    units = list(block_parameters(model))
    rows = [{"criterion": "fisher", "component": c, "layer": layer, "value": float(i)} for i, (c, layer) in
            enumerate(units)]  # in reverse: fc2.1, fc1.1, ln2.1, mha.1, ln1.1, fc2.0, fc1.0, ln2.0, mha.0, ln1.0
    table = tmp_path / "criteria.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    # 10% of 25,408 = 2,540 parameters: no large unit fits, so the four LayerNorms in score order.
    assert labels(budget_units(model, {"selector": "fisher", "budget": 0.1}, table)) == [
        "ln2.1", "ln1.1", "ln2.0", "ln1.0"]
    # 20% = 5,081: fc2.1 (4,128), then every LayerNorm (4,384); fc1.1, mha.1, … would pass it.
    assert labels(budget_units(model, {"selector": "fisher", "budget": 0.2}, table)) == [
        "fc2.1", "ln2.1", "ln1.1", "ln2.0", "ln1.0"]
    with pytest.raises(UserError, match="has no scores of criterion 'fps'; rerun its criteria job"):
        budget_units(model, {"selector": "fps", "budget": 0.1}, table)


def config_with(selection, enabled=True, experiment_selection=True):
    return {"selection": {"budgets": [], "criteria": [], "random_draws": 3} | selection,
            "criteria": {"enabled": enabled},
            "experiments": {"budget": {"selection": experiment_selection}}}


def test_selection_config_errors_name_the_key_and_the_fix():
    with pytest.raises(UserError, match=r"^config key 'selection.criteria': unknown selector\(s\) 'lastk'; allowed: "
                                        r"plasticity_embedding, .*, random, last_k, attention_top$"):
        check_selection(config_with({"budgets": [0.1], "criteria": ["lastk"]}), {})
    with pytest.raises(UserError, match=r"^config key 'criteria.enabled': selection criterion 'fisher' ranks by the "
                                        r"criteria job's scores; set criteria.enabled to true$"):
        check_selection(config_with({"budgets": [0.1], "criteria": ["fisher"]}, enabled=False), {})
    with pytest.raises(UserError, match=r"^config key 'selection.budgets': must not be empty, since experiment "
                                        r"'budget' sets selection: true"):
        check_selection(config_with({"criteria": ["last_k"]}), {})
    with pytest.raises(UserError, match=r"^config key 'arms.last_k_10pct': the name of a selection arm"):
        check_selection(config_with({"budgets": [0.1], "criteria": ["last_k"]}), {"last_k_10pct": ["mha"]})
    check_selection(config_with({"budgets": [0.1], "criteria": ["last_k", "random"]}, enabled=False), {})


def test_the_selection_table_ranks_selectors_and_sets_each_beside_random():
    # Task T, budget 0.1: fisher 90 (seeds 89, 91), last_k 80 (80, 80), random draws 84 and 86 (two seeds each).
    accs = {"fisher_10pct": ("fisher", None, (89, 91)), "last_k_10pct": ("last_k", None, (80, 80)),
            "random_10pct_draw0": ("random", 0, (84, 84)), "random_10pct_draw1": ("random", 1, (85, 87)),
            "mha": (None, None, (95, 95))}
    runs = pd.DataFrame([{"task": "T", "arm": arm, "lr": 0.01, "seed": seed, "test_acc": float(acc), "status": "ok",
                          "trainable_params": 1200, "selector": selector, "budget": 0.1 if selector else math.nan,
                          "draw": draw} for arm, (selector, draw, values) in accs.items()
                         for seed, acc in enumerate(values)])
    costs = pd.DataFrame([{"task": "T", "criterion": "fisher", "wall_s": 2.0, "peak_mib": 30.0}])
    table = selection_table(main_table(runs), runs, costs)
    assert table["selector"].tolist() == ["fisher", "random", "last_k"]  # budget.SELECTORS' order; mha is no budget arm
    rows = table.set_index("selector")
    assert rows.loc["fisher", ["acc", "spread", "rank", "gain_vs_random", "wall_s"]].tolist() == [
        90.0, 1.0, 1, 5.0, 2.0]
    assert rows.loc["random", ["acc", "spread", "spread_over", "rank", "gain_vs_random"]].tolist() == [
        85.0, 1.0, "draws", 2, 0.0]  # draws 84 and 86: mean 85, std 1
    assert rows.loc["last_k", ["acc", "rank", "gain_vs_random"]].tolist() == [80.0, 3, -5.0]
    assert math.isnan(rows.loc["last_k", "wall_s"])


def test_the_selection_view_gives_the_gain_over_random_with_its_interval_over_tasks():
    # fisher beats random by 5, 3 and 1 points on three tasks: mean 3, s = 2, t(0.975, 2) = 4.3027,
    # 3 ± 4.3027 * 2 / sqrt 3 = 3 ± 4.968. random's gain is 0 on every task: the interval is the point.
    rows = [{"task": task, "selector": selector, "budget": 0.1, "trainable_params": 1200.0, "acc": acc,
             "spread": 1.0, "spread_over": "draws" if selector == "random" else "seeds", "rank": rank,
             "gain_vs_random": gain, "wall_s": math.nan, "peak_mib": math.nan}
            for task, fisher, random in (("A", 85.0, 80.0), ("B", 73.0, 70.0), ("C", 61.0, 60.0))
            for selector, acc, rank, gain in (("fisher", fisher, 1, fisher - random), ("random", random, 2, 0.0))]
    view = _selection_view(pd.DataFrame(rows))
    column = "gain over random (points) [95% CI over tasks]"
    assert view.loc["fisher", column] == "3.00 [-1.97, 7.97]" and view.loc["fisher", "tasks"] == "3"
    assert view.loc["random", column] == "0.00 [0.00, 0.00]"
    assert view.loc["fisher", "rank per task"] == "A 1, B 1, C 1" and view.loc["random", "mean rank"] == 2
    # Without a random arm at that budget there is no gain to show.
    alone = _selection_view(pd.DataFrame(rows[:1]).assign(gain_vs_random=math.nan))
    assert alone.loc["fisher", column] == "—" and alone.loc["fisher", "tasks"] == "1"
