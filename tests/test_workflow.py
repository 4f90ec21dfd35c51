"""The workflow end to end: the smoke study, reruns, config errors, the paper's DAG."""

import shutil

import pandas as pd
import psutil
import pytest
from conftest import ROOT, planned_jobs, smoke_config, snakemake, write_config
from jobkit import comparable

from vitplasticity.registry import FIGURES


@pytest.mark.slow
def test_smoke_study_writes_every_table_and_figure(smoke_run):
    tables = smoke_run / "results" / "tables" / "main"
    main = pd.read_csv(tables / "main_table.csv")
    assert set(main["task"]) == {"novel", "sketch"}
    assert set(main["arm"]) == {"all", "mha", "ln1", "smooth", "non_smooth"}
    assert main["best_lr"].isin([0.01, 0.03]).all()
    runs = pd.read_csv(tables / "runs.csv")
    assert len(runs) == 2 * 5 * 2 * 1
    plasticity = pd.read_csv(tables / "plasticity.csv")
    assert set(plasticity["mode"]) == {"embedding", "hidden"}
    assert len(plasticity) == 2 * 2 * 5 * 2  # tasks x modes x components x layers
    assert "Average" in (tables / "main_table.md").read_text()
    for figure in FIGURES:
        for suffix in ("png", "pdf"):
            assert (smoke_run / "results" / "figures" / "main" / f"{figure}.{suffix}").stat().st_size > 1000


