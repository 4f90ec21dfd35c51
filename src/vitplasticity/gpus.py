"""GPU slots of one machine: at most one job per GPU, each job on its own GPU.

On a workstation with several GPUs, `snakemake --cores all` may start more GPU jobs than there
are GPUs. The workflow's default profile (``profiles/default``) caps them: it gives Snakemake a
``gpu`` resource equal to `gpu_count()` and each GPU rule a request of 1, so at most that many
run at once. Each such job then calls `claim_gpu()` before CUDA starts: it takes the first free
slot's lock (a file lock, released by the operating system however the process ends) and makes
that GPU the only one it sees (``CUDA_VISIBLE_DEVICES``). Kept free of heavy imports: the profile
reads `gpu_count` at every start of Snakemake.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from vitplasticity.errors import UserError

GPUS_ENV = "VITPLASTICITY_GPUS"  # overrides the detected number of GPUs (0 turns slots off)
LOCK_DIR = Path(tempfile.gettempdir()) / "vitplasticity-gpu-slots"
_held: list = []  # the claimed slot's lock, held for the life of the process


def gpu_count(environ=os.environ) -> int:
    """GPUs on this machine: `GPUS_ENV` if set, else the devices `nvidia-smi -L` lists, else 0."""
    if environ.get(GPUS_ENV, "").strip():
        try:
            count = int(environ[GPUS_ENV])
        except ValueError:
            count = -1
        if count < 0:
            raise UserError(f"{GPUS_ENV}={environ[GPUS_ENV]!r} is not a number of GPUs; set it to 0 or more")
        return count
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines())


def claim_gpu(environ=os.environ, lock_dir: Path = LOCK_DIR, poll_s: float = 0.5) -> int | None:
    """Take a free GPU slot for the rest of this process and make it the only GPU it sees; return its index.

    Does nothing (None) where a scheduler or the user already chose the devices (``CUDA_VISIBLE_DEVICES``
    set, as SLURM does) or where there are no slots (`gpu_count` is 0). Waits while every slot is taken.
    Call before anything starts CUDA.
    """
    from filelock import FileLock, Timeout

    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    count = gpu_count(environ)
    if count == 0:
        return None
    try:
        lock_dir.mkdir(mode=0o777, parents=True, exist_ok=True)
        lock_dir.chmod(0o1777)  # shared by every user of the machine, as /tmp is
    except PermissionError:
        pass  # made by another user, who opened it to all
    while True:
        for slot in range(count):
            lock = FileLock(lock_dir / f"gpu{slot}.lock", mode=0o666)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            except PermissionError as exc:
                raise UserError(f"cannot take GPU slot {slot}: {exc}; make {lock_dir} writable by every user, or "
                                f"set {GPUS_ENV}=0 and choose devices with CUDA_VISIBLE_DEVICES") from exc
            _held.append(lock)
            environ["CUDA_VISIBLE_DEVICES"] = str(slot)
            return slot
        time.sleep(poll_s)
