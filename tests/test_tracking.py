"""MLflow, a view of the job records: live runs, resume/rerun without duplicates, failure states, parallel
jobs, rebuild."""

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import smoke_config, snakemake, write_config
from mlflow.tracking import MlflowClient

from vitplasticity import records, tracking
from vitplasticity.machine import Tracking
from vitplasticity.settings import build

PARENT = "vit/novel/sgd"
PARAMS = {"model": "vit", "task": "novel", "optimizer": "sgd", "arm": "mha", "lr": 0.01, "seed": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real MLflow server on 127.0.0.1 with a fresh SQLite store; its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "art"),
               "--workers", "1"]
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:  # noqa: S310 (http://127.0.0.1)
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"MLflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)  # open keep-alive connections delay a graceful stop
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def prepared(server):
    return tracking.prepare_store(server, "tests", [PARENT])


def live(uri: str) -> Tracking:
    return Tracking(enabled=True, uri=uri, experiment="tests")


def history(first: int, last: int, eval_every: int = 10) -> list[dict]:
    rows = []
    for step in range(first, last + 1):
        row = {"step": step, "loss": 1.0 / step, "lr": 0.01, "grad_norm": float("nan") if step == 3 else 0.5}
        if step % eval_every == 0:
            row |= {"val_loss": 2.0 / step, "val_acc": step / 1000}
        rows.append(row)
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    columns = ("step", *records.HISTORY_KEYS)
    lines = [",".join(columns)] + [",".join("" if row.get(c) is None else str(row.get(c)) for c in columns)
                                   for row in rows]
    path.write_text("\n".join(lines) + "\n")


def recorded_id(run_dir: Path) -> str:
    return json.loads((run_dir / tracking.RUN_FILE).read_text())["run_id"]


def count(client: MlflowClient, run_id: str, key: str) -> int:
    return len(client.get_metric_history(run_id, key))


def runs_named(client: MlflowClient, experiment_id: str, name: str) -> list:
    return [r for r in client.search_runs([experiment_id], max_results=1000) if r.info.run_name == name]


def finetune(settings: Tracking, run_dir: Path, rows: list[dict], params: dict | None = None,
             logged: int | None = None) -> dict:
    """A finetuning job as the command line runs it: its run open while it trains (the first `logged`
    history rows logged through the evaluation hook, ten at a time), then its folder and record."""
    params = params or PARAMS
    with tracking.live(settings, run_dir, "finetune", params) as on_eval:
        run_dir.mkdir(parents=True, exist_ok=True)
        shown = rows[:len(rows) if logged is None else logged]
        for start in range(0, len(shown), 10):
            on_eval(shown[start:start + 10])
        write_history(run_dir / "history.csv", rows)
        (run_dir / "metrics.json").write_text("{}")
        return records.write(run_dir, "finetune", params, started=time.time() - 2,
                             metrics={"test_acc": 0.75, "best_step": 40, "status": "completed", "test_loss": None},
                             artifacts=[run_dir / "metrics.json"], history=run_dir / "history.csv", device="cpu")


def test_a_job_s_git_tags_name_the_commit_and_whether_the_tree_differs_from_it(tmp_path, monkeypatch):
    def tags() -> dict:
        return {k: v for k, v in records.environment_tags().items() if k in ("mlflow.source.git.commit", "git_dirty")}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                              capture_output=True, text=True).stdout.strip()

    monkeypatch.chdir(tmp_path)
    assert tags() == {}  # outside a repository
    git("init", "-q")
    (tmp_path / "a b.txt").write_text("one")
    assert tags() == {}  # no commit yet
    git("add", "a b.txt")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    assert tags() == {"mlflow.source.git.commit": head, "git_dirty": "false"}
    (tmp_path / "c d.txt").write_text("untracked")
    assert tags() == {"mlflow.source.git.commit": head, "git_dirty": "true"}
    (tmp_path / "c d.txt").unlink()
    (tmp_path / "a b.txt").write_text("two")
    assert tags() == {"mlflow.source.git.commit": head, "git_dirty": "true"}
    git("checkout", "-q", "--", "a b.txt")
    git("checkout", "-q", "--detach")
    assert tags() == {"mlflow.source.git.commit": head, "git_dirty": "false"}


def test_without_live_tracking_a_job_opens_no_run(tmp_path):
    for settings in (Tracking(enabled=False), Tracking(enabled=True, uri="http://127.0.0.1:1", live=False)):
        with tracking.live(settings, tmp_path, "finetune", PARAMS) as on_eval:
            assert on_eval is None
    with tracking.live(live("http://127.0.0.1:1"), None, "figures", {}) as on_eval:
        assert on_eval is None  # a job without a record
    assert list(tmp_path.iterdir()) == []


def test_params_are_flat_truncated_and_free_of_credentials():
    flat = tracking.flatten_params({
        "lr": 0.01, "components": ["mha", "fc1"], "train": {"steps": 8, "betas": [0.9, 0.999]}, "note": "x" * 7000,
        "hub": {"token": "hf_AbCdEf0123456789xyz", "api_key": "sk-1234567890abcdefXYZ", "key_layer": "qkv"},
        "db_password": "hunter2", "secret": "s", "max_tokens": 128, "mirror": "https://user:pw@example.org/x",
    })
    assert flat["lr"] == "0.01" and flat["components"] == '["mha", "fc1"]'
    assert flat["train.steps"] == "8" and flat["train.betas"] == "[0.9, 0.999]"
    assert len(flat["note"]) == tracking.MAX_PARAM_LENGTH
    assert flat["hub.key_layer"] == "qkv" and flat["max_tokens"] == "128"
    assert not {"hub.token", "hub.api_key", "db_password", "secret", "mirror"} & flat.keys()


