"""The study's jobs: each reads explicit inputs, writes its outputs atomically, and ends with its record.

The workflow calls these through the command line (`cli`); science arrives as the job's typed
settings (`vitplasticity.settings`, built from the JSON object the workflow makes of the study
config: rerun triggers), machine settings as `machine.Runtime` (from the environment: never
rerun triggers). A job that leaves a run folder writes its record there last (`records.write`),
which MLflow mirrors (`tracking`); the training jobs take an optional evaluation hook (`on_eval`)
through which `tracking.live` logs curves while they run.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vitplasticity import models, records, training
from vitplasticity.budget import unit_label
from vitplasticity.components import block_parameters, component_of, set_trainable
from vitplasticity.errors import UserError
from vitplasticity.fileio import atomic_dir, read_json, write_csv, write_json, write_rows, write_yaml
from vitplasticity.prepared import Split, load_split, read_meta
from vitplasticity.registry import FIGURES, TABLES
from vitplasticity.runtime import pick_device, seed_everything
from vitplasticity.settings import Finetune, params

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

    from vitplasticity.machine import Runtime
    from vitplasticity.settings import Aggregate, Criteria, Fetch, Plasticity, Pretrain, Probe, Trajectory

# Start-up time is paid by every job, so each job imports only what it uses: pandas, scipy,
# scikit-learn and the measurement modules load inside the functions that need them.


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_config(settings: Pretrain | Finetune, runtime: Runtime, img_size: int, **normalisation) -> (
        training.TrainConfig):
    """The training loop's settings (checked as they are made, before a job writes anything): a job's science
    and its machine; `normalisation`: a checkpoint's mean and std. Pretraining sets no momentum (its optimizer
    defaults to AdamW; with SGD it takes `training.TrainConfig`'s 0.9)."""
    momentum = {"momentum": settings.momentum} if isinstance(settings, Finetune) else {}
    return training.TrainConfig(
        steps=settings.steps, eval_every=settings.eval_every, batch_size=settings.batch_size, lr=settings.lr,
        seed=settings.seed, img_size=img_size, optimizer=settings.optimizer, **momentum,
        weight_decay=settings.weight_decay, betas=tuple(settings.betas), warmup_steps=settings.warmup_steps,
        clip_norm=settings.clip_norm, crop_scale=tuple(settings.crop_scale), micro_batch=runtime.micro_batch,
        compile=runtime.compile, eval_batch=runtime.eval_batch, prefetch=runtime.prefetch, **normalisation)


def _splits(task_dir: Path) -> dict:
    """The three splits, checked against meta.json and its checksums before any output is written."""
    return {split: load_split(task_dir, split, verify=True) for split in ("train", "val", "test")}


def _write_run_folder(run_dir: Path, result: training.Result, metrics: dict) -> list[Path]:
    write_rows(run_dir / "history.csv", result.history, training.HISTORY_COLUMNS)
    write_json(run_dir / "metrics.json", metrics)
    return [run_dir / "config.yaml", run_dir / "history.csv", run_dir / "metrics.json"]


def _result_metrics(result: training.Result) -> dict:
    evaluated = result.best_step > 0  # a run that diverged before its first evaluation has no best state
    return {"status": result.status, "best_val_acc": result.best_val_acc if evaluated else None,
            "best_step": result.best_step if evaluated else None,
            "test_acc": result.test_acc, "test_loss": result.test_loss, "diverged_step": result.diverged_step,
            "steps_done": result.steps_done}


