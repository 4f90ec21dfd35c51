"""The fork server: a job forked from it writes what a fresh interpreter writes, and its exit status,
streams and signals pass through as if it ran on its own."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from jobkit import ENV, cli_command, comparable, finetune_argv

from vitplasticity import forkserver

PROGRAM = "vitplasticity.cli:run_in_process"

@pytest.fixture(scope="module")
def server():
    started = forkserver.start(PROGRAM)
    yield started
    started.stop()


def served(server) -> dict:
    return dict(ENV, **{forkserver.SOCKET_ENV: str(server.socket)})


def children(server) -> list[psutil.Process]:
    return psutil.Process(server.process.pid).children()


def forked_child(server) -> psutil.Process:
    """The server's child that runs a job, once there is one. A fork keeps the server's command line; a
    short-lived helper that an import starts (Python 3.12's `platform` runs `uname`) does not, and may be
    gone by the time it is looked at."""
    parent = psutil.Process(server.process.pid)
    found = []

    def forked() -> list[psutil.Process]:
        for child in parent.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.cmdline() == parent.cmdline():
                    found.append(child)
        return found

    wait_for(forked)
    return found[0]


def has_ended(pid: int) -> bool:
    """The process has exited (a zombie whose parent has not reaped it yet counts)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_forked_job_writes_the_run_folder_of_a_fresh_interpreter(kit, tmp_path, server):
    fresh, forked = tmp_path / "fresh", tmp_path / "forked"
    subprocess.run(cli_command(*finetune_argv(kit, fresh, threads=1)), env=ENV, check=True, capture_output=True)
    result = subprocess.run(cli_command(*finetune_argv(kit, forked, threads=1)), env=served(server), check=True,
                            capture_output=True, text=True)
    assert "finetune completed: test accuracy" in result.stderr  # the child's stderr is the client's
    assert comparable(forked / "metrics.json") == comparable(fresh / "metrics.json")
    for name in ("history.csv", "config.yaml"):
        assert (forked / name).read_bytes() == (fresh / name).read_bytes(), name
    assert not children(server)  # the child was reaped


def test_exit_status_and_streams_pass_through(kit, tmp_path, server):
    result = subprocess.run(cli_command("finetune", "--help"), env=served(server), capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: vitplasticity finetune")
    argv = finetune_argv(kit, tmp_path / "run")
    argv[argv.index("--task") + 1] = str(tmp_path / "missing")
    result = subprocess.run(cli_command(*argv), env=served(server), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"vitplasticity finetune: error: {tmp_path / 'missing'} is not a prepared task (no meta.json); "
        "run its prepare_dataset rule"]


def test_a_signal_to_the_job_reaches_its_forked_child_and_the_server_serves_on(kit, tmp_path, server):
    job = subprocess.Popen(cli_command(*finetune_argv(kit, tmp_path / "run", steps=100_000, eval_every=50_000)),
                           env=served(server), stderr=subprocess.PIPE, text=True)
    child = forked_child(server)
    wait_for(lambda: (tmp_path / "run").exists())  # the run has started
    job.send_signal(signal.SIGTERM)
    assert job.wait(60) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(child.pid)
    result = subprocess.run(cli_command("finetune", "--help"), env=served(server), capture_output=True, text=True)
    assert result.returncode == 0


@pytest.mark.parametrize("stdin", ["open", "closed"])
def test_a_killed_job_takes_its_forked_child_with_it(kit, tmp_path, server, stdin):
    # With its standard input closed, the job's connection to the server would take descriptor 0.
    job = subprocess.Popen(cli_command(*finetune_argv(kit, tmp_path / "run", steps=100_000, eval_every=50_000)),
                           env=served(server), stderr=subprocess.DEVNULL,
                           preexec_fn=(lambda: os.close(0)) if stdin == "closed" else None)
    child = forked_child(server)
    job.kill()
    job.wait(60)
    wait_for(lambda: not psutil.pid_exists(child.pid), timeout_s=30)


def test_without_a_server_the_command_runs_in_its_own_process(tmp_path):
    assert forkserver.delegate(["--help"], {}) is None
    assert forkserver.delegate(["--help"], {forkserver.SOCKET_ENV: str(tmp_path / "gone")}) is None


def test_the_server_ends_with_the_process_that_started_it(tmp_path):
    starter = (f"import sys; from vitplasticity import forkserver; s = forkserver.start({PROGRAM!r}); "
               "print(s.process.pid, s.folder, flush=True)")
    out = subprocess.run([sys.executable, "-c", starter], env=ENV, check=True, capture_output=True, text=True).stdout
    pid, folder = out.split()
    wait_for(lambda: not Path(folder).exists())  # it removes its socket folder when it exits
    wait_for(lambda: has_ended(int(pid)), timeout_s=30)


def test_a_server_that_cannot_start_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VITPLASTICITY_MACHINE", "not json")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"^the fork server did not start \(.*VITPLASTICITY_MACHINE is not the JSON"):
        forkserver.start(PROGRAM)
    assert list(tmp_path.iterdir()) == []


def test_a_job_whose_server_is_killed_ends_with_its_child_and_one_line(kit, tmp_path):
    started = forkserver.start(PROGRAM)
    job = subprocess.Popen(cli_command(*finetune_argv(kit, tmp_path / "run", steps=100_000, eval_every=50_000)),
                           env=served(started), stderr=subprocess.PIPE, text=True)
    child = forked_child(started)
    try:
        wait_for(lambda: (tmp_path / "run").exists())  # the run has started
        started.process.kill()
        assert job.wait(60) == 1
        # The job ends only once its child has: nothing writes to its outputs after Snakemake sees it fail.
        assert has_ended(child.pid)
        assert job.stderr.read().splitlines()[-1] == (
            f"vitplasticity: the fork server stopped while it ran this job (pid {child.pid}); run it again")
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
        started.stop()


def test_a_forked_job_takes_its_temporary_folder_from_its_own_environment(tmp_path):
    # Snakemake gives each job its `tmpdir` resource as TMPDIR; the server's modules asked for theirs at import.
    folder, report, job_tmp = tmp_path / "server", tmp_path / "tempdir.txt", tmp_path / "job-tmp"
    folder.mkdir()
    job_tmp.mkdir()
    code = ("import sys, tempfile; from pathlib import Path; from vitplasticity import forkserver; "
            "forkserver.serve(Path(sys.argv[1]), int(sys.argv[2]), "
            "lambda argv: (Path(argv[0]).write_text(tempfile.gettempdir()), 0)[1])")
    # Snakemake's environment, unlike the tests' (importing torch set it), has no TORCHINDUCTOR_CACHE_DIR:
    # the server's torch then asks for the temporary folder at import.
    snakemake_env = {name: value for name, value in ENV.items() if name != "TORCHINDUCTOR_CACHE_DIR"}
    server = subprocess.Popen([sys.executable, "-c", code, str(folder / "socket"), str(os.getpid())],
                              env=snakemake_env)
    try:
        wait_for((folder / "socket").exists)
        env = dict(ENV, TMPDIR=str(job_tmp), **{forkserver.SOCKET_ENV: str(folder / "socket")})
        assert forkserver.delegate([str(report)], env) == 0
        assert report.read_text() == str(job_tmp)
    finally:
        server.terminate()
        server.wait()


def test_a_malformed_request_is_refused_without_keeping_its_descriptors(server):
    def refused() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.connect(str(server.socket))
            socket.send_fds(conn, [b"not json"], [0, 1, 2])
            assert conn.recv(100) == b""  # the server hung up without forking

    refused()  # once the server has imported its modules and serves
    before = psutil.Process(server.process.pid).num_fds()
    for _ in range(3):
        refused()
    assert psutil.Process(server.process.pid).num_fds() == before


def test_a_client_silent_after_connecting_does_not_hold_the_server(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
        silent.connect(str(server.socket))  # and sends nothing, as a client stopped right after connecting
        # A job behind it is served (were the server held, it would wait for its reply for ever).
        result = subprocess.run(cli_command("finetune", "--help"), env=served(server), capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.startswith("usage: vitplasticity finetune")
        silent.settimeout(5)
        assert silent.recv(100) == b""  # the server hung up on it


def test_a_server_that_fails_after_it_listens_says_why_when_stopped(tmp_path, monkeypatch):
    """Its imports fail once it listens: jobs run on their own, and stopping it says so in one line."""
    (tmp_path / "timm.py").write_text("raise ImportError('timm is broken here')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    started = forkserver.start(PROGRAM)
    started.process.wait(60)
    assert forkserver.delegate(["--help"], {forkserver.SOCKET_ENV: str(started.socket)}) is None
    assert started.stop() == ("the fork server ended early (ImportError: timm is broken here); jobs after that "
                              "started their own interpreters")
    assert not started.folder.exists()
