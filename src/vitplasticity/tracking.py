"""MLflow mirror of the run folders.

The run folder stays the record; MLflow is a view of it that can always be rebuilt from the
folders (`rebuild`). Every call names its run id explicitly (`MlflowClient`), so parallel jobs
share no state. The workflow makes the store, the experiment and the parent runs once before
any job (`prepare_study`, from Snakemake's `onstart`), so parallel jobs never race on schema
migration or experiment creation; jobs find them by name. Nothing is recorded in a file: the
default store is resolved from the folder a job runs in (`study_uri`), so a copied study
tracks into its own store.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import json
import math
import numbers
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import yaml

from vitplasticity.errors import UserError
from vitplasticity.fileio import is_missing, read_json, write_json

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from vitplasticity.machine import Tracking

RUN_RECORD = "mlflow_run.json"
# Tag of a run the mirror has not completed yet: an interrupted mirror's run, which the next mirror
# deletes and mirrors again (the run folder's record names a run only once it is complete).
INCOMPLETE = "mirror_incomplete"
# The study's own store, relative to the folder the workflow and its jobs run in.
DEFAULT_STORE = Path("results") / "mlflow.db"
# Held while a job creates a missing parent run (the workflow normally made them all before).
PARENT_LOCK = Path("results") / "tracking.lock"
HISTORY_KEYS = ("loss", "lr", "grad_norm", "val_loss", "val_acc")
# Accuracies are fractions in the run folders and percentages in the tables; MLflow shows percentages.
PERCENT_KEYS = frozenset({"val_acc", "best_val_acc", "test_acc", "source_test_acc", "train_acc"})
# Settings of the optimizer a run does not use, left out of its MLflow params.
UNUSED_BY = {"sgd": ("betas",), "adamw": ("momentum",)}
# MLflow 3's UI opens an experiment of this kind on its runs (not on the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
HEALTH_TIMEOUT_S = 5.0
# MLflow's documented limits (mlflow.utils.validation), fixed here to keep mlflow imports lazy.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
_SENSITIVE_ALWAYS = ("password", "secret")
_SENSITIVE_IF_CREDENTIAL = ("token", "key")
_CREDENTIAL = re.compile(r"(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9_\-+/=.:]{12,}")
_URL_USERINFO = re.compile(r"//[^/\s@]+@")


class Unusable(UserError):
    """A store the study cannot use: its one line names the URI, the cause and the command that fixes it."""

    def __init__(self, uri: str, cause: str, fix: str):
        super().__init__(f"MLflow store {_redact(uri)} cannot be used ({cause}); the jobs run and their run "
                         f"folders stay the record; fix: {fix}")


def unusable(settings: Tracking, exc: BaseException) -> Unusable:
    """The `Unusable` of any failure to use the study's store: another MLflow version, a lock, an
    unreachable server, a bad URI, or whatever MLflow or SQLite raised."""
    if isinstance(exc, Unusable):
        return exc
    uri, text = study_uri(settings.uri), _one_line(getattr(exc, "reason", None) or exc)
    path, rebuild = sqlite_path(uri), rebuild_command(settings)
    if found := re.search(r"found version (\w+)|Can't locate revision identified by '?(\w+)", text):
        revision = found.group(1) or found.group(2)
        cause = f"its schema revision {revision} was written by another MLflow version"
        fix = (f"`mv {path} {path}.other && {rebuild}` (or use the MLflow version that wrote it)" if path else
               "run the server with the MLflow version its database was written by")
        return Unusable(uri, cause, fix)
    if "database is locked" in text:
        return Unusable(uri, "locked by another process", f"let that process end, then `{rebuild}`")
    if "registered tracking store" in text or "scheme" in text.lower() and "uri" in text.lower():
        return Unusable(uri, text, "set `tracking.uri` to sqlite:////absolute/path.db or http(s)://host:port")
    return Unusable(uri, text, f"`{rebuild}` once the store answers")


class Terminated(SystemExit):
    """SIGTERM inside `track_job`: the run is closed as KILLED, then the process exits with 143."""


class JobRun:
    """The run of one job with tracking disabled: every call does nothing."""

    def log_history(self, rows: list[dict]) -> None:
        """Log training-history rows (step, loss, lr, grad_norm, val_loss, val_acc)."""

    def log_metrics(self, metrics: dict) -> None:
        """Log final metrics; text values become tags."""

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        """Log values that run along something (layer, pretraining step) on MLflow's step axis."""

    def log_artifacts(self, paths: list[Path]) -> None:
        """Copy files or folders into the run's artifacts."""