def test_run_names():
    settings = {"model": "vit", "task": "cifar10", "arm": "mha", "lr": 0.01, "seed": 42, "optimizer": "sgd",
                "experiment": "main"}
    assert records.run_name("finetune", settings) == "mha/cifar10/lr0.01/seed42"
    assert records.run_name("pretrain", settings) == "pretrain/vit"
    assert records.run_name("probe", settings) == "probe/vit/cifar10"
    assert records.run_name("aggregate", settings) == "aggregate/main"
    assert records.parent_name(settings) == "vit/cifar10/sgd"


def test_a_record_holds_what_mlflow_shows(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    folder = tmp_path / "probes" / "vit" / "novel"
    folder.mkdir(parents=True)
    (folder / "out.csv").write_text("a\n1\n")
    record = records.write(folder, "probe", {"model": "vit", "task": "novel"}, started=time.time() - 3,
                           metrics={"test_acc": 0.887, "train_acc": 0.94, "n": 12, "loss": float("nan"),
                                    "status": "ok", "note": None},
                           series={"embedding/mha": [(1, 0.5), (0, 0.25)]}, artifacts=[folder / "out.csv"],
                           device="cpu")
    assert json.loads((folder / records.FILE).read_text()) == record == records.read(folder)
    assert record["metrics"] == {"test_acc": pytest.approx(88.7), "train_acc": pytest.approx(94.0), "n": 12.0}
    assert record["series"] == {"embedding/mha": [[0, 0.25], [1, 0.5]]}  # in step order
    assert record["artifacts"] == ["out.csv"] and record["history"] is None
    assert record["run_name"] == "probe/vit/novel" and record["parent"] is None
    tags = record["tags"]
    assert tags["kind"] == "probe" and tags["device"] == "cpu" and tags["status"] == "ok" and "note" not in tags
    assert tags["slurm_job_id"] == "4242" and tags["host"] == socket.gethostname()
    assert record["end_ms"] - record["start_ms"] == pytest.approx(3000, abs=200)
    assert record["resources"]["wall_s"] == pytest.approx(3.0, abs=0.2)
    assert 10 < record["resources"]["peak_rss_mib"] < 100_000  # this process, in MiB
    (tmp_path / "logs" / "x").mkdir(parents=True)
    (tmp_path / "logs" / "x" / records.FILE).write_text("{}")  # not a run folder: not searched
    assert records.find(tmp_path) == [folder]


def test_series_leave_out_missing_values_and_average_rows_at_a_step():
    rows = [{"step": step, "mode": "embedding", "component": "mha", "mean": value}
            for step in (100, 50) for value in (0.5, float("nan"), 1.5 + step, None)]
    assert records.series(rows, "step", ("mode", "component"), "mean") == {"embedding/mha": [(50, 26.0), (100, 51.0)]}


def test_a_live_run_logs_its_curves_then_its_record(server, prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run_dir = tmp_path / "run"
    params = PARAMS | {"components": ["mha"], "hub": {"token": "t0k3n"}}
    record = finetune(live(server), run_dir, history(1, 50), params=params, logged=30)
    client = MlflowClient(server)
    (found,) = runs_named(client, prepared["experiment_id"], "mha/novel/lr0.01/seed1")
    assert found.info.run_id == recorded_id(run_dir)
    assert json.loads((run_dir / tracking.RUN_FILE).read_text())["record_id"] == record["id"]
    assert found.info.status == "FINISHED"
    assert found.data.params == {"model": "vit", "task": "novel", "optimizer": "sgd", "arm": "mha", "lr": "0.01",
                                 "seed": "1", "components": '["mha"]', "hub.token": "t0k3n"}  # short: no credential
    tags = found.data.tags
    assert tags["kind"] == "finetune" and tags["device"] == "cpu" and tags["status"] == "completed"
    assert tags["slurm_job_id"] == "4242" and tags["host"] == socket.gethostname()
    assert tags["mlflow.parentRunId"] == prepared["parent_run_ids"][PARENT]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags.get("mlflow.source.git.commit") == (head or None)
    assert tags.get("git_dirty") in (("true", "false") if head else (None,))
    assert found.data.metrics["test_acc"] == 75.0 and "test_loss" not in found.data.metrics  # accuracies in %
    assert found.data.metrics["job/peak_rss_mib"] == pytest.approx(record["resources"]["peak_rss_mib"])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "test_acc")] == [50]  # the last step
    run_id = found.info.run_id
    # 30 rows logged live, the other 20 from the history file at job end
    assert [count(client, run_id, k) for k in records.HISTORY_KEYS] == [50, 50, 49, 5, 5]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_acc")] == [
        (step, step / 10) for step in (10, 20, 30, 40, 50)]  # history rows hold fractions: step / 1000
    assert [a.path for a in client.list_artifacts(run_id)] == ["metrics.json"]
    assert tracking.unmirrored(live(server), tmp_path) is None  # a server is not asked


def test_rerun_of_a_finished_folder_reuses_its_run(server, prepared, tmp_path):
    params, run_dir = PARAMS | {"arm": "ln1"}, tmp_path / "run"
    finetune(live(server), run_dir, history(1, 30), params)
    first = recorded_id(run_dir)
    finetune(live(server), run_dir, history(1, 30), params)
    client = MlflowClient(server)
    (found,) = runs_named(client, prepared["experiment_id"], "ln1/novel/lr0.01/seed1")
    assert found.info.run_id == first == recorded_id(run_dir)
    assert found.info.status == "FINISHED"
    assert count(client, first, "loss") == 30 and count(client, first, "test_acc") == 1


