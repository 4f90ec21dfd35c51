"""Figures of one experiment (study-spec §6), each drawn by one small function from the tables.

Every figure is written as PNG and PDF with a constrained layout and at most one legend.
Components and arms keep one colour, marker and line style everywhere (LN1 and LN2 differ
in all three), and arms appear in the experiment's order (that of `main_table.csv`) under
the labels the Markdown tables use (`components.arm_label`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from vitplasticity.components import THEORETICAL_RANK, arm_label  # noqa: E402
from vitplasticity.fileio import atomic_path  # noqa: E402

PALETTE = {
    "mha": "#d62728", "fc1": "#ff7f0e", "fc2": "#8c564b", "ln2": "#1f77b4", "ln1": "#e377c2",
    "emb": "#7f7f7f", "all": "#000000", "smooth": "#2ca02c", "non_smooth": "#9467bd", "head": "#bcbd22",
}
MARKERS = {
    "mha": "o", "fc1": "s", "fc2": "D", "ln2": "^", "ln1": "v", "emb": "P", "all": "*", "smooth": "X",
    "non_smooth": "h", "head": "p",
}
LINESTYLES = {"ln1": (0, (4, 2)), "fc2": (0, (1, 1)), "emb": (0, (6, 2, 1, 2))}
TASK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "*", "<", ">")
BY_THEORY = sorted(THEORETICAL_RANK, key=THEORETICAL_RANK.get)
# Arms outside PALETTE (controls, a user's own arms) take these in the experiment's order.
EXTRA_COLOURS = ("#17becf", "#393b79", "#e7ba52", "#98df8a", "#ff9896", "#c5b0d5", "#9edae5", "#637939")
EXTRA_MARKERS = ("<", ">", "d", "H", "8", "p")
_extra: dict[str, tuple[str, str]] = {}  # set by `give_styles` for the experiment being drawn


def give_styles(arms: list[str]) -> None:
    """Give each arm of `arms` outside PALETTE its own colour and marker, in that order, so that every
    figure of the experiment draws it alike and no two of them alike (until the extra colours run out)."""
    _extra.clear()
    for index, arm in enumerate(a for a in dict.fromkeys(arms) if a not in PALETTE):
        _extra[arm] = (EXTRA_COLOURS[index % len(EXTRA_COLOURS)], EXTRA_MARKERS[index % len(EXTRA_MARKERS)])


def _given(name: str) -> tuple[str, str]:
    """The colour and marker `give_styles` gave a name outside PALETTE (the first extra ones if none)."""
    return _extra.get(name, (EXTRA_COLOURS[0], EXTRA_MARKERS[0]))


def colour(name: str) -> str:
    return PALETTE.get(name) or _given(name)[0]


def style(name: str) -> dict:
    """Line2D keyword arguments of a component or arm: colour, marker, line style."""
    marker = MARKERS.get(name) or _given(name)[1]
    return {"color": colour(name), "marker": marker, "linestyle": LINESTYLES.get(name, "-")}


def _save(fig: plt.Figure, out_dir: Path, name: str) -> None:
    for suffix in ("png", "pdf"):
        with atomic_path(out_dir / f"{name}.{suffix}") as tmp:
            fig.savefig(tmp, format=suffix, dpi=150, bbox_inches="tight")
    plt.close(fig)


def _saved(draw):
    """`draw(*data) -> Figure` as `draw(*data, out_dir) -> None`: the figure is saved in out_dir under the
    drawing function's name, a name of `registry.FIGURES` (its one spelling in the code)."""
    @functools.wraps(draw)
    def draw_and_save(*args) -> None:
        *data, out_dir = args
        _save(draw(*data), Path(out_dir), draw.__name__)

    return draw_and_save


