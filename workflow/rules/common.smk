# Helpers shared by the workflow: the config, target lists and per-job settings.
#
# Science reaches jobs as params (rerun triggers); machine settings (runtime, tracking, study)
# reach them through the environment variable MACHINE_ENV, which Snakemake does not record.
import json
import os
import re
import sys

from vitplasticity import budget, registry
from vitplasticity.settings import for_job
from vitplasticity.config import check_config
from vitplasticity.errors import UserError
from vitplasticity.machine import MACHINE_ENV, machine

try:
    # Validated once; every default the schema declares is filled in here.
    check_config(config)
except UserError as error:
    print(f"vitplasticity config error: {error}", file=sys.stderr)
    sys.exit(1)

# Jobs run the `vitplasticity` command of the environment that runs this workflow.
os.environ["PATH"] = (
    f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
)
MACHINE = machine(config)
os.environ[MACHINE_ENV] = MACHINE.to_env()


envvars:
    MACHINE_ENV,


EXPERIMENTS = config["experiments"]
MODELS = config["models"]
TASKS = config["tasks"]
# Arms, parameter-matched controls and budget arms share one namespace; a control trains its one
# component, a budget arm the units its selector picks (no whole component).
SELECTION_ARMS = budget.arms(config["selection"])
ARMS = {
    **config["arms"],
    **{name: [control["component"]] for name, control in config["controls"].items()},
    **{name: [] for name in SELECTION_ARMS},
}
REFERENCE = config["plasticity"]["reference_task"]
# Table and figure names: one list, shared with the package and the tests.
TABLES = list(registry.TABLES)
FIGURES = list(registry.FIGURES)
CRITERIA = config["criteria"]


def _alternatives(names):
    """A wildcard regex matching exactly these names."""
    return "|".join(sorted(map(re.escape, names))) or "(?!)"


def experiment_lrs(experiment, task):
    """The task's lrs times the experiment's lr_scale, as they appear in paths (0.01, 1e-05)."""
    return [registry.lr_label(lr * experiment["lr_scale"]) for lr in TASKS[task]["lrs"]]


def experiment_arms(experiment):
    """The experiment's arms (default: every arm and control), then the budget arms when it sets selection."""
    named = experiment.get("arms", [arm for arm in ARMS if arm not in SELECTION_ARMS])
    return named + (list(SELECTION_ARMS) if experiment["selection"] else [])


def get_experiment_runs(wildcards):
    """metrics.json of every finetuning run of an experiment."""
    exp = EXPERIMENTS[wildcards.experiment]
    return [
        f"results/runs/{exp['model']}/{task}/{exp['optimizer']}/{arm}/lr{lr}_seed{seed}/metrics.json"
        for task in exp["tasks"]
        for arm in experiment_arms(exp)
        for lr in experiment_lrs(exp, task)
        for seed in config["finetune"]["seeds"]
    ]


