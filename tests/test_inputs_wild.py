"""Reliability: inputs from the wild, each refused with one line or read with the right values.

- links and archive members: symlinked class folders and files are read as torchvision's
  ImageFolder reads them; tar regular files, hard links and symbolic links (to files and to
  folders) and zip symbolic links are read; links that dangle, loop or leave an archive,
  special members and escaping names are refused naming the entry; skipped entries are counted
  in the prepared meta.json;
- image modes: every PIL mode is converted with the right values (16-bit scaled by 1/257,
  32-bit integer and float only with a declared pixel_range, alpha dropped as PIL does);
- very large images: refused from their header, naming the file, its size and the fix;
- model shapes: a model is built at its img_size (timm resamples a pretrained position
  embedding); what timm cannot build is refused at config time; a checkpoint of another size
  is refused before any run folder is written;
- identical streams: a reference task that is also downstream is refused at config time, and
  streams with no usable pair at run time;
- gated MLPs: hidden mode applies every MLP variant `check_vit` accepts as the block does.
"""

from __future__ import annotations

import copy
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import SMOKE_CONFIG
from helpers import random_split, tiny_vit
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.layers import GatedMlp, GluMlp, Mlp, SwiGLU, SwiGLUPacked, resample_abs_pos_embed
from torchvision.datasets import ImageFolder

from vitplasticity import cli, components, jobs, models, plasticity
from vitplasticity.config import check_config
from vitplasticity.datasets.archives import extract
from vitplasticity.datasets.imagefiles import ImageFiles
from vitplasticity.datasets.images import Decoding, read_image, to_rgb
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.errors import UserError
from vitplasticity.machine import Runtime
from vitplasticity.prepared import load_split
from vitplasticity.settings import SCHEMA, build

pytestmark = pytest.mark.reliability

SMOKE = yaml.safe_load(SMOKE_CONFIG.read_text())


def png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    return buffer.getvalue()


def grey(level: int, size: int = 8) -> bytes:
    return png(np.full((size, size), level, dtype=np.uint8))


def imagenet_task(path: Path, **keys) -> dict:
    """The own-folder source: a folder or archive of images, read in place (a flat one needs order: file_name)."""
    return {"source": "imagenet_val", "store_size": 8, "split_seed": 42, "path": str(path), **keys}


def prepare(task: dict, tmp_path: Path) -> tuple[dict, Path]:
    out = tmp_path / "prepared" / "task"
    return prepare_task("task", task, out, tmp_path / "raw"), out


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Links and archive members


@pytest.fixture
def linked_folder(tmp_path) -> Path:
    """dog/ holds 3 images and a link to a 4th; cat/ and fox/ link to folders outside (3 each)."""
    data, store = tmp_path / "data", tmp_path / "store"
    for folder in (data / "dog", store / "cat", store / "fox"):
        folder.mkdir(parents=True)
    for k in range(3):
        (data / "dog" / f"{k}.png").write_bytes(grey(10 + k))
        (store / "cat" / f"{k}.png").write_bytes(grey(20 + k))
        (store / "fox" / f"{k}.png").write_bytes(grey(30 + k))
    (store / "extra.png").write_bytes(grey(40))
    (data / "cat").symlink_to(store / "cat", target_is_directory=True)
    (data / "fox").symlink_to("../store/fox", target_is_directory=True)
    (data / "dog" / "3.png").symlink_to(store / "extra.png")
    return data


def test_symlinked_class_folders_and_files_are_read_as_torchvision_imagefolder_reads_them(linked_folder, tmp_path):
    reference = ImageFolder(str(linked_folder))
    with ImageFiles(linked_folder) as dataset:
        assert dataset.classes == reference.classes == ["cat", "dog", "fox"]
        assert len(dataset) == len(reference) == 10
        assert dataset.labels.tolist() == reference.targets == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    meta, out = prepare(imagenet_task(linked_folder), tmp_path)
    assert (meta["classes"], meta["splits"]) == (["cat", "dog", "fox"], {"test": 10})
    assert meta["provenance"]["skipped"] == {"hidden": 0, "not_an_image": 0}
    assert load_split(out, "test").images[:, 0, 0, 0].tolist() == [20, 21, 22, 10, 11, 12, 40, 30, 31, 32]