def _empty(ax: plt.Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _diverged_label(name: str, diverged: int) -> str:
    """An arm's tick label, noting its diverged runs (they have no accuracy to draw)."""
    return arm_label(name) + (f"\n({diverged} diverged)" if diverged else "")


def _diverged_counts(frame: pd.DataFrame, column: str) -> dict[str, int]:
    """Diverged runs per arm: from a per-run `status` column or a per-cell `diverged_runs` count."""
    if column == "status" and "status" in frame:
        return frame.assign(d=frame["status"].eq("diverged")).groupby("arm")["d"].sum().astype(int).to_dict()
    if column == "diverged_runs" and "diverged_runs" in frame:
        return frame.groupby("arm")["diverged_runs"].sum().astype(int).to_dict()
    return {}


def _arm_ticks(ax: plt.Axes, order: list[str], diverged: dict[str, int]) -> None:
    ax.set_xticks(range(len(order)), [_diverged_label(a, diverged.get(a, 0)) for a in order],
                  rotation=90)
    ax.set_xlim(-0.6, len(order) - 0.4)


def _legend_below(fig: plt.Figure, handles: list, ncol: int) -> None:
    """The figure's one legend, outside and below every panel."""
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=max(1, min(ncol, len(handles))), fontsize=8)


def _component_handles(components: list[str]) -> list[Line2D]:
    return [Line2D([], [], label=arm_label(c), **style(c)) for c in components]


