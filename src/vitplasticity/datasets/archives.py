"""Unpacking downloaded archives once, safely, and never half-way."""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from vitplasticity.errors import UserError
from vitplasticity.fileio import remove_stale_temps


def extract(archive: Path, dest: Path, stamp: str) -> None:
    """Unpack a tar (any compression) or zip `archive` into `dest`, unless done for `stamp`.

    Entries are unpacked under a temporary folder and moved into place; a marker holding
    `stamp` (the archive's checksum) is written last, so an interrupted run unpacks again
    and a changed archive replaces what an older one left.
    """
    marker = dest / f".{archive.name}.extracted"
    if marker.exists() and marker.read_text() == stamp:
        return
    print(f"extract {archive.name} into {dest}", file=sys.stderr, flush=True)
    remove_stale_temps(dest / archive.name)  # what a killed extraction left (callers hold the raw-folder lock)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=f".{archive.name}.", suffix=".tmp"))
    try:
        try:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as handle:
                    handle.extractall(tmp)  # noqa: S202 (zipfile drops absolute paths and '..' itself)
            else:
                with tarfile.open(archive) as handle:
                    handle.extractall(tmp, filter="data")
        # TarError covers the "data" filter's refusals (links leaving `dest`, special files);
        # KeyError is tarfile's for a hard link to a member the archive lacks.
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
            raise UserError(
                f"cannot unpack {archive} ({exc}); delete it and run again to download it afresh"
            ) from exc
        for entry in tmp.iterdir():
            target = dest / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
        marker.write_text(stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
