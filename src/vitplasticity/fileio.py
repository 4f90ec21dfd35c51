"""Atomic file writes and checksums: nothing half-written is ever taken as complete."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import yaml

from vitplasticity.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (single-threaded), since reading it means setting it briefly.
_UMASK = _read_umask()


def _temp_name(path: Path) -> re.Pattern:
    """Names `tempfile` gives a temporary sibling of `path` here: `.{name}.<8 random chars>.tmp`."""
    return re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temps(path: str | Path) -> None:
    """Delete temporary siblings of `path` left by a writer that was killed.

    One job writes a given path at a time (Snakemake's outputs are disjoint and its lock
    stops a second workflow), so any such sibling is garbage from an interrupted run.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    pattern = _temp_name(path)
    for sibling in path.parent.iterdir():
        if pattern.fullmatch(sibling.name):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


def check_writable(path: str | Path, what: str = "output") -> None:
    """Fail before any work if `path` cannot be created: its nearest existing ancestor must be a
    writable folder. Creates nothing."""
    path = Path(path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {what} {path}: {ancestor} is a file, not a folder; "
                        f"move or delete {ancestor}, or choose another {what} path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {path}: folder {ancestor} is not writable; "
                        f"fix its permissions or choose another {what} path")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success fsync it and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        tmp_path.chmod(0o666 & ~_UMASK)  # mkstemp's 0600 would make results private to their writer
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        tmp.chmod(0o777 & ~_UMASK)
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb+") as handle:
                    os.fsync(handle.fileno())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: object) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_yaml(path: str | Path, payload: object) -> None:
    write_text(path, yaml.safe_dump(payload, sort_keys=False))


def write_csv(path: str | Path, frame, float_format: str | None = None) -> None:
    """A DataFrame as CSV, atomically; `float_format` (e.g. "%.10g") rounds floats at write."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)


def write_rows(path: str | Path, rows: Iterable[Mapping], columns: Sequence[str]) -> None:
    """Records as CSV with the header `columns`, atomically, written as `DataFrame.to_csv` writes
    them (a missing value or NaN as an empty field) without importing pandas, which would add
    about 0.4 s to the start-up of every job that writes a training history."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if is_missing(row.get(name)) else row[name] for name in columns])


def is_missing(value: object) -> bool:
    """None or a NaN number: what a CSV writes as an empty field and MLflow does not log."""
    return value is None or (isinstance(value, numbers.Real) and math.isnan(value))


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _jsonable(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