def _grid(count: int, width: float, height: float, cols: int = 3) -> tuple[plt.Figure, np.ndarray]:
    cols = max(1, min(cols, count))
    rows = -(-count // cols)
    return plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained")


def _modes(plasticity: pd.DataFrame) -> list[str]:
    return sorted(plasticity["mode"].unique()) if not plasticity.empty else ["embedding"]


def _span(values: pd.Series) -> str:
    low, high = int(values.min()), int(values.max())
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def pair_note(data: pd.DataFrame) -> str:
    """The pair count and distinct images per stream behind a plasticity panel, for its title.

    Over the panel's tasks: "12,800 pairs; images: reference 12,800, downstream 2,000–10,000
    (cycled)"; pairs within one folder (an `images` column): "132 pairs of 12 images (cycled)". Empty for
    tables without the count columns.
    """
    if not data.empty and {"pairs", "images"} <= set(data):
        cycled = (data["images"] < 2 * data["pairs"]).any()
        return f"{_span(data['pairs'])} pairs of {_span(data['images'])} images" + (" (cycled)" if cycled else "")
    columns = ("pairs", "reference_images", "downstream_images")
    if data.empty or any(column not in data for column in columns):
        return ""
    cycled = (data["reference_images"] < data["pairs"]) | (data["downstream_images"] < data["pairs"])
    return (f"{_span(data['pairs'])} pairs; images: reference {_span(data['reference_images'])}, "
            f"downstream {_span(data['downstream_images'])}" + (" (cycled)" if cycled.any() else ""))


def _plasticity_title(mode: str, detail: str, data: pd.DataFrame) -> str:
    note = pair_note(data)
    return f"{mode} mode{detail}" + (f"\n{note}" if note else "")


@_saved
def plasticity_vs_rank(plasticity: pd.DataFrame) -> plt.Figure:
    """Each component's plasticity over layers (box) and per layer (dots), ordered by theoretical rank."""
    modes = _modes(plasticity)
    fig, axes = _grid(len(modes), 4.6, 3.6)
    for ax, mode in zip(axes.flat, modes, strict=False):
        data = plasticity[plasticity["mode"] == mode] if not plasticity.empty else plasticity
        if data.empty:
            _empty(ax, "no plasticity measured")
            continue
        per_layer = data.groupby(["component", "layer"], as_index=False)["mean"].mean()
        order = [c for c in BY_THEORY if c in set(per_layer["component"])]
        values = [per_layer.loc[per_layer["component"] == c, "mean"].to_numpy() for c in order]
        boxes = ax.boxplot(values, positions=range(len(order)), widths=0.6, patch_artist=True, showfliers=False)
        for patch, component in zip(boxes["boxes"], order, strict=True):
            patch.set(facecolor=colour(component), alpha=0.35, edgecolor=colour(component))
        for index, (component, points) in enumerate(zip(order, values, strict=True)):
            ax.plot(np.full(len(points), index), points, ms=4, **{**style(component), "linestyle": "none"})
        ax.set_xticks(range(len(order)), [f"{arm_label(c)}\n(rank {THEORETICAL_RANK[c]})" for c in order])
        ax.set_xlabel("component (theoretical rank, 1 = most plastic)")
        ax.set_ylabel("plasticity (ratio)")
        ax.set_title(_plasticity_title(mode, " (dots: layers)", data), fontsize=9)
    for ax in list(axes.flat)[len(modes):]:
        ax.set_axis_off()
    return fig


DECADES_FOR_LOG = 2  # a panel whose positive values span more than this many decades gets a log axis


def spans_decades(values: pd.Series, decades: float = DECADES_FOR_LOG) -> bool:
    """True when every value is positive and the largest is more than 10^`decades` times the smallest."""
    return bool(len(values) and (values > 0).all() and values.max() > 10**decades * values.min())


@_saved
def plasticity_vs_depth(plasticity: pd.DataFrame) -> plt.Figure:
    """Plasticity against layer depth (%) with its 95% CI, averaged over tasks; on a log axis where the panel's
    values span more than `DECADES_FOR_LOG` decades (LayerNorm values of 10–50 beside linear ones under 1 would
    flatten the others to a line)."""
    modes = _modes(plasticity)
    fig, axes = _grid(len(modes), 4.6, 3.4)
    drawn = []
    for ax, mode in zip(axes.flat, modes, strict=False):
        data = plasticity[plasticity["mode"] == mode] if not plasticity.empty else plasticity
        if data.empty:
            _empty(ax, "no plasticity measured")
            continue
        curve = data.groupby(["component", "depth_pct"], as_index=False)[["mean", "ci95"]].mean()
        for component in BY_THEORY:
            part = curve[curve["component"] == component]
            if part.empty:
                continue
            ax.plot(part["depth_pct"], part["mean"], ms=5, **style(component))
            ax.fill_between(part["depth_pct"], part["mean"] - part["ci95"], part["mean"] + part["ci95"],
                            color=colour(component), alpha=0.15, lw=0)
            drawn.append(component)
        ax.set_xlabel("layer depth (% of blocks)")
        logarithmic = spans_decades(curve["mean"])
        if logarithmic:
            ax.set_yscale("log")
        ax.set_ylabel("plasticity (ratio, ± 95% CI" + (", log)" if logarithmic else ")"))
        ax.set_title(_plasticity_title(mode, "", data), fontsize=9)
    for ax in list(axes.flat)[len(modes):]:
        ax.set_axis_off()
    _legend_below(fig, _component_handles([c for c in BY_THEORY if c in drawn]), 5)
    return fig


@_saved
def bounds_vs_depth(bounds: pd.DataFrame) -> plt.Figure:
    """Upper bounds per component against depth, log scale: the paper's (left) and, where the streams' token
    extremes were measured, the ones that hold for them (right); LN2 drawn hollow over LN1."""
    kinds = [("bound", "the paper's bounds")]
    if "holding_bound" in bounds and bounds["holding_bound"].notna().any():
        kinds.append(("holding_bound", "bounds that hold for the measured E"))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), layout="constrained", squeeze=False,
                             sharey=True)
    handles = []
    if bounds.empty:
        _empty(axes[0, 0], "no bounds computed")
    for ax, (column, title) in zip(axes[0], kinds, strict=True):
        if bounds.empty:
            break
        curve = bounds.groupby(["component", "depth_pct"], as_index=False)[column].mean()
        drawn = []
        for component in BY_THEORY:
            part = curve[curve["component"] == component]
            if part.empty:
                continue
            hollow = {"markerfacecolor": "none", "markersize": 8} if component == "ln2" else {"markersize": 5}
            drawn += ax.plot(part["depth_pct"], part[column], label=arm_label(component), **style(component),
                             **hollow)
        handles = handles or drawn
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("layer depth (% of blocks)")
    axes[0, 0].set_ylabel("upper bound on rate of change (log)")
    _legend_below(fig, handles, 5)
    return fig


def _arm_order(frame: pd.DataFrame) -> list[str]:
    """Arms in the experiment's order: their first appearance in the table."""
    return list(dict.fromkeys(frame["arm"])) if not frame.empty else []


