"""Image files in a folder, a tar or a zip, read in place and labelled by sub-folder."""

from __future__ import annotations

import io
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from vitplasticity.errors import UserError


class ImageFiles:
    """The images under `root` inside `path` (a folder, tar or zip), sorted by path.

    Images in sub-folders of `root` are labelled by their sub-folder, classes being the sorted
    sub-folder names; images directly under `root` all take label 0 of the single class
    `flat_class` (an error when it is None). ``dataset[i]`` → (RGB PIL image, label), safe to
    call from several threads. Hidden files and non-image files are skipped.
    """

    def __init__(self, path: Path, root: str = "", flat_class: str | None = None) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._archive: zipfile.ZipFile | tarfile.TarFile | None = None
        if self.path.is_dir():
            entries = {p.relative_to(self.path).as_posix(): p for p in self.path.rglob("*")
                       if p.is_file()}
        elif zipfile.is_zipfile(self.path):
            self._archive = zipfile.ZipFile(self.path)
            entries = {i.filename: i for i in self._archive.infolist() if not i.is_dir()}
        elif self.path.is_file() and tarfile.is_tarfile(self.path):
            self._archive = tarfile.open(self.path)  # noqa: SIM115 - closed by close()
            entries = {m.name: m for m in self._archive.getmembers() if m.isfile()}
        else:
            raise UserError(f"{self.path} is not a folder, a tar or a zip of images; fix its path")
        try:
            self._index(entries, root, flat_class)
        except UserError:
            self.close()
            raise

    def _index(self, entries: dict, root: str, flat_class: str | None) -> None:
        """Keep the image entries below `root`, sorted; label them by their sub-folder."""
        prefix = f"{root.strip('/')}/" if root else ""
        images = {}  # path below root → entry
        for name, entry in entries.items():
            clean = name.removeprefix("./")
            if (clean.startswith(prefix) and clean.lower().endswith(IMG_EXTENSIONS)
                    and not any(part.startswith(".") for part in clean.split("/"))):
                images[clean[len(prefix):]] = entry
        if not images:
            raise UserError(f"{self.path} holds no images under '{root or '.'}'; check its path")
        self.names = sorted(images)
        self._entries = [images[name] for name in self.names]
        folders = [name.split("/")[0] if "/" in name else None for name in self.names]
        if all(folders):
            self.classes = sorted(set(folders))
            index = {name: label for label, name in enumerate(self.classes)}
            self.labels = np.array([index[folder] for folder in folders], dtype=np.int64)
        elif not any(folders) and flat_class is not None:
            self.classes = [flat_class]
            self.labels = np.zeros(len(folders), dtype=np.int64)
        else:
            raise UserError(
                f"{self.path} must hold images in class sub-folders of '{root or '.'}'"
                + (" or all directly in it" if flat_class is not None else "")
                + "; move the stray images"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        name = self.names[index]
        try:
            with Image.open(io.BytesIO(self._read(self._entries[index]))) as image:
                return image.convert("RGB"), int(self.labels[index])
        except (OSError, SyntaxError) as exc:
            raise UserError(
                f"cannot read image {name} in {self.path} ({exc}); replace or remove it, then rerun"
            ) from exc

    def _read(self, entry: Path | zipfile.ZipInfo | tarfile.TarInfo) -> bytes:
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