class MlflowJobRun(JobRun):
    """One MLflow run; each history step and final value is logged at most once."""

    def __init__(self, client: MlflowClient, run_id: str, last_steps: dict[str, int], latest: dict[str, float]):
        self.client, self.run_id = client, run_id
        self._last_steps, self._latest = last_steps, latest

    def log_history(self, rows: list[dict]) -> None:
        from mlflow.entities import Metric

        now, metrics = _now_ms(), []
        for row in rows:
            step = int(row["step"])
            for key in HISTORY_KEYS:
                value = row.get(key)
                if is_missing(value) or step <= self._last_steps.get(key, 0):
                    continue
                metrics.append(Metric(key, _shown(key, value), now, step))
                self._last_steps[key] = step
        _log_batch(self.client, self.run_id, metrics=metrics)

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        from mlflow.entities import Metric

        now, metrics = _now_ms(), []
        for key, points in series.items():
            for step, value in sorted(points):
                if is_missing(value) or (key in self._last_steps and step <= self._last_steps[key]):
                    continue
                metrics.append(Metric(key, _shown(key, value), now, int(step)))
                self._last_steps[key] = int(step)
        _log_batch(self.client, self.run_id, metrics=metrics)

    def log_metrics(self, metrics: dict) -> None:
        """Final values, at the last step of the logged history (accuracies in %)."""
        from mlflow.entities import Metric

        now, values, texts = _now_ms(), [], {}
        step = max((self._last_steps[key] for key in HISTORY_KEYS if key in self._last_steps), default=0)
        for key, value in metrics.items():
            if is_missing(value):
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                if self._latest.get(key) != _shown(key, value):
                    values.append(Metric(key, _shown(key, value), now, step))
                    self._latest[key] = _shown(key, value)
            else:
                texts[key] = str(value)
        _log_batch(self.client, self.run_id, metrics=values, tags=_tag_entities(texts))

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in map(Path, paths):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str, end_time: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)


@contextlib.contextmanager
def track_job(settings: dict | None, *, run_dir: Path, run_name: str, kind: str, params: dict,
              tags: dict) -> Iterator[JobRun]:
    """Mirror one job into MLflow; the run is closed FINISHED, FAILED or KILLED as the block ends.

    `settings`: `enabled`, `uri` (None: `study_uri`), `experiment` (its name; it must exist), `parent`
    (a parent-run name, created if missing under the file lock `lock`), `tags`; or, disabled,
    `mirrored_later`: the run folder's recorded run (of an earlier run of this job) is marked stale,
    so that the mirror after the workflow updates it from the folder this run writes.
    The store and the experiment are checked before the block runs; a store the job cannot use is one
    line (`unusable`) and the block runs untracked: its folder is mirrored once the store answers.
    """
    if not settings or not settings.get("enabled"):
        if settings and settings.get("mirrored_later"):
            _mark_stale(Path(run_dir) / RUN_RECORD)
        yield JobRun()
        return
    try:
        job = _open_job(settings, run_dir=Path(run_dir), run_name=run_name, kind=kind, params=params, tags=tags)
    except Exception as exc:  # noqa: BLE001 (tracking is a view: any store failure leaves the job untracked)
        from vitplasticity.machine import Tracking

        track = Tracking(uri=settings.get("uri"), experiment=settings.get("experiment") or "")
        print(f"vitplasticity tracking: {unusable(track, exc)}", file=sys.stderr, flush=True)
        _mark_stale(Path(run_dir) / RUN_RECORD)  # its folder is mirrored when the store answers again
        yield JobRun()
        return
    with _sigterm_raises():
        try:
            yield job
        except (KeyboardInterrupt, Terminated):
            _close_quietly(job, "KILLED")
            raise
        except BaseException:
            _close_quietly(job, "FAILED")
            raise
    job.close("FINISHED")