@_saved
def accuracy_per_arm(table: pd.DataFrame, probes: dict[str, float]) -> plt.Figure:
    """Per task: each arm's test accuracy at its best lr (mean ± seed std), the linear probe as a line."""
    tasks = list(dict.fromkeys(table["task"])) if not table.empty else []
    fig, axes = _grid(max(1, len(tasks)), 4.2, 3.4)
    if not tasks:
        _empty(axes.flat[0], "no test accuracy")
    order = _arm_order(table)
    diverged = _diverged_counts(table, "diverged_runs")
    for ax, task in zip(axes.flat, tasks, strict=False):
        part = table[table["task"] == task].set_index("arm")
        for index, arm in enumerate(order):
            if arm in part.index and pd.notna(part.loc[arm, "mean"]):
                ax.errorbar(index, part.loc[arm, "mean"], yerr=part.loc[arm, "std"], capsize=3, ms=6,
                            **{**style(arm), "linestyle": "none"})
        if task in probes:
            ax.axhline(probes[task], color="#555555", ls="--", lw=1)
        ax.set_title(task)
        _arm_ticks(ax, order, diverged)
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[max(1, len(tasks)):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color="#555555", ls="--", label="linear probe")] if probes else []
    handles.append(Line2D([], [], color="black", marker="o", ls="none", label="arm at its best lr (± seed std)"))
    _legend_below(fig, handles, 2)
    return fig


@_saved
def relative_gain(gains: pd.DataFrame) -> plt.Figure:
    """Relative gain over the linear probe per arm: one marker per task, a bar at the task mean."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    handles = []
    if gains.empty or gains["gain_pct"].isna().all():
        _empty(ax, "no relative gain (no linear probe)")
    else:
        order = _arm_order(gains)
        tasks = list(dict.fromkeys(gains["task"]))
        offsets = np.linspace(-0.25, 0.25, len(tasks)) if len(tasks) > 1 else [0.0]
        for task, marker, offset in zip(tasks, TASK_MARKERS * len(tasks), offsets, strict=False):
            part = gains[gains["task"] == task].set_index("arm").reindex(order)
            ax.scatter(np.arange(len(order)) + offset, part["gain_pct"], marker=marker, s=28,
                       c=[colour(a) for a in order], edgecolors="black", linewidths=0.4, zorder=3)
            handles.append(Line2D([], [], marker=marker, color="black", ls="none", mfc="white", label=task))
        mean = gains.groupby("arm")["gain_pct"].mean().reindex(order)
        ax.hlines(mean, np.arange(len(order)) - 0.35, np.arange(len(order)) + 0.35, color="black", lw=2)
        ax.axhline(0, color="#555555", ls="--", lw=1)
        handles += [Line2D([], [], color="black", lw=2, label="mean over tasks"),
                    Line2D([], [], color="#555555", ls="--", label="linear probe (0%)")]
        _arm_ticks(ax, order, _diverged_counts(gains, "diverged_runs"))
        ax.set_ylabel("gain over linear probe (%)")
    _legend_below(fig, handles, 3)
    return fig


@_saved
def lr_robustness(runs: pd.DataFrame) -> plt.Figure:
    """Per task and arm: every run's test accuracy, side by side per learning rate (seeds as dots)."""
    tasks = sorted(runs["task"].unique())
    fig, axes = _grid(len(tasks), 4.6, 3.4)
    lrs = sorted(runs["lr"].unique())
    shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(lrs)))
    width = 0.7 / len(lrs)
    order = _arm_order(runs)
    for ax, task in zip(axes.flat, tasks, strict=False):
        data = runs[runs["task"] == task]
        diverged = _diverged_counts(data, "status")
        for (lr_index, lr), shade in zip(enumerate(lrs), shades, strict=True):
            x_shift = (lr_index - (len(lrs) - 1) / 2) * width
            for index, arm in enumerate(order):
                accs = data[(data["arm"] == arm) & (data["lr"] == lr)]["test_acc"].dropna()
                if accs.empty:
                    continue
                ax.plot(np.full(len(accs), index + x_shift), accs, ls="none", marker=".", ms=4, color=shade,
                        alpha=0.6)
                ax.plot(index + x_shift, accs.mean(), ls="none", marker="_", ms=10, mew=2, color=shade)
        _arm_ticks(ax, order, diverged)
        total = sum(diverged.values())
        ax.set_title(task + (f" ({total} diverged runs not drawn)" if total else ""))
        ax.set_ylabel("test accuracy (%)")
    for ax in list(axes.flat)[len(tasks):]:
        ax.set_axis_off()
    handles = [Line2D([], [], color=shade, marker="_", ms=10, mew=2, ls="none", label=f"lr {lr:g}")
               for lr, shade in zip(lrs, shades, strict=True)]
    handles.append(Line2D([], [], color="gray", marker=".", ls="none", label="one seed (bar: seed mean)"))
    _legend_below(fig, handles, len(handles))
    return fig


