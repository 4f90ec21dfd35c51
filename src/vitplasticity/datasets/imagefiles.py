"""Image files in a folder, a tar or a zip, read in place and labelled by sub-folder.

Entries are listed as torchvision's ImageFolder lists a folder: links to files and to
folders are followed. In a folder a link may point anywhere (the folder is the user's own);
in an archive a link (tar symbolic or hard link, zip symbolic link) is followed to another
member of the same archive. A link that is dangling, loops, or leaves the archive, a member
that is neither file, folder nor link but has an image's name, and an archive member whose
name leaves the archive are refused with one line naming it. Hidden entries and files
without an image extension are skipped and counted in `skipped`.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import tarfile
import threading
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from vitplasticity.datasets.images import Decoding, read_image
from vitplasticity.errors import UserError

MAX_LINKS = 40  # links followed to resolve one name, as Linux's ELOOP limit
Entry = Path | zipfile.ZipInfo | tarfile.TarInfo


class ImageFiles:
    """The images under `root` inside `path` (a folder, tar or zip), sorted by path.

    Images in sub-folders of `root` are labelled by their sub-folder, classes being the sorted
    sub-folder names; images directly under `root` all take label 0 of the single class
    `flat_class` (an error when it is None). ``dataset[i]`` → (RGB PIL image, label), decoded by
    `read_image` with `decoding`, safe to call from several threads. ``skipped`` counts the
    entries left out, by reason: ``hidden`` (a name starting with '.'; a hidden folder counts
    once) and ``not_an_image`` (no image extension, or not a file).
    """

    def __init__(self, path: Path, root: str = "", flat_class: str | None = None,
                 decoding: Decoding | None = None) -> None:
        self.path = Path(path)
        self.decoding = decoding or Decoding()
        self.skipped = Counter(hidden=0, not_an_image=0)
        self._lock = threading.Lock()
        self._archive: zipfile.ZipFile | tarfile.TarFile | None = None
        top = root.strip("/")
        try:
            if self.path.is_dir():
                folder = self.path / top
                if not folder.is_dir():
                    raise UserError(f"{self.path} has no folder '{top}'; check its path")
                entries, folders = _FolderWalk(folder, self.skipped).run()
            else:
                if zipfile.is_zipfile(self.path):
                    self._archive = zipfile.ZipFile(self.path)
                    tree = _ArchiveTree.of_zip(self.path, self._archive)
                elif self.path.is_file() and tarfile.is_tarfile(self.path):
                    self._archive = tarfile.open(self.path)  # noqa: SIM115 - closed by close()
                    tree = _ArchiveTree.of_tar(self.path, self._archive)
                else:
                    raise UserError(f"{self.path} is not a folder, a tar or a zip of images; fix its path")
                entries, folders = tree.walk(top, self.skipped)
            self._index(entries, folders, root, flat_class)
        except UserError:
            self.close()
            raise

    def _index(self, images: dict[str, Entry], folders: set[str], root: str, flat_class: str | None) -> None:
        """Sort the image entries below `root`; label them by their sub-folder."""
        if not images:
            raise UserError(f"{self.path} holds no images under '{root or '.'}'; check its path")
        self.names = sorted(images)
        self._entries = [images[name] for name in self.names]
        labels = [name.split("/")[0] if "/" in name else None for name in self.names]
        if all(labels):
            empty = sorted(folders - set(labels))
            if empty:
                raise UserError(
                    f"{self.path}: class folder '{empty[0]}' under '{root or '.'}' holds no images "
                    f"({len(empty)} such folder(s)); add images to it or remove it"
                )
            self.classes = sorted(set(labels))
            index = {name: label for label, name in enumerate(self.classes)}
            self.labels = np.array([index[folder] for folder in labels], dtype=np.int64)
        elif not any(labels) and flat_class is not None:
            self.classes = [flat_class]
            self.labels = np.zeros(len(labels), dtype=np.int64)
        else:
            raise UserError(
                f"{self.path} must hold images in class sub-folders of '{root or '.'}'"
                + (" or all directly in it" if flat_class is not None else "")
                + "; move the stray images"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        entry = self._entries[index]
        name = str(entry) if isinstance(entry, Path) else f"{self.names[index]} in {self.path}"
        return read_image(self._read(entry), name, self.decoding), int(self.labels[index])

    def _read(self, entry: Entry) -> bytes:
        if isinstance(entry, Path):
            return entry.read_bytes()
        with self._lock:  # one archive handle, one seek position
            if isinstance(entry, zipfile.ZipInfo):
                return self._archive.read(entry)
            return self._archive.extractfile(entry).read()

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()

    def __enter__(self) -> ImageFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _kept(name: str, skipped: Counter) -> bool:
    """Whether a file entry named `name` (its last part) is an image; counts it when not."""
    if name.lower().endswith(IMG_EXTENSIONS):
        return True
    skipped["not_an_image"] += 1
    return False


class _FolderWalk:
    """The files below `top`, links followed as ImageFolder (os.walk(followlinks=True)) does."""

    def __init__(self, top: Path, skipped: Counter) -> None:
        self.top, self.skipped = top, skipped
        self.images: dict[str, Path] = {}
        self.folders: set[str] = set()  # the non-hidden folders directly below top

    def run(self) -> tuple[dict[str, Path], set[str]]:
        self._visit(self.top, "", (os.path.realpath(self.top),))
        return self.images, self.folders

    def _visit(self, folder: Path, shown: str, chain: tuple[str, ...]) -> None:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        for entry in entries:
            name = shown + entry.name
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()  # both follow links
            except OSError:  # a link that loops
                is_dir = is_file = False
            if entry.name.startswith("."):
                self.skipped["hidden"] += 1
            elif is_dir:
                real = os.path.realpath(entry.path)
                if real in chain:
                    raise UserError(
                        f"{self.top}: link {name} points to {real}, a folder that contains it, so the "
                        "folder loops; remove the link, then rerun"
                    )
                if not shown:
                    self.folders.add(entry.name)
                self._visit(Path(entry.path), name + "/", (*chain, real))
            elif is_file:
                if _kept(entry.name, self.skipped):
                    self.images[name] = Path(entry.path)
            elif entry.is_symlink():
                target = os.readlink(entry.path)
                problem = "loops" if _loops(entry.path) else "points to nothing"
                raise UserError(
                    f"{self.top}: link {name} → {target} {problem}; remove the link or restore its "
                    "target, then rerun"
                )
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                raise UserError(
                    f"{self.top}: {name} is not a regular file (a device, pipe or socket); remove it, then rerun"
                )
            else:
                self.skipped["not_an_image"] += 1


def _loops(path: str) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


class _ArchiveTree:
    """An archive's members as a tree of paths, resolving links as a file system would."""

    def __init__(self, archive: Path) -> None:
        self.archive = archive
        self.files: dict[str, Entry] = {}  # path → regular member
        self.symlinks: dict[str, str] = {}  # path → link target, relative to the link's folder
        self.hardlinks: dict[str, str] = {}  # path → target, relative to the archive's top
        self.others: dict[str, str] = {}  # path → kind of a member that is none of the above
        self.children: defaultdict[str, set[str]] = defaultdict(set)  # folder ("" = top) → names

    @classmethod
    def of_tar(cls, archive: Path, tar: tarfile.TarFile) -> _ArchiveTree:
        tree = cls(archive)
        for member in tar.getmembers():
            path = tree._add(member.name)
            if member.isdir():
                tree.children[path]  # noqa: B018 - an empty folder is a folder too
            elif member.isfile():
                tree.files[path] = member
            elif member.issym():
                tree.symlinks[path] = member.linkname
            elif member.islnk():
                tree.hardlinks[path] = member.linkname
            else:
                tree.others[path] = "pipe" if member.isfifo() else "device" if member.isdev() else "special member"
        return tree

    @classmethod
    def of_zip(cls, archive: Path, handle: zipfile.ZipFile) -> _ArchiveTree:
        tree = cls(archive)
        for info in handle.infolist():
            path = tree._add(info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0  # 3: Unix
            if info.is_dir():
                tree.children[path]  # noqa: B018 - an empty folder is a folder too
                continue
            if kind == stat.S_IFLNK:
                tree.symlinks[path] = handle.read(info).decode("utf-8", "replace")
            elif kind in (0, stat.S_IFREG):
                tree.files[path] = info
            else:
                tree.others[path] = "special member"
        return tree

    def _add(self, raw: str) -> str:
        """Register member name `raw` and its parent folders; returns its clean path."""
        path = posixpath.normpath(raw)
        if raw.startswith("/") or path == ".." or path.startswith("../"):
            raise UserError(
                f"{self.archive}: member {raw} lies outside the archive (an absolute name or one that "
                "climbs with '..'); remove it from the archive, then rerun"
            )
        parts = [] if path == "." else path.split("/")
        for depth, part in enumerate(parts):
            self.children["/".join(parts[:depth])].add(part)
        return "/".join(parts)

    def _resolve(self, path: str) -> str:
        """`path` with every link in it followed; refuses links that dangle, loop or leave."""
        pending, done, followed = path.split("/"), [], 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not done:
                    raise UserError(
                        f"{self.archive}: member {path} links outside the archive; remove the link from the "
                        "archive, then rerun"
                    )
                done.pop()
                continue
            done.append(part)
            current = "/".join(done)
            link = self.symlinks.get(current)
            hard = self.hardlinks.get(current)
            if link is None and hard is None:
                continue
            followed += 1
            if followed > MAX_LINKS:
                raise UserError(
                    f"{self.archive}: member {path} is a link that loops (more than {MAX_LINKS} links "
                    "followed); remove the link from the archive, then rerun"
                )
            if link is not None and link.startswith("/"):
                raise UserError(
                    f"{self.archive}: member {current} links to {link}, outside the archive; remove the "
                    "link from the archive, then rerun"
                )
            if link is not None:
                done.pop()
                pending = link.split("/") + pending
            else:
                done, pending = [], hard.split("/") + pending
        return "/".join(done)

    def walk(self, top: str, skipped: Counter) -> tuple[dict[str, Entry], set[str]]:
        """The image members below folder `top` (paths relative to it) and its sub-folders."""
        images: dict[str, Entry] = {}
        folders: set[str] = set()
        start = self._resolve(top) if top else ""
        if top and start not in self.children:
            raise UserError(f"{self.archive} has no folder '{top}'; check its root")

        def visit(folder: str, shown: str, chain: tuple[str, ...]) -> None:
            for child in sorted(self.children[folder]):
                name = shown + child
                if child.startswith("."):
                    skipped["hidden"] += 1
                    continue
                member = f"{folder}/{child}" if folder else child
                real = self._resolve(member)
                if real in self.files:
                    if _kept(child, skipped):
                        images[name] = self.files[real]
                elif real in self.children and real not in self.others:
                    if real in chain:
                        raise UserError(
                            f"{self.archive}: member {member} links to {real}, a folder that contains it, so "
                            "the archive loops; remove the link from the archive, then rerun"
                        )
                    if not shown:
                        folders.add(child)
                    visit(real, name + "/", (*chain, real))
                elif real in self.others:
                    if child.lower().endswith(IMG_EXTENSIONS):
                        raise UserError(
                            f"{self.archive}: member {member} is a {self.others[real]}, not an image file; "
                            "remove it from the archive, then rerun"
                        )
                    skipped["not_an_image"] += 1
                else:
                    raise UserError(
                        f"{self.archive}: member {member} links to {real}, which the archive does not hold; "
                        "remove the link from the archive or add its target, then rerun"
                    )

        visit(start, "", (start,))
        return images, folders
