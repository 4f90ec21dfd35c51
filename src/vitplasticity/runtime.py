"""Device, threads, precision and seeding: the machine side of a job."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds third-party code that uses the global state
    torch.manual_seed(seed)


def autocast(device: torch.device):
    """bf16 autocast on GPU; full precision on CPU (deterministic, and bf16 is slow there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """A generator that depends only on (seed, step, stream), so a resumed run replays exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)