def _open_job(settings: dict, *, run_dir: Path, run_name: str, kind: str, params: dict,
              tags: dict) -> MlflowJobRun:
    """The run of one live-tracked job (`track_job`), its id recorded in the run folder."""
    uri = study_uri(settings.get("uri"))
    check_store(uri, create=False)
    client = _client(uri)
    experiment_id = _experiment_id(client, uri, settings.get("experiment"))
    parent_id = None
    if name := settings.get("parent"):  # made by `prepare_study`; created here only if it was deleted since
        parent_id = _parents(client, experiment_id).get(name)
        if parent_id is None:
            with _exclusive(settings.get("lock")):
                parent_id = parent_runs(client, experiment_id, [name])[name]
    all_tags = environment_tags() | {"kind": kind} | dict(settings.get("tags") or {}) | dict(tags)
    return open_run(client, run_dir, run_name=run_name, experiment_id=experiment_id, parent_id=parent_id,
                    params=params, tags=all_tags, uri=uri)


def study_uri(uri: str | None, cwd: Path | None = None) -> str:
    """The tracking URI: `uri`, else MLFLOW_TRACKING_URI, else the SQLite store `results/mlflow.db` of
    the study folder `cwd` (default: the working directory, where Snakemake runs its jobs).

    Resolved afresh by every process and never recorded, so a copied study folder tracks into its
    own store, and a job writes outside its study only to a store the user named.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(cwd or Path.cwd()).resolve() / DEFAULT_STORE}"


def job_tracking(settings: Tracking, kind: str, job: dict) -> dict:
    """`track_job` settings of one job: the study's store and experiment, and for a finetuning
    run its parent (`parent_name`); the experiment and parents exist once `prepare_study` ran.

    Without `settings.live` a job that leaves a run folder (`MIRRORED_KINDS`) is not tracked while
    it runs: the workflow mirrors its folder when it ends (`prepare_study`), and the job never
    imports MLflow (about 3 s of start-up, the larger part of a short job's overhead).
    """
    if not settings.enabled:
        return {"enabled": False}
    if not settings.live and kind in MIRRORED_KINDS:
        return {"enabled": False, "mirrored_later": True}
    return {"enabled": True, "uri": settings.uri, "experiment": settings.experiment,
            "parent": parent_name(job) if kind == "finetune" else None, "lock": str(PARENT_LOCK)}


def rebuild_command(settings: Tracking) -> str:
    """The command that mirrors a study's run folders into its store by hand (a URI that names
    credentials is shown without them)."""
    uri = f" --uri {_redact(settings.uri)}" if settings.uri else ""
    return f"vitplasticity tracking rebuild --experiment {settings.experiment}{uri}"


def mirror_at_end(settings: Tracking, parents: Sequence[str], results_dir: Path = Path("results")) -> None:
    """After the jobs of a workflow: mirror the finished run folders the store lacks.

    Never raises: the folders are the record and every job succeeded or failed on its own, so a
    store that fails now (another MLflow version, locked, unreachable, a damaged folder) gets one
    line (`unusable`), and the workflow's exit status stays the jobs'.
    """
    try:
        prepare_study(settings, parents, results_dir)
    except Exception as exc:  # noqa: BLE001 (any failure: one line, the results stand)
        print(f"vitplasticity tracking: {unusable(settings, exc)}", file=sys.stderr, flush=True)


def prepare_study(settings: Tracking, parents: Sequence[str], results_dir: Path = Path("results")) -> str:
    """Before a workflow's jobs: make the store, the experiment and its parent runs, and mirror every
    finished run folder the experiment lacks (tracking switched on, study renamed, store lost, pulled
    or copied); returns the URI. A SQLite store copied from another study folder (its experiment's
    artifacts live elsewhere) is set aside first, so nothing here or in a job writes into another study.
    """
    uri = study_uri(settings.uri)
    check_store(uri, create=True)
    _set_aside_copied_store(uri, settings.experiment)
    prepare_store(uri, settings.experiment, parents)
    mirrored = rebuild(results_dir, uri, settings.experiment, only_missing=True)
    if mirrored:
        print(f"vitplasticity: mirrored {len(mirrored)} finished run folders into MLflow experiment "
              f"'{settings.experiment}' at {_redact(uri)}", file=sys.stderr, flush=True)
    return uri


def _artifact_root(uri: str) -> str | None:
    """Where a SQLite store keeps its experiments' artifacts: `mlartifacts` beside the database."""
    path = sqlite_path(uri)
    return (path.parent.resolve() / "mlartifacts").as_uri() if path else None


