"""Tables and statistics of one experiment (study-spec §6), as CSV and Markdown.

All numbers come from the run folders (metrics.json + config.yaml), never from MLflow.
Accuracy is in percent. A learning rate at which any seed diverged is not eligible as
the best lr; standard deviations are over seeds with ddof=0 (numpy's default).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from vitplasticity import registry
from vitplasticity.components import THEORETICAL_RANK, arm_label
from vitplasticity.datasets.vtab1k import GROUPS, TASKS
from vitplasticity.errors import UserError
from vitplasticity.fileio import read_json, write_csv, write_text

SINGLE_COMPONENT_ARMS = ("mha", "fc1", "fc2", "ln2", "ln1", "emb")


def load_runs(metrics_files: list[Path]) -> pd.DataFrame:
    """One row per finetuning run: its settings and results."""
    rows = []
    for path in metrics_files:
        path = Path(path)
        metrics = read_json(path)
        settings = yaml.safe_load((path.parent / "config.yaml").read_text())["settings"]
        acc = metrics.get("test_acc")
        rows.append({
            "model": settings["model"], "task": settings["task"], "optimizer": settings["optimizer"],
            "arm": settings["arm"], "lr": float(settings["lr"]), "seed": int(settings["seed"]),
            "status": metrics["status"], "test_acc": 100.0 * acc if acc is not None else math.nan,
            "best_val_acc": _percent(metrics.get("best_val_acc")), "best_step": metrics.get("best_step"),
            "diverged_step": metrics.get("diverged_step"), "trainable_params": metrics.get("trainable_params"),
            "wall_time_s": metrics.get("wall_time_s"), "run_dir": str(path.parent),
            **_budget_arm(settings.get("selection")),
        })
    if not rows:
        raise UserError("no finetuning runs to aggregate; check the experiment's tasks and arms")
    return pd.DataFrame(rows)


def _budget_arm(spec: dict | None) -> dict:
    """A run's selector, budget and random draw when it is a budget arm's (`budget.arms`), else empty."""
    if spec is None:
        return {}
    return {"selector": spec["selector"], "budget": spec["budget"], "draw": spec.get("draw")}


def _percent(fraction: float | None) -> float:
    """A fraction in percent; NaN where a run has none (it diverged before being evaluated)."""
    return 100.0 * fraction if fraction is not None else math.nan


def seed_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, arm, lr): mean and std over seeds; NaN mean when a seed diverged."""
    grouped = runs.groupby(["task", "arm", "lr"])
    table = grouped["test_acc"].agg(mean=lambda s: s.mean(skipna=False), std=lambda s: s.std(ddof=0, skipna=False),
                                    n_seeds="count").reset_index()
    table["diverged"] = grouped["status"].apply(lambda s: int((s == "diverged").sum())).to_numpy()
    return table


def main_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, arm): accuracy at the best lr (highest seed mean)."""
    means = seed_means(runs)
    rows = []
    for (task, arm), group in means.groupby(["task", "arm"], sort=False):
        eligible = group.dropna(subset=["mean"])
        if eligible.empty:
            rows.append({"task": task, "arm": arm, "best_lr": math.nan, "mean": math.nan, "std": math.nan,
                         "n_seeds": 0, "diverged_runs": int(group["diverged"].sum())})
            continue
        best = eligible.loc[eligible["mean"].idxmax()]
        rows.append({"task": task, "arm": arm, "best_lr": best["lr"], "mean": best["mean"], "std": best["std"],
                     "n_seeds": int(best["n_seeds"]), "diverged_runs": int(group["diverged"].sum())})
    return pd.DataFrame(rows)


def relative_gain(table: pd.DataFrame, probes: dict[str, float]) -> pd.DataFrame:
    """(acc − acc_LP) / acc_LP per (task, arm), in percent."""
    gains = table[["task", "arm", "mean"]].copy()
    gains["probe_acc"] = gains["task"].map(probes)
    gains["gain_pct"] = 100.0 * (gains["mean"] - gains["probe_acc"]) / gains["probe_acc"]
    return gains


def lr_gap(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, arm): max − min of the seed-mean accuracy over the lr grid."""
    means = seed_means(runs)
    gap = means.groupby(["task", "arm"], sort=False)["mean"].agg(lambda s: s.max() - s.min()).reset_index()
    return gap.rename(columns={"mean": "lr_gap"})