def test_skipped_entries_are_counted_by_reason_in_meta_json(linked_folder, tmp_path):
    (linked_folder / ".DS_Store").write_bytes(b"\0")
    (linked_folder / "dog" / "._0.png").write_bytes(b"\0")  # a macOS resource fork
    (linked_folder / ".ipynb_checkpoints").mkdir()
    (linked_folder / "dog" / "notes.txt").write_text("not an image\n")
    meta, _ = prepare(imagenet_task(linked_folder), tmp_path)
    assert meta["splits"] == {"test": 10}
    assert meta["provenance"]["skipped"] == {"hidden": 3, "not_an_image": 1}


FOLDER_LINKS = {
    "loop to a folder above": (lambda d: (d / "dog" / "again").symlink_to("..", target_is_directory=True),
                               "{d}: link dog/again points to {d}, a folder that contains it, so the folder loops; "
                               "remove the link, then rerun"),
    "link to itself": (lambda d: (d / "dog" / "self.png").symlink_to("self.png"),
                       "{d}: link dog/self.png → self.png loops; remove the link or restore its target, then rerun"),
    "dangling link": (lambda d: (d / "cat" / "gone.png").symlink_to("missing.png"),
                      "{d}: link cat/gone.png → missing.png points to nothing; remove the link or restore its "
                      "target, then rerun"),
    "named pipe": (lambda d: os.mkfifo(d / "dog" / "pipe.png"),
                   "{d}: dog/pipe.png is not a regular file (a device, pipe or socket); remove it, then rerun"),
    "empty class folder": (lambda d: (d / "wolf").mkdir(),
                           "{d}: class folder 'wolf' under '.' holds no images (1 such folder(s)); add images to it "
                           "or remove it"),
}


@pytest.mark.parametrize("name", list(FOLDER_LINKS))
def test_a_bad_entry_in_a_folder_is_one_line_naming_it_and_nothing_is_written(name, linked_folder, tmp_path):
    damage, message = FOLDER_LINKS[name]
    damage(linked_folder)
    with pytest.raises(UserError) as error:
        prepare(imagenet_task(linked_folder), tmp_path)
    assert one_line(error) == message.format(d=linked_folder)
    assert not (tmp_path / "prepared").exists()


