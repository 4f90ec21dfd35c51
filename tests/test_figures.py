"""Every figure reads at a glance: no text drawn over other text, legends outside the panels.

The figures are drawn from a hand-made results set the size of the quick study (3 tasks,
9 arms, 2 learning rates, 3 seeds, 6 layers), rendered, and the extents matplotlib reports
for titles, axis labels, tick labels, annotations and legends are checked pairwise.
"""

import itertools
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.transforms import Bbox

from vitplasticity import aggregate, figures
from vitplasticity.registry import CRITERIA, FIGURES

TASKS = ("shapes_noise", "shapes_novel", "shapes_sketch")
ARMS = ("all", "emb", "ln1", "mha", "ln2", "fc1", "fc2", "smooth", "non_smooth")
COMPONENTS = ("ln1", "mha", "ln2", "fc1", "fc2")
LRS, SEEDS, STEPS = (0.01, 0.03), (0, 1, 2), 60
# Budget arms (vitplasticity.budget): name -> its selection spec.
BUDGET_ARMS = {f"{selector}_{pct}pct" + (f"_draw{draw}" if draw is not None else ""):
               {"selector": selector, "budget": pct / 100} | ({"draw": draw} if draw is not None else {})
               for pct in (5, 10) for selector, draw in (("fisher", None), ("last_k", None), ("random", 0),
                                                         ("random", 1))}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure of a hand-made experiment, rendered: {name: Figure}."""
    root = tmp_path_factory.mktemp("figures")
    rng = np.random.default_rng(0)
    runs = []
    for task, arm, lr, seed in itertools.product(TASKS, (*ARMS, *BUDGET_ARMS), LRS, SEEDS):
        run = root / "runs" / task / arm / f"lr{lr}_seed{seed}"
        run.mkdir(parents=True)
        settings = {"model": "vit", "task": task, "optimizer": "sgd", "arm": arm, "lr": lr, "seed": seed}
        if arm in BUDGET_ARMS:
            settings["selection"] = BUDGET_ARMS[arm]
        (run / "config.yaml").write_text(yaml.safe_dump({"settings": settings}))
        steps = np.arange(1, STEPS + 1)
        history = pd.DataFrame({"step": steps, "loss": 1.6 - steps / 100, "lr": lr,
                                "grad_norm": rng.lognormal(0, 0.5, STEPS),
                                "val_loss": np.where(steps % 20 == 0, 1.5 - steps / 80, np.nan),
                                "val_acc": np.where(steps % 20 == 0, 0.5, np.nan)})
        history.to_csv(run / "history.csv", index=False)
        index = ARMS.index(arm) if arm in ARMS else list(BUDGET_ARMS).index(arm)
        acc = 0.6 + 0.03 * index / len(ARMS) + rng.normal(0, 0.01)
        params = 1000 * (1 + 100 * BUDGET_ARMS[arm]["budget"]) if arm in BUDGET_ARMS else 1000 * (1 + index)
        (run / "metrics.json").write_text(json.dumps({
            "status": "completed", "test_acc": acc, "best_val_acc": acc, "best_step": STEPS,
            "diverged_step": None, "trainable_params": params, "wall_time_s": 2.0}))
        runs.append(run / "metrics.json")
    probes = []
    for index, task in enumerate(TASKS):
        probe = root / "probes" / f"{task}.json"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(json.dumps({"task": task, "test_acc": 0.55 + 0.05 * index}))
        probes.append(probe)
    layers = range(6)
    plasticity = pd.DataFrame([
        {"model": "vit", "task": task, "mode": mode, "component": component, "layer": layer,
         "depth_pct": 100 * (layer + 1) / 6, "mean": 1.0 + COMPONENTS.index(component) + 0.1 * layer,
         "ci95": 0.05} for task in TASKS for mode in ("embedding", "hidden") for component in COMPONENTS
        for layer in layers])
    bounds = pd.DataFrame([
        {"component": component, "layer": layer, "depth_pct": 100 * (layer + 1) / 6,
         "bound": 1.0 if component.startswith("ln") else 10.0 ** (1 + COMPONENTS.index(component)),
         "holding_bound": 3.0 if component.startswith("ln") else 10.0 ** (2 + COMPONENTS.index(component))}
        for component in COMPONENTS for layer in layers])
    plasticity.to_csv(root / "plasticity.csv", index=False)
    bounds.to_csv(root / "bounds.csv", index=False)
    criteria = []
    for task in TASKS:
        folder = root / "criteria" / task
        folder.mkdir(parents=True)
        names = tuple(CRITERIA)
        pd.DataFrame([{"model": "vit", "task": task, "criterion": name, "component": component, "layer": layer,
                       "value": rng.uniform(0.1, 2.0)} for name in names for component in COMPONENTS
                      for layer in layers]).to_csv(folder / "criteria.csv", index=False)
        pd.DataFrame([{"model": "vit", "task": task, "criterion": name, "wall_s": 1.5, "peak_mib": 20.0}
                      for name in names]).to_csv(folder / "cost.csv", index=False)
        criteria.append(folder / "criteria.csv")
    trajectory = pd.DataFrame([
        {"model": "vit", "task": task, "step": step, "source_val_acc": 0.2 + step / 1500,
         "downstream_token_norm": 8 + step / 300, "mode": mode,
         "component": component, "layer": layer, "mean": rng.uniform(0.1, 1.0)}
        for task in TASKS for step in (100, 300, 600, 1200) for mode in ("embedding", "hidden", "scale_free")
        for component in COMPONENTS for layer in layers])
    trajectory.to_csv(root / "trajectory.csv", index=False)
    tables = root / "tables"
    aggregate.aggregate([*ARMS, *BUDGET_ARMS], runs, probes, [root / "plasticity.csv"],
                        [root / "bounds.csv"], tables, criteria, [root / "trajectory.csv"])

    drawn = {}
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, name: drawn.__setitem__(name, fig))
    figures.make_figures(tables, root / "figures")
    monkeypatch.undo()
    for fig in drawn.values():
        fig.canvas.draw()
    return drawn


def _text_boxes(fig) -> list[tuple[str, Bbox]]:
    """(what, extent in pixels) of every visible piece of text; a legend counts as one box."""
    renderer = fig.canvas.get_renderer()
    boxes = []

    def add(what, artist):
        if artist.get_visible() and (not hasattr(artist, "get_text") or artist.get_text().strip()):
            boxes.append((what, artist.get_window_extent(renderer)))

    for text in fig.texts:
        add("figure text", text)
    for legend in fig.legends:
        add("figure legend", legend)
    for index, ax in enumerate(fig.axes):
        if not ax.axison and not ax.texts:
            continue
        for title in (ax.title, ax._left_title, ax._right_title):
            add(f"axes {index} title", title)
        if ax.axison:
            add(f"axes {index} x label", ax.xaxis.label)
            add(f"axes {index} y label", ax.yaxis.label)
            for axis in (ax.xaxis, ax.yaxis):
                low, high = sorted(axis.get_view_interval())
                span = high - low
                for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                    if low - 1e-9 * span <= tick.get_loc() <= high + 1e-9 * span:  # drawn: inside the view
                        add(f"axes {index} tick '{tick.label1.get_text()}'", tick.label1)
        for text in ax.texts:
            add(f"axes {index} text", text)
        if ax.get_legend() is not None:
            add(f"axes {index} legend", ax.get_legend())
    return boxes


def _overlap(a: Bbox, b: Bbox, tolerance: float = 1.0) -> bool:
    """Whether two extents share more than a `tolerance`-pixel border."""
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance)


def test_every_figure_is_drawn(drawn):
    assert set(drawn) == set(FIGURES)


def test_criteria_figure_has_a_row_per_criterion_and_random_as_the_floor(drawn):
    ticks = [t.get_text() for t in drawn["criteria_hit_rate"].axes[0].get_yticklabels()]
    assert ticks == ["plasticity embedding", "plasticity hidden", "plasticity scale free", "relative gradient norm",
                     "fisher", "fps", "kappatune", "trainable params", "random"]


@pytest.mark.parametrize("name", FIGURES)
def test_no_text_overlaps_other_text_and_legends_sit_outside_the_panels(drawn, name):
    fig = drawn[name]
    boxes = _text_boxes(fig)
    assert boxes, name
    clashes = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if _overlap(box_a, box_b)]
    assert not clashes, f"{name}: overlapping text {clashes[:5]}"
    renderer = fig.canvas.get_renderer()
    panels = [ax.get_window_extent(renderer) for ax in fig.axes if ax.axison]
    assert len(fig.legends) <= 1 and not any(ax.get_legend() for ax in fig.axes), f"{name}: more than one legend"
    for legend in fig.legends:
        extent = legend.get_window_extent(renderer)
        assert not any(_overlap(extent, panel) for panel in panels), f"{name}: the legend covers a panel"


def test_overlap_check_catches_colliding_tick_labels(drawn):
    """The check can fail: long labels on a narrow axis collide and are reported."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(range(6), ["Embedding"] * 6)
    fig.canvas.draw()
    boxes = _text_boxes(fig)
    assert any(_overlap(a, b) for (_, a), (_, b) in itertools.combinations(boxes, 2))
    plt.close(fig)


