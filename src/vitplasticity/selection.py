"""How often a selection criterion picks the component that finetunes best (study-spec §8).

A criterion scores the five block components (``ln1 mha ln2 fc1 fc2``) of a model on a task; the end of
its scale chosen first is declared in `registry.CRITERIA` (higher first for most, lower first for
``kappatune``), and every ranking here uses it through `oriented`: a component the criterion does not
score (NaN, e.g. a LayerNorm for ``kappatune``) is placed after every component it scores, tied with the
other unscored ones, and never chosen first unless none is scored. The finetuning ranking of a task is
the components' test accuracy at their best learning rate (the lr with the highest seed mean, as the
main table chooses it). Per task:

- ``spearman``: Spearman's rank correlation between the criterion's scores and the accuracies.
  Ties in either ranking get average ranks (scipy's ``spearmanr``), so two components with equal
  parameter counts share a rank. Undefined (NaN) when either side is constant.
- ``top1``: 1 when the criterion's first choice is the best arm or within one standard deviation
  over seeds of the best arm's accuracy (acc_choice ≥ acc_best − std_best), else 0. A tie for first
  place counts as the mean hit of the tied components.
- ``spearman_low`` / ``spearman_high``: 95% percentile bootstrap interval over seeds: the task's
  seeds are resampled with replacement (one draw shared by every component and lr, since runs of
  one seed share data order and head initialisation), the best lr and accuracies recomputed among
  the eligible lrs, and Spearman recomputed, ``n_boot`` times (a fixed seed makes it reproducible).

The ``random`` criterion is the floor, given analytically: Spearman 0, and top-1 equal to the
share of components that count as a hit (1/5 when only the best one does).

Over tasks (`summary`), each criterion's mean Spearman and top-1 carry a 95% Student-t interval over the
per-task values (`interval_over_tasks`): the tasks are the sample, so the interval reads "on tasks like these".
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from vitplasticity.budget import RANDOM
from vitplasticity.components import BLOCK_COMPONENTS
from vitplasticity.errors import UserError
from vitplasticity.registry import CRITERIA


def oriented(scores: pd.Series, criterion: str) -> pd.Series:
    """`scores` of `criterion` turned so that higher = chosen first (negated for a lower-first criterion), with
    an unscored entry (NaN) at −∞: after every scored one. All NaN stays NaN (nothing to rank).

    Raises UserError for a criterion `registry.CRITERIA` does not name.
    """
    if criterion not in CRITERIA:
        raise UserError(f"unknown selection criterion '{criterion}'; known: {', '.join(CRITERIA)}")
    turned = scores.astype(float) * (1.0 if CRITERIA[criterion] == "higher" else -1.0)
    return turned if turned.isna().all() else turned.fillna(-math.inf)


def component_accuracy(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, arm) of the block components: accuracy at the best lr, its std over seeds and seed count.

    `runs`: one row per run with task, arm, lr, seed, test_acc (%). A lr where a seed has no accuracy
    (diverged) is not eligible.
    """
    runs = runs[runs["arm"].isin(BLOCK_COMPONENTS)]
    grouped = runs.groupby(["task", "arm", "lr"])["test_acc"]
    means = grouped.agg(mean=lambda s: s.mean(skipna=False), std=lambda s: s.std(ddof=0, skipna=False),
                        n_seeds="count").reset_index().dropna(subset=["mean"])
    best = means.loc[means.groupby(["task", "arm"])["mean"].idxmax()]
    return best.rename(columns={"mean": "acc", "lr": "best_lr"}).reset_index(drop=True)


def spearman(scores: pd.Series, accuracy: pd.Series) -> float:
    """Spearman correlation over the components both name (average ranks for ties); NaN if undefined."""
    both = pd.concat([scores.rename("score"), accuracy.rename("acc")], axis=1, join="inner").dropna()
    if len(both) < 2 or both["score"].nunique() < 2 or both["acc"].nunique() < 2:
        return math.nan
    return float(stats.spearmanr(both["score"], both["acc"]).statistic)


def hits(accuracy: pd.DataFrame) -> pd.Series:
    """Per component (index): 1.0 if its accuracy is within one std over seeds of the best arm's, else 0.0."""
    best = accuracy.loc[accuracy["acc"].idxmax()]
    return (accuracy.set_index("arm")["acc"] >= best["acc"] - best["std"]).astype(float)


