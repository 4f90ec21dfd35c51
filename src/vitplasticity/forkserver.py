"""Fork server: the jobs of a local run start from one process that has already imported torch and timm.

A job's fresh interpreter spends about 4 s importing torch and timm (timm imports torchvision and
torch._dynamo unconditionally) before it does any work; a study of many short jobs spends most of
its time there. With the machine setting `runtime.fork_server`, a local Snakemake run starts one
server (`onstart`) that imports them once and listens on a Unix socket in a private temporary
folder, and exports the socket's path as `SOCKET_ENV`. Each job's `vitplasticity` command then
hands its arguments, working directory, environment and standard streams to the server, which forks
a child that runs the command in-process, and relays signals and the exit status back. The child
runs the same code on the same inputs, so results do not change; it holds no state of earlier jobs
(each is a fresh fork of the server, which runs no job code itself). It ends as forked children
do (Python's multiprocessing among them): its streams flushed, then `os._exit`, without the
server's `atexit` handlers.

Where no server answers (the variable unset, a SLURM job on another node, the server gone), the
command runs in its own interpreter as before. The server serves only its own user (the folder is
private and each peer's uid is checked), exits when the Snakemake process that started it exits,
and stops the children of clients that went away; a child never outlives its server (a server
killed takes its children with it, and their clients end only once they have).

Protocol (SOCK_SEQPACKET, one JSON message each): the client sends {"argv", "cwd", "env", "fds"}
with its standard streams attached (SCM_RIGHTS); the server answers {"pid": child} and, when the
child ends, {"exit": code} (negative: killed by that signal).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# The environment variable that tells a `vitplasticity` command where the server listens.
SOCKET_ENV = "VITPLASTICITY_FORK_SERVER"
# What the server imports before it serves: the cost every job would otherwise pay.
PRELOAD = ("numpy", "torch", "timm", "safetensors.torch", "vitplasticity.jobs")
# The most a request may hold. The client's send buffer limits it further (about 200 KB of environment
# under Linux's defaults); a larger request is refused and the job runs in its own interpreter.
_MESSAGE_BYTES = 1 << 20
# How long the server waits for a connected client's request: a client stopped between connecting and
# sending (its process suspended or killed) must not hold the server; a client sends as it connects.
REQUEST_TIMEOUT_S = 2.0
_STREAM_FDS = (0, 1, 2)
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1  # prctl option, <linux/prctl.h>


class Server:
    """A started server: its socket path, and the process to stop when the run ends."""

    def __init__(self, process: subprocess.Popen, folder: Path) -> None:
        self.process = process
        self.folder = folder
        self.socket = folder / "socket"

    def stop(self) -> str | None:
        """Stop the server (it stops any child still running) and remove its folder. Idempotent.
        Returns what to tell the user if the server had ended on its own with an error, else None."""
        early = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self.process.returncode != 0:
            early = (f"the fork server ended early ({_last_words(self.folder / 'server.log')}); jobs after that "
                     "started their own interpreters")
        shutil.rmtree(self.folder, ignore_errors=True)
        return early


def _last_words(log: Path) -> str:
    """The last line a server wrote (the error of a traceback)."""
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return "it left no message"


def start(program: str, ready_timeout_s: float = 60.0) -> Server:
    """Start a server whose children run `program` ("module:function", called with a command's
    argv, returning its exit status) as a child of this process, and wait until it listens (its
    imports go on while the first clients queue). Raises RuntimeError, with the server's own words,
    if it fails to."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="vitplasticity-"))  # mode 0700: only this user connects
    except OSError as exc:
        raise RuntimeError(f"the fork server did not start (no private temporary folder: {exc})") from exc
    log = folder / "server.log"
    with log.open("wb") as stderr:
        # Its own session: a Ctrl-C in the terminal reaches Snakemake and the jobs, not the server.
        # -P: the working directory is not put first on sys.path (as the `vitplasticity` script
        # does not), so nothing in a study folder can shadow a module the jobs import.
        process = subprocess.Popen([sys.executable, "-P", "-m", "vitplasticity.forkserver", str(folder / "socket"),
                                    str(os.getpid()), program], stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                   start_new_session=True)
    server = Server(process, folder)
    deadline = time.monotonic() + ready_timeout_s
    while not server.socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            words = _last_words(log)
            server.stop()
            raise RuntimeError(f"the fork server did not start ({words})")
        time.sleep(0.02)
    return server