def test_selection_figure_has_a_line_per_selector_random_as_a_band_and_the_components_as_points(drawn):
    fig = drawn["selection_vs_budget"]
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels[:2] == ["fisher", "random (± spread over draws)"] and labels[2] == "last k"
    assert "MHA (every block)" in labels and "all (every block)" in labels
    lines = [line for line in fig.axes[0].get_lines() if len(line.get_xdata()) == 2]
    assert sorted(tuple(line.get_xdata()) for line in lines)[:2] == [(6000.0, 11000.0), (6000.0, 11000.0)]


def test_trajectory_has_a_panel_per_mode_and_the_source_accuracy_at_the_kept_steps(drawn):
    fig = drawn["plasticity_trajectory"]
    assert [ax.get_title() for ax in fig.axes] == [
        "embedding mode (mean over layers and tasks)", "hidden mode (mean over layers and tasks)",
        "scale_free mode (mean over layers and tasks)", "the pretraining run at those steps"]
    for ax in fig.axes:
        assert ax.get_xscale() == "log"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["100", "300", "600", "1,200"]
    accuracy = fig.axes[3].get_lines()[0]
    assert list(accuracy.get_xdata()) == [100, 300, 600, 1200]
    assert list(accuracy.get_ydata()) == pytest.approx([100 * (0.2 + s / 1500) for s in (100, 300, 600, 1200)])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MHA", "FC1", "FC2", "LN2", "LN1"]