def _set_aside_copied_store(uri: str, experiment: str) -> None:
    """Rename a SQLite store whose experiment keeps its artifacts outside this store's folder (a copy
    of another study's store: writing to it would write into the other study's `mlartifacts`).

    Read with sqlite3, not MLflow, which would keep the renamed file open in its engine cache.
    """
    path, expected = sqlite_path(uri), _artifact_root(uri)
    if path is None or not path.exists():
        return
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            row = db.execute("SELECT artifact_location FROM experiments WHERE name = ?", (experiment,)).fetchone()
        except sqlite3.Error:
            return  # not an MLflow store yet; MLflow reports what is wrong with it
    if row is None or not row[0] or row[0].rstrip("/") == expected:
        return
    aside = path.with_name(f"{path.stem}.copied-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}")
    path.rename(aside)
    print(f"vitplasticity: {path} was copied from another study (artifacts in {row[0]}); kept as {aside.name}, "
          "this study gets its own store", file=sys.stderr, flush=True)


def check_store(uri: str, *, create: bool) -> None:
    """Raise `Unusable` unless the store answers: a server's /health, or a writable SQLite folder.

    With `create` false a SQLite file must already exist (jobs never create the store).
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S) as response:  # noqa: S310 (http(s))
                status = response.status
        except (OSError, ValueError) as exc:
            raise Unusable(uri, f"the server is not reachable: {_one_line(getattr(exc, 'reason', exc))}",
                           "start the server (`mlflow server`), or correct `tracking.uri`") from exc
        if status != 200:
            raise Unusable(uri, f"the server answered /health with HTTP {status}", "check the server")
        return
    path = sqlite_path(uri)
    if path is None:
        return
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unusable(uri, f"its folder cannot be created: {_one_line(exc)}",
                           "choose another `tracking.uri`") from exc
    elif not path.exists():
        raise Unusable(uri, "it does not exist", "run the job through snakemake (it creates the store before "
                       "any job) or `vitplasticity tracking rebuild`")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise Unusable(uri, "it is not writable", f"fix the permissions of {path.parent}")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other URIs and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or len(uri) == len(prefix):
        return None
    return Path(unquote(uri[len(prefix):].split("?", 1)[0]))


def prepare_store(uri: str, experiment_name: str, parents: Sequence[str] = ()) -> dict:
    """Create the store, the experiment and the named parent runs once; reuse whatever exists.

    Returns {"experiment_id": ..., "parent_run_ids": {name: run id}}.
    """
    check_store(uri, create=True)
    client = _client(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        experiment_id = client.create_experiment(experiment_name, artifact_location=_artifact_root(uri),
                                                 tags=EXPERIMENT_KIND)
    else:
        experiment_id = experiment.experiment_id
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment_id)
        if experiment.tags.get("mlflow.experimentKind") is None:
            client.set_experiment_tag(experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return {"experiment_id": experiment_id, "parent_run_ids": parent_runs(client, experiment_id, parents)}


def parent_runs(client: MlflowClient, experiment_id: str, names: Sequence[str]) -> dict[str, str]:
    """{name: run id} of the named parent runs, creating those not in the experiment yet.

    Parallel callers must hold one lock (see `_exclusive`), or a parent could be created twice.
    """
    existing = _parents(client, experiment_id)
    for name in names:
        if name not in existing:
            run = client.create_run(experiment_id, run_name=name, tags={"kind": "parent"})
            client.set_terminated(run.info.run_id, status="FINISHED")
            existing[name] = run.info.run_id
    return {name: existing[name] for name in names}


def _parents(client: MlflowClient, experiment_id: str) -> dict[str, str]:
    """{name: run id} of the experiment's parent runs."""
    existing: dict[str, str] = {}
    for run in _search(client, experiment_id, "tags.kind = 'parent'"):
        existing.setdefault(run.info.run_name, run.info.run_id)
    return existing