def _smooth(values: pd.Series, steps: int) -> pd.Series:
    """Rolling mean over about a twentieth of the run, so many arms' noisy gradient norms stay readable."""
    return values.rolling(max(1, steps // 20), min_periods=1, center=True).mean()


@_saved
def training_curves(runs: pd.DataFrame, table: pd.DataFrame) -> plt.Figure:
    """Gradient norm (smoothed) and validation loss over training, per arm at its best lr (seed mean)."""
    tasks = sorted(runs["task"].unique())
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 2.9 * len(tasks)), squeeze=False, layout="constrained")
    drawn = []
    for (ax_grad, ax_loss), task in zip(axes, tasks, strict=True):
        for best in table[table["task"] == task].itertuples():
            chosen = runs[(runs["task"] == task) & (runs["arm"] == best.arm) & (runs["lr"] == best.best_lr)]
            if chosen.empty:
                continue
            history = pd.concat([pd.read_csv(Path(d) / "history.csv") for d in chosen["run_dir"]])
            curve = history.groupby("step", as_index=False)[["grad_norm", "val_loss"]].mean()
            line = {**style(best.arm), "marker": None}
            ax_grad.plot(curve["step"], _smooth(curve["grad_norm"], len(curve)), lw=1.2, **line)
            evals = curve.dropna(subset=["val_loss"])
            ax_loss.plot(evals["step"], evals["val_loss"], ms=4, lw=1.2, **style(best.arm))
            if best.arm not in drawn:
                drawn.append(best.arm)
        ax_grad.set_title(f"{task}: gradient norm (smoothed)")
        ax_grad.set_xlabel("optimizer step")
        ax_grad.set_ylabel("L2 norm before clipping")
        ax_grad.set_yscale("log")
        ax_loss.set_title(f"{task}: validation loss")
        ax_loss.set_xlabel("optimizer step")
        ax_loss.set_ylabel("cross-entropy (nats)")
    _legend_below(fig, _component_handles(drawn), 5)
    return fig


