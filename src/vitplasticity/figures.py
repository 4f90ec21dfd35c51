"""Figures of one experiment (study-spec §6), each drawn by one small function from the tables.

Every figure is written as PNG and PDF; components and arms keep one colour everywhere.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from vitplasticity.components import LABELS, THEORETICAL_RANK  # noqa: E402
from vitplasticity.fileio import atomic_path  # noqa: E402

PALETTE = {
    "mha": "#d62728", "fc1": "#ff7f0e", "fc2": "#8c564b", "ln2": "#1f77b4", "ln1": "#17becf",
    "emb": "#7f7f7f", "all": "#000000", "smooth": "#2ca02c", "non_smooth": "#9467bd", "head": "#bcbd22",
}
BY_THEORY = sorted(THEORETICAL_RANK, key=THEORETICAL_RANK.get)


def colour(name: str) -> str:
    return PALETTE.get(name, "#e377c2")


def _save(fig: plt.Figure, out_dir: Path, name: str) -> None:
    for suffix in ("png", "pdf"):
        with atomic_path(out_dir / f"{name}.{suffix}") as tmp:
            fig.savefig(tmp, format=suffix, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _empty(ax: plt.Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _label(name: str) -> str:
    return LABELS.get(name, name)


def _diverged_label(name: str, diverged: int) -> str:
    """An arm's tick label, noting its diverged runs (they have no accuracy to draw)."""
    return _label(name) + (f"\n({diverged} diverged)" if diverged else "")


def _diverged_counts(frame: pd.DataFrame, column: str) -> dict[str, int]:
    """Diverged runs per arm: from a per-run `status` column or a per-cell `diverged_runs` count."""
    if column == "status" and "status" in frame:
        return frame.assign(d=frame["status"].eq("diverged")).groupby("arm")["d"].sum().astype(int).to_dict()
    if column == "diverged_runs" and "diverged_runs" in frame:
        return frame.groupby("arm")["diverged_runs"].sum().astype(int).to_dict()
    return {}