def open_run(client: MlflowClient, run_dir: Path, *, run_name: str, experiment_id: str, parent_id: str | None,
             params: dict, tags: dict, uri: str, start_time: int | None = None, record: bool = True
             ) -> MlflowJobRun:
    """Continue the run recorded in `run_dir/mlflow_run.json`, or create one; record its id there
    (with `record` false the caller records it, once the run is complete: `write_record`).

    A recorded run that still exists (and was not deleted) is reused with status RUNNING and
    keeps its history. If its params differ from `params` (MLflow params cannot change) it is
    deleted and replaced by a new run.
    """
    unused = UNUSED_BY.get(params.get("optimizer"), ())
    flat = flatten_params({k: v for k, v in params.items() if k not in unused})
    tag_values = {k[:MAX_KEY_LENGTH]: _truncate(str(v), MAX_TAG_LENGTH) for k, v in tags.items()
                  if not _is_credential(k, v)}
    if parent_id:
        tag_values["mlflow.parentRunId"] = parent_id
    run = _recorded_run(client, run_dir / RUN_RECORD, experiment_id)
    if run is not None and any(run.data.params.get(k, v) != v for k, v in flat.items()):
        client.set_tag(run.info.run_id, "superseded", "params changed")
        client.delete_run(run.info.run_id)
        run = None
    if run is None:
        run = client.create_run(experiment_id, start_time=start_time, run_name=run_name, tags=tag_values)
        run_id, last_steps, latest = run.info.run_id, {}, {}
        new_params = flat
    else:
        run_id = run.info.run_id
        client.update_run(run_id, status="RUNNING", name=run_name)
        _log_batch(client, run_id, tags=_tag_entities(tag_values))
        last_steps = {}
        for key in dict.fromkeys((*HISTORY_KEYS, *run.data.metrics)):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            if steps:
                last_steps[key] = max(steps)
        latest = dict(run.data.metrics)
        new_params = {k: v for k, v in flat.items() if k not in run.data.params}
    from mlflow.entities import Param

    _log_batch(client, run_id, params=[Param(k, v) for k, v in new_params.items()])
    if record:
        write_record(run_dir, run_id, experiment_id, run_name, uri)
    return MlflowJobRun(client, run_id, last_steps, latest)


def write_record(run_dir: Path, run_id: str, experiment_id: str, run_name: str, uri: str) -> None:
    """Name the folder's MLflow run in `run_dir/mlflow_run.json`."""
    write_json(run_dir / RUN_RECORD, {"run_id": run_id, "experiment_id": experiment_id, "run_name": run_name,
                                      "tracking_uri": _redact(uri)})


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts → dotted keys; values as text cut to MLflow's limit; credentials left out."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten_params(value, f"{name}.")
        elif not _is_credential(name, value):
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name[:MAX_KEY_LENGTH]] = _truncate(text, MAX_PARAM_LENGTH)
    return flat


def environment_tags() -> dict[str, str]:
    """Git commit and dirty flag of the working directory, host, user and SLURM job id."""
    tags = {"host": socket.gethostname()}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit.strip()
        tags["git_dirty"] = str(bool(_git("status", "--porcelain").strip())).lower()
    with contextlib.suppress(OSError, KeyError):
        tags["mlflow.user"] = getpass.getuser()
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags


def run_name(kind: str, settings: dict) -> str:
    """The MLflow run name of a job, e.g. `mha/cifar10/lr0.01/seed42` for a finetuning run (the arm
    first: the UI cuts long names, and runs are compared by arm)."""
    if kind == "finetune":
        return f"{settings['arm']}/{settings['task']}/lr{settings['lr']:g}/seed{settings['seed']}"
    if kind in ("pretrain", "trajectory"):  # jobs of a model, not of a task
        return f"{kind}/{settings['model']}"
    return f"{kind}/{settings['model']}/{settings['task']}"


def parent_name(settings: dict) -> str:
    """The parent run grouping a finetuning run: `model/task/optimizer`."""
    return f"{settings['model']}/{settings['task']}/{settings['optimizer']}"