def top1(scores: pd.Series, accuracy: pd.DataFrame) -> float:
    """Hit of the criterion's first choice (mean hit over components tied for first)."""
    hit = hits(accuracy)
    scores = scores.reindex(hit.index).dropna()
    if scores.empty:
        return math.nan
    first = scores[scores == scores.max()].index
    return float(hit[first].mean())


def _bootstrap_spearman(scores: pd.Series, runs: pd.DataFrame, n_boot: int, rng: np.random.Generator) -> tuple:
    """95% percentile interval of Spearman when the seeds are resampled with replacement (one draw for all)."""
    seeds = sorted(runs["seed"].unique())
    if len(seeds) < 2:
        return math.nan, math.nan
    by_seed = runs.pivot_table(index=["arm", "lr"], columns="seed", values="test_acc", dropna=False)
    by_seed = by_seed[seeds].dropna()  # a lr where any seed diverged stays ineligible
    values = by_seed.to_numpy()  # (arm × lr, seeds)
    arms = by_seed.index.get_level_values("arm")
    samples = []
    for _ in range(n_boot):
        means = values[:, rng.integers(0, len(seeds), size=len(seeds))].mean(axis=1)
        accuracy = pd.Series(means, index=arms).groupby(level=0).max()  # best lr per component
        value = spearman(scores, accuracy)
        if not math.isnan(value):
            samples.append(value)
    if not samples:
        return math.nan, math.nan
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def hit_rates(criteria: pd.DataFrame, runs: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (task, criterion): spearman, its bootstrap interval, top1, and the components each side ranks first.

    `criteria`: columns task, criterion (a name of `registry.CRITERIA`, whose direction is applied through
    `oriented`), component, score. `runs`: task, arm, lr, seed, test_acc (%). The `random` criterion is
    added with its analytic expectation.
    """
    rng = np.random.default_rng(seed)
    runs = runs[runs["arm"].isin(BLOCK_COMPONENTS)]
    rows = []
    for task, task_runs in runs.groupby("task", sort=False):
        accuracy = component_accuracy(task_runs)
        if accuracy.empty:
            continue
        acc = accuracy.set_index("arm")["acc"]
        best_arm = acc.idxmax()
        for criterion, group in criteria[criteria["task"] == task].groupby("criterion", sort=False):
            scores = oriented(group.set_index("component")["score"], criterion)
            low, high = _bootstrap_spearman(scores, task_runs, n_boot, rng)
            choice = scores.reindex(acc.index).idxmax() if scores.reindex(acc.index).notna().any() else None
            rows.append({"task": task, "criterion": criterion, "spearman": spearman(scores, acc),
                         "spearman_low": low, "spearman_high": high, "top1": top1(scores, accuracy),
                         "choice": choice, "best_arm": best_arm})
        rows.append({"task": task, "criterion": RANDOM, "spearman": 0.0, "spearman_low": math.nan,
                     "spearman_high": math.nan, "top1": float(hits(accuracy).mean()), "choice": None,
                     "best_arm": best_arm})
    return pd.DataFrame(rows, columns=["task", "criterion", "spearman", "spearman_low", "spearman_high", "top1",
                                       "choice", "best_arm"])


def interval_over_tasks(values: pd.Series, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of per-task values: mean ± t((1 + level) / 2, n − 1) · s / √n, with s the
    standard deviation (ddof 1) over the n tasks that have a value (NaN ones are left out); (NaN, NaN) with fewer
    than two. Tasks are the sampling unit: the interval says how far the mean could move on other tasks like these.
    """
    values = pd.Series(values, dtype=float).dropna()
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def summary(per_task: pd.DataFrame) -> pd.DataFrame:
    """Per criterion: mean Spearman and top-1 over tasks, each with its 95% Student-t interval over tasks
    (`interval_over_tasks`: ``spearman_low`` / ``spearman_high``, ``top1_low`` / ``top1_high``; a task where
    Spearman is undefined is left out of its mean and interval), and the number of tasks."""
    rows = []
    for criterion, part in per_task.groupby("criterion", sort=False):
        spearman_low, spearman_high = interval_over_tasks(part["spearman"])
        top1_low, top1_high = interval_over_tasks(part["top1"])
        rows.append({"criterion": criterion, "spearman": part["spearman"].mean(), "spearman_low": spearman_low,
                     "spearman_high": spearman_high, "top1": part["top1"].mean(), "top1_low": top1_low,
                     "top1_high": top1_high, "n_tasks": part["task"].nunique()})
    return pd.DataFrame(rows, columns=["criterion", "spearman", "spearman_low", "spearman_high", "top1", "top1_low",
                                       "top1_high", "n_tasks"])