def tar_with(members: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


# train/cat: a file, a hard link and a symbolic link to files outside train/; train/dog: a link to a folder.
LINKED_TAR = [("extra/x.png", grey(50)), ("extra/y.png", grey(60)), ("train/cat/1.png", grey(70)),
              link("train/cat/2.png", "extra/x.png", tarfile.LNKTYPE), link("train/cat/3.png", "../../extra/y.png"),
              link("train/dog", "../extra"), ("train/readme.txt", b"notes")]


def test_every_tar_member_type_is_read_as_imagefolder_reads_the_unpacked_tar(tmp_path):
    archive = tmp_path / "train.tar"
    archive.write_bytes(tar_with(LINKED_TAR))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    reference = ImageFolder(str(tmp_path / "unpacked" / "train"))
    with ImageFiles(archive, root="train") as dataset:
        assert dataset.names == ["cat/1.png", "cat/2.png", "cat/3.png", "dog/x.png", "dog/y.png"]
        assert dataset.classes == reference.classes and dataset.labels.tolist() == reference.targets
        assert [np.asarray(dataset[i][0])[0, 0, 0] for i in range(5)] == [70, 50, 60, 50, 60]
        assert dataset.skipped == {"hidden": 0, "not_an_image": 1}


def fifo(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info


TAR_CASES = {
    "symbolic link out of the archive": (link("train/cat/evil.png", "../../../etc/x.png"),
        "{a}: member train/cat/evil.png links outside the archive; remove the link from the archive, then rerun"),
    "absolute symbolic link": (link("train/cat/abs.png", "/etc/passwd"),
        "{a}: member train/cat/abs.png links to /etc/passwd, outside the archive; remove the link from the archive, "
        "then rerun"),
    "link to itself": (link("train/cat/loop.png", "loop.png"),
        "{a}: member train/cat/loop.png is a link that loops (more than 40 links followed); remove the link from "
        "the archive, then rerun"),
    "folder link to its parent": (link("train/cat/up", ".."),
        "{a}: member train/cat/up links to train, a folder that contains it, so the archive loops; remove the link "
        "from the archive, then rerun"),
    "dangling hard link": (link("train/cat/gone.png", "train/cat/none.png", tarfile.LNKTYPE),
        "{a}: member train/cat/gone.png links to train/cat/none.png, which the archive does not hold; remove the "
        "link from the archive or add its target, then rerun"),
    "named pipe": (fifo("train/cat/pipe.png"),
        "{a}: member train/cat/pipe.png is a pipe, not an image file; remove it from the archive, then rerun"),
    "name climbing out": (("../escape.png", grey(1)),
        "{a}: member ../escape.png lies outside the archive (an absolute name or one that climbs with '..'); "
        "remove it from the archive, then rerun"),
    "empty class folder": (folder("train/wolf"),
        "{a}: class folder 'wolf' under 'train' holds no images (1 such folder(s)); add images to it or remove it"),
}


@pytest.mark.parametrize("name", list(TAR_CASES))
def test_a_bad_tar_member_is_one_line_naming_it(name, tmp_path):
    member, message = TAR_CASES[name]
    archive = tmp_path / "train.tar"
    archive.write_bytes(tar_with([*LINKED_TAR, member]))
    with pytest.raises(UserError) as error:
        ImageFiles(archive, root="train")
    assert one_line(error) == message.format(a=archive)


@pytest.mark.parametrize(("name", "reason"), [
    ("symbolic link out of the archive", "'train/cat/evil.png' would link to '{d}/etc/x.png', which is outside the "
                                         "destination"),
    ("dangling hard link", "\"linkname 'train/cat/none.png' not found\""),
])
def test_unpacking_a_tar_with_a_bad_link_is_one_line_naming_it(name, reason, tmp_path):
    archive = tmp_path / "train.tar"
    archive.write_bytes(tar_with([*LINKED_TAR, TAR_CASES[name][0]]))
    with pytest.raises(UserError) as error:
        extract(archive, tmp_path, "stamp")
    assert one_line(error) == (f"cannot unpack {archive} ({reason.format(d=tmp_path)}); delete it and run again to "
                               "download it afresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.tar"]  # nothing unpacked, no temporary left


def test_unpacking_a_tar_keeps_its_links_inside_it(tmp_path):
    archive = tmp_path / "train.tar"
    archive.write_bytes(tar_with(LINKED_TAR))
    extract(archive, tmp_path, "stamp")
    assert [len(ImageFolder(str(tmp_path / "train")).samples)] == [5]
    assert (tmp_path / "train" / "dog").is_symlink() and (tmp_path / "train" / "cat" / "2.png").stat().st_nlink == 2


def zip_with(files: dict[str, bytes], links: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def test_zip_symbolic_links_are_read_or_refused_naming_them(tmp_path):
    archive = tmp_path / "clipart.zip"
    files = {"clipart/cat/1.png": grey(80), "clipart/dog/1.png": grey(90)}
    archive.write_bytes(zip_with(files, {"clipart/dog/2.png": "../cat/1.png"}))
    with ImageFiles(archive, root="clipart") as dataset:
        assert dataset.names == ["cat/1.png", "dog/1.png", "dog/2.png"]
        assert [np.asarray(dataset[i][0])[0, 0, 0] for i in range(3)] == [80, 90, 80]
    archive.write_bytes(zip_with(files, {"clipart/dog/2.png": "../../../secret.png"}))
    with pytest.raises(UserError) as error:
        ImageFiles(archive, root="clipart")
    assert one_line(error) == (f"{archive}: member clipart/dog/2.png links outside the archive; remove the link "
                               "from the archive, then rerun")


# ---------------------------------------------------------------------------------------------
# Image modes


def test_a_16_bit_png_stores_x_over_257_not_white(tmp_path):
    data = tmp_path / "val"
    data.mkdir()
    values = np.tile(np.repeat(np.array([10_280, 51_400], dtype=np.uint16), 4), (8, 1))  # left half, right half
    (data / "deep.png").write_bytes(png(values))
    assert Image.open(data / "deep.png").mode == "I;16"
    _, out = prepare(imagenet_task(data, order="file_name"), tmp_path)
    stored = load_split(out, "test").images[0]  # (8, 8, 3)
    assert (stored[:, :4] == 40).all() and (stored[:, 4:] == 200).all()


def pil_image(mode: str, value) -> Image.Image:
    return Image.new(mode, (2, 2), value)


def palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 2), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    if transparent:
        image.info["transparency"] = 1
    return image


# Every PIL mode → its RGB value. Alpha is dropped as PIL's convert drops it (no compositing);
# RGBa and La are premultiplied, so PIL un-premultiplies them first.
MODES = {
    "1": (pil_image("1", 1), (255, 255, 255)),
    "L": (pil_image("L", 77), (77, 77, 77)),
    "P": (palette(False), (10, 20, 30)),
    "P with transparency": (palette(True), (10, 20, 30)),
    "PA": (palette(False).convert("PA"), (10, 20, 30)),
    "LA": (pil_image("LA", (77, 0)), (77, 77, 77)),
    "La": (pil_image("La", (50, 128)), (99, 99, 99)),
    "RGBA": (pil_image("RGBA", (10, 20, 30, 0)), (10, 20, 30)),
    "RGBa": (pil_image("RGBa", (50, 50, 50, 128)), (99, 99, 99)),
    "RGBX": (pil_image("RGBX", (1, 2, 3, 255)), (1, 2, 3)),
    "RGB": (pil_image("RGB", (1, 2, 3)), (1, 2, 3)),
    "CMYK": (pil_image("CMYK", (0, 255, 0, 0)), (255, 0, 255)),
    "YCbCr": (pil_image("YCbCr", (128, 128, 128)), (128, 128, 128)),
    "HSV": (pil_image("HSV", (0, 255, 255)), (255, 0, 0)),
    "LAB": (pil_image("LAB", (128, 128, 128)), (119, 119, 119)),  # L* 50, a* 0, b* 0: sRGB mid grey
    "I;16": (pil_image("I;16", 51_400), (200, 200, 200)),
    "I;16L": (pil_image("I;16L", 10_280), (40, 40, 40)),
    "I;16B": (pil_image("I;16B", 10_280), (40, 40, 40)),
    "I;16N": (pil_image("I;16N", 65_535), (255, 255, 255)),
}


def test_the_mode_table_covers_every_mode_pil_knows():
    assert set(Image.MODES) <= {key.split(" ")[0] for key in MODES} | {"I", "F"}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_converts_with_the_right_values(mode):
    image, rgb = MODES[mode]
    converted = to_rgb(image, "x.png")
    assert converted.mode == "RGB" and converted.getpixel((1, 1)) == rgb


@pytest.mark.parametrize(("mode", "value", "kind", "declared", "rgb"), [
    ("I", 400, "32-bit integer", (0, 1000), 102),
    ("F", 0.2, "32-bit float", (0.0, 1.0), 51),
])
def test_32_bit_modes_need_a_declared_pixel_range(mode, value, kind, declared, rgb):
    with pytest.raises(UserError) as error:
        to_rgb(pil_image(mode, value), "scan.tif")
    assert one_line(error) == (f"image scan.tif has {kind} pixels (PIL mode {mode}), whose value range is not defined; "
                               "declare it with the task's pixel_range: [low, high] (mapped to 0..255)")
    assert to_rgb(pil_image(mode, value), "scan.tif", declared).getpixel((0, 0)) == (rgb, rgb, rgb)


def test_a_32_bit_tiff_is_refused_then_read_with_its_declared_range(tmp_path):
    data = tmp_path / "val"
    data.mkdir()
    Image.fromarray(np.full((8, 8), 3000, dtype=np.int32)).save(data / "scan.tif")
    with pytest.raises(UserError) as error:
        prepare(imagenet_task(data, order="file_name"), tmp_path)
    assert one_line(error).startswith(f"image {data / 'scan.tif'} has 32-bit integer pixels (PIL mode I)")
    assert not any((tmp_path / "prepared").iterdir())  # nothing published, no temporary left
    with pytest.raises(UserError) as error:
        prepare(imagenet_task(data, order="file_name", pixel_range=[4095, 0]), tmp_path)
    assert one_line(error) == "task key pixel_range: [4095, 0] must be [low, high] with low < high; fix it"
    _, out = prepare(imagenet_task(data, order="file_name", pixel_range=[0, 4095]), tmp_path)
    assert (load_split(out, "test").images == 187).all()  # 3000 / 4095 · 255 = 186.8


# ---------------------------------------------------------------------------------------------
# Very large images


def png_header(width: int, height: int) -> bytes:
    """A PNG that states its size and holds no pixels (as small as a decompression bomb gets)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


@pytest.mark.parametrize(("file", "header", "pixels"), [
    ("bomb.png", png_header(13_500, 13_500), "13,500 × 13,500 = 182,250,000"),  # PIL raises above 2× its limit
    ("big.bmp", bmp_header(10_000, 10_000), "10,000 × 10,000 = 100,000,000"),  # PIL only warns below it
])
def test_a_very_large_image_is_one_line_naming_it_its_size_and_the_fix(file, header, pixels, tmp_path, capsys):
    data = tmp_path / "val"
    data.mkdir()
    (data / "normal.png").write_bytes(grey(5))
    (data / file).write_bytes(header)
    settings = json.dumps({"name": "task", "data": imagenet_task(data, order="file_name")})
    out = tmp_path / "prepared" / "task"
    capsys.readouterr()
    assert cli.main(["prepare", "--settings", settings, "--out", str(out), "--raw", str(tmp_path / "raw")]) == 2
    count = pixels.split("= ")[1].replace(",", "")
    assert capsys.readouterr().err.splitlines() == [
        f"vitplasticity prepare: error: image {data / file} is {pixels} pixels, more than max_image_pixels "
        f"(89,478,485, PIL's guard against decompression bombs); remove it, or for trusted local data set the "
        f"task's max_image_pixels to at least {count}"]
    assert not out.exists()


def test_max_image_pixels_sets_the_limit_for_trusted_data(tmp_path):
    image = grey(5, size=16)
    with pytest.raises(UserError, match=r"is 16 × 16 = 256 pixels, more than max_image_pixels \(255,"):
        read_image(image, "a.png", Decoding(max_image_pixels=255))
    assert read_image(image, "a.png", Decoding(max_image_pixels=256)).size == (16, 16)
    with pytest.raises(UserError, match="cannot read image bomb.png"):  # past the limit, decoding is tried
        read_image(png_header(13_500, 13_500), "bomb.png", Decoding(max_image_pixels=200_000_000))


# ---------------------------------------------------------------------------------------------
# Model shapes

RUNTIME = Runtime()
ARCH_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TRAIN = {"optimizer": "sgd", "lr": 0.01, "seed": 0, "steps": 4, "eval_every": 2, "batch_size": 16, "warmup_steps": 0}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    for name, kind in (("source", "source"), ("novel", "novel")):
        data = {"source": "synthetic", "kind": kind, "image_size": 16, "n_train": 32, "n_val": 16, "n_test": 16,
                "seed": 0}
        prepare_task(name, data, root / name, root / "raw")
    return root


def test_a_model_runs_at_its_img_size_not_at_kwargs_img_size(tasks, tmp_path):
    config = copy.deepcopy(SMOKE)
    model = config["models"]["vit_smoke"]
    model["img_size"], model["kwargs"]["img_size"] = 24, 16  # the quick-style case
    check_config(config, SCHEMA)
    settings = build("pretrain", {**TRAIN, "model": "vit", "task": "source", "timm_name": "vit_tiny_patch16_224",
                                          "kwargs": ARCH_KWARGS, "img_size": 24})
    weights = tmp_path / "vit.safetensors"
    jobs.pretrain(settings, RUNTIME, tasks / "source", weights, tmp_path / "pretrain")
    record = json.loads(weights.with_suffix(".json").read_text())
    assert (record["img_size"], record["arch"]["kwargs"]["img_size"]) == (24, 24)
    assert load_file(str(weights))["pos_embed"].shape == (1, 10, 32)  # 3 × 3 patches of 8 px + class token
    finetune = build("finetune", {**TRAIN, "model": "vit", "task": "novel", "arm": "mha",
                                          "components": ["mha"]})
    assert jobs.finetune(finetune, RUNTIME, tasks / "novel", weights, tmp_path / "run")["status"] == (
        "completed")
    measure = build("plasticity", {"model": "vit", "task": "novel", "reference_task": "source", "n_pairs": 8,
                                   "modes": ["embedding", "hidden"]})
    table = jobs.measure_plasticity(measure, RUNTIME, weights, tasks / "source", tasks / "novel", tmp_path / "p.csv",
                                    tmp_path / "p.json")
    assert len(table) == 2 * 5 * 2 and table["mean"].notna().all()
    assert len(jobs.compute_bounds(weights, tmp_path / "p.json", tmp_path / "bounds.csv")) == 5 * 2
    probe = build("probe", {"model": "vit", "task": "novel", "max_iter": 50})
    assert 0 <= jobs.linear_probe(probe, RUNTIME, weights, tasks / "novel", tmp_path / "probe.json")["test_acc"] <= 1


def test_a_checkpoint_of_another_size_is_one_line_before_any_run_folder(tasks, tmp_path, capsys):
    weights = tmp_path / "old.safetensors"
    record = {"arch": {"timm_name": "vit_tiny_patch16_224", "kwargs": ARCH_KWARGS}, "img_size": 24,
              "mean": [0.5] * 3, "std": [0.5] * 3}  # as fetch wrote it before img_size reached timm
    models.save_checkpoint(weights, models.build(record["arch"], num_classes=5), record)
    finetune = {**TRAIN, "model": "vit", "task": "novel", "arm": "mha", "components": ["mha"]}
    run_dir = tmp_path / "run"
    capsys.readouterr()
    code = cli.main(["finetune", "--settings", json.dumps(finetune), "--task", str(tasks / "novel"),
                     "--checkpoint", str(weights), "--run-dir", str(run_dir)])
    assert (code, capsys.readouterr().err.splitlines()) == (2, [
        f"vitplasticity finetune: error: checkpoint {weights} does not fit the architecture in its sidecar "
        "(vit_tiny_patch16_224 {'depth': 2, 'embed_dim': 32, 'img_size': 24, 'num_heads': 2, 'patch_size': 8}): "
        "1 tensor(s) of the wrong shape, e.g. pos_embed is [1, 5, 32] in the file but [1, 10, 32] in the model; "
        "delete both files and fetch or pretrain it again"])
    assert not (run_dir / "config.yaml").exists()


HUB_NAME, HUB_TAG = "vit_tiny_patch16_224", "augreg_in21k_ft_in1k"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_fetch_at_another_img_size_resamples_the_position_embedding(tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / f"models--timm--{HUB_NAME}.{HUB_TAG}" / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(HUB_COMMIT)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model(HUB_NAME, num_classes=1000).state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    settings = {"model": "vit", "source": "timm", "timm_name": HUB_NAME, "pretrained_tag": HUB_TAG, "revision": "main",
                "img_size": 32}
    out = tmp_path / "vit.safetensors"
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-m", "vitplasticity.cli", "fetch", "--settings", json.dumps(settings),
                             "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["arch"] == {"timm_name": HUB_NAME, "kwargs": {"img_size": 32}} and record["img_size"] == 32
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(2, 2), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    assert torch.equal(load_file(str(out))["pos_embed"], expected)  # (1, 1 + 2 × 2, 192)
    model, _ = models.load_checkpoint(out, num_classes=3)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


SHAPE_CASES = {
    "patch 14 architecture at 32 px": (
        {"timm_name": "vit_small_patch14_dinov2", "img_size": 32, "patch_size": 14, "kwargs": {}},
        "config key 'models.vit_smoke.img_size': 32 is not divisible by the patch size 14; choose a multiple of 14"),
    "patch_size disagreeing with the architecture": (
        {"timm_name": "vit_small_patch14_dinov2", "img_size": 224, "patch_size": 16, "kwargs": {}},
        "config key 'models.vit_smoke.patch_size': 16 differs from the patch size 14 timm builds "
        "vit_small_patch14_dinov2 with; set patch_size to 14, or kwargs.patch_size to 16 to build 16-pixel patches"),
    "heads not dividing the width": (
        {"kwargs": {**ARCH_KWARGS, "embed_dim": 30, "num_heads": 4}},
        "config key 'models.vit_smoke.kwargs.num_heads': embed_dim 30 is not divisible by 4 heads; choose a number "
        "of heads that divides embed_dim"),
}


@pytest.mark.parametrize("name", list(SHAPE_CASES))
def test_a_model_timm_cannot_build_is_one_line_at_config_time(name):
    config = copy.deepcopy(SMOKE)
    config["models"]["vit_smoke"].update(SHAPE_CASES[name][0])
    with pytest.raises(UserError) as error:
        check_config(config, SCHEMA)
    assert one_line(error) == SHAPE_CASES[name][1]


def test_dinov2_at_its_own_size_or_at_224_passes_the_config_check():
    config = copy.deepcopy(SMOKE)
    for size in (518, 224):
        config["models"]["vit_smoke"].update(timm_name="vit_small_patch14_dinov2", img_size=size, patch_size=14,
                                             kwargs={})
        check_config(config, SCHEMA)


# ---------------------------------------------------------------------------------------------
# Identical streams


def test_a_reference_task_that_is_also_downstream_is_refused_at_config_time():
    config = copy.deepcopy(SMOKE)
    experiment, tasks = next(iter(config["experiments"].items()))
    config["plasticity"]["reference_task"] = tasks["tasks"][0]
    with pytest.raises(UserError) as error:
        check_config(config, SCHEMA)
    assert one_line(error) == (
        f"config key 'plasticity.reference_task': '{tasks['tasks'][0]}' is also a downstream task of experiment "
        f"'{experiment}', so plasticity would pair its test images with themselves; choose a reference task no "
        "experiment finetunes on")


@pytest.mark.parametrize("modes", [("embedding",), ("hidden",), ("embedding", "hidden")])
def test_identical_streams_are_one_line_at_run_time(modes):
    stream = random_split(6)
    with pytest.raises(UserError) as error:
        plasticity.measure(tiny_vit(), stream, stream, 6, 4, 32, torch.device("cpu"), modes, progress=lambda _: None)
    assert one_line(error) == (
        "plasticity: all 6 image pairs have identical embeddings (zero input distance), so no rate of change is "
        "defined; choose a plasticity.reference_task whose images differ from the downstream task's")


def test_running_stats_of_no_values_are_nan_not_a_division_by_zero():
    stats = plasticity.RunningStats()
    stats.add(("hidden", "fc1", 0), torch.zeros(0))
    mean, spread, n = stats.summary(("hidden", "fc1", 0))
    assert np.isnan(mean) and np.isnan(spread) and n == 0


# ---------------------------------------------------------------------------------------------
# Gated MLPs

MLP_VARIANTS = {
    "Mlp": {"mlp_layer": Mlp},
    "GluMlp (sigmoid gate)": {"mlp_layer": GluMlp, "mlp_ratio": 4},
    "SwiGLUPacked": {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU, "mlp_ratio": 2.66667 * 2},
    "SwiGLU (split fc1)": {"mlp_layer": SwiGLU, "act_layer": torch.nn.SiLU},
}


def gated_fc2_input(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FC2's input computed from timm's documented forward of each MLP, by hand."""
    if isinstance(mlp, SwiGLU):
        return mlp.act(mlp.fc1_g(x)) * mlp.fc1_x(x)
    if isinstance(mlp, GluMlp):
        value, gate = mlp.fc1(x).chunk(2, dim=-1)
        return value * mlp.act(gate) if mlp.gate_last else mlp.act(value) * gate
    return mlp.act(mlp.fc1(x))


def dinov2_giant_shrunk() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, img_size=28,
                             embed_dim=32, depth=2, num_heads=2).eval()


MODELS = {name: partial(tiny_vit, **kwargs) for name, kwargs in MLP_VARIANTS.items()}
MODELS["DINOv2-giant shrunk"] = dinov2_giant_shrunk


@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_mode_applies_every_accepted_mlp_as_the_block_does(name):
    model = components.check_vit(MODELS[name]())
    if name == "DINOv2-giant shrunk":
        assert type(model.blocks[0].mlp) is GluMlp and not model.blocks[0].mlp.gate_last  # SwiGLUPacked
    images = torch.randn(3, 3, *model.patch_embed.img_size)
    hidden = components.embed(model, images)
    with torch.no_grad():
        for block in model.blocks:
            inputs, out = components.hidden_inputs(block, hidden)
            assert torch.equal(out, block(hidden))
            after_attn = hidden + block.ls1(block.attn(block.norm1(hidden)))
            torch.testing.assert_close(inputs["fc2"], gated_fc2_input(block.mlp, block.norm2(after_attn)))
            width = components.apply_component(block, "fc1", inputs["fc1"]).shape[-1]
            assert width == components.fc1_weight(block.mlp).shape[0]
            hidden = out
    assert set(components.count_by_component(model)) == set(components.COMPONENTS)  # every parameter placed
    split = random_split(8, size=model.patch_embed.img_size[0])
    other = random_split(8, size=model.patch_embed.img_size[0], seed=1)
    table, _ = plasticity.measure(model, split, other, 8, 4, model.patch_embed.img_size[0], torch.device("cpu"),
                                  ("embedding", "hidden"), progress=lambda _: None)
    assert len(table) == 2 * 5 * 2 and np.isfinite(table["mean"]).all()


def test_an_mlp_without_a_known_fc1_and_fc2_is_refused_by_check_vit():
    with pytest.raises(UserError) as error:
        components.check_vit(tiny_vit(mlp_layer=GatedMlp))
    assert one_line(error) == ("block 0 is a Block (GatedMlp MLP); only pre-norm timm Blocks with a Mlp, GluMlp, "
                               "SwiGLU MLP are supported")
