"""The VTAB-1k study's rehearsal: config/vtab.yaml plus config/vtab-rehearsal.yaml, every kind of job, on CPU.

The slow test runs the VTAB workflow on all 19 tasks in their real shapes (a generated copy of the processed
layout with each task's class count, 224 px, ViT-B/16's 197 tokens of width 768, one block deep) through
preparation, plasticity, criteria, bounds, probes, one finetuning and one budget arm per task and the
aggregation, and fails if any job fails. The fast test checks the overlay.
"""

from __future__ import annotations

import copy
import subprocess

import pandas as pd
import pytest
import yaml
from conftest import planned_jobs
from rehearsal import environment
from vtab_rehearsal import VTAB_CONFIG, build, command, config

from vitplasticity.config import check_config
from vitplasticity.datasets.vtab1k import TASKS
from vitplasticity.prepared import read_meta

# Per task: plasticity, criteria, bounds, probe, MHA and the plasticity_embedding budget arm; 20 preparations
# (the 19 tasks and the ImageNet reference stream).
PLANNED = {"prepare_dataset": 20, "fetch_checkpoint": 1, "measure_plasticity": 19, "measure_criteria": 19,
           "compute_bounds": 19, "linear_probe": 19, "finetune": 19 * 2, "aggregate": 1, "figures": 1, "all": 1}
BUDGET_ARM = "plasticity_embedding_2.8pct"


def test_the_overlay_keeps_the_vtab_study_and_cuts_only_time():
    base, merged = yaml.safe_load(VTAB_CONFIG.read_text()), config()
    check_config(copy.deepcopy(merged))
    assert merged["models"]["vit_b16"] == base["models"]["vit_b16"] | {"kwargs": {"depth": 1}}
    vtab = {name: task for name, task in merged["tasks"].items() if task["data"]["source"] == "vtab1k"}
    assert sorted(task["data"]["vtab_task"] for task in vtab.values()) == sorted(TASKS)
    for name, task in vtab.items():  # the source, task and store size stay; the copy is the generated one
        assert task["data"] == base["tasks"][name]["data"] | {"path": "rehearsal/vtab-1k"}, name
        assert (task["steps"], task["eval_every"], task["lrs"]) == (1, 1, [0.01]), name
    assert merged["tasks"]["imagenet_val"]["data"] == base["tasks"]["imagenet_val"]["data"] | {
        "path": "rehearsal/imagenet_val.tar"}
    # The experiment keeps its 19 tasks and its budget arms; one arm, one budget, one selector.
    assert merged["experiments"]["vtab"] == base["experiments"]["vtab"] | {"arms": ["mha"]}
    assert merged["selection"] == base["selection"] | {"budgets": [0.028], "criteria": ["plasticity_embedding"]}
    assert merged["plasticity"] == base["plasticity"] | {"n_pairs": 8}
    assert merged["criteria"] == base["criteria"] | {"n_pairs": 8, "gradient_batches": 1, "gradient_batch_size": 2}
    assert merged["finetune"] == base["finetune"] | {"batch_size": 2, "warmup_steps": 0, "seeds": [0]}
    assert merged["runtime"]["fork_server"] is True and merged["tracking"]["enabled"] is False


def check_results(study) -> None:
    """What a finished VTAB rehearsal must hold: every task in its real shape and every table filled."""
    results = study / "results"
    for task, (_, classes) in TASKS.items():
        meta = read_meta(study / "data" / "prepared" / task)
        assert len(meta["classes"]) == classes and meta["image_size"] == 224, task
        assert meta["splits"] == {"train": 4, "val": 2, "test": 3}, task
    stats = yaml.safe_load((results / "plasticity" / "vit_b16" / "sun397" / "embedding.json").read_text())
    assert (stats["num_tokens"], stats["embed_dim"], stats["pairs"]) == (197, 768, 8)
    tables = results / "tables" / "vtab"
    runs = pd.read_csv(tables / "runs.csv")
    assert len(runs) == 19 * 2 and set(runs["status"]) == {"completed"}
    # At 2.8% of one block (198,460 parameters) only its two LayerNorms fit; the head (and the final norm,
    # 2 x 768) is trained outside the budget: 768 x classes + classes + 4,608 on every task.
    budget = runs[runs["arm"] == BUDGET_ARM].set_index("task")
    for task, (_, classes) in TASKS.items():
        assert budget.loc[task, "trainable_params"] == 769 * classes + 3 * 2 * 768, task
        units = yaml.safe_load((study / budget.loc[task, "run_dir"] / "metrics.json").read_text())["units"]
        assert units == "ln1.0 ln2.0", task
    vtab = pd.read_csv(tables / "vtab.csv").set_index("method")
    for method in ("MHA", BUDGET_ARM, "linear probe"):
        means = pd.to_numeric(vtab.loc[method, [*TASKS, "Natural", "Specialized", "Structured", "mean", "group_mean"]])
        assert means.notna().all(), method  # every task ran, so every group mean is there
    criteria = pd.read_csv(tables / "criteria.csv")
    average = criteria[criteria["task"] == "Average"].set_index("criterion")
    assert set(average["n_tasks"]) == {19} and "random" in average.index
    assert average["top1_low"].notna().all()  # one component arm: top-1 is defined, Spearman is not
    selection = pd.read_csv(tables / "selection.csv")
    assert sorted(selection["task"]) == sorted(TASKS) and set(selection["selector"]) == {"plasticity_embedding"}
    assert "| plasticity_embedding | 2.8 |" in (tables / "selection.md").read_text()
    assert (results / "figures" / "vtab" / "selection_vs_budget.png").stat().st_size > 0


@pytest.mark.slow
def test_vtab_rehearsal_runs_every_job(tmp_path):
    """137 jobs, each a fork of one interpreter: 382 s of CPU, ≈3.5 minutes on an idle 2-core CPU (docs/vtab.md)."""
    study = tmp_path / "study"
    build(study)
    dry = subprocess.run(command(study, "-n"), capture_output=True, text=True, timeout=300, env=environment(study))
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert planned_jobs(dry.stdout) == PLANNED
    run = subprocess.run(command(study, "--cores", "2", "--keep-going"), capture_output=True, text=True,
                         timeout=1800, env=environment(study))
    assert run.returncode == 0, run.stderr[-5000:]
    check_results(study)
