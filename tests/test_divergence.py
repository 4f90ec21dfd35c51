"""Divergence: a NaN loss ends that run as `diverged` (metrics.json, MLflow, tables, figures) and the
study goes on."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import snakemake, write_config
from jobkit import CKPT, FINETUNE, RUNTIME, SMOKE, TASK

from vitplasticity import figures, jobs, tracking
from vitplasticity.machine import Tracking
from vitplasticity.settings import build, params

pytestmark = pytest.mark.reliability


def test_divergence_is_recorded_in_metrics_json_and_mlflow(kit, tmp_path, monkeypatch, capsys):
    secret = "hf_" + "Zq8x" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = Tracking(enabled=True, uri=uri, experiment="reliability")
    tracking.prepare_study(track, ["vit/novel/sgd"], tmp_path / "results")  # as the workflow's onstart does
    run_dir = tmp_path / "run"

    settings = build("finetune", {**FINETUNE, "lr": 1e30})
    with tracking.live(track, run_dir, "finetune", params(settings)) as on_eval:  # as the command line runs the job
        metrics = jobs.finetune(settings, RUNTIME, kit / TASK, kit / CKPT, run_dir, on_eval=on_eval)

    expected = {"status": "diverged", "diverged_step": 2, "steps_done": 2, "test_acc": None, "test_loss": None,
                "best_val_acc": None, "best_step": None}  # it diverged before its first evaluation
    assert {k: metrics[k] for k in expected} == expected
    assert {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if k in expected} == expected
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["step"]) == [1, 2] and np.isnan(history["loss"].iloc[-1])
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "history.csv", "metrics.json",
                                                         "mlflow_run.json", "record.json"]  # no state.pt left

    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["status"] == "diverged" and run.data.metrics["diverged_step"] == 2
    assert "test_acc" not in run.data.metrics

    # No credential from the environment reaches the run folder, the log or MLflow.
    seen = [capsys.readouterr().err, *(p.read_text() for p in run_dir.iterdir()),
            json.dumps(run.data.params), json.dumps(run.data.tags)]
    assert not any(secret in text for text in seen)


@pytest.mark.slow
def test_a_diverging_learning_rate_is_shown_as_such_and_the_study_goes_on(settled_copy, tmp_path, monkeypatch):
    config = copy.deepcopy(SMOKE)
    config["tasks"]["novel"]["lrs"] = [0.01, 0.03, 1e30]
    diverging = tmp_path / "diverging.yaml"
    write_config(diverging, config)
    kept = settled_copy / "results/runs/vit_smoke/novel/sgd/mha/lr0.01_seed0/metrics.json"
    kept_mtime = kept.stat().st_mtime_ns
    figure = settled_copy / "results/figures/main/lr_robustness.png"
    figure_mtime = figure.stat().st_mtime_ns

    snakemake(settled_copy, "--cores", "2", config=diverging)  # exit 0: the study goes on

    arms = sorted(SMOKE["arms"])
    for arm in arms:
        run = settled_copy / f"results/runs/vit_smoke/novel/sgd/{arm}/lr1e+30_seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["status"], metrics["diverged_step"], metrics["test_acc"]) == ("diverged", 2, None), arm
        assert not (run / "state.pt").exists()
    assert kept.stat().st_mtime_ns == kept_mtime  # the other runs were not redone

    tables = settled_copy / "results/tables/main"
    runs = pd.read_csv(tables / "runs.csv")
    diverged = runs[runs["lr"] == 1e30]
    assert sorted(diverged["arm"]) == arms and set(diverged["status"]) == {"diverged"}
    assert set(diverged["diverged_step"]) == {2} and diverged["test_acc"].isna().all()
    assert set(runs[runs["lr"] != 1e30]["status"]) == {"completed"}
    main = pd.read_csv(tables / "main_table.csv")
    assert dict(zip(main["task"] + "/" + main["arm"], main["diverged_runs"], strict=True)) == {
        f"{task}/{arm}": int(task == "novel") for task in ("novel", "sketch") for arm in arms}
    assert main["best_lr"].isin([0.01, 0.03]).all()  # a diverged lr is never the best one
    novel_row = next(line for line in (tables / "main_table.md").read_text().splitlines()
                     if line.startswith("| novel |"))
    assert novel_row.count("(1 diverged)") == len(arms)
    assert figure.stat().st_mtime_ns > figure_mtime

    # The figures name the diverged runs, and draw an arm whose every run diverged without failing.
    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, name: drawn.append((name, fig)))
    figures.lr_robustness(runs, tmp_path)
    axes = {ax.get_title(): ax for ax in drawn[-1][1].axes}
    assert "novel (5 diverged runs not drawn)" in axes and "sketch" in axes
    assert "MHA\n(1 diverged)" in [t.get_text() for t in axes["novel (5 diverged runs not drawn)"].get_xticklabels()]

    monkeypatch.undo()
    monkeypatch.chdir(settled_copy)  # runs.csv names run folders relative to the study
    broken = tmp_path / "tables"
    shutil.copytree(tables, broken)
    all_ln1 = runs["arm"] == "ln1"
    runs.loc[all_ln1, ["status", "test_acc"]] = ["diverged", np.nan]
    runs.to_csv(broken / "runs.csv", index=False)
    main.loc[main["arm"] == "ln1", ["best_lr", "mean", "std", "diverged_runs"]] = [np.nan, np.nan, np.nan, 3]
    main.to_csv(broken / "main_table.csv", index=False)
    figures.make_figures(broken, tmp_path / "figures")
    for name in ("accuracy_per_arm", "lr_robustness", "training_curves", "relative_gain"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 1000