def test_resumed_job_continues_its_run(server, prepared, tmp_path):
    params, run_dir = PARAMS | {"arm": "fc1"}, tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), tracking.live(live(server), run_dir, "finetune", params) as on_eval:
        on_eval(history(1, 20))
        raise KeyboardInterrupt
    client = MlflowClient(server)
    run_id = recorded_id(run_dir)
    assert client.get_run(run_id).info.status == "KILLED"
    with tracking.live(live(server), run_dir, "finetune", params) as on_eval:
        assert client.get_run(run_id).info.status == "RUNNING"
        on_eval(history(11, 40))  # overlaps what was logged before the interruption
        write_history(run_dir / "history.csv", history(1, 40))
        records.write(run_dir, "finetune", params, started=time.time(), history=run_dir / "history.csv")
    assert recorded_id(run_dir) == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 41))


def test_exception_inside_marks_the_run_failed(server, prepared, tmp_path):
    with pytest.raises(RuntimeError, match="boom"), tracking.live(live(server), tmp_path, "finetune",
                                                                   PARAMS | {"arm": "failed"}):
        raise RuntimeError("boom")
    assert MlflowClient(server).get_run(recorded_id(tmp_path)).info.status == "FAILED"
    assert tracking.unmirrored(Tracking(enabled=True, uri=f"sqlite:///{tmp_path}/none.db"), tmp_path) == 0


