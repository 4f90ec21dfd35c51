"""MLflow, a view of the job records (`records`) that can always be rebuilt from them.

Every job that leaves a run folder ends by writing its record there; this module mirrors records
into MLflow, each whole or not at all, and reads nothing else of a folder. The workflow makes the
store, the experiment and the parent runs once before any job (`prepare_study`, from Snakemake's
`onstart`), so parallel jobs never race on schema migration or experiment creation, and mirrors the
records the store lacks before the jobs and after them (`mirror_at_end`); `vitplasticity tracking
rebuild` does the same by hand. With `tracking.live`, a job also opens its run while it runs
(`live`): the training loop's evaluation hook logs the curves, and at job end its record is
mirrored into that run (the record wins). Every call names its run id explicitly
(`MlflowClient`), so parallel jobs share no state. Nothing is recorded in a file: the default store
is resolved from the folder a job runs in (`study_uri`), so a copied study tracks into its own store.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from vitplasticity import records
from vitplasticity.errors import UserError
from vitplasticity.fileio import is_missing, read_json, write_json

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from vitplasticity.machine import Tracking

# Names a folder's MLflow run and the record (`records`, its id) that run mirrors.
RUN_FILE = "mlflow_run.json"
# Tag of a run the mirror has not completed yet: an interrupted mirror's run, which the next mirror
# deletes and mirrors again (the run folder's RUN_FILE names a run only once it is complete).
INCOMPLETE = "mirror_incomplete"
# The study's own store, relative to the folder the workflow and its jobs run in.
DEFAULT_STORE = Path("results") / "mlflow.db"
# Held while a job creates a missing parent run (the workflow normally made them all before).
PARENT_LOCK = Path("results") / "tracking.lock"
# Settings of the optimizer a run does not use, left out of its MLflow params.
UNUSED_BY = {"sgd": ("betas",), "adamw": ("momentum",)}
# MLflow 3's UI opens an experiment of this kind on its runs (not on the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
HEALTH_TIMEOUT_S = 5.0
# MLflow's documented limits (mlflow.utils.validation), fixed here to keep mlflow imports lazy;
# `MlflowClient.log_batch` splits a batch into MLflow's own chunks.
MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
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
    """SIGTERM inside `live`: the run is closed as KILLED, then the process exits with 143."""


class MirroredRun:
    """One MLflow run; each history step and final value is logged at most once."""

    def __init__(self, client: MlflowClient, run_id: str, last_steps: dict[str, int], latest: dict[str, float]):
        self.client, self.run_id = client, run_id
        self._last_steps, self._latest = last_steps, latest

    def log_history(self, rows: list[dict]) -> None:
        """Log training-history rows (step and `records.HISTORY_KEYS`, accuracies as fractions)."""
        from mlflow.entities import Metric

        now, metrics = _now_ms(), []
        for row in rows:
            step = int(float(row["step"]))
            for key in records.HISTORY_KEYS:
                value = row.get(key)
                if value in (None, "") or is_missing(value) or step <= self._last_steps.get(key, 0):
                    continue
                metrics.append(Metric(key, records.shown(key, float(value)), now, step))
                self._last_steps[key] = step
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_record(self, record: dict, folder: Path) -> None:
        """Log what the record holds and the run lacks: the history file's rows, the series on
        MLflow's step axis, the final metrics (at the last history step) and the job's resources,
        the tags, the artifacts."""
        from mlflow.entities import Metric

        if record.get("history"):
            with open(folder / record["history"], newline="") as handle:
                self.log_history(list(csv.DictReader(handle)))
        now, metrics = _now_ms(), []
        for key, points in record["series"].items():
            for step, value in points:
                if key not in self._last_steps or step > self._last_steps[key]:
                    metrics.append(Metric(key, value, now, step))
                    self._last_steps[key] = step
        step = max((self._last_steps[key] for key in records.HISTORY_KEYS if key in self._last_steps), default=0)
        finals = record["metrics"] | {f"job/{key}": value for key, value in record["resources"].items()}
        for key, value in finals.items():
            if self._latest.get(key) != value:
                metrics.append(Metric(key, value, now, step))
                self._latest[key] = value
        self.client.log_batch(self.run_id, metrics=metrics, tags=_tag_entities(record["tags"]))
        for name in record["artifacts"]:
            path = folder / name
            if not path.exists():
                print(f"vitplasticity tracking: {path}, an artifact named by {folder / records.FILE}, is gone; "
                      "the run is mirrored without it", file=sys.stderr, flush=True)
            elif path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str, end_time: int | None = None) -> None:
        self.client.set_terminated(self.run_id, status=status, end_time=end_time)


@contextlib.contextmanager
def live(settings: Tracking, folder: Path | None, kind: str, params: dict) -> Iterator[Callable | None]:
    """Track one job in MLflow while it runs; yield the training loop's evaluation hook that logs its
    history rows (`MirroredRun.log_history`), or None when nothing is tracked live.

    Live: `settings.enabled` and `settings.live`, and the job leaves a record in `folder`. When the
    block ends the record the job wrote is mirrored into the run (the record wins) and the run is
    closed FINISHED; an exception closes it FAILED, Ctrl-C or SIGTERM KILLED. A store the job cannot
    use, at the start, during training or at the end, is one line (`unusable`) and the job goes on
    untracked: the workflow mirrors its record later.
    """
    if folder is None or not (settings.enabled and settings.live):
        yield None
        return
    folder = Path(folder)
    try:
        run, experiment_id, uri = _open_live(settings, folder, kind, params)
    except Exception as exc:  # noqa: BLE001 (tracking is a view: any store failure leaves the job untracked)
        print(f"vitplasticity tracking: {unusable(settings, exc)}", file=sys.stderr, flush=True)
        yield None
        return
    failed = []

    def on_eval(rows: list[dict]) -> None:
        """Log the rows; after a first failure one line, and the job trains on without logging."""
        if failed:
            return
        try:
            run.log_history(rows)
        except Exception as exc:  # noqa: BLE001 (a store that fails mid-run must not stop a long job)
            failed.append(exc)
            print(f"vitplasticity tracking: {unusable(settings, exc)}", file=sys.stderr, flush=True)

    with _sigterm_raises():
        try:
            yield on_eval
        except (KeyboardInterrupt, Terminated):
            _close_quietly(run, "KILLED")
            raise
        except BaseException:
            _close_quietly(run, "FAILED")
            raise
    record = records.read(folder)
    if record is None:  # a fault of this project, not of the store: said, and the run not left RUNNING
        print(f"vitplasticity tracking: the {kind} job wrote no {folder / records.FILE}; its MLflow run is "
              "marked FAILED", file=sys.stderr, flush=True)
        _close_quietly(run, "FAILED")
        return
    try:
        run.log_record(record, folder)
        run.close("FINISHED")
        write_run_file(folder, run.run_id, experiment_id, record, uri)
    except Exception as exc:  # noqa: BLE001 (the job succeeded; its record is mirrored when the store answers)
        print(f"vitplasticity tracking: {unusable(settings, exc)}", file=sys.stderr, flush=True)
        _close_quietly(run, "FAILED")


def _open_live(settings: Tracking, folder: Path, kind: str, params: dict) -> tuple[MirroredRun, str, str]:
    """The run of one live-tracked job, its id in the folder's RUN_FILE (without a record yet)."""
    uri = study_uri(settings.uri)
    check_store(uri, create=False)
    client = _client(uri)
    experiment_id = _experiment_id(client, uri, settings.experiment)
    parent_id = None
    if kind == "finetune":  # its parent is made by `prepare_study`; created here only if it was deleted since
        name = records.parent_name(params)
        parent_id = _parents(client, experiment_id).get(name)
        if parent_id is None:
            from filelock import FileLock

            with FileLock(PARENT_LOCK):
                parent_id = parent_runs(client, experiment_id, [name])[name]
    run = open_run(client, folder, run_name=records.run_name(kind, params), experiment_id=experiment_id,
                   parent_id=parent_id, params=params, tags=records.environment_tags() | {"kind": kind})
    write_run_file(folder, run.run_id, experiment_id, None, uri)
    return run, experiment_id, uri