def rebuild(results_dir: Path, uri: str, experiment_name: str, *, only_missing: bool = False) -> dict[str, str]:
    """Recreate the MLflow runs from the run folders under `results_dir`; returns {folder: run id}.

    Folders whose recorded run is still in the store are completed in place, not duplicated;
    with `only_missing` those whose run is complete are skipped (one search of the experiment, not
    one call per folder). Each folder is mirrored whole or not at all: its run carries the tag
    `INCOMPLETE` until it is FINISHED and recorded in the folder, and the runs an interrupted mirror
    left with that tag are deleted first, so their folders are mirrored again. Ctrl-C (SIGINT) in the
    main thread stops after the folder being mirrored (KeyboardInterrupt); a second one stops at once.
    """
    results_dir = Path(results_dir)
    experiment_id = prepare_store(uri, experiment_name)["experiment_id"]
    client = _client(uri)
    for run in _search(client, experiment_id, f"tags.{INCOMPLETE} = 'true'"):
        client.delete_run(run.info.run_id)
    wanted = None
    if only_missing:
        present = {r.info.run_id for r in _search(client, experiment_id, "attributes.status = 'FINISHED'")}
        wanted = lambda folder: _needs_mirror(folder / RUN_RECORD, present)  # noqa: E731
    folders = list(_run_folders(results_dir, wanted))
    parents = parent_runs(client, experiment_id, sorted({parent_name(f["params"]) for f in folders
                                                         if f["kind"] == "finetune"}))
    done = {}
    with _sigint_after_the_folder() as stopped:
        for folder in folders:
            if stopped():
                raise KeyboardInterrupt
            done[str(folder["dir"].relative_to(results_dir))] = _mirror_folder(client, folder, experiment_id,
                                                                               parents, uri, results_dir)
    return done


def _mirror_folder(client: MlflowClient, folder: dict, experiment_id: str, parents: dict[str, str], uri: str,
                   results_dir: Path) -> str:
    """Mirror one run folder (`_run_folders`) whole; its run id."""
    relative = str(folder["dir"].relative_to(results_dir))
    name = run_name(folder["kind"], folder["params"])
    job = open_run(client, folder["dir"], run_name=name, experiment_id=experiment_id,
                   parent_id=parents.get(parent_name(folder["params"])) if folder["kind"] == "finetune" else None,
                   params=folder["params"], tags={"kind": folder["kind"], "mirrored_from": relative,
                                                  INCOMPLETE: "true"},
                   uri=uri, start_time=folder["start_ms"], record=False)
    job.log_history(folder["history"])
    job.log_series(folder["series"])
    job.log_metrics(folder["final"])
    job.log_artifacts(folder["artifacts"])
    job.close("FINISHED", end_time=folder["end_ms"])
    write_record(folder["dir"], job.run_id, experiment_id, name, uri)
    client.delete_tag(job.run_id, INCOMPLETE)
    return job.run_id


# Where each kind of job leaves its last-written file, relative to the results folder.
_FINISHED = (("finetune", "runs/**/metrics.json"), ("pretrain", "pretrain/*/metrics.json"),
             ("probe", "probes/**/metrics.json"), ("plasticity", "plasticity/**/plasticity.csv"),
             ("criteria", "criteria/**/criteria.csv"), ("trajectory", "pretrain/*/trajectory/trajectory.csv"))
# The kinds of job whose run folder the store can be rebuilt from (the others, aggregate and
# figures, are tracked while they run).
MIRRORED_KINDS = frozenset(kind for kind, _ in _FINISHED)


def unmirrored(settings: Tracking, results_dir: Path = Path("results")) -> int | None:
    """How many finished run folders the study's SQLite store lacks, read without writing anything
    (None for a server URI: asking it would slow every invocation)."""
    uri = study_uri(settings.uri)
    path = sqlite_path(uri)
    if path is None:
        return None
    folders = [p.parent for _, pattern in _FINISHED for p in _visible(results_dir.glob(pattern))]
    present: set[str | None] = set()
    if path.exists():
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db, \
                contextlib.suppress(sqlite3.Error):
            present = {row[0] for row in db.execute(
                    "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                    "WHERE e.name = ? AND r.lifecycle_stage = 'active' AND r.status = 'FINISHED' AND NOT EXISTS "
                    "(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = ?)",
                    (settings.experiment, INCOMPLETE))}
    return sum(_needs_mirror(folder / RUN_RECORD, present) for folder in folders)