def plasticity_vs_rank(plasticity: pd.DataFrame, out_dir: Path) -> None:
    """Boxplot over layers of each component's plasticity, ordered by theoretical rank."""
    modes = sorted(plasticity["mode"].unique()) if not plasticity.empty else ["embedding"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.5 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        data = plasticity[plasticity["mode"] == mode] if not plasticity.empty else plasticity
        if data.empty:
            _empty(ax, "no plasticity measured")
            continue
        per_layer = data.groupby(["component", "layer"], as_index=False)["mean"].mean()
        order = [c for c in BY_THEORY if c in set(per_layer["component"])]
        sns.boxplot(per_layer, x="component", y="mean", hue="component", order=order, hue_order=order,
                    palette=PALETTE, legend=False, ax=ax)
        ax.set_xticks(range(len(order)), [f"{_label(c)}\n(rank {THEORETICAL_RANK[c]})" for c in order])
        ax.set_xlabel("component (theoretical rank, 1 = most plastic)")
        ax.set_ylabel("plasticity (rate of change, ratio)")
        ax.set_title(f"{mode} mode: one box per component, over layers")
    _save(fig, out_dir, "plasticity_vs_rank")


def plasticity_vs_depth(plasticity: pd.DataFrame, out_dir: Path) -> None:
    """Plasticity against layer depth (%) with its 95% CI, averaged over tasks."""
    modes = sorted(plasticity["mode"].unique()) if not plasticity.empty else ["embedding"]
    fig, axes = plt.subplots(1, len(modes), figsize=(4.8 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        data = plasticity[plasticity["mode"] == mode] if not plasticity.empty else plasticity
        if data.empty:
            _empty(ax, "no plasticity measured")
            continue
        curve = data.groupby(["component", "depth_pct"], as_index=False)[["mean", "ci95"]].mean()
        for component in BY_THEORY:
            part = curve[curve["component"] == component]
            ax.plot(part["depth_pct"], part["mean"], marker="o", color=colour(component), label=_label(component))
            ax.fill_between(part["depth_pct"], part["mean"] - part["ci95"], part["mean"] + part["ci95"],
                            color=colour(component), alpha=0.2)
        ax.set_xlabel("layer depth (% of blocks)")
        ax.set_ylabel("plasticity (ratio, mean ± 95% CI)")
        ax.set_title(f"{mode} mode")
        ax.legend(fontsize=8)
    _save(fig, out_dir, "plasticity_vs_depth")


def bounds_vs_depth(bounds: pd.DataFrame, out_dir: Path) -> None:
    """Theoretical upper bounds per component against depth, log scale."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if bounds.empty:
        _empty(ax, "no bounds computed")
    else:
        curve = bounds.groupby(["component", "depth_pct"], as_index=False)["bound"].mean()
        for component in BY_THEORY:
            part = curve[curve["component"] == component]
            ax.plot(part["depth_pct"], part["bound"], marker="o", color=colour(component), label=_label(component))
        ax.set_yscale("log")
        ax.set_xlabel("layer depth (% of blocks)")
        ax.set_ylabel("upper bound on rate of change (log)")
        ax.legend(fontsize=8)
    _save(fig, out_dir, "bounds_vs_depth")


def _arm_bars(frame: pd.DataFrame, value: str, ylabel: str, out_dir: Path, name: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if frame.empty or frame[value].isna().all():
        _empty(ax, f"no {ylabel}")
    else:
        order = list(frame.groupby("arm")[value].mean().sort_values(ascending=False).index)
        diverged = _diverged_counts(frame, "diverged_runs")
        sns.barplot(frame, x="arm", y=value, hue="arm", order=order, hue_order=order, palette=PALETTE,
                    errorbar="sd", legend=False, ax=ax)
        sns.stripplot(frame, x="arm", y=value, order=order, color="black", size=3, ax=ax)
        ax.set_xticks(range(len(order)), [_diverged_label(a, diverged.get(a, 0)) for a in order], rotation=30)
        ax.set_xlabel("finetuned arm (bars: mean over tasks ± sd; dots: tasks)")
        ax.set_ylabel(ylabel)
    _save(fig, out_dir, name)


def relative_gain(gains: pd.DataFrame, out_dir: Path) -> None:
    _arm_bars(gains, "gain_pct", "relative gain over linear probe (%)", out_dir, "relative_gain")


def accuracy_per_arm(table: pd.DataFrame, out_dir: Path) -> None:
    _arm_bars(table, "mean", "test accuracy at best lr (%)", out_dir, "accuracy_per_arm")


def lr_robustness(runs: pd.DataFrame, out_dir: Path) -> None:
    """Boxplots of every lr × seed run's test accuracy per arm, one panel per task."""
    tasks = sorted(runs["task"].unique())
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        data = runs[runs["task"] == task]
        order = list(dict.fromkeys(data["arm"]))
        diverged = _diverged_counts(data, "status")
        sns.boxplot(data, x="arm", y="test_acc", hue="arm", order=order, hue_order=order, palette=PALETTE,
                    legend=False, ax=ax)
        ax.set_xticks(range(len(order)), [_diverged_label(a, diverged.get(a, 0)) for a in order], rotation=30)
        total = sum(diverged.values())
        ax.set_title(task + (f" ({total} diverged runs not drawn)" if total else ""))
        ax.set_xlabel("arm (all learning rates × seeds)")
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_axis_off()
    _save(fig, out_dir, "lr_robustness")


def training_curves(runs: pd.DataFrame, table: pd.DataFrame, out_dir: Path) -> None:
    """Gradient norm and validation loss over training, per arm at its best lr (seed mean)."""
    tasks = sorted(runs["task"].unique())
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.2 * len(tasks)), squeeze=False)
    for (ax_grad, ax_loss), task in zip(axes, tasks, strict=True):
        for best in table[table["task"] == task].itertuples():
            chosen = runs[(runs["task"] == task) & (runs["arm"] == best.arm) & (runs["lr"] == best.best_lr)]
            if chosen.empty:
                continue
            history = pd.concat([pd.read_csv(Path(d) / "history.csv") for d in chosen["run_dir"]])
            curve = history.groupby("step", as_index=False)[["grad_norm", "val_loss"]].mean()
            ax_grad.plot(curve["step"], curve["grad_norm"], color=colour(best.arm), label=_label(best.arm), lw=1)
            evals = curve.dropna(subset=["val_loss"])
            ax_loss.plot(evals["step"], evals["val_loss"], color=colour(best.arm), marker="o", ms=3,
                         label=_label(best.arm))
        ax_grad.set_title(f"{task}: gradient norm (before clipping)")
        ax_grad.set_xlabel("optimizer step")
        ax_grad.set_ylabel("global gradient L2 norm")
        ax_grad.set_yscale("log")
        ax_loss.set_title(f"{task}: validation loss")
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("cross-entropy (nats)")
        ax_loss.legend(fontsize=7, ncol=2)
    _save(fig, out_dir, "training_curves")


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def make_figures(tables_dir: Path, out_dir: Path) -> None:
    """Draw every figure of an experiment from its tables folder."""
    sns.set_theme(style="whitegrid", context="paper")
    tables_dir, out_dir = Path(tables_dir), Path(out_dir)
    runs, table = _read(tables_dir / "runs.csv"), _read(tables_dir / "main_table.csv")
    plasticity = _read(tables_dir / "plasticity.csv")
    plasticity_vs_rank(plasticity, out_dir)
    plasticity_vs_depth(plasticity, out_dir)
    bounds_vs_depth(_read(tables_dir / "bounds.csv"), out_dir)
    relative_gain(_read(tables_dir / "relative_gain.csv"), out_dir)
    accuracy_per_arm(table, out_dir)
    lr_robustness(runs, out_dir)
    training_curves(runs, table, out_dir)