@_saved
def criteria_hit_rate(criteria: pd.DataFrame) -> plt.Figure:
    """Per selection criterion: Spearman with the finetuning ranking per task (markers, 95% bootstrap CI over
    seeds) and averaged over tasks (bar), and the top-1 hit rate averaged over tasks (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained", sharey=True)
    handles = []
    if criteria.empty:
        _empty(left, "no selection criteria measured")
        right.set_axis_off()
    else:
        average = criteria[criteria["task"] == "Average"].set_index("criterion")
        per_task = criteria[criteria["task"] != "Average"]
        order = list(average.index)
        y = np.arange(len(order))
        left.barh(y, average["spearman"].reindex(order), color="#cccccc", edgecolor="black", height=0.6)
        tasks = list(dict.fromkeys(per_task["task"]))
        offsets = np.linspace(-0.2, 0.2, len(tasks)) if len(tasks) > 1 else [0.0]
        for task, marker, offset in zip(tasks, TASK_MARKERS * len(tasks), offsets, strict=False):
            part = per_task[per_task["task"] == task].set_index("criterion").reindex(order)
            low = (part["spearman"] - part["spearman_low"]).clip(lower=0).fillna(0)
            high = (part["spearman_high"] - part["spearman"]).clip(lower=0).fillna(0)
            left.errorbar(part["spearman"], y + offset, xerr=[low, high], fmt=marker, color="black", ms=4,
                          capsize=2, lw=0.8)
            handles.append(Line2D([], [], marker=marker, color="black", ls="none", label=task))
        left.axvline(0, color="#555555", lw=1)
        left.set_xlim(-1.05, 1.05)
        left.set_yticks(y, [name.replace("_", " ") for name in order])
        left.set_xlabel("Spearman with the finetuning ranking")
        right.barh(y, average["top1"].reindex(order), color="#cccccc", edgecolor="black", height=0.6)
        right.set_xlim(0, 1.05)
        right.set_xlabel("top-1 hit rate (share of tasks)")
        handles.append(Line2D([], [], color="#cccccc", lw=6, label="mean over tasks"))
    _legend_below(fig, handles, 4)
    return fig


@_saved
def accuracy_vs_params(table: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """Test accuracy at the best lr against trainable parameters (log): one point per arm and task."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    handles = []
    if table.empty or "trainable_params" not in runs or runs["trainable_params"].isna().all():
        _empty(ax, "no trainable parameter counts")
    else:
        params = runs.groupby(["task", "arm"])["trainable_params"].first()
        data = table.join(params, on=["task", "arm"]).dropna(subset=["mean", "trainable_params"])
        tasks = list(dict.fromkeys(data["task"]))
        for task, marker in zip(tasks, TASK_MARKERS * len(tasks), strict=False):
            part = data[data["task"] == task]
            ax.scatter(part["trainable_params"], part["mean"], marker=marker, s=30,
                       c=[colour(arm) for arm in part["arm"]], edgecolors="black", linewidths=0.4, zorder=3)
            handles.append(Line2D([], [], marker=marker, color="black", ls="none", mfc="white", label=task))
        handles += [Line2D([], [], marker="s", color=colour(arm), ls="none", label=arm_label(arm))
                    for arm in _arm_order(data)]
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("test accuracy at the best lr (%)")
    _legend_below(fig, handles, 6)
    return fig