def _run_folders(results_dir: Path, wanted=None) -> Iterator[dict]:
    """Every finished run folder (for which `wanted(folder)` holds): kind, params, history rows,
    final metrics, artifacts, times."""
    patterns = dict(_FINISHED)

    def visible(kind: str) -> list[Path]:
        return [p for p in _visible(results_dir.glob(patterns[kind])) if wanted is None or wanted(p.parent)]

    for kind in ("finetune", "pretrain"):
        for path in visible(kind):
            config = yaml.safe_load((path.parent / "config.yaml").read_text())
            files = [path.parent / name for name in ("config.yaml", "history.csv", "metrics.json")]
            yield _folder(kind, path, config["settings"], read_json(path), [f for f in files if f.exists()],
                          _read_history(path.parent / "history.csv"))
    for path in visible("probe"):
        final = read_json(path)
        yield _folder("probe", path, _model_task(path.parent, final), final, [path])
    for path in visible("plasticity"):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        stats = path.parent / "embedding.json"
        yield _folder("plasticity", path, _model_task(path.parent, rows[0] if rows else {}), {},
                      [path] + ([stats] if stats.exists() else []), series=plasticity_series(rows))
    for path in visible("criteria"):
        cost = path.parent / "cost.csv"
        with open(cost, newline="") as handle:
            rows = list(csv.DictReader(handle))
        with open(path, newline="") as handle:
            scores = list(csv.DictReader(handle))
        yield _folder("criteria", path, _model_task(path.parent, rows[0] if rows else {}), criteria_costs(rows),
                      [path, cost], series=criteria_series(scores))
    for path in visible("trajectory"):
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        params = {"model": rows[0]["model"] if rows else path.parent.parent.name,
                  "tasks": list(dict.fromkeys(r["task"] for r in rows)),
                  "keep_steps": sorted({int(r["step"]) for r in rows}),
                  "n_pairs": int(rows[0]["pairs"]) if rows else None}
        yield _folder("trajectory", path, params, {}, [path], series=trajectory_series(rows))