def test_sigterm_inside_marks_the_run_killed(server, prepared, tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(tracking.Terminated) as caught, tracking.live(live(server), tmp_path, "finetune",
                                                                      PARAMS | {"arm": "terminated"}):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert caught.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    assert MlflowClient(server).get_run(recorded_id(tmp_path)).info.status == "KILLED"


def test_changed_params_replace_the_recorded_run(server, prepared, tmp_path):
    params = PARAMS | {"arm": "changed"}
    finetune(live(server), tmp_path, history(1, 10), params | {"steps": 10})
    old = recorded_id(tmp_path)
    finetune(live(server), tmp_path, history(1, 20), params | {"steps": 20})
    client = MlflowClient(server)
    (found,) = runs_named(client, prepared["experiment_id"], "changed/novel/lr0.01/seed1")
    assert found.info.run_id == recorded_id(tmp_path) != old
    assert client.get_run(old).info.lifecycle_stage == "deleted"
    assert count(client, found.info.run_id, "loss") == 20


def test_unreachable_server_leaves_the_job_untracked_with_one_line(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    with tracking.live(live(uri), tmp_path, "finetune", PARAMS) as on_eval:
        assert on_eval is None  # the job runs; its record is mirrored once the store answers
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"vitplasticity tracking: MLflow store {uri} cannot be used (the server is not reachable")
    assert line.endswith("; fix: start the server (`mlflow server`), or correct `tracking.uri`")
    assert not (tmp_path / tracking.RUN_FILE).exists()


def parallel_job(args: tuple[Tracking, str, int]) -> str:
    """One job of the parallel test (runs in a spawned process)."""
    settings, run_dir, index = args
    finetune(settings, Path(run_dir), history(1, 200, eval_every=20), PARAMS | {"arm": f"parallel{index}"})
    return recorded_id(Path(run_dir))


def test_parallel_processes_lose_no_run_and_no_point(server, prepared, tmp_path):
    jobs = [(live(server), str(tmp_path / f"run{i}"), i) for i in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(parallel_job, jobs)
    client = MlflowClient(server)
    assert len(set(run_ids)) == 4
    for index, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.run_name == f"parallel{index}/novel/lr0.01/seed1" and run.info.status == "FINISHED"
        assert run.info.experiment_id == prepared["experiment_id"]
        assert [count(client, run_id, k) for k in records.HISTORY_KEYS] == [200, 200, 199, 10, 10]
    for index in range(4):
        assert len(runs_named(client, prepared["experiment_id"], f"parallel{index}/novel/lr0.01/seed1")) == 1


def test_parallel_jobs_of_a_new_task_create_its_parent_run_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the study folder: its results/ holds the lock
    (tmp_path / "results").mkdir()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    prepared = tracking.prepare_store(uri, "tests")  # as the workflow does: no parent runs yet
    jobs = [(live(uri), str(tmp_path / f"run{i}"), i) for i in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(parallel_job, jobs)
    client = MlflowClient(uri)
    (parent,) = runs_named(client, prepared["experiment_id"], PARENT)
    assert parent.data.tags["kind"] == "parent"
    assert {client.get_run(run_id).data.tags["mlflow.parentRunId"] for run_id in run_ids} == {parent.info.run_id}


def test_embedded_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/results/mlflow.db"
    with tracking.live(live(uri), tmp_path, "probe", {"model": "vit", "task": "novel"}) as on_eval:
        assert on_eval is None  # jobs never create the store
    assert not (tmp_path / "results" / "mlflow.db").exists()
    prepared = tracking.prepare_store(uri, "tests", [PARENT])
    assert tracking.prepare_store(uri, "tests", [PARENT]) == prepared
    run_dir = tmp_path / "results" / "runs" / "a"
    finetune(live(uri), run_dir, history(1, 12))
    client = MlflowClient(uri)
    run = client.get_run(recorded_id(run_dir))
    assert run.data.tags["mlflow.parentRunId"] == prepared["parent_run_ids"][PARENT]
    assert count(client, run.info.run_id, "loss") == 12
    assert (tmp_path / "results" / "mlartifacts" / run.info.run_id / "artifacts" / "metrics.json").exists()
    assert tracking.unmirrored(live(uri), tmp_path / "results") == 0


def write_run_folder(folder: Path, settings: dict, steps: int, job: str = "finetune") -> dict:
    """A pretraining or finetuning run folder as its job writes it, its record last; the record."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"job": job, "settings": settings}))
    lines = ["step,loss,lr,grad_norm,val_loss,val_acc"]
    lines += [f"{s},{1 / s},0.01,0.5," + (f"{2 / s},{s / 100}" if s % 5 == 0 else ",") for s in range(1, steps + 1)]
    (folder / "history.csv").write_text("\n".join(lines) + "\n")
    metrics = {"status": "completed", "test_acc": 0.5, "wall_time_s": 12.5, "diverged_step": None, "device": "cpu"}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return records.write(folder, job, settings, started=time.time() - 12.5, metrics=metrics, device="cpu",
                         artifacts=[folder / name for name in ("config.yaml", "history.csv", "metrics.json")],
                         history=folder / "history.csv")


def study_results(results: Path) -> None:
    """A finished study's run folders as the jobs write them."""
    for task, arm, lr in (("novel", "mha", 0.01), ("novel", "ln1", 0.03), ("sketch", "mha", 0.01)):
        settings = {"model": "vit", "task": task, "optimizer": "sgd", "arm": arm, "lr": lr, "seed": 0,
                    "components": [arm], "steps": 20}
        write_run_folder(results / "runs" / "vit" / task / "sgd" / arm / f"lr{lr}_seed0", settings, 20)
    write_run_folder(results / "pretrain" / "vit", {"model": "vit", "steps": 30, "lr": 0.003}, 30, job="pretrain")
    model_task = {"model": "vit", "task": "novel"}
    probe = results / "probes" / "vit" / "novel"
    probe.mkdir(parents=True)
    (probe / "metrics.json").write_text(json.dumps({"test_acc": 0.4, "model": "vit", "task": "novel"}))
    records.write(probe, "probe", model_task, started=time.time(), metrics={"test_acc": 0.4},
                  artifacts=[probe / "metrics.json"])
    plasticity = results / "plasticity" / "vit" / "novel"
    plasticity.mkdir(parents=True)
    rows = [{"mode": "embedding", "component": c, "layer": layer, "mean": layer + 1.5} for c in ("mha", "fc1")
            for layer in (0, 1)]
    (plasticity / "plasticity.csv").write_text("mode,component,layer,mean\n" + "".join(
        f"{r['mode']},{r['component']},{r['layer']},{r['mean']}\n" for r in rows))
    records.write(plasticity, "plasticity", model_task | {"n_pairs": 64}, started=time.time(),
                  series=records.series(rows, "layer", ("mode", "component"), "mean"),
                  artifacts=[plasticity / "plasticity.csv"])
    criteria = results / "criteria" / "vit" / "novel"
    criteria.mkdir(parents=True)
    (criteria / "criteria.csv").write_text("model,task,criterion,component,layer,value\n"
                                           "vit,novel,trainable_params,mha,0,12\n")
    records.write(criteria, "criteria", model_task, started=time.time(),
                  series={"trainable_params/mha": [(0, 12.0)]},
                  metrics={"trainable_params/wall_s": 0.01, "relative_gradient_norm/wall_s": 1.25},
                  artifacts=[criteria / "criteria.csv"])
    trajectory = results / "pretrain" / "vit" / "trajectory"
    trajectory.mkdir()
    rows = [{"step": step, "task": task, "mode": "embedding", "component": "mha", "layer": layer,
             "mean": step / 10 + layer + (task == "b")} for step in (10, 20) for task in ("b", "a") for layer in (0, 1)]
    (trajectory / "trajectory.csv").write_text("step\n10\n20\n")
    records.write(trajectory, "trajectory", {"model": "vit", "tasks": ["b", "a"], "keep_steps": [10, 20],
                                             "n_pairs": 64}, started=time.time(),
                  series=records.series(rows, "step", ("mode", "component"), "mean"),
                  artifacts=[trajectory / "trajectory.csv"])


def store_summary(uri: str) -> dict:
    """{run name: (kind, parent name, metric point counts)} of every active run."""
    client = MlflowClient(uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "study"]
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    names = {r.info.run_id: r.info.run_name for r in runs}
    return {r.info.run_name: (r.data.tags["kind"], names.get(r.data.tags.get("mlflow.parentRunId")),
                              {k: count(client, r.info.run_id, k) for k in r.data.metrics}) for r in runs}


def rebuild_and_summarise(results: Path, uri: str) -> tuple[dict, dict]:
    """`rebuild` as the command line runs it (a fresh process: no engine cached on a deleted database)."""
    return tracking.rebuild(results, uri, "study"), store_summary(uri)


JOB = {"job/wall_s": 1, "job/peak_rss_mib": 1}  # every record's own resources


def test_rebuild_recreates_the_store_from_run_folders(tmp_path):
    results = tmp_path / "results"
    study_results(results)
    uri = f"sqlite:///{results}/mlflow.db"
    first, summary = rebuild_and_summarise(results, uri)
    experiment = MlflowClient(uri).get_experiment_by_name("study")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    history_counts = {"loss": 20, "lr": 20, "grad_norm": 20, "val_loss": 4, "val_acc": 4, "test_acc": 1,
                      "wall_time_s": 1, **JOB}
    assert summary["mha/novel/lr0.01/seed0"] == ("finetune", "vit/novel/sgd", history_counts)
    assert summary["mha/sketch/lr0.01/seed0"][1] == "vit/sketch/sgd"
    assert summary["pretrain/vit"][2]["loss"] == 30
    assert summary["probe/vit/novel"] == ("probe", None, {"test_acc": 1, **JOB})
    client = MlflowClient(uri)

    def points(folder: Path, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(recorded_id(folder), key)]

    # values that run along something are on MLflow's step axis: plasticity and criteria per layer
    assert summary["plasticity/vit/novel"][2] == {"embedding/mha": 2, "embedding/fc1": 2, **JOB}
    assert points(results / "plasticity" / "vit" / "novel", "embedding/fc1") == [(0, 1.5), (1, 2.5)]
    assert summary["criteria/vit/novel"] == ("criteria", None, {"trainable_params/wall_s": 1,
                                                                "relative_gradient_norm/wall_s": 1,
                                                                "trainable_params/mha": 1, **JOB})
    assert points(results / "criteria" / "vit" / "novel", "trainable_params/mha") == [(0, 12.0)]
    # the trajectory per pretraining step; step 10: layers 0 and 1 of task b (2, 3) and a (1, 2); step 20: 2 + the same
    assert summary["trajectory/vit"] == ("trajectory", None, {"embedding/mha": 2, **JOB})
    assert points(results / "pretrain" / "vit" / "trajectory", "embedding/mha") == [(10, 2.0), (20, 3.0)]
    trajectory = client.get_run(recorded_id(results / "pretrain" / "vit" / "trajectory"))
    assert trajectory.data.params == {"model": "vit", "tasks": '["b", "a"]', "keep_steps": "[10, 20]", "n_pairs": "64"}
    # runs + pretrain + probe + plasticity + criteria + trajectory + parents
    assert len(summary) == 3 + 1 + 1 + 1 + 1 + 1 + 2
    folder = results / "runs" / "vit" / "novel" / "sgd" / "mha" / "lr0.01_seed0"
    assert recorded_id(folder) == first["runs/vit/novel/sgd/mha/lr0.01_seed0"]
    run = MlflowClient(uri).get_run(recorded_id(folder))
    assert run.info.status == "FINISHED" and run.info.end_time - run.info.start_time == pytest.approx(12500, abs=5)
    assert run.data.params["components"] == '["mha"]' and run.data.tags["device"] == "cpu"

    assert rebuild_and_summarise(results, uri) == (first, summary)  # again: nothing duplicated

    (results / "mlflow.db").unlink()
    shutil.rmtree(results / "mlartifacts")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        second, rebuilt = pool.apply(rebuild_and_summarise, (results, uri))
    assert rebuilt == summary
    assert second.keys() == first.keys() and not set(second.values()) & set(first.values())
    assert recorded_id(folder) == second["runs/vit/novel/sgd/mha/lr0.01_seed0"]


def test_a_damaged_folder_is_one_line_and_the_others_are_mirrored(tmp_path, capsys):
    results = tmp_path / "results"
    study_results(results)
    damaged = results / "runs" / "vit" / "novel" / "sgd" / "ln1" / "lr0.03_seed0"
    (damaged / "history.csv").unlink()
    (results / "probes" / "vit" / "novel" / "metrics.json").unlink()  # an artifact gone: mirrored without it
    uri = f"sqlite:///{results}/mlflow.db"
    done = tracking.rebuild(results, uri, "study")
    assert len(done) == 7 and str(damaged.relative_to(results)) not in done
    lines = capsys.readouterr().err.splitlines()
    assert (f"vitplasticity tracking: {damaged / records.FILE} cannot be mirrored ([Errno 2] No such file or "
            f"directory: '{damaged / 'history.csv'}'); rerun its job (snakemake -R <its rule>), then mirror "
            "again") in lines
    probe = results / "probes" / "vit" / "novel"
    assert (f"vitplasticity tracking: {probe / 'metrics.json'}, an artifact named by {probe / records.FILE}, is gone; "
            "the run is mirrored without it") in lines
    assert tracking.unmirrored(Tracking(enabled=True, uri=uri, experiment="study"), results) == 1
    assert [run for run in stored_runs(results / "mlflow.db") if run[0] == "ln1/novel/lr0.03/seed0"] == [
        ("ln1/novel/lr0.03/seed0", "RUNNING", "deleted", "finetune", "true")]  # no half-mirrored run is left active


def test_a_folder_of_an_earlier_version_without_a_record_is_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    study_results(results)
    old = results / "runs" / "vit" / "novel" / "sgd" / "ln1" / "lr0.03_seed0"
    (old / records.FILE).unlink()  # as a run folder written before jobs kept records
    done = tracking.rebuild(results, f"sqlite:///{results}/mlflow.db", "study")
    assert len(done) == 7 and str(old.relative_to(results)) not in done
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitplasticity")] == [
        f"vitplasticity tracking: 1 run folders hold no record.json (written before jobs kept records, e.g. {old}) "
        "and are not mirrored; rerun their jobs to give them one (snakemake --forcerun <their rule>)"]


def test_a_live_run_survives_a_store_that_fails_mid_run_and_a_job_without_record(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking.prepare_store(uri, "tests", [PARENT])
    client = MlflowClient(uri)

    def broken(self, rows):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(tracking.MirroredRun, "log_history", broken)
    run_dir = tmp_path / "run"
    finetune(live(uri), run_dir, history(1, 30))  # the job trains on and writes its record
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitplasticity")]
    assert len(lines) == 2 and all(" cannot be used (locked by another process)" in line for line in lines)
    assert client.get_run(recorded_id(run_dir)).info.status == "FAILED"  # not left RUNNING
    assert tracking.unmirrored(live(uri), tmp_path) == 1  # its record is mirrored by the next mirror
    monkeypatch.undo()
    tracking.rebuild(tmp_path, uri, "tests", only_missing=True)
    assert client.get_run(recorded_id(run_dir)).info.status == "FINISHED"
    assert tracking.unmirrored(live(uri), tmp_path) == 0

    with tracking.live(live(uri), tmp_path / "other", "probe", {"model": "vit", "task": "novel"}):
        pass  # a job that writes no record
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("vitplasticity")] == [
        f"vitplasticity tracking: the probe job wrote no {tmp_path / 'other' / records.FILE}; its MLflow run is "
        "marked FAILED"]
    assert client.get_run(recorded_id(tmp_path / "other")).info.status == "FAILED"


def test_a_job_that_runs_again_drops_the_record_of_its_earlier_run_first(tmp_path):
    from vitplasticity.cli import run_in_process

    out = tmp_path / "results" / "figures" / "main"
    out.mkdir(parents=True)
    (out / records.FILE).write_text('{"id": "earlier"}')
    assert run_in_process(["figures", "--tables", str(tmp_path / "missing"), "--out-dir", str(out)]) == 2
    assert not (out / records.FILE).exists()  # a failed rerun leaves no record of outputs it replaced


def test_a_job_run_again_without_live_tracking_updates_its_run_at_the_next_mirror(tmp_path):
    results = tmp_path / "results"
    study_results(results)
    uri = f"sqlite:///{results}/mlflow.db"
    tracking.rebuild(results, uri, "study")
    before = store_summary(uri)
    deferred = Tracking(enabled=True, uri=uri, experiment="study", live=False)
    folder = results / "runs" / "vit" / "novel" / "sgd" / "mha" / "lr0.01_seed0"
    settings = yaml.safe_load((folder / "config.yaml").read_text())["settings"]
    old_id = recorded_id(folder)

    def run_again(steps: int) -> None:
        """The job as Snakemake reruns it: its outputs removed, then written anew with a new record."""
        for name in ("config.yaml", "history.csv", "metrics.json"):
            (folder / name).unlink()
        with tracking.live(deferred, folder, "finetune", settings) as on_eval:
            assert on_eval is None
            write_run_folder(folder, settings | {"steps": steps}, steps)

    run_again(steps=20)  # same settings (a code change): the same run, continued
    assert tracking.unmirrored(deferred, results) == 1
    tracking.rebuild(results, uri, "study", only_missing=True)
    assert recorded_id(folder) == old_id and tracking.unmirrored(deferred, results) == 0
    again = store_summary(uri)
    # nothing duplicated; the job's own resources get a point each time they changed (this test's two
    # "runs" share one process, whose peak memory may not have grown in between)
    name = "mha/novel/lr0.01/seed0"
    assert {k: v for k, v in again[name][2].items() if not k.startswith("job/")} == {
        k: v for k, v in before[name][2].items() if not k.startswith("job/")}
    assert again[name][2]["job/wall_s"] in (1, 2) and again[name][2]["job/peak_rss_mib"] in (1, 2)
    assert {k: v for k, v in again.items() if k != name} == {k: v for k, v in before.items() if k != name}

    run_again(steps=30)  # changed settings: the run is replaced, as when it is tracked live
    tracking.rebuild(results, uri, "study", only_missing=True)
    after = store_summary(uri)
    assert recorded_id(folder) != old_id and len(after) == len(before)
    assert after["mha/novel/lr0.01/seed0"][2]["loss"] == 30


def stored_runs(store: Path) -> list[tuple]:
    """(name, status, lifecycle stage, kind tag, incomplete tag) of every run in a SQLite store, read with sqlite3."""
    if not store.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        return db.execute("SELECT r.name, r.status, r.lifecycle_stage, k.value, i.value FROM runs r "
                          "LEFT JOIN tags k ON k.run_uuid = r.run_uuid AND k.key = 'kind' "
                          "LEFT JOIN tags i ON i.run_uuid = r.run_uuid AND i.key = ?",
                          (tracking.INCOMPLETE,)).fetchall()


def start_rebuild(study: Path, after_runs: int) -> subprocess.Popen:
    """`tracking rebuild` in `study`, returned once the store holds `after_runs` job runs (or it ended)."""
    process = subprocess.Popen([sys.executable, "-m", "vitplasticity", "tracking", "rebuild", "--experiment", "study"],
                               cwd=study, stderr=subprocess.PIPE, text=True)
    deadline, store = time.time() + 300, study / "results" / "mlflow.db"
    while time.time() < deadline and process.poll() is None:
        with contextlib.suppress(sqlite3.Error):
            if sum(run[3] not in (None, "parent") for run in stored_runs(store)) >= after_runs:
                break
        time.sleep(0.05)
    return process


def test_a_rebuild_stopped_by_ctrl_c_or_killed_is_completed_by_the_next_mirror(tmp_path):
    results = tmp_path / "results"
    study_results(results)
    for index in range(20):  # enough folders that the interrupt lands mid-way
        settings = {"model": "vit", "task": "novel", "optimizer": "sgd", "arm": "fc1", "lr": 0.01, "seed": index,
                    "components": ["fc1"], "steps": 20}
        write_run_folder(results / "runs" / "vit" / "novel" / "sgd" / "fc1" / f"lr0.01_seed{index}", settings, 20)
    store = results / "mlflow.db"
    deferred = Tracking(enabled=True, uri=f"sqlite:///{store}", experiment="study")

    process = start_rebuild(tmp_path, after_runs=3)
    process.send_signal(signal.SIGINT)  # Ctrl-C: it stops once the folder being mirrored is complete
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        "vitplasticity tracking rebuild: interrupted; the folders not mirrored yet (and the one being mirrored) "
        "are mirrored by the next snakemake run or by this command again")
    missing = tracking.unmirrored(deferred, results)  # what `snakemake -n` reports
    assert 0 < missing < 28
    assert len(list(results.rglob(tracking.RUN_FILE))) == 28 - missing
    assert {run[1] for run in stored_runs(store)} == {"FINISHED"}

    process = start_rebuild(tmp_path, after_runs=28 - missing + 2)
    process.kill()  # killed mid-way: a run of a folder is left RUNNING, without its record
    process.communicate(timeout=60)
    assert tracking.unmirrored(deferred, results) > 0

    with multiprocessing.get_context("spawn").Pool(1) as pool:  # the next mirror, as snakemake runs it
        pool.apply(tracking.rebuild, (results, f"sqlite:///{store}", "study"), {"only_missing": True})
    assert tracking.unmirrored(deferred, results) == 0
    active = [run for run in stored_runs(store) if run[2] == "active"]
    assert len(active) == 28 + 2  # every folder once, and the two parent runs
    assert {(status, incomplete) for _, status, _, _, incomplete in active} == {("FINISHED", None)}
    assert len({name for name, *_ in active}) == len(active)


def test_a_store_of_another_mlflow_version_stops_neither_the_workflow_nor_rebuild(tmp_path):
    store = tmp_path / "results" / "mlflow.db"
    tracking.prepare_store(f"sqlite:///{store}", "smoke")
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        db.execute("UPDATE alembic_version SET version_num='ffffffffffff'")
    config = smoke_config()
    config["tracking"] = {"enabled": True}
    config_path = write_config(tmp_path / "tracked.yaml", config)
    result = snakemake(tmp_path, "--cores", "1", "data/prepared/novel", config=config_path)
    assert (tmp_path / "data" / "prepared" / "novel" / "meta.json").exists()  # the job ran
    line = (f"vitplasticity tracking: MLflow store sqlite:///{store} cannot be used (its schema revision ffffffffffff "
            "was written by another MLflow version); the jobs run and their run folders stay the record; fix: "
            f"`mv {store} {store}.other && vitplasticity tracking rebuild --experiment smoke` (or use the MLflow "
            "version that wrote it)")
    assert result.stderr.splitlines().count(line) == 2  # at start and at end
    assert "Traceback" not in result.stderr
    rebuild = subprocess.run([sys.executable, "-m", "vitplasticity", "tracking", "rebuild", "--experiment", "smoke"],
                             cwd=tmp_path, capture_output=True, text=True)
    assert rebuild.returncode == 2
    assert rebuild.stderr.splitlines()[-1] == line.replace("vitplasticity tracking:", "vitplasticity tracking: error:")
    assert "Traceback" not in rebuild.stderr


@pytest.mark.slow
def test_smoke_workflow_with_parallel_jobs_mirrors_every_run_folder(server, tmp_path):
    config = smoke_config()
    config["tracking"] = {"enabled": True, "uri": server}
    config_path = write_config(tmp_path / "smoke.yaml", config)
    workdir = tmp_path / "study"
    snakemake(workdir, "--cores", "2", config=config_path, timeout=1800)
    results = workdir / "results"
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], max_results=1000)
    assert all(r.info.status == "FINISHED" for r in runs)
    kinds = [r.data.tags["kind"] for r in runs]
    folders = {kind: [p.parent for p in results.glob(pattern)] for kind, pattern in (
        ("finetune", "runs/**/metrics.json"), ("pretrain", "pretrain/*/metrics.json"),
        ("probe", "probes/**/metrics.json"), ("plasticity", "plasticity/**/plasticity.csv"),
        ("trajectory", "pretrain/*/trajectory/trajectory.csv"))}
    assert len(folders["finetune"]) == 2 * 5 * 2
    finetune_settings = {folder: yaml.safe_load((folder / "config.yaml").read_text())["settings"]
                         for folder in folders["finetune"]}
    # One parent per model/task/optimizer, made before the jobs by the workflow's onstart.
    parents = {r.info.run_name: r.info.run_id for r in runs if r.data.tags["kind"] == "parent"}
    assert sorted(parents) == sorted({records.parent_name(s) for s in finetune_settings.values()})
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "parent": len(parents), "aggregate": 1, "figures": 1, **{kind: len(found) for kind, found in folders.items()}}
    for folder, settings in finetune_settings.items():
        run = client.get_run(recorded_id(folder))
        assert run.info.run_name == records.run_name("finetune", settings)
        assert run.data.tags["mlflow.parentRunId"] == parents[records.parent_name(settings)]
        assert run.data.params["arm"] == settings["arm"]
        steps = len((folder / "history.csv").read_text().splitlines()) - 1
        assert count(client, run.info.run_id, "loss") == steps == settings["steps"]
        assert run.data.metrics["test_acc"] == pytest.approx(
            100 * json.loads((folder / "metrics.json").read_text())["test_acc"])
        assert "betas" not in run.data.params and run.data.params["momentum"] == "0.9"  # SGD runs
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"config.yaml", "history.csv",
                                                                           "metrics.json"}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_copied_study_tracks_into_its_own_store(smoke_copy, tmp_path):
    config = smoke_config()
    config["tracking"]["enabled"] = True
    # A finished study tracked into its default store: tracking switched on, then the one-line advice followed.
    rebuilt = subprocess.run([sys.executable, "-m", "vitplasticity", "tracking", "rebuild", "--experiment", "smoke"],
                             cwd=smoke_copy, capture_output=True, text=True, check=True)
    assert "rebuilt 28 runs" in rebuilt.stderr  # 26 run folders, the tables and the figures
    original = {"db": tree_digest(smoke_copy / "results")["mlflow.db"],
                "artifacts": tree_digest(smoke_copy / "results" / "mlartifacts")}

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(smoke_copy), str(copy)], check=True)
    config["tasks"]["novel"]["steps"] = 6
    changed = write_config(tmp_path / "changed.yaml", config)
    snakemake(copy, "--cores", "2", config=changed)

    assert tree_digest(smoke_copy / "results")["mlflow.db"] == original["db"]
    assert tree_digest(smoke_copy / "results" / "mlartifacts") == original["artifacts"]
    assert len(list((copy / "results").glob("mlflow.copied-*.db"))) == 1  # the copied store, set aside
    client = MlflowClient(f"sqlite:///{copy}/results/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    assert experiment.artifact_location == (copy / "results" / "mlartifacts").as_uri()
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    folders = [p.parent for p in (copy / "results" / "runs").rglob("metrics.json")]
    assert len(folders) == 20
    for folder in folders:
        run = runs[recorded_id(folder)]
        assert run.info.status == "FINISHED"
        steps = yaml.safe_load((folder / "config.yaml").read_text())["settings"]["steps"]
        assert run.data.params["steps"] == str(steps) == ("6" if "/novel/" in str(folder) else "8")
        assert count(client, run.info.run_id, "loss") == steps
    kinds = [r.data.tags["kind"] for r in runs.values()]
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        "finetune": 20, "pretrain": 1, "probe": 2, "plasticity": 2, "trajectory": 1, "parent": 2, "aggregate": 1,
        "figures": 1}