def study_uri(uri: str | None, cwd: Path | None = None) -> str:
    """The tracking URI: `uri`, else MLFLOW_TRACKING_URI, else the SQLite store `results/mlflow.db` of
    the study folder `cwd` (default: the working directory, where Snakemake runs its jobs).

    Resolved afresh by every process and never recorded, so a copied study folder tracks into its
    own store, and a job writes outside its study only to a store the user named.
    """
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(cwd or Path.cwd()).resolve() / DEFAULT_STORE}"


def rebuild_command(settings: Tracking) -> str:
    """The command that mirrors a study's job records into its store by hand (a URI that names
    credentials is shown without them)."""
    uri = f" --uri {_redact(settings.uri)}" if settings.uri else ""
    return f"vitplasticity tracking rebuild --experiment {settings.experiment}{uri}"


def mirror_at_end(settings: Tracking, parents: Sequence[str]) -> None:
    """After the jobs of a workflow: mirror the job records the store lacks.

    Never raises: the folders are the record and every job succeeded or failed on its own, so a
    store that fails now (another MLflow version, locked, unreachable, a damaged folder) gets one
    line (`unusable`), and the workflow's exit status stays the jobs'.
    """
    try:
        prepare_study(settings, parents)
    except Exception as exc:  # noqa: BLE001 (any failure: one line, the results stand)
        print(f"vitplasticity tracking: {unusable(settings, exc)}", file=sys.stderr, flush=True)


