"""Inputs of the paper rehearsal: what a machine without network or GPU cannot have.

`config/rehearsal.yaml` overlays `config/config.yaml`. This module makes what the overlay points
at, inside the study folder (``rehearsal/``):

- ``host/``: small archives in each dataset's real format and file names, with real image
  sizes (CIFAR and CIFAR-10-C at 32 px; DomainNet, Flowers102 and Pet JPEGs of varied sizes
  and aspect ratios) and the class counts that shape code (DomainNet 345, CIFAR-100 100,
  Flowers102 102, Pet 37), served on 127.0.0.1 at the overlay's port;
- ``imagenet_val.tar``: ImageNet-style val JPEGs in four class folders named by WordNet id (the
  layout torchvision's `ImageNet` unpacks the official tar to, read in the authors' ImageFolder
  order), one of them CMYK and one grayscale, as the official tar holds;
- ``hub/``: a Hugging Face hub cache holding random weights of each `timm` model of the merged
  config, built with the config's `kwargs` (the rehearsal cuts depth), read with
  ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1``.

Every archive is built byte for byte the same on every run (no time stamps), so the overlay
can pin its checksums. Run the rehearsal::

    python tests/rehearsal.py STUDY_DIR                # build, serve, run snakemake, stop
    python tests/rehearsal.py STUDY_DIR --checksums    # print the archives' checksums
"""

from __future__ import annotations

import argparse
import errno
import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "config" / "config.yaml"
OVERLAY = ROOT / "config" / "rehearsal.yaml"
FOLDER = "rehearsal"  # inside the study folder
HUB_COMMIT = "0" * 40

# Width x height of the JPEGs, in turn: portrait, landscape, square, smaller than the store size.
SIZES = [(320, 240), (240, 320), (257, 257), (96, 128), (400, 300), (64, 48), (300, 500)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CORRUPTIONS = ["contrast", "gaussian_noise", "motion_blur", "snow", "speckle_noise"]
# The 37 Oxford-IIIT Pet breeds as the dataset names its files (cats capitalised, species 1).
PET_BREEDS = [
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal", "Birman",
    "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug", "Ragdoll",
    "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese", "Sphynx",
    "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
]


# --- byte-stable containers ---

def tar_bytes(files: dict[str, bytes], compress: bool) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)  # mtime 0, no owner
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    return gzip.compress(data, mtime=0) if compress else data


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def mat_bytes(payload: dict) -> bytes:
    """A MATLAB 5 file; its 116-byte text header (a creation date) replaced by a fixed one."""
    import scipy.io

    buffer = io.BytesIO()
    scipy.io.savemat(buffer, payload)
    return b"MATLAB 5.0 MAT-file, vitplasticity rehearsal".ljust(116) + buffer.getvalue()[116:]


