# Helpers shared by the workflow: config checks, target lists and per-job settings.
import json
import os
import sys

from snakemake.utils import validate

from vitplasticity.config import check_config
from vitplasticity.errors import UserError

try:
    check_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except UserError as error:
    print(f"vitplasticity config error: {error}", file=sys.stderr)
    sys.exit(1)
validate(config, schema="../schemas/config.schema.yaml", set_default=True)

# Jobs run the `vitplasticity` command of the environment that runs this workflow.
os.environ["PATH"] = (
    f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
)
EXPERIMENTS = config["experiments"]
MODELS = config["models"]
TASKS = config["tasks"]
ARMS = config["arms"]
REFERENCE = config["plasticity"]["reference_task"]
TRACKING = config.get("tracking", {"enabled": True, "uri": None})
RUNTIME = config.get("runtime", {})
FIGURES = [
    "plasticity_vs_rank",
    "plasticity_vs_depth",
    "bounds_vs_depth",
    "relative_gain",
    "accuracy_per_arm",
    "lr_robustness",
    "training_curves",
]
TABLES = [
    "main_table",
    "relative_gain",
    "lr_gap",
    "stat_tests",
    "separation",
    "plasticity_rank",
    "plasticity",
    "bounds",
    "runs",
]


def _alternatives(names):
    """A wildcard regex matching exactly these names."""
    return "|".join(sorted(names)) or "(?!)"


def fmt_lr(lr):
    """The lr as it appears in paths: shortest round-trip form (0.01, 1e-05)."""
    return f"{lr:g}"


def experiment_lrs(experiment, task):
    scale = experiment.get("lr_scale", 1.0)
    return [fmt_lr(lr * scale) for lr in TASKS[task]["lrs"]]


def experiment_arms(experiment):
    return experiment.get("arms", list(ARMS))


def get_experiment_runs(wildcards):
    """metrics.json of every finetuning run of an experiment."""
    exp = EXPERIMENTS[wildcards.experiment]
    return [
        f"results/runs/{exp['model']}/{task}/{exp.get('optimizer', 'sgd')}/{arm}/lr{lr}_seed{seed}/metrics.json"
        for task in exp["tasks"]
        for arm in experiment_arms(exp)
        for lr in experiment_lrs(exp, task)
        for seed in config["finetune"]["seeds"]
    ]