@_saved
def selection_vs_budget(selection: pd.DataFrame, table: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """Test accuracy at the best lr (mean over the tasks with budget arms) against trainable parameters (log,
    head included): one line per selector through its budgets, ``random`` as a band (mean ± spread over its
    draws), and the whole-component arms (and ``all``) on the same tasks as points."""
    from vitplasticity.budget import RANDOM, SELECTORS

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    handles = []
    if selection.empty:
        _empty(ax, "no budget arms\n(the experiment's selection is false)")
        return fig
    mean = selection.groupby(["selector", "budget"], as_index=False, sort=False)[
        ["trainable_params", "acc", "spread"]].mean().sort_values("budget")
    for index, selector in enumerate(name for name in SELECTORS if name in set(mean["selector"])):
        part = mean[mean["selector"] == selector]
        if selector == RANDOM:
            ax.fill_between(part["trainable_params"], part["acc"] - part["spread"], part["acc"] + part["spread"],
                            color="#bbbbbb", alpha=0.5, lw=0)
            ax.errorbar(part["trainable_params"], part["acc"], yerr=part["spread"], color="#777777", marker="o",
                        ms=4, capsize=3, lw=1)
            handles.append(Line2D([], [], color="#777777", marker="o", label="random (± spread over draws)"))
            continue
        line = {"color": EXTRA_COLOURS[index % len(EXTRA_COLOURS)], "marker": EXTRA_MARKERS[index % len(EXTRA_MARKERS)]}
        ax.plot(part["trainable_params"], part["acc"], ms=5, lw=1.2, **line)
        handles.append(Line2D([], [], label=selector.replace("_", " "), **line))
    tasks = set(selection["task"])
    budget_arms = set(runs.dropna(subset=["selector"])["arm"]) if "selector" in runs else set()
    whole = table[table["task"].isin(tasks) & ~table["arm"].isin(budget_arms)]
    params = runs.groupby(["task", "arm"])["trainable_params"].first()
    whole = whole.join(params, on=["task", "arm"]).groupby("arm", sort=False)[["trainable_params", "mean"]].mean()
    for arm, row in whole.dropna().iterrows():
        ax.scatter(row["trainable_params"], row["mean"], s=40, edgecolors="black", linewidths=0.4, zorder=3,
                   color=colour(arm), marker=style(arm)["marker"])
        handles.append(Line2D([], [], ls="none", color=colour(arm), marker=style(arm)["marker"],
                              label=f"{arm_label(arm)} (every block)"))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, head included (log)")
    ax.set_ylabel("test accuracy at the best lr (%), mean over tasks")
    _legend_below(fig, handles, 4)
    return fig


def _step_axis(ax: plt.Axes, steps: list[int]) -> None:
    """Pretraining steps on a log axis, labelled at the measured steps when they are few enough to read."""
    ax.set_xscale("log")
    if len(steps) <= 6:
        ax.set_xticks(steps, [f"{step:,}" for step in steps])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("pretraining step (log)")


@_saved
def plasticity_trajectory(trajectory: pd.DataFrame) -> plt.Figure:
    """Each component's plasticity (mean over layers and tasks) against the pretraining step, one panel per
    mode, and the pretraining run's source validation accuracy at those steps (last panel)."""
    modes = _modes(trajectory)
    fig, axes = _grid(len(modes) + 1, 4.0, 3.0, cols=2)
    drawn = []
    if trajectory.empty:
        _empty(axes.flat[0], "no pretraining trajectory\n(the model keeps no steps)")
        for ax in list(axes.flat)[1:]:
            ax.set_axis_off()
        return fig
    steps = sorted(trajectory["step"].unique())
    for ax, mode in zip(axes.flat, modes, strict=False):
        data = trajectory[trajectory["mode"] == mode]
        curve = data.groupby(["component", "step"], as_index=False)["plasticity"].mean()
        for component in BY_THEORY:
            part = curve[curve["component"] == component]
            if not part.empty:
                ax.plot(part["step"], part["plasticity"], ms=5, **style(component))
                drawn.append(component)
        _step_axis(ax, steps)
        ax.set_ylabel("plasticity (ratio)")
        ax.set_title(f"{mode} mode (mean over layers and tasks)")
    accuracy = trajectory.groupby("step", as_index=False)["source_val_acc"].first()
    ax = axes.flat[len(modes)]
    ax.plot(accuracy["step"], accuracy["source_val_acc"], color="black", marker="o", ms=5)
    _step_axis(ax, steps)
    ax.set_ylabel("source validation accuracy (%)")
    ax.set_title("the pretraining run at those steps")
    for ax in list(axes.flat)[len(modes) + 1:]:
        ax.set_axis_off()
    _legend_below(fig, _component_handles([c for c in BY_THEORY if c in drawn]), 5)
    return fig


def _read(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _probes(gains: pd.DataFrame) -> dict[str, float]:
    """Linear-probe accuracy per task, as the relative-gain table records it."""
    if gains.empty or "probe_acc" not in gains:
        return {}
    return gains.groupby("task", sort=False)["probe_acc"].first().dropna().to_dict()


def make_figures(tables_dir: Path, out_dir: Path) -> None:
    """Draw every figure of an experiment (`registry.FIGURES`) from its tables folder."""
    plt.style.use("seaborn-v0_8-whitegrid")
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 8})
    tables_dir, out_dir = Path(tables_dir), Path(out_dir)
    runs, table = _read(tables_dir / "runs.csv"), _read(tables_dir / "main_table.csv")
    gains = _read(tables_dir / "relative_gain.csv")
    give_styles(_arm_order(table))
    plasticity = _read(tables_dir / "plasticity.csv")
    plasticity_vs_rank(plasticity, out_dir)
    plasticity_vs_depth(plasticity, out_dir)
    bounds_vs_depth(_read(tables_dir / "bounds.csv"), out_dir)
    relative_gain(gains, out_dir)
    accuracy_per_arm(table, _probes(gains), out_dir)
    lr_robustness(runs, out_dir)
    training_curves(runs, table, out_dir)
    criteria_hit_rate(_read(tables_dir / "criteria.csv"), out_dir)
    accuracy_vs_params(table, runs, out_dir)
    plasticity_trajectory(_read(tables_dir / "trajectory.csv"), out_dir)
    selection_vs_budget(_read(tables_dir / "selection.csv"), table, runs, out_dir)