def picture(index: int, size: tuple[int, int], mode: str = "RGB") -> bytes:
    """A smooth JPEG of (width, height) `size` whose colours depend on `index`."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = index * 0.7
    channels = [127 + 120 * np.sin(x / (9 + index % 7) + phase + k) * np.cos(y / (11 + index % 5) - k)
                for k in range(3)]
    image = Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def cifar_images(count: int, offset: int) -> np.ndarray:
    """(count, 32, 32, 3) uint8 patterns, image i coloured by offset + i."""
    y, x = np.mgrid[0:32, 0:32]
    codes = np.arange(offset, offset + count)[:, None, None, None]
    planes = np.stack([x, y, x + y], axis=-1)[None]  # (1, 32, 32, 3)
    return ((planes * (1 + codes % 5) + 37 * codes) % 256).astype(np.uint8)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: (N, 3072), the R, G and B planes one after the other."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


# --- the datasets ---

def cifar10() -> bytes:
    files = {}
    for batch in range(5):
        codes = range(8 * batch, 8 * batch + 8)
        entry = {"data": cifar_rows(cifar_images(8, 8 * batch)), "labels": [k % 10 for k in codes]}
        files[f"cifar-10-batches-py/data_batch_{batch + 1}"] = pickle.dumps(entry, protocol=4)
    test = {"data": cifar_rows(cifar_images(12, 500)), "labels": [k % 10 for k in range(12)]}
    files["cifar-10-batches-py/test_batch"] = pickle.dumps(test, protocol=4)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": CIFAR10_CLASSES}, protocol=4)
    return tar_bytes(files, compress=True)


def cifar100() -> bytes:
    names = [f"class_{i:03d}" for i in range(100)]

    def entry(images, labels):
        return pickle.dumps({"data": cifar_rows(images), "fine_labels": labels,
                             "coarse_labels": [label // 5 for label in labels]}, protocol=4)

    files = {
        # Two images of every class: the low-data subset draws one of each.
        "cifar-100-python/train": entry(cifar_images(200, 0), [(7 * k) % 100 for k in range(200)]),
        "cifar-100-python/test": entry(cifar_images(12, 500), [(13 * k) % 100 for k in range(12)]),
        "cifar-100-python/meta": pickle.dumps({"fine_label_names": names, "coarse_label_names": names[:20]},
                                              protocol=4),
    }
    return tar_bytes(files, compress=True)


def cifar10c(per_severity: int = 20) -> bytes:
    rows = 5 * per_severity
    files = {f"CIFAR-10-C/{name}.npy": _npy(cifar_images(rows, 1000 * k)) for k, name in enumerate(CORRUPTIONS)}
    files["CIFAR-10-C/labels.npy"] = _npy((np.arange(rows) % 10).astype(np.uint8))
    return tar_bytes(files, compress=False)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def domainnet(domain: str, classes: int = 345, extra: int = 35, copies: int = 1) -> bytes:
    """<domain>.zip: <domain>/<class>/<domain>_<c>_<i>.jpg, one image per class plus `extra`, and `copies` - 1
    more small ones of every class (so that a low-data subset finds every class in the training pool)."""
    files = {}
    for n in range(classes * copies + extra):
        c = n % classes
        size = SIZES[n % len(SIZES)] if n < classes + extra else (64, 48)
        files[f"{domain}/class_{c:03d}/{domain}_{c:03d}_{n:06d}.jpg"] = picture(n, size)
    return zip_bytes(files)


def flowers102(images: int = 60) -> dict[str, bytes]:
    ids = np.arange(1, images + 1)
    archive = tar_bytes({f"jpg/image_{k:05d}.jpg": picture(int(k), SIZES[k % len(SIZES)]) for k in ids},
                        compress=True)
    third = images // 3
    return {
        "102flowers.tgz": archive,
        "imagelabels.mat": mat_bytes({"labels": ((ids * 7) % 102 + 1)[None, :]}),
        "setid.mat": mat_bytes({"trnid": ids[None, :third], "valid": ids[None, third:2 * third],
                                "tstid": ids[None, 2 * third:]}),
    }


def oxford_pets(trainval_per_breed: int = 2, test_per_breed: int = 1) -> dict[str, bytes]:
    images, lines, n = {}, {"trainval": [], "test": []}, 0
    for split, per_breed in (("trainval", trainval_per_breed), ("test", test_per_breed)):
        for repeat in range(per_breed):
            for breed_id, breed in enumerate(PET_BREEDS, start=1):
                n += 1
                image_id = f"{breed}_{n}"
                images[f"images/{image_id}.jpg"] = picture(n, SIZES[(n + repeat) % len(SIZES)])
                species = 1 if breed[0].isupper() else 2
                lines[split].append(f"{image_id} {breed_id} {species} {n}\n")
    annotations = {f"annotations/{split}.txt": "".join(rows).encode() for split, rows in lines.items()}
    return {"images.tar.gz": tar_bytes(images, compress=True),
            "annotations.tar.gz": tar_bytes(annotations, compress=True)}


IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")  # the first four classes


def imagenet_val(images: int = 24) -> bytes:
    """ImageNet val as class folders (torchvision's `ImageNet` layout): the official file names, each
    in its WordNet id's folder; image 3 is CMYK and image 5 grayscale, as in the real tar."""
    modes = {3: "CMYK", 5: "L"}
    return tar_bytes({f"{IMAGENET_WNIDS[k % len(IMAGENET_WNIDS)]}/ILSVRC2012_val_{k:08d}.JPEG":
                      picture(k, SIZES[k % len(SIZES)], modes.get(k, "RGB")) for k in range(1, images + 1)},
                     compress=False)


def archives() -> dict[str, bytes]:
    """Every served file by its path on the host."""
    files = {"cifar-10-python.tar.gz": cifar10(), "cifar-100-python.tar.gz": cifar100(),
             "CIFAR-10-C.tar": cifar10c(), "domainnet/clipart.zip": domainnet("clipart", copies=4),
             "domainnet/sketch.zip": domainnet("sketch")}
    files |= {f"flowers102/{name}": data for name, data in flowers102().items()}
    files |= {f"oxford_pets/{name}": data for name, data in oxford_pets().items()}
    return files


# --- the merged config, the hub cache, the study folder ---

def merged_config(overlays: list[Path], base: Path = PAPER_CONFIG) -> dict:
    """`base` (config/config.yaml) updated by each overlay in turn, nested mappings merged (Snakemake's rule)."""
    from snakemake.utils import update_config

    config = yaml.safe_load(Path(base).read_text())
    for overlay in overlays:
        update_config(config, yaml.safe_load(Path(overlay).read_text()))
    return config


def build_hub_cache(cache: Path, config: dict) -> list[str]:
    """Random weights of each timm model of `config`, laid out as huggingface_hub caches them."""
    import timm
    import torch
    from safetensors.torch import save_file

    made = []
    for model in config["models"].values():
        if model["source"] != "timm":
            continue
        name = f"{model['timm_name']}.{model['pretrained_tag']}"
        repo = cache / f"models--timm--{name}"
        weights = repo / "snapshots" / HUB_COMMIT / "model.safetensors"
        if not weights.exists():
            torch.manual_seed(0)
            net = timm.create_model(name, pretrained=False, **model.get("kwargs", {}))
            weights.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / model.get("revision", "main")).write_text(HUB_COMMIT)
        made.append(name)
    return made