def delegate(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> int | None:
    """Run `vitplasticity argv` in a child of the server named by `SOCKET_ENV` and return its exit
    status (128 + N if signal N ended it); None if no server answers, so the caller runs it itself.
    Signals this process receives are passed to the child; if this process dies, the server stops it."""
    path = environ.get(SOCKET_ENV)
    if not path:
        return None
    # Before the socket exists: where a standard stream is closed, the socket takes its number, and
    # a child holding its own connection as that stream would keep it open after this process died.
    fds = [fd for fd in _STREAM_FDS if _is_open(fd)]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    child: list[int] = []
    pidfd = None
    pending: list[int] = []

    def forward(signum, _frame) -> None:
        if child:
            _signal(child[0], signum)
        else:
            pending.append(signum)

    previous = {signum: signal.signal(signum, forward) for signum in _FORWARDED}
    try:
        request = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(environ), "fds": fds}
        try:
            socket.send_fds(conn, [json.dumps(request).encode()], fds)
        except OSError:  # the server went away, or the request is too large for one message
            return None
        reply = _receive(conn)
        if reply is None:  # the server stopped before it forked: run here
            return None
        child.append(reply["pid"])
        with contextlib.suppress(ProcessLookupError):  # it has already ended
            pidfd = os.pidfd_open(child[0])
        for signum in pending:
            _signal(child[0], signum)
        reply = _receive(conn)
        if reply is None:  # the server died, and its death signal stops the child: wait for it to end
            if pidfd is not None:
                _await_end(pidfd)
            print(f"vitplasticity: the fork server stopped while it ran this job (pid {child[0]}); run it again",
                  file=sys.stderr)
            return 1
        code = reply["exit"]
        return code if code >= 0 else 128 - code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        conn.close()
        if pidfd is not None:
            os.close(pidfd)


def _await_end(pidfd: int) -> None:
    """Wait until the process of `pidfd` has ended, SIGKILLing it after the grace period."""
    if not select.select([pidfd], [], [], _STOP_GRACE_S)[0]:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _receive(conn: socket.socket) -> dict | None:
    """The next message, or None once the peer has gone (a signal handler's interruption is retried
    by Python itself, PEP 475)."""
    try:
        data = conn.recv(_MESSAGE_BYTES)
    except ConnectionError:
        return None
    return json.loads(data) if data else None


def serve(path: Path, watched_pid: int, run: Callable[[list[str]], int]) -> None:
    """Listen on `path` and fork a child per request that runs `run(argv)` with the client's streams,
    working directory and environment. Returns on SIGTERM or once its parent, `watched_pid`, has
    exited, after stopping the children still running and removing the socket's folder (the
    server's own, made by `start`)."""
    if not (hasattr(os, "pidfd_open") and hasattr(socket, "SO_PEERCRED")):
        raise SystemExit("it needs Linux (pidfd_open, SO_PEERCRED)")
    os.close(os.pidfd_open(os.getpid()))  # OSError on a Linux older than 5.3
    preload = _preload(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path) + ".binding")
    listener.listen(64)
    # Listening before the imports, so that early clients queue instead of running on their own;
    # the name appears only once the socket accepts (what `start` waits for).
    os.rename(str(path) + ".binding", path)
    for module in preload:
        __import__(module)
    if sys.modules["torch"].cuda.is_initialized():  # a fork could not use it
        raise SystemExit("importing the jobs' modules initialised CUDA")
    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches Snakemake, which stops the run (and us)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "listener")
    children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (client connection, pidfd)
    try:
        while not stopping and os.getppid() == watched_pid:
            for key, _ in selector.select(timeout=1.0):
                if key.data == "listener":
                    _accept(listener, selector, children, run)
                elif key.data[0] == "child":  # the child ended: report its status
                    pid = key.data[1]
                    conn, pidfd = children.pop(pid)
                    _, status = os.waitpid(pid, 0)
                    _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                    _forget(selector, conn, pidfd)
                elif key.data[1] in children:  # the client went away (killed): stop its child
                    pid = key.data[1]
                    selector.unregister(children[pid][0])
                    _signal(pid, signal.SIGTERM)
    finally:
        selector.close()
        listener.close()
        _stop(children)
        shutil.rmtree(path.parent, ignore_errors=True)