def plasticity_series(rows: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """What a plasticity run logs, from its table's rows (`plasticity.measure`): the mean plasticity of
    each `<mode>/<component>`, step = layer (MLflow then draws plasticity against depth)."""
    return _series(rows, "layer", ("mode", "component"), "mean")


def trajectory_series(rows: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """What a trajectory run logs, from its table's rows (`jobs.measure_trajectory`): plasticity of each
    `<mode>/<component>`, mean over layers and tasks, step = pretraining step."""
    return _series(rows, "step", ("mode", "component"), "mean")


def criteria_series(rows: Iterable[dict]) -> dict[str, list[tuple[int, float]]]:
    """What a criteria run logs of its scores (`criteria.measure`): each `<criterion>/<component>`,
    step = layer."""
    return _series(rows, "layer", ("criterion", "component"), "value")


def criteria_costs(rows: Iterable[dict]) -> dict[str, float]:
    """The wall time of each criterion (`criteria.measure`'s cost rows), as `<criterion>/wall_s`."""
    return {f"{row['criterion']}/wall_s": float(row["wall_s"]) for row in rows}


def _series(rows: Iterable[dict], along: str, by: Sequence[str], value: str) -> dict[str, list[tuple[int, float]]]:
    """{"/"-joined `by` columns: [(step = column `along`, mean of `value` over the rows at that step)]};
    a missing value (empty in a CSV, NaN in a frame) is left out."""
    values: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if row[value] == "" or is_missing(row[value]):
            continue
        key = "/".join(str(row[column]) for column in by)
        values.setdefault(key, {}).setdefault(int(row[along]), []).append(float(row[value]))
    return {key: [(step, sum(found) / len(found)) for step, found in sorted(steps.items())]
            for key, steps in values.items()}


def _folder(kind: str, path: Path, params: dict, final: dict, artifacts: list[Path],
            history: list[dict] | None = None, series: dict | None = None) -> dict:
    """A run folder's record; it ended when `path` was written and ran for `wall_time_s` if known."""
    end = int(path.stat().st_mtime * 1000)
    wall = final.get("wall_time_s")
    start = end - int(1000 * wall) if isinstance(wall, numbers.Real) and math.isfinite(wall) else end
    return {"kind": kind, "dir": path.parent, "params": params, "final": final, "artifacts": artifacts,
            "history": history or [], "series": series or {}, "start_ms": start, "end_ms": end}


def _visible(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if not any(part.startswith(".") for part in p.parts[-4:]))


def _model_task(folder: Path, values: dict) -> dict:
    return {"model": values.get("model", folder.parent.name), "task": values.get("task", folder.name)}


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]


def _experiment_id(client: MlflowClient, uri: str, name: str | None) -> str:
    """The id of the active experiment `name`; `Unusable` if the store cannot give it."""
    fix = "run the job through snakemake (it creates the experiment before any job)"
    experiment = client.get_experiment_by_name(name) if name else None
    if experiment is None:
        raise Unusable(uri, f"it has no experiment {name!r}", fix)
    if experiment.lifecycle_stage != "active":
        raise Unusable(uri, f"its experiment {name!r} is deleted", "restore it (`mlflow experiments restore`) "
                       "or rerun snakemake")
    return experiment.experiment_id


def _recorded_id(record: Path) -> str | None:
    try:
        return read_json(record)["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mark_stale(record: Path) -> None:
    """Mark a run folder's record as older than the folder (its job runs again, not tracked live)."""
    try:
        payload = read_json(record)
    except (OSError, ValueError):
        return
    if isinstance(payload, dict) and not payload.get("stale"):
        write_json(record, payload | {"stale": True})


def _needs_mirror(record: Path, present: set) -> bool:
    """A finished folder whose recorded run is not among the complete runs `present`, or predates
    what the folder holds."""
    try:
        payload = read_json(record)
        return payload["run_id"] not in present or bool(payload.get("stale"))
    except (OSError, ValueError, KeyError, TypeError):  # no record, or not one: never mirrored
        return True


def _recorded_run(client: MlflowClient, record: Path, experiment_id: str) -> Run | None:
    from mlflow.exceptions import MlflowException

    run_id = _recorded_id(record)
    if run_id is None:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return run


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _log_batch(client: MlflowClient, run_id: str, metrics: list = (), params: list = (), tags: list = ()) -> None:
    for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])
    for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])
    for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=tags[start:start + MAX_PARAMS_TAGS_PER_BATCH])


def _tag_entities(tags: dict) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k[:MAX_KEY_LENGTH], _truncate(str(v), MAX_TAG_LENGTH)) for k, v in tags.items()]


@contextlib.contextmanager
def _exclusive(lock: str | None) -> Iterator[None]:
    """Hold the file lock `lock` (its folder must exist); no path, no lock."""
    if not lock:
        yield
        return
    from filelock import FileLock

    with FileLock(lock):
        yield


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _close_quietly(job: MlflowJobRun, status: str) -> None:
    """Close a failing run without hiding the error that ends it."""
    try:
        job.close(status)
    except Exception as exc:  # the job's own exception is the one to report
        print(f"warning: could not mark MLflow run {job.run_id} {status} ({_one_line(exc)})", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def _sigint_after_the_folder() -> Iterator:
    """While the block runs, a first SIGINT only sets the flag the block polls (`stopped()`); the
    default handler is back for a second one."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` so the run gets closed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _is_credential(name: str, value: object) -> bool:
    lowered = name.lower()
    if isinstance(value, str) and _URL_USERINFO.search(value):
        return True
    if any(word in lowered for word in _SENSITIVE_ALWAYS):
        return value not in (None, "")
    return (any(word in lowered for word in _SENSITIVE_IF_CREDENTIAL) and isinstance(value, str)
            and bool(_CREDENTIAL.fullmatch(value)))


def _shown(key: str, value: float) -> float:
    """A metric as MLflow shows it: accuracies (fractions in the run folders) in %."""
    return 100.0 * float(value) if key in PERCENT_KEYS else float(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redact(uri: str) -> str:
    return _URL_USERINFO.sub("//", uri)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _now_ms() -> int:
    return int(time.time() * 1000)