def pretrain(settings: Pretrain, runtime: Runtime, task_dir: Path, weights: Path, run_dir: Path,
             on_eval: Callable[[list[dict]], None] | None = None) -> dict:
    """Train a small timm ViT from scratch on the source task; write the checkpoint and the run folder, whose
    checkpoints/ keeps the weights at every evaluation (step_<N>.safetensors + .json: the pretraining trajectory).
    `on_eval(rows)` gets the new history rows at each evaluation."""
    started = time.time()
    meta = read_meta(task_dir)
    arch = models.architecture(settings.timm_name, settings.kwargs, settings.img_size)
    seed_everything(settings.seed)
    model = models.build(arch, num_classes=len(meta["classes"]))
    set_trainable(model, ["emb", "ln1", "mha", "ln2", "fc1", "fc2"])
    cfg = _train_config(settings, runtime, settings.img_size)
    splits = _splits(task_dir)
    device = pick_device(runtime.device)
    write_yaml(run_dir / "config.yaml",
               {"job": "pretrain", "settings": params(settings), "train": training.config_record(cfg)})
    record = {"arch": arch, "img_size": settings.img_size, "mean": list(cfg.mean), "std": list(cfg.std)}
    kept_scratch = run_dir / "checkpoints.partial"  # copied to run_dir/checkpoints at the end, removed with state.pt

    def keep(row: dict) -> None:
        """Keep the model's current weights as those of the evaluation `row` (the pretraining trajectory)."""
        models.save_checkpoint(kept_scratch / f"step_{row['step']}.safetensors", model, record | {
            "provenance": {"kind": "pretrain", "task": meta["name"], "step": row["step"],
                           "steps": cfg.steps, "val_acc": row["val_acc"], "seed": cfg.seed}})

    def evaluated_at(rows: list[dict]) -> None:
        """Hand on the new history rows; keep the weights of this evaluation's step."""
        if on_eval is not None:
            on_eval(rows)
        if "val_acc" in rows[-1]:
            keep(rows[-1])

    def on_resume(history: list[dict]) -> None:
        """Before training on: an interruption between saving the state and keeping that step's weights
        lost them (keep them now); weights of earlier steps cannot be recovered (one line, at once)."""
        evaluated = [row["step"] for row in history if "val_acc" in row]
        current = evaluated[-1:] if evaluated and evaluated[-1] == history[-1]["step"] else []
        _check_kept(kept_scratch, evaluated[:len(evaluated) - len(current)])
        if _missing_kept(kept_scratch, current):
            keep(history[-1])

    began = time.time()
    result = training.train(model, splits, cfg, device, state_path=run_dir / "state.pt",
                            on_eval=evaluated_at, progress=log, on_resume=on_resume)
    if result.status != "completed":
        raise UserError(f"pretraining diverged at step {result.diverged_step}; lower models.*.pretrain.lr")
    metrics = _result_metrics(result) | {"source_test_acc": result.test_acc, "wall_time_s": time.time() - began,
                                         "device": str(device)}
    record |= {"provenance": {"kind": "pretrain", "task": meta["name"], "source_test_acc": result.test_acc,
                              "steps": cfg.steps, "seed": cfg.seed}}
    evaluated = [row["step"] for row in result.history if "val_acc" in row]
    _publish_kept(kept_scratch, run_dir / "checkpoints", evaluated)
    models.save_checkpoint(weights, model.cpu(), record)
    records.write(run_dir, "pretrain", params(settings), started=started, metrics=metrics,
                  artifacts=_write_run_folder(run_dir, result, metrics), history=run_dir / "history.csv",
                  device=str(device))
    # The scratch copies go with state.pt: until then a failure after publishing can still resume.
    (run_dir / "state.pt").unlink(missing_ok=True)
    shutil.rmtree(kept_scratch, ignore_errors=True)
    return metrics


def _missing_kept(scratch: Path, steps: list[int]) -> list[str]:
    names = [f"step_{step}.{suffix}" for step in steps for suffix in ("safetensors", "json")]
    return [name for name in names if not (scratch / name).exists()]


def _check_kept(scratch: Path, steps: list[int]) -> None:
    """UserError unless the scratch folder (`run_dir/checkpoints.partial`) holds the weights kept at every step."""
    lost = _missing_kept(scratch, steps)
    if lost:
        raise UserError(f"the kept weights {lost[0]} of an interrupted earlier run are missing from {scratch}; "
                        f"delete {scratch.parent / 'state.pt'} and run the pretraining again")


def _publish_kept(scratch: Path, kept: Path, steps: list[int]) -> None:
    """Copy the weights of every evaluated step from the scratch folder (which, like state.pt, outlives an
    interrupted run that resumes) into `kept` whole, as step_<N>.safetensors + .json each."""
    _check_kept(scratch, steps)
    with atomic_dir(kept) as tmp:
        for step in steps:
            for suffix in ("safetensors", "json"):
                shutil.copyfile(scratch / f"step_{step}.{suffix}", tmp / f"step_{step}.{suffix}")


