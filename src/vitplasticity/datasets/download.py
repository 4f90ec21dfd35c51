"""HTTP downloads that resume, verify their checksum and land atomically.

A file streams into ``<file>.part``; after an interruption the next run asks the server for
the rest with an HTTP Range request. The finished ``.part`` is checked against its
``md5:<hex>`` or ``sha256:<hex>`` checksum and renamed to ``<file>`` only when it matches;
a mismatch deletes it. Progress is a tqdm bar on stderr; every failure is one `UserError` line
with its fix, with any credential in the URL redacted; a file the host does not send is a
`DownloadError`, which names the task's mirror keys once the task is known.

Why not a library: `pooch.retrieve` and torchvision's `download_url` /
`download_and_extract_archive` restart an interrupted download from byte 0 (neither sends a
Range request), and torchvision checks md5 only and writes straight to the final name. This
module keeps exactly what they lack: range resume of multi-GB archives (CIFAR-10-C, DomainNet)
and a sha256/md5 check before the rename. Locks (filelock) and progress (tqdm) are libraries.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from vitplasticity.errors import UserError, redact

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60
PROGRESS_SECONDS = 5.0
USER_AGENT = "vitplasticity"
_HEX_LENGTH = {"md5": 32, "sha256": 64}


@dataclass(frozen=True)
class Resource:
    """One file to download: its local name, where it comes from, and its checksum."""

    filename: str
    url: str
    checksum: str


class DownloadError(UserError):
    """A host did not send `resource`: `status` is the HTTP status ("HTTP 404 Not Found") or the
    network's reason. `for_task` words the message for a task, with the keys that point it at a mirror.
    """

    def __init__(self, resource: Resource, status: str) -> None:
        self.resource, self.status = resource, status
        super().__init__(f"cannot download {resource.filename} from {resource.url} ({status}); check the URL, or "
                         "point the task at a mirror of the same file with its url and checksum keys")

    def for_task(self, name: str, several_files: bool) -> str:
        """One line naming task `name`, the URL, the status and the override keys of the task's config
        (`url`/`checksum`, or `urls`/`checksums` keyed by file name when its source downloads several)."""
        resource, where = self.resource, f"tasks.{name}.data"
        if several_files:
            url_key = f"{where}.urls: {{{resource.filename}: <mirror URL>}}"
            checksum_key = f"{where}.checksums: {{{resource.filename}: md5:<hex>}}"
        else:
            url_key, checksum_key = f"{where}.url: <mirror URL>", f"{where}.checksum: md5:<hex>"
        network = "" if self.status.startswith("HTTP ") else "check the network; "
        return (f"task {name}: cannot download {resource.filename} from {resource.url} ({self.status}); {network}if "
                f"the host is down, point the task at a mirror of the same file with {url_key} (the download is still "
                f"checked against {resource.checksum}; {checksum_key} replaces that sum for a copy known to differ)")


def resolve(defaults: list[Resource], task: dict) -> list[Resource]:
    """Apply a task's overrides to a source's official files.

    `url` and `checksum` replace those of a source's only file; `urls` and `checksums`
    ({filename: value}) replace those of the named files. Unset values keep the defaults.
    """
    names = [resource.filename for resource in defaults]
    urls = dict(task.get("urls") or {})
    checksums = dict(task.get("checksums") or {})
    for key, table in (("url", urls), ("checksum", checksums)):
        if task.get(key) is None:
            continue
        if len(defaults) != 1:
            raise UserError(
                f"this source downloads several files ({', '.join(names)}); set {key}s: "
                f"{{filename: {key}}} in the task instead of {key}"
            )
        table[names[0]] = task[key]
    for key, table in (("urls", urls), ("checksums", checksums)):
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise UserError(
                f"the task's {key} names unknown files {unknown}; this source's files are "
                f"{', '.join(names)}"
            )
    return [
        Resource(r.filename, urls.get(r.filename, r.url), checksums.get(r.filename, r.checksum))
        for r in defaults
    ]


def parse_checksum(checksum: str) -> tuple[str, str]:
    """'md5:<hex>' or 'sha256:<hex>' → (algorithm, lower-case hex digest)."""
    algorithm, _, digest = str(checksum).partition(":")
    digest = digest.lower()
    length = _HEX_LENGTH.get(algorithm.lower())
    if length is None or not re.fullmatch(f"[0-9a-f]{{{length}}}", digest):
        raise UserError(
            f"checksum '{checksum}' is not md5:<32 hex digits> or sha256:<64 hex digits>; "
            "fix the task's checksum in the config"
        )
    return algorithm.lower(), digest


def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder`, so jobs sharing its raw files take turns."""
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        yield


def fetch(resource: Resource, folder: Path) -> Path:
    """Download `resource` into `folder` unless a verified copy is there; returns its path."""
    algorithm, expected = parse_checksum(resource.checksum)
    path = folder / resource.filename
    if path.exists():
        if file_digest(path, algorithm) == expected:
            return path
        _say(f"{path} does not match {resource.checksum}; downloading it again")
        path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    _download(resource, part)
    actual = file_digest(part, algorithm)
    if actual != expected:
        part.unlink()
        raise UserError(
            f"checksum mismatch for {resource.filename} from {resource.url} (expected "
            f"{algorithm}:{expected}, got {algorithm}:{actual}); the download was deleted: run "
            "again, or fix the task's checksum in the config"
        )
    os.replace(part, path)
    return path


def _download(resource: Resource, part: Path) -> None:
    """Stream `resource` (an http or https URL) into `part`, continuing from the bytes already there."""
    url = resource.url
    if not url.startswith(("http://", "https://")):
        raise UserError(f"cannot download {url}: only http:// and https:// URLs are fetched; fix the task's url")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 (an http(s) URL, checked above)
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing left to fetch: the part file is whole; its checksum decides
        raise DownloadError(resource, f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(resource, str(getattr(exc, "reason", exc))) from exc
    with response:
        if offset and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            start = int(start.group(1)) if start else None
            if start != offset:
                part.unlink()
                raise UserError(
                    f"{url} answered a request for bytes {offset}- with bytes {start}-; the "
                    "partial download was deleted: run again"
                )
        else:
            offset = 0  # the server sends the whole file
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        _copy(response, part, offset, total, url)


def _copy(response, part: Path, offset: int, total: int | None, url: str) -> None:
    name = part.name.removesuffix(".part")
    verb = f"resume {name} at {_mib(offset)}" if offset else f"download {name}"
    _say(f"{verb} from {url}" + (f" ({_mib(total)})" if total is not None else ""))
    with open(part, "ab" if offset else "wb") as out, \
            tqdm(total=total, initial=offset, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                 mininterval=PROGRESS_SECONDS, file=sys.stderr) as bar:
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise UserError(
                f"download of {url} broke off after {_mib(bar.n)} ({exc!r}); run again to resume"
            ) from exc
    if total is not None and bar.n != total:
        raise UserError(
            f"download of {url} ended after {_mib(bar.n)} of {_mib(total)}; run again to resume"
        )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _say(line: str) -> None:
    print(redact(line), file=sys.stderr, flush=True)