@pytest.mark.slow
def test_second_invocation_has_nothing_to_do(smoke_run):
    result = snakemake(smoke_run, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_changing_one_learning_rate_reruns_only_its_jobs_and_the_aggregation(smoke_copy, tmp_path):
    config = smoke_config()
    config["tasks"]["novel"]["lrs"] = [0.01, 0.05]
    changed = write_config(tmp_path / "changed.yaml", config)
    result = snakemake(smoke_copy, "-n", config=changed)
    jobs = planned_jobs(result.stdout + result.stderr)
    assert jobs, result.stdout + result.stderr
    arms, seeds = len(config["arms"]), len(config["finetune"]["seeds"])
    assert jobs == {"finetune": arms * seeds, "aggregate": 1, "figures": 1, "all": 1}
    assert "lr0.05_seed0" in result.stdout + result.stderr


@pytest.mark.slow
def test_adding_a_task_plans_its_jobs_in_one_invocation(smoke_copy, tmp_path):
    config = smoke_config()
    config["tasks"]["noise"] = {**config["tasks"]["novel"], "data": {**config["tasks"]["source"]["data"],
                                                                     "kind": "corrupt", "corruption": "gaussian_noise"}}
    config["experiments"]["main"]["tasks"].append("noise")
    changed = write_config(tmp_path / "changed.yaml", config)
    result = snakemake(smoke_copy, "-n", config=changed)
    arms, lrs, seeds = len(config["arms"]), len(config["tasks"]["noise"]["lrs"]), len(config["finetune"]["seeds"])
    assert planned_jobs(result.stdout + result.stderr) == {
        "prepare_dataset": 1, "finetune": arms * lrs * seeds, "linear_probe": 1, "measure_plasticity": 1,
        "compute_bounds": 1, "measure_trajectory": 1, "aggregate": 1, "figures": 1, "all": 1
    }, result.stdout + result.stderr


@pytest.mark.slow
def test_a_changed_subset_reruns_only_that_tasks_jobs(smoke_copy, tmp_path):
    """The subset is part of the task's data settings, so of its preparation's params: a new subset of `novel`
    (50 // 5 classes = 10 images a class) replans that preparation and everything that reads it, not `sketch`'s."""
    config = smoke_config()
    config["tasks"]["novel"]["data"]["subset"] = {"images": 50, "seed": 42}
    changed = write_config(tmp_path / "changed.yaml", config)
    result = snakemake(smoke_copy, "-n", config=changed)
    output = result.stdout + result.stderr
    arms, lrs, seeds = len(config["arms"]), len(config["tasks"]["novel"]["lrs"]), len(config["finetune"]["seeds"])
    assert planned_jobs(output) == {
        "prepare_dataset": 1, "finetune": arms * lrs * seeds, "linear_probe": 1, "measure_plasticity": 1,
        "compute_bounds": 1, "measure_trajectory": 1, "aggregate": 1, "figures": 1, "all": 1
    }, output
    # Every job that names a task names novel (the trajectory and aggregation name none; they read both tasks).
    assert "output: data/prepared/novel" in output and "task=novel" in output and "task=sketch" not in output


# Every machine setting of a study config (docs/configuration.md: "What reruns after which change"): each key of
# `runtime`, `tracking`, the study name, and the profile's threads.
MACHINE_CHANGES = {
    "runtime.device": ("runtime", "device", "cpu"),
    "runtime.micro_batch": ("runtime", "micro_batch", 8),
    "runtime.eval_batch": ("runtime", "eval_batch", 32),
    "runtime.compile": ("runtime", "compile", True),
    "runtime.plasticity_batch": ("runtime", "plasticity_batch", 16),
    "runtime.prefetch": ("runtime", "prefetch", 0),
    "runtime.fork_server": ("runtime", "fork_server", True),
    "tracking.enabled": ("tracking", "enabled", True),
    "tracking.uri": ("tracking", "uri", "sqlite:////elsewhere/mlflow.db"),
    "tracking.live": ("tracking", "live", False),
}


@pytest.mark.slow
def test_changing_a_machine_setting_reruns_nothing(smoke_run, tmp_path):
    for name, (section, key, value) in MACHINE_CHANGES.items():
        config = smoke_config()
        config[section][key] = value
        changed = write_config(tmp_path / f"{name}.yaml", config)
        result = snakemake(smoke_run, "-n", config=changed)
        assert "Nothing to be done" in result.stdout, (name, result.stdout + result.stderr)
    config = smoke_config()
    config["study"] = "renamed"
    result = snakemake(smoke_run, "-n", config=write_config(tmp_path / "study.yaml", config))
    assert "Nothing to be done" in result.stdout, result.stdout + result.stderr
    result = snakemake(smoke_run, "-n", "--set-threads", "finetune=2", "measure_plasticity=2", "pretrain_checkpoint=1")
    assert "Nothing to be done" in result.stdout, result.stdout + result.stderr
    assert not (smoke_run / "results" / "mlflow.db").exists()  # a dry run creates no store


@pytest.mark.slow
def test_jobs_forked_from_the_fork_server_write_what_fresh_interpreters_wrote(smoke_copy, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"  # the server's socket folder goes here: this run's server, no other
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    results = smoke_copy / "results"
    run = next((results / "runs").rglob("metrics.json")).parent
    plasticity = next((results / "plasticity").rglob("plasticity.csv"))
    before = {path: path.read_bytes() for path in (run / "history.csv", run / "config.yaml", plasticity)}
    metrics = comparable(run / "metrics.json")
    shutil.rmtree(run)
    plasticity.unlink()
    config = smoke_config()
    config["runtime"]["fork_server"] = True
    targets = [str((run / "metrics.json").relative_to(smoke_copy)), str(plasticity.relative_to(smoke_copy))]
    snakemake(smoke_copy, "--cores", "2", *targets, config=write_config(tmp_path / "forked.yaml", config))
    assert {path: path.read_bytes() for path in before} == before
    assert comparable(run / "metrics.json") == metrics
    # The job's own process only relayed: torch was imported in the server, not in it.
    benchmark = results / "benchmarks" / "finetune" / f"{run.relative_to(results / 'runs')}.tsv"
    assert pd.read_csv(benchmark, sep="\t")["max_rss"].iloc[0] < 200  # MB; a job that imports torch: 400+
    # The server ended with the run and removed its folder.
    assert list(scratch.iterdir()) == []
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(scratch) in " ".join(p.info["cmdline"] or [])]


@pytest.mark.slow
def test_switching_tracking_on_says_how_to_fill_the_experiment(smoke_copy, tmp_path):
    config = smoke_config()
    config["tracking"]["enabled"] = True
    result = snakemake(smoke_copy, "-n", config=write_config(tmp_path / "tracked.yaml", config))
    assert "Nothing to be done" in result.stdout
    assert ("vitplasticity: 28 job records are not in MLflow experiment 'smoke' yet; snakemake mirrors "
            "them before it runs any job, or now: vitplasticity tracking rebuild --experiment smoke"
            ) in result.stderr.splitlines()


@pytest.mark.slow
def test_a_changed_table_reruns_only_the_figures(smoke_copy):
    runs = smoke_copy / "results" / "tables" / "main" / "runs.csv"
    runs.write_text(runs.read_text() + "\n")
    result = snakemake(smoke_copy, "-n")
    assert planned_jobs(result.stdout + result.stderr) == {"figures": 1, "all": 1}, result.stdout + result.stderr


def test_bad_config_fails_before_any_job_with_one_line(tmp_path):
    config = smoke_config()
    config["arms"]["mha"] = ["attention"]
    bad = write_config(tmp_path / "bad.yaml", config)
    result = snakemake(tmp_path, "-n", config=bad, check=False)
    assert result.returncode != 0
    line = [x for x in result.stderr.splitlines() if "config error" in x]
    assert line == [
        "vitplasticity config error: config key 'arms.mha.0': 'attention' is not allowed; "
        "allowed values: emb, ln1, mha, ln2, fc1, fc2"
    ]
    assert not (tmp_path / "results").exists()


def test_paper_dag_plans_every_job(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    result = snakemake(tmp_path, "-n", config=ROOT / "config" / "config.yaml", timeout=120)
    jobs = planned_jobs(result.stdout)
    # main 11 tasks x 4 lrs x 3 seeds x (9 arms + 5 controls) + AdamW 4 x 4 x 3 x (9 + rank-8 LoRA)
    # + model size 2 x 1 x 4 x 3 x 9 + low data 4 x 4 x 3 x 6 + MHA+FC1 2 x 4 x 3 (its other arms are main's runs)
    # + budget 4 tasks x 4 lrs x 3 seeds x 2 budgets x (7 selectors + 3 random draws) (its component arms are main's)
    assert jobs["finetune"] == 1188 + 660 + 480 + 216 + 288 + 24 + 960
    assert jobs["prepare_dataset"] == 16  # 11 tasks + 4 low-data subsets + ImageNet val
    assert jobs["fetch_checkpoint"] == 3
    assert jobs["measure_plasticity"] == 17 and jobs["compute_bounds"] == 17 and jobs["measure_criteria"] == 17
    assert jobs["linear_probe"] == 17
    assert jobs["aggregate"] == 7 and jobs["figures"] == 7
    for run in ("results/runs/vit_b16/cifar100_low/sgd/fc2/lr0.03_seed3407/metrics.json",
                "results/runs/vit_b16/clipart/sgd/mha_fc1/lr0.06_seed42/metrics.json",
                "results/runs/vit_b16/motion_blur/adamw/mha_lora8/lr1e-05_seed0/metrics.json"):
        assert run in result.stdout
    assert "results/runs/vit_b16/cifar100_low/sgd/emb/" not in result.stdout
    assert "measure_trajectory" not in jobs  # fetched checkpoints have no pretraining trajectory


def planned_finetune_runs(output: str) -> dict[str, list[str]]:
    """Run folder (results/runs/… without metrics.json) → the inputs of each finetune job a dry run plans."""
    runs = {}
    for block in output.split("rule finetune:")[1:]:
        fields = dict(line.strip().split(": ", 1) for line in block.splitlines()[1:5] if ": " in line)
        metrics = next(path for path in fields["output"].split(", ") if path.endswith("metrics.json"))
        runs[metrics.removesuffix("/metrics.json")] = fields["input"].split(", ")
    return runs


def test_quick_study_plans_each_selection_arm_on_its_tasks_lrs_and_seeds(tmp_path):
    result = snakemake(tmp_path, "-n", config=ROOT / "config" / "quick.yaml", timeout=120)
    runs = planned_finetune_runs(result.stdout)
    scored = ["plasticity_embedding", "relative_gradient_norm", "fisher", "kappatune"]
    arms = [f"{name}_8.5pct" for name in (*scored, "last_k")] + ["random_8.5pct_draw0", "random_8.5pct_draw1"]
    expected = {f"results/runs/vit_quick/{task}/sgd/{arm}/lr{lr}_seed{seed}"
                for task, lr in (("shapes_novel", "0.03"), ("shapes_sketch", "0.1"))
                for arm in arms for seed in (0, 1, 2)}
    selection = {run for run in runs if "pct" in run}
    assert selection == expected  # 7 arms x 2 tasks x 1 lr x 3 seeds; none on shapes_noise (main only)
    assert len(runs) == 99 + 42  # the main experiment's runs, shared with the budget experiment's component arms
    for run in selection:
        task = run.split("/")[3]
        criteria = f"results/criteria/vit_quick/{task}/criteria.csv"
        assert (criteria in runs[run]) == any(f"/{name}_8.5pct/" in run for name in scored), run
