"""When does the ranking form: plasticity at the kept steps of a pretraining run (the pretraining trajectory).

The job is checked on checkpoints made here (two tiny ViTs standing for two steps of one run): its table
holds, per task and step, exactly what `plasticity.measure` gives on that checkpoint. The aggregation
is checked on a hand-made table, and the workflow on the smoke study, whose model keeps steps 15 and 30.
"""

import math

import pandas as pd
import pytest
import torch
from conftest import planned_jobs, smoke_config, snakemake, write_config

from vitplasticity import aggregate, jobs, models, plasticity
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.machine import Runtime
from vitplasticity.prepared import load_split
from vitplasticity.settings import build

ARCH = models.architecture("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}, 16)
NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
VAL_ACC = {10: 0.25, 20: 0.75}  # the source validation accuracy each checkpoint's record states
TASKS = ("novel", "sketch")
N_PAIRS = 12


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretraining run's checkpoints/ folder with steps 10 and 20, the reference and two task folders."""
    root = tmp_path_factory.mktemp("trajectory")
    for name, kind in (("source", "source"), *((task, task) for task in TASKS)):
        data = {"source": "synthetic", "kind": kind, "image_size": 16, "n_train": 8, "n_val": 8, "n_test": 10,
                "seed": 0}
        prepare_task(name, data, root / "prepared" / name, None)
    for step, seed in ((10, 0), (20, 1)):
        torch.manual_seed(seed)
        model = models.build(ARCH, num_classes=5)
        record = {"arch": ARCH, "img_size": 16, **NORM,
                  "provenance": {"kind": "pretrain", "task": "source", "step": step, "val_acc": VAL_ACC[step]}}
        models.save_checkpoint(root / "checkpoints" / f"step_{step}.safetensors", model, record)
    return root


@pytest.fixture(scope="module")
def measured(run):
    settings = {"model": "vit", "tasks": list(TASKS), "keep_steps": [20, 10], "n_pairs": N_PAIRS}
    out = run / "trajectory" / "trajectory.csv"
    returned = jobs.measure_trajectory(build("trajectory", settings), Runtime(plasticity_batch=5), run / "checkpoints",
                                       run / "prepared" / "source", [run / "prepared" / t for t in TASKS], out)
    return returned, pd.read_csv(out)


def test_one_row_per_task_step_mode_component_and_layer(measured):
    _, table = measured
    assert len(table) == len(TASKS) * 2 * len(plasticity.MODES) * 5 * 2  # tasks x steps x modes x components x layers
    assert not table.duplicated(["task", "step", "mode", "component", "layer"]).any()
    assert set(table["model"]) == {"vit"} and set(table["task"]) == set(TASKS)
    assert sorted(table["step"].unique()) == [10, 20] and set(table["mode"]) == set(plasticity.MODES)
    assert table.groupby("step")["source_val_acc"].unique().map(list).to_dict() == {10: [0.25], 20: [0.75]}
    assert (table["pairs"] == N_PAIRS).all()


@pytest.mark.parametrize("step", [10, 20])
def test_values_are_plasticity_measure_on_that_checkpoint(run, measured, step):
    returned, table = measured
    model, record = models.load_checkpoint(run / "checkpoints" / f"step_{step}.safetensors", num_classes=0)
    reference = load_split(run / "prepared" / "source", "test")
    for task in TASKS:
        expected, stats = plasticity.measure(model, reference, load_split(run / "prepared" / task, "test"), N_PAIRS, 5,
                                             16, torch.device("cpu"), plasticity.MODES, tuple(NORM["mean"]),
                                             tuple(NORM["std"]), progress=lambda _: None)
        got = table[(table["step"] == step) & (table["task"] == task)]
        for stream in ("reference", "downstream"):
            assert got[f"{stream}_token_norm"].to_numpy() == pytest.approx(stats[f"{stream}_mean_token_norm"])
        got = got.drop(columns=["model", "task", "step", "source_val_acc", "reference_token_norm",
                                "downstream_token_norm"])
        keys = ["mode", "component", "layer"]
        merged = expected.merge(got, on=keys, suffixes=("", "_job"))
        assert len(merged) == len(expected) == len(got) == len(plasticity.MODES) * 5 * 2
        for column in ("mean", "std", "ci95"):
            assert merged[column].to_numpy() == pytest.approx(merged[f"{column}_job"].to_numpy(), rel=1e-9)
    assert len(returned) == len(table)


def test_the_two_checkpoints_differ(measured):
    """The steps are measured on their own weights, not on one checkpoint twice."""
    _, table = measured
    wide = table.pivot_table(index=["task", "mode", "component", "layer"], columns="step", values="mean")
    assert (wide[10] != wide[20]).all()


def test_aggregation_averages_layers_ranks_components_and_keeps_the_experiment_tasks():
    """By hand: plasticity = mean over layers; rank 1 = most plastic at that step (ties share the better rank,
    listed in the theoretical order); accuracy in %."""
    rows = []
    values = {10: {"mha": (1.0, 3.0), "fc1": (4.0, 4.0), "fc2": (0.5, 0.5), "ln1": (2.0, 2.0), "ln2": (2.0, 2.0)},
              20: {"mha": (5.0, 7.0), "fc1": (4.0, 4.0), "fc2": (0.5, 1.5), "ln1": (1.0, 1.0), "ln2": (3.0, 1.0)}}
    for task in ("novel", "other"):
        for step, components in values.items():
            for component, layers in components.items():
                for layer, value in enumerate(layers):
                    rows.append({"model": "vit", "task": task, "step": step, "source_val_acc": VAL_ACC[step],
                                 "downstream_token_norm": step / 10, "mode": "embedding", "component": component,
                                 "layer": layer, "mean": value})
    table = aggregate.trajectory_table(pd.DataFrame(rows), tasks=["novel"])
    assert list(table.columns) == ["task", "mode", "step", "source_val_acc", "token_norm", "component", "plasticity",
                                   "rank"]
    assert set(table["task"]) == {"novel"}
    ranked = {step: list(zip(part["component"], part["plasticity"], part["rank"], strict=True))
              for step, part in table.groupby("step")}
    assert ranked == {10: [("fc1", 4.0, 1), ("mha", 2.0, 2), ("ln2", 2.0, 2), ("ln1", 2.0, 2), ("fc2", 0.5, 5)],
                      20: [("mha", 6.0, 1), ("fc1", 4.0, 2), ("ln2", 2.0, 3), ("fc2", 1.0, 4), ("ln1", 1.0, 4)]}
    assert table.groupby("step")["source_val_acc"].first().to_dict() == {10: 25.0, 20: 75.0}
    assert table.groupby("step")["token_norm"].first().to_dict() == {10: 1.0, 20: 2.0}


def test_tables_show_the_order_at_each_step(tmp_path):
    """trajectory.md: per mode and step, mean over tasks: source accuracy, token norm of E (downstream images),
    each component's plasticity and their order."""
    rows = [{"model": "vit", "task": task, "step": step, "source_val_acc": VAL_ACC[step], "mode": "hidden",
             "downstream_token_norm": 4.0 if task == "a" else 6.0, "component": component, "layer": 0,
             "mean": value * (1 if task == "a" else 3)}
            for task in ("a", "b") for step in (10, 20)
            for component, value in zip(("mha", "fc1", "fc2", "ln2", "ln1"),
                                        (1, 2, 3, 4, 5) if step == 10 else (5, 4, 3, 2, 1), strict=True)]
    source = tmp_path / "trajectory.csv"
    pd.DataFrame(rows).to_csv(source, index=False)
    runs = tmp_path / "runs" / "metrics.json"
    runs.parent.mkdir()
    runs.write_text('{"status": "completed", "test_acc": 0.5}')
    (runs.parent / "config.yaml").write_text("settings: {model: vit, task: a, optimizer: sgd, arm: mha, lr: 0.1, "
                                             "seed: 0}\n")
    tables = aggregate.aggregate(["mha"], [runs], [], [], [], tmp_path / "out", trajectory_files=[source],
                                 tasks=["a", "b"])
    assert len(tables["trajectory"]) == 2 * 2 * 5
    lines = (tmp_path / "out" / "trajectory.md").read_text().splitlines()
    assert lines[0] == ("| mode | step | source val. accuracy (%) | token norm of E | MHA (ratio) | FC1 (ratio) | "
                        "FC2 (ratio) | LN2 (ratio) | LN1 (ratio) | order (most plastic first) |")
    assert lines[2:] == ["| hidden | 10 | 25 | 5 | 2 | 4 | 6 | 8 | 10 | LN1 > LN2 > FC2 > FC1 > MHA |",
                         "| hidden | 20 | 75 | 5 | 10 | 8 | 6 | 4 | 2 | MHA > FC1 > FC2 > LN2 > LN1 |"]
    assert "<td>LN1 &gt; LN2 &gt; FC2 &gt; FC1 &gt; MHA</td>" in (tmp_path / "out" / "trajectory.html").read_text()


def test_an_experiment_without_a_trajectory_says_so(tmp_path):
    runs = tmp_path / "runs" / "metrics.json"
    runs.parent.mkdir()
    runs.write_text('{"status": "completed", "test_acc": 0.5}')
    (runs.parent / "config.yaml").write_text("settings: {model: vit, task: a, optimizer: sgd, arm: mha, lr: 0.1, "
                                             "seed: 0}\n")
    aggregate.aggregate(["mha"], [runs], [], [], [], tmp_path / "out")
    assert (tmp_path / "out" / "trajectory.csv").read_text().strip() == ""
    assert (tmp_path / "out" / "trajectory.md").read_text() == (
        "No pretraining trajectory in this experiment (its model keeps no steps).\n")


@pytest.mark.slow
def test_the_smoke_study_measures_its_kept_steps(smoke_run):
    table = pd.read_csv(smoke_run / "results" / "tables" / "main" / "trajectory.csv")
    assert sorted(table["step"].unique()) == [15, 30] and set(table["task"]) == {"novel", "sketch"}
    assert len(table) == 2 * 2 * len(plasticity.MODES) * 5  # tasks x steps x modes x components
    history = pd.read_csv(smoke_run / "results" / "pretrain" / "vit_smoke" / "history.csv").set_index("step")
    accuracy = table.groupby("step")["source_val_acc"].first()
    assert [accuracy[s] for s in (15, 30)] == pytest.approx([100 * history.loc[s, "val_acc"] for s in (15, 30)])
    kept = sorted(p.name for p in (smoke_run / "results" / "pretrain" / "vit_smoke" / "checkpoints").glob("*.json"))
    assert kept == ["step_15.json", "step_30.json"]
    assert not math.isnan(table["plasticity"].sum())


@pytest.mark.slow
def test_changing_the_kept_steps_reruns_only_the_trajectory_and_the_tables(smoke_copy, tmp_path):
    """Not pretraining, so no finetuning run either: every evaluation's weights are already kept."""
    config = smoke_config()
    config["models"]["vit_smoke"]["pretrain"]["keep_steps"] = [15]
    result = snakemake(smoke_copy, "-n", config=write_config(tmp_path / "fewer.yaml", config))
    plan = planned_jobs(result.stdout + result.stderr)
    assert plan == {"measure_trajectory": 1, "aggregate": 1, "figures": 1, "all": 1}, result.stdout + result.stderr
    config["models"]["vit_smoke"]["pretrain"]["keep_steps"] = []
    result = snakemake(smoke_copy, "-n", config=write_config(tmp_path / "none.yaml", config))
    assert planned_jobs(result.stdout + result.stderr) == {"aggregate": 1, "figures": 1, "all": 1}, result.stdout