def get_experiment_probes(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    if not exp["probe"]:
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


def get_experiment_criteria(wildcards):
    """criteria.csv of every (model, task) of an experiment, when criteria are enabled."""
    if not CRITERIA["enabled"]:
        return []
    exp = EXPERIMENTS[wildcards.experiment]
    return [
        f"results/criteria/{exp['model']}/{task}/criteria.csv" for task in exp["tasks"]
    ]


def get_criteria_settings(wildcards):
    return job_settings("criteria", wildcards)


def trajectory_tasks(model):
    """The tasks of every experiment that uses `model`, in config order, each once."""
    return list(
        dict.fromkeys(
            task
            for exp in EXPERIMENTS.values()
            if exp["model"] == model
            for task in exp["tasks"]
        )
    )


# Models pretrained here whose config keeps steps of the pretraining trajectory, and that an
# experiment uses: one trajectory job each. Fetched checkpoints have no trajectory.
TRAJECTORY_MODELS = [
    name
    for name, model in MODELS.items()
    if model["source"] == "pretrain"
    and model["pretrain"]["keep_steps"]
    and trajectory_tasks(name)
]


def get_trajectory_tasks(wildcards):
    return [f"data/prepared/{task}" for task in trajectory_tasks(wildcards.model)]


def get_trajectory_settings(wildcards):
    keep_steps = sorted(MODELS[wildcards.model]["pretrain"]["keep_steps"])
    tasks = trajectory_tasks(wildcards.model)
    return job_settings("trajectory", wildcards, tasks=tasks, keep_steps=keep_steps)


def get_experiment_trajectory(wildcards):
    """trajectory.csv of the experiment's model, when it has a pretraining trajectory."""
    model = EXPERIMENTS[wildcards.experiment]["model"]
    if model not in TRAJECTORY_MODELS:
        return []
    return [f"results/pretrain/{model}/trajectory/trajectory.csv"]


def get_all_targets():
    targets = []
    for name in EXPERIMENTS:
        targets += expand(
            "results/tables/{experiment}/{table}.csv", experiment=name, table=TABLES
        )
        targets += expand(
            "results/figures/{experiment}/{figure}.png", experiment=name, figure=FIGURES
        )
        if EXPERIMENTS[name]["compare_to_paper"]:
            targets.append(f"results/tables/{name}/{registry.PAPER_COMPARISON}.csv")
    return targets


def job_settings(command, wildcards, **given):
    """A job's --settings (its rerun trigger): the keys of its dataclass in `vitplasticity.settings`
    read from the config for the entries its wildcards name, or `given`; sorted JSON."""
    names = {
        name: getattr(wildcards, name)
        for name in ("model", "task", "arm", "experiment")
        if name in wildcards.keys()
    }
    return json.dumps(for_job(command, config, names, **given), sort_keys=True)


def get_prepare_settings(wildcards):
    return job_settings("prepare", wildcards, name=wildcards.task)


def get_raw_dir(wildcards):
    """Downloads are shared by tasks of one source (five CIFAR-10-C tasks, one archive)."""
    return f"data/raw/{TASKS[wildcards.task]['data']['source']}"


def get_checkpoint(wildcards):
    return f"data/checkpoints/{wildcards.model}.safetensors"


def get_pretrain_settings(wildcards):
    return job_settings("pretrain", wildcards)


def get_pretrain_task(wildcards):
    return f"data/prepared/{MODELS[wildcards.model]['pretrain']['task']}"


def get_local_weights(wildcards):
    """A local model's weights file: an input, so that replacing it remakes the checkpoint."""
    model = MODELS[wildcards.model]
    return [model["path"]] if model["source"] == "local" else []


def get_fetch_settings(wildcards):
    return job_settings("fetch", wildcards)


def get_finetune_settings(wildcards):
    return job_settings(
        "finetune",
        wildcards,
        optimizer=wildcards.optimizer,
        components=ARMS[wildcards.arm],
        selection=SELECTION_ARMS.get(wildcards.arm),
        lr=float(wildcards.lr),
        seed=int(wildcards.seed),
    )


def get_finetune_criteria(wildcards):
    """criteria.csv of the run's model and task, for a budget arm whose selector ranks by its scores."""
    spec = SELECTION_ARMS.get(wildcards.arm)
    if spec is None or not budget.needs_scores(spec["selector"]):
        return []
    return [f"results/criteria/{wildcards.model}/{wildcards.task}/criteria.csv"]


def get_preflight_settings(wildcards):
    """What the preflight measures (`vitplasticity.preflight`): the study's science and the runtime
    settings that change its figures (as params, so a change reruns it; the job reads them from
    the environment as every job does)."""
    keys = (
        "models",
        "tasks",
        "arms",
        "controls",
        "finetune",
        "plasticity",
        "experiments",
        "selection",
    )
    settings = {key: config[key] for key in keys}
    measured = ("device", "micro_batch", "compile", "plasticity_batch")
    runtime = {key: getattr(MACHINE.runtime, key) for key in measured}
    return json.dumps(dict(settings, runtime=runtime), sort_keys=True)


def get_plasticity_settings(wildcards):
    return job_settings("plasticity", wildcards)


def get_probe_settings(wildcards):
    return job_settings("probe", wildcards)


def get_aggregate_settings(wildcards):
    exp = EXPERIMENTS[wildcards.experiment]
    arms = {arm: ARMS[arm] for arm in experiment_arms(exp)}
    # The experiment's VTAB-1k tasks by their VTAB name, for the vtab table (absent when it has none).
    vtab = {
        task: TASKS[task]["data"]["vtab_task"]
        for task in exp["tasks"]
        if TASKS[task]["data"]["source"] == "vtab1k"
    }
    # The arms' order in the config, which every table and figure keeps (keys get sorted).
    return job_settings(
        "aggregate", wildcards, arms=arms, arm_order=list(arms), vtab_tasks=vtab or None
    )


def get_tables_dir(wildcards):
    return f"results/tables/{wildcards.experiment}"


def get_figures_dir(wildcards):
    return f"results/figures/{wildcards.experiment}"


def get_finetune_runtime_minutes(wildcards):
    """SLURM time limit from the job's steps: a generous 0.5 s per step plus 10 minutes."""
    return 10 + TASKS[wildcards.task]["steps"] // 120


def tracking_parents():
    """The MLflow parent runs of the study: one per (model, task, optimizer) finetuned."""
    from vitplasticity.records import parent_name

    return sorted(
        {
            parent_name(
                {"model": exp["model"], "task": task, "optimizer": exp["optimizer"]}
            )
            for exp in EXPERIMENTS.values()
            for task in exp["tasks"]
        }
    )


def prepare_tracking():
    """Make the study's MLflow store, experiment and parent runs, and mirror the finished run
    folders it lacks. A store the study cannot use is one line; the jobs then run without logging
    to it, and the mirror at the end tries again.
    """
    if not MACHINE.tracking.enabled:
        return
    from dataclasses import replace
    from vitplasticity import tracking

    try:
        tracking.prepare_study(MACHINE.tracking, tracking_parents())
    except Exception as error:
        print(
            f"vitplasticity tracking: {tracking.unusable(MACHINE.tracking, error)}",
            file=sys.stderr,
        )
        unlogged = replace(MACHINE.tracking, live=False)
        os.environ[MACHINE_ENV] = replace(MACHINE, tracking=unlogged).to_env()


def mirror_finished_runs():
    """Mirror the job records the store lacks once the jobs ended (a failure is one line; the
    workflow's exit status stays the jobs')."""
    if not MACHINE.tracking.enabled:
        return
    from vitplasticity.tracking import mirror_at_end

    mirror_at_end(MACHINE.tracking, tracking_parents())


# The run's fork server, when one was started (at most one).
FORK_SERVER = []


def start_fork_server():
    """With `runtime.fork_server` on a local run: start the server whose forks run the jobs
    (vitplasticity.forkserver). If it cannot start, one line, and jobs start their own interpreters.
    """
    if not (MACHINE.runtime.fork_server and workflow.local_exec):
        return
    from vitplasticity import forkserver

    try:
        server = forkserver.start("vitplasticity.cli:run_in_process")
    except RuntimeError as error:
        print(
            f"vitplasticity: {error}; jobs start their own interpreters",
            file=sys.stderr,
        )
        return
    FORK_SERVER.append(server)
    os.environ[forkserver.SOCKET_ENV] = str(server.socket)


def stop_fork_server():
    """Stop the run's fork server; one line if it had ended early (its jobs ran on their own)."""
    for server in FORK_SERVER:
        early = server.stop()
        if early:
            print(f"vitplasticity: {early}", file=sys.stderr)
    FORK_SERVER.clear()


def hint_unmirrored_runs():
    """Tracking switched on or the study renamed reruns nothing, and with nothing to do Snakemake
    runs no onstart: say in one line how the experiment gets the finished runs it lacks.
    """
    if not (MACHINE.tracking.enabled and workflow.is_main_process):
        return
    from vitplasticity.tracking import rebuild_command, unmirrored

    missing = unmirrored(MACHINE.tracking)
    if missing:
        name = MACHINE.tracking.experiment
        print(
            f"vitplasticity: {missing} job records are not in MLflow experiment '{name}' yet; "
            f"snakemake mirrors them before it runs any job, or now: {rebuild_command(MACHINE.tracking)}",
            file=sys.stderr,
        )


hint_unmirrored_runs()