def prepare_study(settings: Tracking, parents: Sequence[str], results_dir: Path = Path("results")) -> str:
    """Before a workflow's jobs: make the store, the experiment and its parent runs, and mirror every
    job record the experiment lacks (tracking switched on, study renamed, store lost, pulled
    or copied); returns the URI. A SQLite store copied from another study folder (its experiment's
    artifacts live elsewhere) is set aside first, so nothing here or in a job writes into another study.
    """
    uri = study_uri(settings.uri)
    check_store(uri, create=True)
    _set_aside_copied_store(uri, settings.experiment)
    prepare_store(uri, settings.experiment, parents)
    mirrored = rebuild(results_dir, uri, settings.experiment, only_missing=True)
    if mirrored:
        print(f"vitplasticity: mirrored {len(mirrored)} job records into MLflow experiment "
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
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) is None:
                client.set_experiment_tag(experiment_id, key, value)
    return {"experiment_id": experiment_id, "parent_run_ids": parent_runs(client, experiment_id, parents)}


def parent_runs(client: MlflowClient, experiment_id: str, names: Sequence[str]) -> dict[str, str]:
    """{name: run id} of the named parent runs, creating those not in the experiment yet.

    Parallel callers must hold one lock (`PARENT_LOCK`), or a parent could be created twice.
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


def open_run(client: MlflowClient, folder: Path, *, run_name: str, experiment_id: str, parent_id: str | None,
             params: dict, tags: dict, start_time: int | None = None) -> MirroredRun:
    """Continue the run named in `folder`'s RUN_FILE, or create one (the caller names it there).

    A named run that still exists (and was not deleted) is reused with status RUNNING and keeps
    its history. If its params differ from `params` (MLflow params cannot change) it is deleted
    and replaced by a new run.
    """
    unused = UNUSED_BY.get(params.get("optimizer"), ())
    flat = flatten_params({k: v for k, v in params.items() if k not in unused})
    tag_values = {k[:MAX_KEY_LENGTH]: _truncate(str(v), MAX_TAG_LENGTH) for k, v in tags.items()
                  if not _is_credential(k, v)}
    if parent_id:
        tag_values["mlflow.parentRunId"] = parent_id
    run = _recorded_run(client, folder, experiment_id)
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
        client.log_batch(run_id, tags=_tag_entities(tag_values))
        last_steps = {}
        for key in dict.fromkeys((*records.HISTORY_KEYS, *run.data.metrics)):
            steps = [m.step for m in client.get_metric_history(run_id, key)]
            if steps:
                last_steps[key] = max(steps)
        latest = dict(run.data.metrics)
        new_params = {k: v for k, v in flat.items() if k not in run.data.params}
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(k, v) for k, v in new_params.items()])
    return MirroredRun(client, run_id, last_steps, latest)


def write_run_file(folder: Path, run_id: str, experiment_id: str, record: dict | None, uri: str) -> None:
    """Name the folder's MLflow run in its RUN_FILE, and the record the run mirrors (None: not yet)."""
    write_json(folder / RUN_FILE, {"run_id": run_id, "experiment_id": experiment_id,
                                   "record_id": record["id"] if record else None,
                                   "run_name": record["run_name"] if record else None,
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


def rebuild(results_dir: Path, uri: str, experiment_name: str, *, only_missing: bool = False) -> dict[str, str]:
    """Mirror the job records under `results_dir` into MLflow; returns {folder: run id}.

    Folders whose named run is still in the store are completed in place, not duplicated; with
    `only_missing` those whose run mirrors their current record are skipped (one search of the
    experiment, not one call per folder). Each record is mirrored whole or not at all: its run
    carries the tag `INCOMPLETE` until it is FINISHED and named in the folder, and the runs an
    interrupted mirror left with that tag are deleted first, so their folders are mirrored again.
    Ctrl-C (SIGINT) in the main thread stops after the folder being mirrored (KeyboardInterrupt); a
    second one stops at once.
    """
    results_dir = Path(results_dir)
    experiment_id = prepare_store(uri, experiment_name)["experiment_id"]
    client = _client(uri)
    for run in _search(client, experiment_id, f"tags.{INCOMPLETE} = 'true'"):
        client.delete_run(run.info.run_id)
    present = None
    if only_missing:
        present = {r.info.run_id for r in _search(client, experiment_id, "attributes.status = 'FINISHED'")}
    found = [(folder, records.read(folder)) for folder in records.find(results_dir)]
    _say_unrecorded(results_dir, {folder for folder, _ in found})
    found = [(folder, record) for folder, record in found
             if record is not None and (present is None or _needs_mirror(folder, record, present))]
    parents = parent_runs(client, experiment_id, sorted({r["parent"] for _, r in found if r["parent"]}))
    done = {}
    with _sigint_after_the_folder() as stopped:
        for folder, record in found:
            if stopped():
                raise KeyboardInterrupt
            relative = str(folder.relative_to(results_dir))
            try:
                done[relative] = _mirror(client, folder, record, experiment_id, parents.get(record["parent"]), uri,
                                         relative)
            except (OSError, ValueError, KeyError, TypeError) as exc:  # this folder's fault: the others go on
                print(f"vitplasticity tracking: {folder / records.FILE} cannot be mirrored ({_one_line(exc)}); "
                      "rerun its job (snakemake -R <its rule>), then mirror again", file=sys.stderr, flush=True)
    return done


def _say_unrecorded(results_dir: Path, recorded: set[Path]) -> None:
    """One line for the run folders of an earlier version: a job's metrics or an MLflow run, but no record."""
    unrecorded = [folder for folder in records.find(results_dir, "metrics.json", RUN_FILE) if folder not in recorded]
    if unrecorded:
        print(f"vitplasticity tracking: {len(unrecorded)} run folders hold no {records.FILE} (written before jobs "
              f"kept records, e.g. {unrecorded[0]}) and are not mirrored; rerun their jobs to give them one "
              "(snakemake --forcerun <their rule>)", file=sys.stderr, flush=True)


def _mirror(client: MlflowClient, folder: Path, record: dict, experiment_id: str, parent_id: str | None, uri: str,
            relative: str) -> str:
    """Mirror one record whole; its run id. A record that cannot be read through leaves no run."""
    run = open_run(client, folder, run_name=record["run_name"], experiment_id=experiment_id, parent_id=parent_id,
                   params=record["params"], tags={"kind": record["kind"], "mirrored_from": relative,
                                                  INCOMPLETE: "true"},
                   start_time=record["start_ms"])
    try:
        run.log_record(record, folder)
    except (OSError, ValueError, KeyError, TypeError):
        client.delete_run(run.run_id)
        raise
    run.close("FINISHED", end_time=record["end_ms"])
    write_run_file(folder, run.run_id, experiment_id, record, uri)
    client.delete_tag(run.run_id, INCOMPLETE)
    return run.run_id


def unmirrored(settings: Tracking, results_dir: Path = Path("results")) -> int | None:
    """How many job records the study's SQLite store lacks, read without writing anything (None for a
    server URI: asking it would slow every invocation)."""
    uri = study_uri(settings.uri)
    path = sqlite_path(uri)
    if path is None:
        return None
    present: set[str | None] = set()
    if path.exists():
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db, \
                contextlib.suppress(sqlite3.Error):
            present = {row[0] for row in db.execute(
                    "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                    "WHERE e.name = ? AND r.lifecycle_stage = 'active' AND r.status = 'FINISHED' AND NOT EXISTS "
                    "(SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid AND t.key = ?)",
                    (settings.experiment, INCOMPLETE))}
    found = ((folder, records.read(folder)) for folder in records.find(results_dir))
    return sum(_needs_mirror(folder, record, present) for folder, record in found if record is not None)


def _needs_mirror(folder: Path, record: dict, present: set) -> bool:
    """A record whose folder names no complete run among `present`, or a run of another record."""
    try:
        named = read_json(folder / RUN_FILE)
        return named["run_id"] not in present or named.get("record_id") != record["id"]
    except (OSError, ValueError, KeyError, TypeError):  # never mirrored
        return True


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


def _recorded_run(client: MlflowClient, folder: Path, experiment_id: str) -> Run | None:
    """The active run of this experiment that `folder`'s RUN_FILE names, if any."""
    from mlflow.exceptions import MlflowException

    try:
        run_id = read_json(folder / RUN_FILE)["run_id"]
        run = client.get_run(run_id)
    except (OSError, ValueError, KeyError, TypeError, MlflowException):
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


def _tag_entities(tags: dict) -> list:
    from mlflow.entities import RunTag

    return [RunTag(k[:MAX_KEY_LENGTH], _truncate(str(v), MAX_TAG_LENGTH)) for k, v in tags.items()]


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _close_quietly(job: MirroredRun, status: str) -> None:
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

    # None: a handler not installed from Python, which cannot be restored; Python's own SIGINT handler
    # (KeyboardInterrupt) stands in (`_sigterm_raises` restores SIGTERM's default, process exit, likewise).
    previous = signal.signal(signal.SIGINT, handler)
    previous = signal.default_int_handler if previous is None else previous
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


def _is_credential(name: str, value: object) -> bool:
    lowered = name.lower()
    if isinstance(value, str) and _URL_USERINFO.search(value):
        return True
    if any(word in lowered for word in _SENSITIVE_ALWAYS):
        return value not in (None, "")
    return (any(word in lowered for word in _SENSITIVE_IF_CREDENTIAL) and isinstance(value, str)
            and bool(_CREDENTIAL.fullmatch(value)))


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _redact(uri: str) -> str:
    return _URL_USERINFO.sub("//", uri)


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


def _now_ms() -> int:
    return int(time.time() * 1000)