@pytest.mark.slow
def test_without_live_tracking_the_workflow_mirrors_what_its_jobs_finished(smoke_copy, tmp_path):
    config = smoke_config()
    config["tracking"] |= {"enabled": True, "live": False}
    config["tasks"]["novel"]["lrs"] = [0.01, 0.05]  # one new learning rate: one run per arm
    result = snakemake(smoke_copy, "--cores", "2", config=write_config(tmp_path / "deferred.yaml", config))
    # Before the jobs the 28 records of the study; after them, the 5 new runs, the tables and the figures.
    assert "vitplasticity: mirrored 28 job records" in result.stderr
    assert "vitplasticity: mirrored 7 job records" in result.stderr
    client = MlflowClient(f"sqlite:///{smoke_copy}/results/mlflow.db")
    experiment = client.get_experiment_by_name("smoke")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id], max_results=1000)}
    new = sorted((smoke_copy / "results" / "runs").glob("*/novel/*/*/lr0.05_seed0"))
    assert len(new) == len(config["arms"])
    for folder in new:
        run = runs[recorded_id(folder)]  # recorded by the mirror: the job itself never opened MLflow
        assert run.info.status == "FINISHED"
        assert run.data.tags["mirrored_from"] == str(folder.relative_to(smoke_copy / "results"))
        assert count(client, run.info.run_id, "loss") == config["tasks"]["novel"]["steps"]
    kinds = [r.data.tags["kind"] for r in runs.values()]
    assert kinds.count("finetune") == 25 and kinds.count("aggregate") == kinds.count("figures") == 1