def _preload(environ: Mapping[str, str]) -> tuple[str, ...]:
    """`PRELOAD`, and MLflow when the run's jobs log to it while they run (`tracking.live`)."""
    from vitplasticity.machine import machine_from_env

    tracking = machine_from_env(environ).tracking
    return (*PRELOAD, "mlflow") if tracking.enabled and tracking.live else PRELOAD


def _accept(listener: socket.socket, selector: selectors.BaseSelector, children: dict,
            run: Callable[[list[str]], int]) -> None:
    try:
        conn, _ = listener.accept()
    except OSError:  # out of file descriptors: the client sees the server gone and runs on its own
        return
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise ValueError("a request from another user")
        conn.settimeout(REQUEST_TIMEOUT_S)
        data, fds, _, _ = socket.recv_fds(conn, _MESSAGE_BYTES, len(_STREAM_FDS))  # TimeoutError: an OSError
        conn.settimeout(None)
        request = json.loads(data)  # ValueError if none (the client went away) or not JSON
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    server = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: become the client's command
        code = 1
        try:
            listener.close()
            for other, pidfd in children.values():
                other.close()
                os.close(pidfd)
            conn.close()
            code = _become(request, fds, run, server)
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    children[pid] = (conn, pidfd)
    _send(conn, {"pid": pid})
    selector.register(pidfd, selectors.EVENT_READ, ("child", pid))
    selector.register(conn, selectors.EVENT_READ, ("client", pid))


def _become(request: dict, fds: list[int], run: Callable[[list[str]], int], server: int) -> int:
    """In the forked child: take the client's streams, folder, environment and signals, then run;
    SIGTERM when `server` exits."""
    for signum in _FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    _end_with(server)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in any Python process
    for target, fd in zip(request["fds"], fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = open(0, closefd=False) if 0 in request["fds"] else None  # noqa: SIM115 - the process's own stream
    sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")  # noqa: SIM115
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tempfile.tempdir = None  # the server's, cached at import: the job's is its TMPDIR (Snakemake's `tmpdir`)
        _limit_thread_pools(request["env"])
        sys.argv = ["vitplasticity", *request["argv"]]
        return run(request["argv"])
    except SystemExit as exc:  # argparse's --help and usage errors, as the interpreter reports them
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _end_with(server: int) -> None:
    """Have the kernel SIGTERM this process when its parent, `server`, exits (prctl PR_SET_PDEATHSIG)."""
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != server:  # it exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _limit_thread_pools(env: Mapping[str, str]) -> None:
    """The thread counts Snakemake gives the job (OMP_NUM_THREADS and kin), which the BLAS and OpenMP
    pools of the server read once, at import: set them at run time."""
    threads = env.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=int(threads))


def _send(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):  # the client is gone; its child is stopped or already ended
        conn.send(json.dumps(message).encode())


def _forget(selector: selectors.BaseSelector, conn: socket.socket, pidfd: int) -> None:
    for fileobj in (conn, pidfd):
        with contextlib.suppress(KeyError):  # a client's connection is unregistered when it goes away
            selector.unregister(fileobj)
    conn.close()
    os.close(pidfd)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _stop(children: dict) -> None:
    """SIGTERM every child still running, SIGKILL what remains after the grace period, and reap."""
    for pid in children:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_GRACE_S
    for pid, (conn, pidfd) in children.items():
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                _signal(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.05)
        conn.close()
        os.close(pidfd)


if __name__ == "__main__":
    import importlib

    module, _, function = sys.argv[3].partition(":")
    serve(Path(sys.argv[1]), int(sys.argv[2]), getattr(importlib.import_module(module), function))