def paired_tests(table: pd.DataFrame, pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Paired two-sided t-test and one-sided Wilcoxon signed-rank (first arm greater) over tasks.

    Each row states both tests' alternatives, since a two-sided p near 1 and a one-sided p
    near 1 mean different things (no difference; the difference goes the other way)."""
    wide = table.pivot(index="task", columns="arm", values="mean")
    rows = []
    for first, second in pairs:
        if first not in wide or second not in wide:
            continue
        both = wide[[first, second]].dropna()
        diff = both[first] - both[second]
        row = {"arm": first, "versus": second, "n_tasks": len(both), "mean_diff": diff.mean(),
               "t_stat": math.nan, "t_pvalue": math.nan, "t_alternative": "two-sided",
               "wilcoxon_stat": math.nan, "wilcoxon_pvalue": math.nan, "wilcoxon_alternative": "greater"}
        if len(both) >= 2 and diff.std() > 0:
            t = stats.ttest_rel(both[first], both[second])
            row.update(t_stat=t.statistic, t_pvalue=t.pvalue)
        if len(both) >= 1 and (diff != 0).any():
            w = stats.wilcoxon(both[first], both[second], alternative="greater")
            row.update(wilcoxon_stat=w.statistic, wilcoxon_pvalue=w.pvalue)
        rows.append(row)
    return pd.DataFrame(rows, columns=["arm", "versus", "n_tasks", "mean_diff", "t_stat", "t_pvalue", "t_alternative",
                                       "wilcoxon_stat", "wilcoxon_pvalue", "wilcoxon_alternative"])


def test_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """MHA against every other component arm and full finetuning; non_smooth against smooth."""
    pairs = [("mha", arm) for arm in arms if arm != "mha" and arm in (*SINGLE_COMPONENT_ARMS, "all")]
    if "non_smooth" in arms and "smooth" in arms:
        pairs.append(("non_smooth", "smooth"))
    return pairs


def plasticity_rank(plasticity: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Mean plasticity over layers and tasks per component, beside its finetuning rank."""
    if plasticity.empty:
        return pd.DataFrame()
    per_component = plasticity.groupby(["mode", "component"], as_index=False)["mean"].mean()
    per_component = per_component.rename(columns={"mean": "plasticity"})
    # Ranks are integers (ties share the better rank, as in sports rankings).
    per_component["plasticity_rank"] = (per_component.groupby("mode")["plasticity"]
                                        .rank(ascending=False, method="min").astype("Int64"))
    per_component["theoretical_rank"] = per_component["component"].map(THEORETICAL_RANK)
    accuracy = table[table["arm"].isin(THEORETICAL_RANK)].groupby("arm")["mean"].mean()
    per_component["finetune_acc"] = per_component["component"].map(accuracy)
    per_component["finetune_rank"] = per_component["component"].map(
        accuracy.rank(ascending=False, method="min")).astype("Int64")
    return per_component.sort_values(["mode", "theoretical_rank"]).reset_index(drop=True)


def separation(table: pd.DataFrame, arm_order: list[str]) -> pd.DataFrame:
    """Per task: best and worst arm, their gap and the gap over the mean seed std (points / points).

    A ratio well above 1 means the table separates arms; near or below 1, seed noise can
    reorder them."""
    rows = []
    for task, part in table.dropna(subset=["mean"]).groupby("task", sort=False):
        part = part[part["arm"].isin(arm_order)]
        best, worst = part.loc[part["mean"].idxmax()], part.loc[part["mean"].idxmin()]
        noise = part["std"].mean()
        gap = best["mean"] - worst["mean"]
        rows.append({"task": task, "best_arm": best["arm"], "best_acc": best["mean"], "worst_arm": worst["arm"],
                     "worst_acc": worst["mean"], "gap": gap, "mean_seed_std": noise,
                     "gap_over_std": gap / noise if noise > 0 else math.nan})
    return pd.DataFrame(rows, columns=["task", "best_arm", "best_acc", "worst_arm", "worst_acc", "gap",
                                       "mean_seed_std", "gap_over_std"])


def _with_average(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Wide task × arm table of `value`, with an Average row over tasks."""
    wide = frame.pivot(index="task", columns="arm", values=value)
    wide.loc["Average"] = wide.mean(axis=0, skipna=False)
    return wide


def _cells(wide: pd.DataFrame, fmt: str = "{:.2f}") -> pd.DataFrame:
    """Every cell as the text a reader sees: numbers formatted, missing values as a dash."""
    def show(cell: object) -> str:
        return cell if isinstance(cell, str) else ("—" if pd.isna(cell) else fmt.format(cell))

    return pd.DataFrame({column: [show(cell) for cell in wide[column]] for column in wide.columns},
                        index=wide.index, columns=wide.columns)


def _markdown(wide: pd.DataFrame, fmt: str = "{:.2f}", index_name: str = "task") -> str:
    cells = _cells(wide, fmt)
    header = "| " + " | ".join([index_name, *map(str, cells.columns)]) + " |"
    lines = [header, "|" + "---|" * (len(cells.columns) + 1)]
    lines += ["| " + " | ".join([str(index), *row]) + " |" for index, row in cells.iterrows()]
    return "\n".join(lines) + "\n"


# The report shows a table's page in a frame of its own: cells keep "97.13 ± 0.26" on one line (the frame
# scrolls sideways instead), numbers align right, the row names left.
HTML_STYLE = ("body { font-family: sans-serif; font-size: 14px; margin: 0.5em; } "
              "table { border-collapse: collapse; } "
              "th, td { white-space: nowrap; padding: 0.25em 0.7em; text-align: right; } "
              "th:first-child, td:first-child { text-align: left; } "
              "thead th { border-bottom: 1px solid #888; } tbody tr:nth-child(even) { background: #f3f3f3; }")


def _html(wide: pd.DataFrame, fmt: str = "{:.2f}", index_name: str = "task") -> str:
    """The table as one HTML page, as the Markdown shows it (the workflow report displays it inline).

    The row names become the first column, headed `index_name`; the name of the column axis (`arm` after a
    pivot) is dropped, as the Markdown drops it (pandas would head an empty column with it)."""
    cells = _cells(wide, fmt).rename_axis(index=index_name, columns=None).reset_index()
    table = cells.to_html(index=False, border=0)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><style>{HTML_STYLE}</style></head><body>\n"
            f"{table}\n</body></html>\n")


def _write_view(out_dir: Path, name: str, wide: pd.DataFrame, fmt: str = "{:.2f}", index_name: str = "task") -> None:
    """A table for readers: Markdown (for the README and terminals) and HTML (for the report)."""
    write_text(out_dir / f"{name}.md", _markdown(wide, fmt, index_name))
    write_text(out_dir / f"{name}.html", _html(wide, fmt, index_name))


def _arm_columns(wide: pd.DataFrame, arm_order: list[str], unit: str) -> pd.DataFrame:
    """The arms' columns in the experiment's order, headed by their label and unit."""
    return wide[arm_order].rename(columns=lambda arm: f"{arm_label(arm)} ({unit})")


def _main_view(table: pd.DataFrame, probes: dict[str, float], arm_order: list[str]) -> pd.DataFrame:
    cells = table.assign(cell=[
        "diverged" if pd.isna(m) else f"{m:.2f} ± {s:.2f}" + (f" ({d} diverged)" if d else "")
        for m, s, d in zip(table["mean"], table["std"], table["diverged_runs"], strict=True)])
    wide = cells.pivot(index="task", columns="arm", values="cell")[arm_order]
    average = table.pivot(index="task", columns="arm", values="mean")[arm_order].mean(axis=0, skipna=False)
    wide.loc["Average"] = [f"{v:.2f}" if not pd.isna(v) else "—" for v in average]
    if probes:
        wide["LP"] = [f"{probes[t]:.2f}" if t in probes else "—" for t in wide.index[:-1]] + [
            f"{np.mean(list(probes.values())):.2f}"]
    return _arm_columns(wide, [*arm_order, *(["LP"] if probes else [])], "%")


def _stat_tests_view(tests: pd.DataFrame) -> pd.DataFrame:
    shown = pd.DataFrame({
        "versus": tests["versus"].map(arm_label), "tasks": tests["n_tasks"].astype(str),
        "mean difference (points)": tests["mean_diff"],
        "paired t-test p (two-sided)": tests["t_pvalue"],
        "Wilcoxon p (one-sided: arm > versus)": tests["wilcoxon_pvalue"],
    }).set_axis(tests["arm"].map(arm_label))
    return shown


def _rank_view(ranks: pd.DataFrame) -> pd.DataFrame:
    shown = pd.DataFrame({
        "component": ranks["component"].map(arm_label),
        "plasticity (ratio)": ranks["plasticity"].map("{:.4g}".format),
        "plasticity rank": ranks["plasticity_rank"].astype(str),
        "theoretical rank": ranks["theoretical_rank"].astype(str),
        "finetuning accuracy (%)": ranks["finetune_acc"],
        "finetuning rank": ranks["finetune_rank"].astype(str).replace("<NA>", "—"),
    }).set_axis(ranks["mode"])
    return shown


def _separation_view(frame: pd.DataFrame) -> pd.DataFrame:
    shown = pd.DataFrame({
        "best arm": frame["best_arm"].map(arm_label), "best (%)": frame["best_acc"],
        "worst arm": frame["worst_arm"].map(arm_label), "worst (%)": frame["worst_acc"],
        "gap (points)": frame["gap"], "mean seed std (points)": frame["mean_seed_std"],
        "gap / std (ratio)": frame["gap_over_std"],
    }).set_axis(frame["task"])
    return shown


# CSVs keep ten significant digits: enough for any measurement here, none of a float's
# binary artefacts (38.800000000000004 is written 38.8).
FLOAT_FORMAT = "%.10g"


def _in_arm_order(frame: pd.DataFrame, arm_order: list[str]) -> pd.DataFrame:
    """Rows by task, then arms in the experiment's order (that of its config), so that every
    table and figure lists arms alike."""
    rank = {arm: index for index, arm in enumerate(arm_order)}
    return frame.sort_values(["task", "arm"], key=lambda column: column.map(rank) if column.name == "arm" else column,
                             kind="stable").reset_index(drop=True)


def criteria_table(criteria: pd.DataFrame, costs: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, criterion) and averaged over tasks ("Average"): the hit rate of each selection criterion
    (`selection.hit_rates`) and its cost (wall time in s, added peak memory in MiB; mean over tasks), with
    the criteria it was timed together with (`measured_with`, "+"-joined; itself when timed alone).

    The intervals differ by row: on a task, ``spearman_low`` / ``spearman_high`` are the 95% bootstrap interval
    over seeds; on an "Average" row, they and ``top1_low`` / ``top1_high`` are the 95% Student-t interval over
    tasks (`selection.summary`), ``n_tasks`` the tasks averaged.

    `criteria`: task, criterion, component, layer, value rows of the criteria jobs; `costs`: task, criterion,
    wall_s, peak_mib and, from the jobs that write it, measured_with.
    """
    from vitplasticity import criteria as measured
    from vitplasticity import selection

    if criteria.empty:
        return pd.DataFrame()
    scores = pd.concat([measured.component_scores(part).assign(task=task) for task, part in criteria.groupby("task")])
    per_task = selection.hit_rates(scores, runs)
    costs = costs.assign(measured_with=costs.get("measured_with", costs["criterion"]))
    per_task = per_task.merge(costs[["task", "criterion", "wall_s", "peak_mib", "measured_with"]],
                              on=["task", "criterion"], how="left")
    summary = selection.summary(per_task).merge(
        per_task.groupby("criterion", as_index=False).agg(wall_s=("wall_s", "mean"), peak_mib=("peak_mib", "mean"),
                                                          measured_with=("measured_with", "first")),
        on="criterion")
    summary.insert(0, "task", "Average")
    return pd.concat([per_task, summary], ignore_index=True)


def _with_interval(value: float, low: float, high: float) -> str:
    """``value [low, high]`` to two decimals; the value alone without an interval, a dash without a value."""
    if pd.isna(value):
        return "—"
    return f"{value:.2f}" + ("" if pd.isna(low) else f" [{low:.2f}, {high:.2f}]")


def _criteria_view(table: pd.DataFrame) -> pd.DataFrame:
    """Averages over tasks first, then each task: which end is chosen first, Spearman [95% CI: a task's over seeds,
    the average's over tasks], top-1 [95% CI over tasks, on the average], cost and what the cost was shared with."""
    ordered = pd.concat([table[table["task"] == "Average"], table[table["task"] != "Average"]])

    def shown(column: str) -> list[str]:
        bounds = [ordered.get(f"{column}_{end}", pd.Series(math.nan, index=ordered.index)) for end in ("low", "high")]
        return [_with_interval(*cells) for cells in zip(ordered[column], *bounds, strict=True)]

    view = pd.DataFrame({
        "criterion": ordered["criterion"].to_numpy(),
        "chosen first": [f"{registry.CRITERIA[c]} score" if c in registry.CRITERIA else "—"
                         for c in ordered["criterion"]],
        "Spearman (ratio) [95% CI: a task's over seeds, the average's over tasks]": shown("spearman"),
        "top-1 hit (share) [95% CI over tasks]": shown("top1"),
        "first choice": ordered["choice"].fillna("—").to_numpy() if "choice" in ordered else "—",
        "best arm": ordered["best_arm"].fillna("—").to_numpy() if "best_arm" in ordered else "—",
        "wall time (s)": ordered["wall_s"].to_numpy(),
        "added peak memory (MiB)": ordered["peak_mib"].to_numpy(),
        "cost shared with": [" + ".join(n for n in str(w).split("+") if n != c) if isinstance(w, str) and w != c
                             else "—" for c, w in zip(ordered["criterion"], ordered["measured_with"], strict=True)],
    }, index=ordered["task"].to_numpy())
    return view


def selection_table(table: pd.DataFrame, runs: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, selector, budget) of the budget arms (`vitplasticity.budget`): test accuracy at the best lr
    (seed mean, %) and its spread, the rank among the selectors of that budget on the task (1 = best, ties
    share the lower rank), the gain over ``random`` at that budget (points), the exact trainable parameters
    (head included) and the selector's cost in the criteria job (wall s, added peak MiB; NaN for ``random``
    and the heuristics, which need no scores).

    `table`: `main_table`; `runs`: `load_runs` (selector, budget, draw per budget-arm run); `costs`: task,
    criterion, wall_s, peak_mib. ``random`` pools its draws: its accuracy is their mean, its spread the std
    over draws (ddof 0); a criterion's spread is the std over seeds. Rows in `budget.SELECTORS`' order, then
    budget ascending; empty when the experiment has no budget arm.
    """
    from vitplasticity.budget import RANDOM, SELECTORS

    columns = ["task", "selector", "budget", "trainable_params", "acc", "spread", "spread_over", "rank",
               "gain_vs_random", "wall_s", "peak_mib"]
    if "selector" not in runs or runs["selector"].isna().all():
        return pd.DataFrame(columns=columns)
    arms = runs.dropna(subset=["selector"]).groupby(["task", "arm"], as_index=False, sort=False).agg(
        selector=("selector", "first"), budget=("budget", "first"), trainable_params=("trainable_params", "mean"))
    cells = arms.merge(table[["task", "arm", "mean", "std"]], on=["task", "arm"])
    rows = []
    for (task, selector, budget), part in cells.groupby(["task", "selector", "budget"], sort=False):
        pooled = selector == RANDOM
        rows.append({"task": task, "selector": selector, "budget": budget,
                     "trainable_params": part["trainable_params"].mean(), "acc": part["mean"].mean(),
                     "spread": part["mean"].std(ddof=0) if pooled else part["std"].iloc[0],
                     "spread_over": "draws" if pooled else "seeds"})
    frame = pd.DataFrame(rows)
    frame["rank"] = frame.groupby(["task", "budget"])["acc"].rank(ascending=False, method="min")
    floor = frame[frame["selector"] == RANDOM].set_index(["task", "budget"])["acc"]
    frame["gain_vs_random"] = frame["acc"] - pd.Series(
        [floor.get((t, b), math.nan) for t, b in zip(frame["task"], frame["budget"], strict=True)], index=frame.index)
    if not costs.empty:
        spent = costs.rename(columns={"criterion": "selector"})[["task", "selector", "wall_s", "peak_mib"]]
        frame = frame.merge(spent, on=["task", "selector"], how="left")
    frame = frame.reindex(columns=columns)
    order = {name: i for i, name in enumerate(SELECTORS)}
    frame = frame.assign(_order=frame["selector"].map(order)).sort_values(["_order", "budget", "task"], kind="stable")
    return frame.drop(columns="_order").reset_index(drop=True)


def _selection_view(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (selector, budget), averaged over tasks: accuracy ± spread, rank per task, gain over random with its 95%
    Student-t interval over tasks (`selection.interval_over_tasks`; the gain is paired within a task, so task
    difficulty cancels), the tasks averaged, cost."""
    from vitplasticity.selection import interval_over_tasks

    rows = []
    for (selector, budget), part in frame.groupby(["selector", "budget"], sort=False):
        gain = part["gain_vs_random"]
        rows.append({"selector": selector, "budget (%)": 100 * budget,
                     "trainable params": f"{part['trainable_params'].mean():,.0f}",
                     "accuracy (%)": f"{part['acc'].mean():.2f} ± {part['spread'].mean():.2f}"
                                     f" ({part['spread_over'].iloc[0]})",
                     "rank per task": ", ".join(f"{t} {r:g}" for t, r in zip(part["task"], part["rank"], strict=True)),
                     "mean rank": part["rank"].mean(),
                     "gain over random (points) [95% CI over tasks]": _with_interval(gain.mean(),
                                                                                     *interval_over_tasks(gain)),
                     "tasks": str(part["task"].nunique()),
                     "cost (s)": part["wall_s"].mean(), "cost (MiB)": part["peak_mib"].mean()})
    return pd.DataFrame(rows).set_index("selector")


def trajectory_table(trajectory: pd.DataFrame, tasks: list[str] | None = None) -> pd.DataFrame:
    """Per (task, mode, step, component): plasticity averaged over layers, its rank among the components at
    that step (1 = most plastic; ties share the better rank), the source validation accuracy (%) of the
    pretraining run at that step and the mean token norm of E on the task's images.

    `trajectory`: rows of the trajectory jobs (`jobs.measure_trajectory`); `tasks`: keep only these.
    """
    if trajectory.empty:
        return pd.DataFrame()
    if tasks is not None:
        trajectory = trajectory[trajectory["task"].isin(tasks)]
    keys = ["task", "mode", "step", "component"]
    table = trajectory.groupby(keys, as_index=False).agg(plasticity=("mean", "mean"),
                                                         source_val_acc=("source_val_acc", "first"),
                                                         token_norm=("downstream_token_norm", "first"))
    table["source_val_acc"] = 100.0 * table["source_val_acc"]
    table["rank"] = (table.groupby(["task", "mode", "step"])["plasticity"]
                     .rank(ascending=False, method="min").astype("Int64"))
    table["theory"] = table["component"].map(THEORETICAL_RANK)  # ties listed in the theoretical order
    return table.sort_values(["task", "mode", "step", "rank", "theory"]).reset_index(drop=True)[
        ["task", "mode", "step", "source_val_acc", "token_norm", "component", "plasticity", "rank"]]


def _trajectory_view(table: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, step), averaged over tasks: source accuracy, E's token norm, each component's plasticity and
    their order."""
    mean = table.groupby(["mode", "step", "component"], as_index=False)[
        ["plasticity", "source_val_acc", "token_norm"]].mean()
    rows = []
    mean["theory"] = mean["component"].map(THEORETICAL_RANK)
    for (mode, step), part in mean.groupby(["mode", "step"]):
        part = part.sort_values(["plasticity", "theory"], ascending=[False, True])
        values = part.set_index("component")["plasticity"]
        rows.append({"mode": mode, "step": f"{step:,}", "source val. accuracy (%)": part["source_val_acc"].iloc[0],
                     "token norm of E": part["token_norm"].iloc[0],
                     **{f"{arm_label(c)} (ratio)": values.get(c, math.nan) for c in THEORETICAL_RANK},
                     "order (most plastic first)": " > ".join(arm_label(c) for c in part["component"])})
    return pd.DataFrame(rows).set_index("mode")


def val_selected(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, arm): the lr of the highest seed-mean validation accuracy (`best_val_acc`, the val split: val200
    on VTAB-1k) and the seed mean and std of test accuracy there. An lr at which a seed diverged is not eligible;
    a (task, arm) with no eligible lr gets NaN."""
    rows = []
    for (task, arm), group in runs.groupby(["task", "arm"], sort=False):
        per_lr = group.groupby("lr").agg(val=("best_val_acc", "mean"), mean=("test_acc", "mean"),
                                         std=("test_acc", lambda s: s.std(ddof=0)), n_seeds=("seed", "count"),
                                         diverged=("status", lambda s: int((s == "diverged").sum())))
        eligible = per_lr[(per_lr["diverged"] == 0) & per_lr["val"].notna()]
        if eligible.empty:
            rows.append({"task": task, "arm": arm, "lr": math.nan, "val_acc": math.nan, "mean": math.nan,
                         "std": math.nan, "n_seeds": 0})
            continue
        lr = eligible["val"].idxmax()
        best = eligible.loc[lr]
        rows.append({"task": task, "arm": arm, "lr": lr, "val_acc": best["val"], "mean": best["mean"],
                     "std": best["std"], "n_seeds": int(best["n_seeds"])})
    return pd.DataFrame(rows, columns=["task", "arm", "lr", "val_acc", "mean", "std", "n_seeds"])


def _vtab_means(row: pd.Series) -> dict[str, float]:
    """A row's group means, 19-task mean and mean of the group means (`vtab1k.TASKS`, `vtab1k.GROUPS`); each NaN
    unless every task it averages has a number, so a partial study is never set beside a published mean."""
    means = {group: row[[t for t, (g, _) in TASKS.items() if g == group]].mean(skipna=False) for group in GROUPS}
    return means | {"mean": row[list(TASKS)].mean(skipna=False),
                    "group_mean": np.mean([means[group] for group in GROUPS])}


def vtab_table(runs: pd.DataFrame, vtab_tasks: dict[str, str], probes: dict[str, float],
               arm_order: list[str]) -> pd.DataFrame:
    """The VTAB-1k table: one row per arm (test accuracy in %, seed mean, at the lr chosen on val200:
    `val_selected`), then the linear probe, each followed by the published reference of the same method
    (`registry.VTAB_REFERENCES`), then the references of methods the study does not run.

    `vtab_tasks`: the experiment's task -> its VTAB-1k task; `probes`: task -> linear-probe test accuracy (%).
    Columns: method, kind ("study" or "published"), source, the 19 tasks in VTAB order (NaN where not run), the
    three group means, mean (over the 19 tasks) and group_mean (of the three group means); a published range is
    the text "low–high". Empty when the experiment has no VTAB-1k task.
    """
    columns = ["method", "kind", "source", *TASKS, *GROUPS, "mean", "group_mean"]
    runs = runs[runs["task"].isin(vtab_tasks)]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    selected = val_selected(runs).assign(vtab=lambda frame: frame["task"].map(vtab_tasks))
    accuracy = selected.pivot(index="arm", columns="vtab", values="mean").reindex(columns=list(TASKS))
    methods = {arm: accuracy.loc[arm] for arm in arm_order if arm in accuracy.index}
    lp = {vtab_tasks[task]: value for task, value in probes.items() if task in vtab_tasks}
    if lp:
        methods["LP"] = pd.Series(lp).reindex(list(TASKS))
    rows = []

    def published(name: str, reference: dict) -> dict:
        cells = {key: f"{value[0]:.1f}–{value[1]:.1f}" if isinstance(value, tuple) else value
                 for key, value in reference.items() if key in ("mean", "group_mean")}
        return {"method": f"{name} (published)", "kind": "published", "source": reference["source"]} | cells

    for arm, row in methods.items():
        label = "linear probe" if arm == "LP" else arm_label(arm)
        rows.append({"method": label, "kind": "study", "source": "this study"} | row.to_dict() | _vtab_means(row))
        rows += [published(name, ref) for name, ref in registry.VTAB_REFERENCES.items() if ref["arm"] == arm]
    rows += [published(name, ref) for name, ref in registry.VTAB_REFERENCES.items() if ref["arm"] is None]
    return pd.DataFrame(rows, columns=columns)


def _vtab_view(table: pd.DataFrame) -> pd.DataFrame:
    """The VTAB table for readers: the tasks run, the group means, both overall means and the source."""
    run = [task for task in TASKS if table.loc[table["kind"] == "study", task].notna().any()]
    view = table.set_index("method")[[*run, *GROUPS, "mean", "group_mean", "source"]]
    return view.rename(columns={"mean": "mean (19 tasks)", "group_mean": "mean of group means"})


def aggregate(arm_order: list[str], runs_files: list[Path], probe_files: list[Path], plasticity_files: list[Path],
              bounds_files: list[Path], out_dir: Path, criteria_files: list[Path] = (),
              trajectory_files: list[Path] = (), tasks: list[str] | None = None,
              vtab_tasks: dict[str, str] | None = None) -> dict[str, pd.DataFrame]:
    """Write every table of an experiment (`registry.TABLES`) into out_dir: CSV (the data), Markdown and HTML
    (for reading).

    `arm_order`: the experiment's arms, in the order of its tables' columns (those without runs are left out);
    `criteria_files`: the criteria jobs' `criteria.csv`, each with its `cost.csv` beside it;
    `trajectory_files`: the trajectory job's `trajectory.csv` of the experiment's model, if it has one, its rows
    of `tasks` (None: all); `vtab_tasks`: {task: its VTAB-1k name} of the experiment's VTAB-1k tasks."""
    runs = load_runs(runs_files)
    arm_order = [arm for arm in arm_order if arm in set(runs["arm"])]
    probes = {read_json(p)["task"]: 100.0 * read_json(p)["test_acc"] for p in probe_files}
    table = _in_arm_order(main_table(runs), arm_order)
    plasticity = pd.concat([pd.read_csv(p) for p in plasticity_files]) if plasticity_files else pd.DataFrame()
    bounds = pd.concat([pd.read_csv(p) for p in bounds_files]) if bounds_files else pd.DataFrame()
    criteria = pd.concat([pd.read_csv(p) for p in criteria_files]) if criteria_files else pd.DataFrame()
    costs = (pd.concat([pd.read_csv(Path(p).parent / "cost.csv") for p in criteria_files]) if criteria_files
             else pd.DataFrame())
    trajectory = pd.concat([pd.read_csv(p) for p in trajectory_files]) if trajectory_files else pd.DataFrame()
    tables = {
        "main_table": table,
        "relative_gain": relative_gain(table, probes) if probes else pd.DataFrame(columns=["task", "arm", "gain_pct"]),
        "lr_gap": _in_arm_order(lr_gap(runs), arm_order),
        "stat_tests": paired_tests(table, test_pairs(arm_order)),
        "separation": separation(table, arm_order),
        "plasticity_rank": plasticity_rank(plasticity, table),
        "plasticity": plasticity,
        "bounds": bounds,
        "runs": runs,
        "criteria": criteria_table(criteria, costs, runs),
        "trajectory": trajectory_table(trajectory, tasks),
        "vtab": vtab_table(runs, vtab_tasks or {}, probes, arm_order),
        "selection": selection_table(table, runs, costs),
    }
    out_dir = Path(out_dir)
    for name in registry.TABLES:
        write_csv(out_dir / f"{name}.csv", tables[name], float_format=FLOAT_FORMAT)
    _write_view(out_dir, "main_table", _main_view(table, probes, arm_order))
    if probes:
        gains = _with_average(tables["relative_gain"], "gain_pct")
        _write_view(out_dir, "relative_gain", _arm_columns(gains, arm_order, "%"))
    else:
        write_text(out_dir / "relative_gain.html", "<p>No linear probe in this experiment: no relative gain.</p>\n")
    lr_gaps = _with_average(tables["lr_gap"], "lr_gap")
    _write_view(out_dir, "lr_gap", _arm_columns(lr_gaps, arm_order, "points"))
    _write_view(out_dir, "stat_tests", _stat_tests_view(tables["stat_tests"]), "{:.3g}", index_name="arm")
    _write_view(out_dir, "separation", _separation_view(tables["separation"]))
    if not tables["plasticity_rank"].empty:
        _write_view(out_dir, "plasticity_rank", _rank_view(tables["plasticity_rank"]), index_name="mode")
    else:
        write_text(out_dir / "plasticity_rank.html", "<p>No plasticity measured in this experiment.</p>\n")
    # Tables only some experiments fill: (view, number format, index name, the line written when empty).
    optional = {
        "criteria": (_criteria_view, "{:.3g}", None, "No selection criteria measured in this experiment."),
        "trajectory": (_trajectory_view, "{:.3g}", "mode",
                       "No pretraining trajectory in this experiment (its model keeps no steps)."),
        "vtab": (_vtab_view, "{:.1f}", "method", "No VTAB-1k task in this experiment."),
        "selection": (_selection_view, "{:.3g}", "selector",
                      "No budget arms in this experiment (its config does not set selection: true)."),
    }
    for name, (view, number, index_name, absent) in optional.items():
        if not tables[name].empty:
            _write_view(out_dir, name, view(tables[name]), number, **({"index_name": index_name} if index_name else {}))
        else:
            write_text(out_dir / f"{name}.md", absent + "\n")
            write_text(out_dir / f"{name}.html", f"<p>{absent}</p>\n")
    for name in ("plasticity", "bounds", "runs"):  # long tables: every row, as the CSV has it
        _write_view(out_dir, name, tables[name].set_index(tables[name].columns[0]) if not tables[name].empty
                    else tables[name], "{:.4g}", index_name=tables[name].columns[0] if not tables[name].empty else "")
    return tables