def test_a_live_and_a_mirrored_plasticity_run_log_the_same_series(kit, tmp_path):
    from jobkit import CKPT, RUNTIME, TASK

    from vitplasticity import jobs
    from vitplasticity.datasets.sources import prepare_task

    reference = tmp_path / "data" / "prepared" / "source"
    prepare_task("source", {"source": "synthetic", "kind": "source", "image_size": 16, "n_train": 16, "n_val": 16,
                            "n_test": 64, "seed": 0}, reference, tmp_path / "data" / "raw")
    live_uri, mirrored_uri = f"sqlite:///{tmp_path}/live.db", f"sqlite:///{tmp_path}/mirrored.db"
    tracking.prepare_store(live_uri, "study")
    folder = tmp_path / "results" / "plasticity" / "vit" / "novel"
    settings = {"model": "vit", "task": "novel", "reference_task": "source", "n_pairs": 16,
                "modes": ["embedding", "hidden"]}
    with tracking.live(Tracking(enabled=True, uri=live_uri, experiment="study"), folder, "plasticity", settings):
        jobs.measure_plasticity(build("plasticity", settings), RUNTIME, kit / CKPT, reference, kit / TASK,
                                folder / "plasticity.csv", folder / "embedding.json")
    live_id = recorded_id(folder)
    tracking.rebuild(tmp_path / "results", mirrored_uri, "study")
    mirrored_id = recorded_id(folder)

    def series(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
        client = MlflowClient(uri)
        return {key: [(m.step, pytest.approx(m.value, rel=1e-6)) for m in client.get_metric_history(run_id, key)]
                for key in client.get_run(run_id).data.metrics if not key.startswith("job/")}

    live = series(live_uri, live_id)
    assert live.keys() == {f"{mode}/{c}" for mode in ("embedding", "hidden")
                           for c in ("ln1", "mha", "ln2", "fc1", "fc2")}
    assert [step for step, _ in live["embedding/mha"]] == [0, 1]  # step = layer (depth 2)
    assert series(mirrored_uri, mirrored_id) == live
    artifacts = {a.path for a in MlflowClient(live_uri).list_artifacts(live_id)}
    assert artifacts == {"plasticity.csv", "embedding.json"}