def fetch(settings: Fetch, weights: Path) -> dict:
    """Write the checkpoint of a `timm` or `local` model config entry (settings: its keys); its record."""
    model, record = models.open_pretrained(
        settings.source, settings.timm_name, path=settings.path, pretrained_tag=settings.pretrained_tag,
        revision=settings.revision, kwargs=settings.kwargs, img_size=settings.img_size, head=settings.head)
    # The study normalises with ImageNet mean/std for every checkpoint (study-spec §3, §5).
    return models.save_checkpoint(weights, model, record)


def _apply_control(model, control: dict | None, weight_decay: float) -> int:
    """Restrict a control arm's component (`controls`); return the number of parameter entries that train.
    A gradient mask keeps entries frozen only without weight decay: UserError otherwise (a job run by hand;
    the workflow's config check refuses it first)."""
    from vitplasticity import controls

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if control is None:
        return trainable
    component = control["component"]
    if "match" in control and weight_decay != 0.0:
        raise UserError(f"control of {component}: a gradient mask keeps entries frozen only with weight_decay 0, "
                        f"got {weight_decay}; set finetune.weight_decay to 0 or use lora_rank")
    if "lora_rank" in control:
        controls.add_lora(model, component, control["lora_rank"])
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    component_size = sum(p.numel() for params in block_parameters(model).values() for name, p in params
                         if component_of(name) == component)
    kept = controls.mask_to_count(model, component, control["match"], control["mask_seed"])
    return trainable - component_size + kept


def budget_units(model, spec: dict, criteria_table: Path | None) -> list[tuple[str, int]]:
    """The units a budget arm trains (`budget.select`): `spec` {selector, budget[, draw]}, the scores read from
    `criteria_table` (the criteria job's criteria.csv of this model and task) when the selector is a criterion."""
    import pandas as pd

    from vitplasticity import budget

    scores = None
    if budget.needs_scores(spec["selector"]):
        if criteria_table is None:
            raise UserError(f"budget arm of criterion '{spec['selector']}' needs the criteria table; pass --criteria "
                            "(the criteria job's criteria.csv of this model and task)")
        scores = budget.unit_scores(pd.read_csv(criteria_table), spec["selector"])
        if not scores:
            raise UserError(f"{criteria_table} has no scores of criterion '{spec['selector']}'; rerun its criteria job")
    return budget.select(spec, budget.unit_sizes(model), scores)


def finetune(settings: Finetune, runtime: Runtime, task_dir: Path, weights: Path, run_dir: Path,
             criteria_table: Path | None = None, on_eval: Callable[[list[dict]], None] | None = None) -> dict:
    """One finetuning run of one arm; resumes from run_dir/state.pt when present.

    A budget arm (settings ``selection``: {selector, budget[, draw]}) trains the units `budget.select` picks
    (scores from `criteria_table` for a criterion) and the head; its units ("mha.3 fc1.2 …", in the order chosen)
    go to config.yaml and metrics.json, beside the exact trainable count of every run. `on_eval(rows)` gets
    the new history rows at each evaluation.
    """
    started = time.time()
    meta = read_meta(task_dir)
    device = pick_device(runtime.device)
    seed_everything(settings.seed)
    model, record = models.load_checkpoint(weights, num_classes=len(meta["classes"]))
    budgeted = settings.selection is not None
    units = budget_units(model, settings.selection, criteria_table) if budgeted else []
    set_trainable(model, settings.components, units)
    trained = _apply_control(model, settings.control, settings.weight_decay)
    unit_names = {"units": " ".join(map(unit_label, units))} if budgeted else {}
    cfg = _train_config(settings, runtime, record["img_size"], mean=tuple(record["mean"]), std=tuple(record["std"]))
    splits = _splits(task_dir)
    write_yaml(run_dir / "config.yaml", {"job": "finetune", "settings": params(settings),
                                         "train": training.config_record(cfg),
                                         "checkpoint_sha256": record["sha256"], **unit_names})
    began = time.time()
    result = training.train(model, splits, cfg, device, state_path=run_dir / "state.pt", on_eval=on_eval,
                            progress=log)
    metrics = _result_metrics(result) | {
        "trainable_params": trained, **unit_names,
        "total_params": sum(p.numel() for p in model.parameters()),
        "wall_time_s": time.time() - began, "device": str(device), "host": socket.gethostname(),
    }
    records.write(run_dir, "finetune", params(settings), started=started, metrics=metrics,
                  artifacts=_write_run_folder(run_dir, result, metrics), history=run_dir / "history.csv",
                  device=str(device))
    (run_dir / "state.pt").unlink(missing_ok=True)
    return metrics