def test_ln1_and_ln2_differ_in_colour_marker_and_line_style():
    ln1, ln2 = figures.style("ln1"), figures.style("ln2")
    assert all(ln1[key] != ln2[key] for key in ("color", "marker", "linestyle"))


def test_every_arm_of_an_experiment_has_its_own_colour_and_marker():
    """The quick study's arms, its two controls and a user's own arm: no two drawn alike, by colour
    alone (accuracy_vs_params tells arms apart by colour) or by colour and marker."""
    arms = ["all", "emb", "ln1", "mha", "ln2", "fc1", "fc2", "smooth", "non_smooth", "mha_as_ln1", "mha_lora1",
            "attn_and_fc1"]
    figures.give_styles(arms)
    styles = [figures.style(arm) for arm in arms]
    assert len({s["color"] for s in styles}) == len(arms)
    assert len({(s["color"], s["marker"]) for s in styles}) == len(arms)
    assert figures.style("mha_lora1") == {"color": "#393b79", "marker": ">", "linestyle": "-"}


def test_arms_keep_the_experiment_order_and_table_labels(drawn):
    """lr_robustness and accuracy_per_arm name arms as the Markdown tables do, in the config's order."""
    expected = ["all", "Embedding", "LN1", "MHA", "LN2", "FC1", "FC2", "smooth", "non_smooth", *BUDGET_ARMS]
    for name in ("lr_robustness", "accuracy_per_arm", "relative_gain"):
        ticks = [t.get_text() for t in drawn[name].axes[0].get_xticklabels()]
        assert ticks == expected, name


def test_lr_robustness_names_each_learning_rate(drawn):
    labels = [t.get_text() for t in drawn["lr_robustness"].legends[0].get_texts()]
    assert labels[:2] == ["lr 0.01", "lr 0.03"]


def test_accuracy_per_arm_shows_the_probe_per_task(drawn):
    fig = drawn["accuracy_per_arm"]
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == list(TASKS)
    probe_lines = [[line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
                   for ax in fig.axes]
    assert probe_lines == [[55.0], [60.0], [65.0]]
    low, high = fig.axes[0].get_ylim()
    assert low > 40  # not a bar from 0: the arms' differences stay visible


def _depth_table(values: dict[str, float]) -> pd.DataFrame:
    """Two layers of each component at the given plasticity, 40 pairs of 12 images within one folder."""
    return pd.DataFrame([{"mode": "embedding", "component": c, "layer": layer, "depth_pct": 50.0 * (layer + 1),
                          "mean": value, "ci95": 0.0, "pairs": 40, "images": 12}
                         for c, value in values.items() for layer in (0, 1)])


def test_plasticity_vs_depth_goes_logarithmic_only_when_values_span_decades():
    """LayerNorms at 22 and 18 beside MHA at 0.05 span 2.6 decades: a linear axis would flatten MHA, FC1 and FC2
    to a line at zero. Values within two decades keep the linear axis."""
    spread = figures.plasticity_vs_depth.__wrapped__(_depth_table({"ln1": 17.9, "ln2": 22.1, "mha": 0.05,
                                                                   "fc1": 0.68, "fc2": 0.36}))
    assert spread.axes[0].get_yscale() == "log" and spread.axes[0].get_ylabel().endswith("log)")
    close = figures.plasticity_vs_depth.__wrapped__(_depth_table({"ln1": 1.0, "ln2": 1.2, "mha": 2.0, "fc1": 0.5,
                                                                  "fc2": 0.4}))
    assert close.axes[0].get_yscale() == "linear"
    assert close.axes[0].get_title() == "embedding mode\n40 pairs of 12 images (cycled)"