def build(study: Path, config: dict) -> Path:
    """Write the served archives, the ImageNet val tar of class folders and the hub cache under study/rehearsal."""
    folder = Path(study) / FOLDER
    for name, data in archives().items():
        path = folder / "host" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "imagenet_val.tar").write_bytes(imagenet_val())
    build_hub_cache(folder / "hub", config)
    return folder


def checksums_problems(config: dict) -> list[str]:
    """Where the overlay's URLs or checksums do not name the archives built here."""
    files = archives()
    problems = []
    for task, spec in config["tasks"].items():
        data = spec["data"]
        pinned = {}
        if data.get("url"):
            pinned[data["url"]] = data.get("checksum")
        for filename, url in (data.get("urls") or {}).items():
            pinned[url] = (data.get("checksums") or {}).get(filename)
        for url, checksum in pinned.items():
            name = urlparse(url).path.lstrip("/")
            if name not in files:
                problems.append(f"{task}: {url} names no rehearsal archive")
            elif checksum != f"md5:{hashlib.md5(files[name]).hexdigest()}":
                problems.append(f"{task}: {name} has md5:{hashlib.md5(files[name]).hexdigest()}, "
                                f"the overlay pins {checksum}")
    return problems


def host_port(config: dict) -> int:
    ports = {urlparse(url).port for spec in config["tasks"].values()
             for url in [spec["data"].get("url"), *(spec["data"].get("urls") or {}).values()] if url}
    if len(ports) != 1:
        raise SystemExit(f"the overlay's dataset URLs name ports {sorted(ports)}; they must name one")
    return ports.pop()


def environment(study: Path) -> dict[str, str]:
    """The environment of the rehearsal's snakemake: the hub cache, offline."""
    return dict(os.environ, HF_HUB_CACHE=str(Path(study).resolve() / FOLDER / "hub"), HF_HUB_OFFLINE="1",
                HF_HUB_DISABLE_TELEMETRY="1", MPLBACKEND="Agg")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study folder (snakemake --directory)")
    parser.add_argument("--overlay", type=Path, action="append", default=None,
                        help="overlay config files after config/config.yaml (default: config/rehearsal.yaml)")
    parser.add_argument("--checksums", action="store_true", help="print the archives' md5 checksums and stop")
    parser.add_argument("snakemake_args", nargs="*", help="after --: extra snakemake arguments")
    args = parser.parse_args()
    if args.checksums:
        for name, data in archives().items():
            print(f"{name}: md5:{hashlib.md5(data).hexdigest()}")
        return 0
    overlays = args.overlay or [OVERLAY]
    config = merged_config(overlays)
    problems = checksums_problems(config)
    if problems:
        print("the rehearsal archives do not match the overlay: " + "; ".join(problems), file=sys.stderr)
        return 1
    sys.path.insert(0, str(Path(__file__).parent))
    from http_fixture import DatasetHost

    port = host_port(config)
    try:  # before anything is built: the overlay's URLs name this one port
        host = DatasetHost(args.study / FOLDER / "host", port=port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"cannot serve the rehearsal archives on 127.0.0.1:{port}, the port the overlay's dataset URLs name "
              f"({exc.strerror}); wait for the rehearsal that serves there to end, or stop what listens there, "
              "then run this again", file=sys.stderr)
        return 1
    try:
        build(args.study, config)
        command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(args.study),
                   "--configfile", str(PAPER_CONFIG), *map(str, overlays), "--cores", "all",
                   *args.snakemake_args]
        return subprocess.run(command, env=environment(args.study)).returncode
    finally:
        host.close()


if __name__ == "__main__":
    sys.exit(main())