def measure_plasticity(settings: Plasticity, runtime: Runtime, weights: Path, reference_dir: Path, task_dir: Path,
                       out_table: Path, out_stats: Path) -> pd.DataFrame:
    """Per-component plasticity of one model on one task (`plasticity.measure`), with the reference classes
    the pairs take; writes `out_table`, `out_stats` and the record beside them."""
    from vitplasticity import plasticity

    started = time.time()
    device = pick_device(runtime.device)
    model, record = models.load_checkpoint(weights, num_classes=0)
    reference, downstream = load_split(reference_dir, "test", verify=True), load_split(task_dir, "test", verify=True)
    table, stats = plasticity.measure(
        model, reference, downstream, settings.n_pairs, runtime.plasticity_batch, record["img_size"], device,
        tuple(settings.modes), tuple(record["mean"]), tuple(record["std"]), progress=log,
        loader_batch=settings.loader_batch)
    table.insert(0, "task", settings.task)
    table.insert(0, "model", settings.model)
    reference_meta = read_meta(reference_dir)
    order = reference_meta["provenance"].get("order", "stored")
    table["reference_order"] = order
    paired = reference_classes(reference_meta, reference, downstream, settings.n_pairs,
                               settings.loader_batch)
    write_csv(out_table, table)
    write_json(out_stats, stats | {"model": settings.model, "task": settings.task, "reference_order": order,
                                   "reference_classes_paired": paired})
    # MLflow draws each mode's plasticity of a component against depth (step = layer).
    records.write(out_table.parent, "plasticity", params(settings), started=started, device=str(device),
                  series=records.series(table.to_dict("records"), "layer", ("mode", "component"), "mean"),
                  artifacts=[out_table, out_stats])
    return table


def reference_classes(meta: dict, reference: Split, downstream: Split, n_pairs: int,
                      loader_batch: int | None = None) -> list[str]:
    """The class names of the reference images that `n_pairs` pairs take, in stream order.

    The pairs are `plasticity.pair_indices`'; `meta` is the reference task's. In the authors'
    ImageNet order, 12,800 pairs take the 256 first WordNet ids.
    """
    from vitplasticity.plasticity import pair_indices

    rows, _ = pair_indices(len(reference.labels), len(downstream.labels), n_pairs, loader_batch)
    return [meta["classes"][label] for label in dict.fromkeys(reference.labels[rows].tolist())]