def get_experiment_probes(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    if not exp.get("probe", True):
        return []
    return [
        f"results/probes/{exp['model']}/{task}/metrics.json" for task in exp["tasks"]
    ]


def get_experiment_plasticity(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return [
        f"results/plasticity/{exp['model']}/{task}/plasticity.csv"
        for task in exp["tasks"]
    ]


def get_experiment_bounds(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    return [f"results/bounds/{exp['model']}/{task}/bounds.csv" for task in exp["tasks"]]


def get_all_targets():
    targets = []
    for name in EXPERIMENTS:
        targets += expand(
            "results/tables/{experiment}/{table}.csv", experiment=name, table=TABLES
        )
        targets += expand(
            "results/figures/{experiment}/{figure}.png", experiment=name, figure=FIGURES
        )
        if EXPERIMENTS[name].get("compare_to_paper", False):
            targets.append(f"results/tables/{name}/paper_comparison.csv")
    return targets


def get_prepare_settings(wildcards):
    return json.dumps(
        {"name": wildcards.task, "data": TASKS[wildcards.task]["data"]}, sort_keys=True
    )


def get_raw_dir(wildcards):
    """Downloads are shared by tasks of one source (five CIFAR-10-C tasks, one archive)."""
    return f"data/raw/{TASKS[wildcards.task]['data']['source']}"


def get_checkpoint(wildcards):
    return f"data/checkpoints/{wildcards.model}.safetensors"


def get_pretrain_settings(wildcards):
    model = MODELS[wildcards.model]
    settings = {
        "clip_norm": config["finetune"].get("clip_norm", 1.0),
        "betas": [0.9, 0.999],
    }
    settings.update(model["pretrain"])
    settings.update(
        model=wildcards.model,
        timm_name=model["timm_name"],
        kwargs=model.get("kwargs", {}),
        img_size=model["img_size"],
    )
    return json.dumps(settings, sort_keys=True)


def get_pretrain_task(wildcards):
    return f"data/prepared/{MODELS[wildcards.model]['pretrain']['task']}"


def get_local_weights(wildcards):
    """A local model's weights file: an input, so that replacing it remakes the checkpoint."""
    model = MODELS[wildcards.model]
    return [model["path"]] if model["source"] == "local" else []


def get_fetch_settings(wildcards):
    model = MODELS[wildcards.model]
    return json.dumps(dict(model, model=wildcards.model), sort_keys=True)


def get_finetune_settings(wildcards):
    task = TASKS[wildcards.task]
    settings = dict(config["finetune"])
    settings.pop("seeds")
    settings.update(
        model=wildcards.model,
        task=wildcards.task,
        optimizer=wildcards.optimizer,
        arm=wildcards.arm,
        components=ARMS[wildcards.arm],
        lr=float(wildcards.lr),
        seed=int(wildcards.seed),
        steps=task["steps"],
        eval_every=task["eval_every"],
    )
    return json.dumps(settings, sort_keys=True)


def get_plasticity_settings(wildcards):
    settings = dict(config["plasticity"], model=wildcards.model, task=wildcards.task)
    return json.dumps(settings, sort_keys=True)


def get_probe_settings(wildcards):
    settings = dict(
        config.get("probe", {"max_iter": 5000}),
        model=wildcards.model,
        task=wildcards.task,
    )
    return json.dumps(settings, sort_keys=True)


def get_runtime():
    return json.dumps(RUNTIME, sort_keys=True)


def get_aggregate_settings(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    arms = {arm: ARMS[arm] for arm in experiment_arms(exp)}
    # The arms' order in the config, which every table and figure keeps (keys get sorted).
    return json.dumps(
        dict(exp, experiment=wildcards.experiment, arms=arms, arm_order=list(arms)),
        sort_keys=True,
    )


def get_tables_dir(wildcards):
    return f"results/tables/{wildcards.experiment}"


def get_figures_dir(wildcards):
    return f"results/figures/{wildcards.experiment}"


def get_finetune_runtime_minutes(wildcards):
    """SLURM time limit from the job's steps: a generous 0.5 s per step plus 10 minutes."""
    return 10 + TASKS[wildcards.task]["steps"] // 120


def get_tracking_uri():
    """config tracking.uri, else MLFLOW_TRACKING_URI; empty means the SQLite store in results/
    (resolved by the command, so the param does not change when the study folder moves).
    """
    return TRACKING.get("uri") or os.environ.get("MLFLOW_TRACKING_URI") or ""


TRACKING_REQUEST = {
    "uri": get_tracking_uri(),
    "experiment": config["study"],
    "enabled": TRACKING.get("enabled", True),
}


def warn_if_tracking_store_outdated(path="results/tracking.json"):
    """Jobs take the record as ancient(); when make_tracking_store must re-make it, Snakemake
    (9.x) schedules only that rule and leaves other pending jobs to the next invocation. Say so.
    """
    if not os.path.exists(path):
        return
    try:
        with open(path) as handle:
            recorded = json.load(handle).get("requested")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != TRACKING_REQUEST:
        print(
            f"vitplasticity: the tracking settings changed since {path} was written; "
            "this invocation re-creates it and runs no other job: run snakemake again "
            "for the rest",
            file=sys.stderr,
        )


warn_if_tracking_store_outdated()


# Every tracked job reads the store description (URI and experiment id) from this file,
# so tracking settings never enter job params; ancient(): recreating it (after `dvc pull`,
# or with another URI) reruns no finished job.
TRACKING_STORE = ancient("results/tracking.json")


def tracking_params(rule_name):
    """A params function giving a job's --tracking JSON: the store file, its parent run and tags."""

    def get_tracking(wildcards):
        names = dict(wildcards.items())
        parent = None
        if {"model", "task", "optimizer"} <= names.keys():
            parent = f"{names['model']}/{names['task']}/{names['optimizer']}"
        tags = {
            "rule": rule_name,
            "wildcards": json.dumps(names, sort_keys=True),
            "study": config["study"],
        }
        return json.dumps(
            {"store": "results/tracking.json", "parent": parent, "tags": tags},
            sort_keys=True,
        )

    return get_tracking