def measure_criteria(settings: Criteria, runtime: Runtime, weights: Path, reference_dir: Path, task_dir: Path,
                     out_table: Path) -> pd.DataFrame:
    """Every selection criterion of `registry.CRITERIA` on one model and task, with its cost.

    Writes `out_table` (model, task, criterion, component, layer, value) and `cost.csv` beside it
    (model, task, criterion, wall_s, peak_mib, measured_with), both in `registry.CRITERIA`'s order.
    """
    import copy

    from vitplasticity import criteria, plasticity

    started = time.time()
    device = pick_device(runtime.device)
    model, record = models.load_checkpoint(weights, num_classes=0)
    model.to(device)
    reference, downstream = load_split(reference_dir, "test", verify=True), load_split(task_dir, "test", verify=True)
    train = load_split(task_dir, "train", verify=True)
    classes = len(read_meta(task_dir)["classes"])
    norm = (tuple(record["mean"]), tuple(record["std"]))

    def plasticity_in(mode: str):
        def run() -> pd.DataFrame:
            table, _ = plasticity.measure(model, reference, downstream, settings.n_pairs, runtime.plasticity_batch,
                                          record["img_size"], device, (mode,), *norm, progress=log)
            return table.rename(columns={"mean": "value"})[["component", "layer", "value"]]
        return run

    headed = copy.deepcopy(model)  # gets a new head and gradients; copied outside the measured cost
    batches = (settings.gradient_batch_size, settings.gradient_batches, record["img_size"], device,
               settings.seed, *norm)

    measured = {"plasticity_embedding": plasticity_in("embedding"), "plasticity_hidden": plasticity_in("hidden"),
                "plasticity_scale_free": plasticity_in("scale_free"),
                ("relative_gradient_norm", "fisher"): lambda: criteria.gradient_criteria(headed, train, classes,
                                                                                         *batches),
                "fps": lambda: criteria.fps(model, train, *batches),
                "kappatune": lambda: criteria.kappatune(model),
                "trainable_params": lambda: criteria.trainable_params(model)}
    scores, costs = criteria.measure(measured, device, progress=log)
    for frame in (scores, costs):
        frame.insert(0, "task", settings.task)
        frame.insert(0, "model", settings.model)
    write_csv(out_table.parent / "cost.csv", costs)
    write_csv(out_table, scores)
    # Each criterion's score of a component against depth (step = layer), and what each criterion cost.
    records.write(out_table.parent, "criteria", params(settings), started=started, device=str(device),
                  series=records.series(scores.to_dict("records"), "layer", ("criterion", "component"), "value"),
                  metrics={f"{row['criterion']}/wall_s": row["wall_s"] for row in costs.to_dict("records")}
                  | {f"{row['criterion']}/peak_mib": row["peak_mib"] for row in costs.to_dict("records")},
                  artifacts=[out_table, out_table.parent / "cost.csv"])
    return scores


def measure_trajectory(settings: Trajectory, runtime: Runtime, checkpoints: Path, reference_dir: Path,
                       task_dirs: list[Path], out: Path) -> pd.DataFrame:
    """Plasticity in every mode of `plasticity.MODES` at each kept step of a pretraining run, on each task.

    `checkpoints`: the run's checkpoints/ folder (step_<N>.safetensors + .json); `task_dirs`: the prepared
    folders of `settings.tasks`, in that order. Each task's test split is paired with the reference
    stream's as `measure_plasticity` pairs them (`plasticity.measure`, `n_pairs` pairs). Writes `out`:
    one row per (task, step, mode, component, layer), the columns of `plasticity.measure`'s table after
    model, task, step, source_val_acc (the run's validation accuracy on its source task at that step,
    a fraction, from the checkpoint's record) and the mean token norm of E over each stream's images
    (reference_token_norm, downstream_token_norm: a LayerNorm's rate of change scales as 1/‖token‖).
    """
    import pandas as pd

    from vitplasticity import plasticity

    started = time.time()
    if len(task_dirs) != len(settings.tasks):
        raise UserError(f"--task names {len(task_dirs)} folders but the settings list {len(settings.tasks)} "
                        f"tasks ({', '.join(settings.tasks)}); pass one prepared folder per task, in order")
    device = pick_device(runtime.device)
    reference = load_split(reference_dir, "test", verify=True)
    downstream = {task: load_split(folder, "test", verify=True)
                  for task, folder in zip(settings.tasks, task_dirs, strict=True)}
    tables = []
    for step in sorted(settings.keep_steps):
        model, record = models.load_checkpoint(checkpoints / f"step_{step}.safetensors", num_classes=0)
        val_acc = record.get("provenance", {}).get("val_acc")
        for task, split in downstream.items():
            log(f"trajectory: step {step}, {task}")
            table, stats = plasticity.measure(
                model, reference, split, settings.n_pairs, runtime.plasticity_batch, record["img_size"],
                device, plasticity.MODES, tuple(record["mean"]), tuple(record["std"]), progress=log)
            for position, (column, value) in enumerate((
                    ("model", settings.model), ("task", task), ("step", step), ("source_val_acc", val_acc),
                    ("reference_token_norm", stats["reference_mean_token_norm"]),
                    ("downstream_token_norm", stats["downstream_mean_token_norm"]))):
                table.insert(position, column, value)
            tables.append(table)
    frame = pd.concat(tables, ignore_index=True)
    write_csv(out, frame)
    # Each mode's plasticity of a component, mean over layers and tasks, against the pretraining step.
    records.write(out.parent, "trajectory", params(settings), started=started, device=str(device),
                  series=records.series(frame.to_dict("records"), "step", ("mode", "component"), "mean"),
                  artifacts=[out])
    return frame


def compute_bounds(weights: Path, stats_path: Path, out: Path) -> pd.DataFrame:
    from vitplasticity import bounds

    model, _ = models.load_checkpoint(weights, num_classes=0)
    stats = read_json(stats_path)
    extremes = {key: stats[key] for key in ("min_token_std", "max_token_norm")}
    table = bounds.theoretical_bounds(model, radius=stats["downstream_rms_token_norm"], extremes=extremes)
    table.insert(0, "task", stats["task"])
    table.insert(0, "model", stats["model"])
    table["head_slicing"] = bounds.HEAD_SLICING
    write_csv(out, table)
    return table


def linear_probe(settings: Probe, runtime: Runtime, weights: Path, task_dir: Path, out: Path) -> dict:
    """The linear probe of one model on one task (`probe.fit_and_score`); writes `out` and the record beside it."""
    from vitplasticity import probe  # scikit-learn: 0.7 s of start-up the other jobs need not pay

    started = time.time()
    device = pick_device(runtime.device)
    model, record = models.load_checkpoint(weights, num_classes=0)
    train, test = load_split(task_dir, "train", verify=True), load_split(task_dir, "test", verify=True)
    began = time.time()
    args = (record["img_size"], runtime.eval_batch, device, tuple(record["mean"]), tuple(record["std"]))
    metrics = probe.fit_and_score(probe.features(model, train, *args), train.labels,
                                  probe.features(model, test, *args), test.labels,
                                  max_iter=settings.max_iter, progress=log)
    metrics |= {"wall_time_s": time.time() - began, "model": settings.model, "task": settings.task}
    write_json(out, metrics)
    records.write(out.parent, "probe", params(settings), started=started, device=str(device),
                  metrics={k: v for k, v in metrics.items() if k not in ("model", "task")}, artifacts=[out])
    return metrics


def aggregate_experiment(settings: Aggregate, runs: list[Path], probes: list[Path], plasticity_tables: list[Path],
                         bounds_tables: list[Path], out_dir: Path, criteria_tables: list[Path] = (),
                         trajectory_tables: list[Path] = ()) -> None:
    """Tables of one experiment (`aggregate.aggregate`); its record holds each arm's mean accuracy over tasks
    (%) and the tables as artifacts."""
    from vitplasticity.aggregate import aggregate

    started = time.time()
    tables = aggregate(settings.arm_order, runs, probes, plasticity_tables, bounds_tables, out_dir, criteria_tables,
                       trajectory_tables, tasks=settings.tasks, vtab_tasks=settings.vtab_tasks)
    average = tables["main_table"].groupby("arm")["mean"].mean()
    records.write(Path(out_dir), "aggregate", {k: v for k, v in params(settings).items() if k != "arms"},
                  started=started,
                  metrics={f"average_acc/{arm}": value for arm, value in average.items()},
                  artifacts=[path for table in TABLES for suffix in ("csv", "md")
                             if (path := Path(out_dir) / f"{table}.{suffix}").exists()])


def draw_figures(tables_dir: Path, out_dir: Path) -> None:
    """Figures of one experiment (`figures.make_figures`); its record holds them as artifacts."""
    from vitplasticity.figures import make_figures

    started = time.time()
    make_figures(tables_dir, out_dir)
    records.write(Path(out_dir), "figures", {"experiment": Path(out_dir).name, "tables": str(tables_dir)},
                  started=started,
                  artifacts=[path for figure in FIGURES for suffix in ("png", "pdf")
                             if (path := Path(out_dir) / f"{figure}.{suffix}").exists()])
