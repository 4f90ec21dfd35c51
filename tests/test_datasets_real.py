"""Real dataset preparation, end to end, against a local host serving tiny real-layout archives.

Every test runs the production download → verify → unpack → split → store path; only the
host (127.0.0.1) and the archives' sizes differ from the real thing.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from dataset_archives import (
    CIFAR10_NAMES,
    DOMAINNET_CLASSES,
    cifar10_archive,
    cifar10c_archive,
    cifar100_archive,
    domainnet_zip,
    flowers_files,
    imagenet_devkit,
    jpeg,
    pets_files,
    tar_bytes,
)
from http_fixture import DatasetHost
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets import imagenet as tv_imagenet

from vitplasticity.datasets.cifar10c import read_severity
from vitplasticity.datasets.download import Resource, fetch, parse_checksum, resolve
from vitplasticity.datasets.flowers import OFFICIAL as FLOWERS_FILES
from vitplasticity.datasets.images import fit_square
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.errors import UserError
from vitplasticity.prepared import load_split, prepared_writer, read_meta, write_prepared


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    server = DatasetHost(tmp_path_factory.mktemp("host"))
    yield server
    server.close()


def md5(data: bytes) -> str:
    return f"md5:{hashlib.md5(data).hexdigest()}"


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def make_task(source: str, **keys) -> dict:
    return {"source": source, "store_size": 32, "split_seed": 42, "val_fraction": 0.2,
            "test_fraction": 0.2, **keys}


def serve(host: DatasetHost, folder: str, files: dict[str, bytes]) -> dict:
    """Serve `files` below `folder`; returns the task keys that point a source at them."""
    return {"urls": {name: host.put(f"{folder}/{name}", data) for name, data in files.items()},
            "checksums": {name: md5(data) for name, data in files.items()}}


def run(name: str, task: dict, tmp_path: Path) -> tuple[dict, Path]:
    out_dir = tmp_path / "prepared" / name
    return prepare_task(name, task, out_dir, tmp_path / "raw" / task["source"]), out_dir


def splits_of(out_dir: Path) -> dict:
    meta = read_meta(out_dir)
    return {split: load_split(out_dir, split, verify=True) for split in meta["splits"]}


def test_cifar10_official_train_split_80_20_and_official_test(host, tmp_path):
    data = cifar10_archive()
    task = make_task("cifar10", url=host.put("c10/cifar-10-python.tar.gz", data),
                     checksum=md5(data))
    meta, out_dir = run("cifar10", task, tmp_path)
    assert meta == read_meta(out_dir)
    assert meta["classes"] == CIFAR10_NAMES
    assert meta["splits"] == {"train": 16, "val": 4, "test": 5}
    assert meta["image_size"] == 32
    assert meta["provenance"]["files"] == [
        {"filename": "cifar-10-python.tar.gz", "url": task["url"], "checksum": task["checksum"]}
    ]
    splits = splits_of(out_dir)
    codes = {}
    for split, part in splits.items():
        assert part.images.dtype == np.uint8 and part.labels.dtype == np.int64
        assert part.images.shape == (meta["splits"][split], 32, 32, 3)
        codes[split] = part.images[:, 0, 0, 0].tolist()
        # CIFAR rows are R, G, B planes: R is the image's code, G the row, B twice the column.
        assert (part.images[..., 0] == part.images[:, :1, :1, 0]).all()
        assert (part.images[:, :, :, 1] == np.arange(32)[None, :, None]).all()
        assert (part.images[:, :, :, 2] == 2 * np.arange(32)[None, None, :]).all()
    assert sorted(codes["train"] + codes["val"]) == list(range(20))
    assert sorted(codes["val"]) == [7, 9, 14, 15]  # split_seed 42: 4 of the 20 training images, pinned
    assert splits["train"].labels.tolist() == [code % 10 for code in codes["train"]]
    assert codes["test"] == [200, 201, 202, 203, 204]
    assert splits["test"].labels.tolist() == [0, 1, 2, 3, 4]


def test_cifar10_split_seed_chooses_the_validation_images(host, tmp_path):
    data = cifar10_archive()
    url = host.put("seeded/cifar-10-python.tar.gz", data)
    val = {}
    for seed in (42, 7):
        task = make_task("cifar10", url=url, checksum=md5(data), split_seed=seed)
        _, out_dir = run(f"cifar10_{seed}", task, tmp_path)
        val[seed] = sorted(load_split(out_dir, "val").images[:, 0, 0, 0].tolist())
    assert val == {42: [7, 9, 14, 15], 7: [3, 8, 12, 13]}


def test_a_second_preparation_reuses_the_download_and_gives_the_same_bytes(host, tmp_path):
    data = cifar10_archive()
    task = make_task("cifar10", url=host.put("again/cifar-10-python.tar.gz", data),
                     checksum=md5(data))
    first = prepare_task("cifar10", task, tmp_path / "a" / "cifar10", tmp_path / "raw")
    second = prepare_task("cifar10", task, tmp_path / "b" / "cifar10", tmp_path / "raw")
    assert first["checksums"] == second["checksums"]
    assert [r.path for r in host.requests].count("again/cifar-10-python.tar.gz") == 1


def test_cifar100_fine_labels_and_100_classes(host, tmp_path):
    data = cifar100_archive()
    task = make_task("cifar100", **serve(host, "c100", {"cifar-100-python.tar.gz": data}))
    meta, out_dir = run("cifar100", task, tmp_path)
    assert len(meta["classes"]) == 100 and meta["classes"][7] == "class07"
    assert meta["splits"] == {"train": 8, "val": 2, "test": 3}
    splits = splits_of(out_dir)
    for part in (splits["train"], splits["val"]):
        assert part.labels.tolist() == [7 * code for code in part.images[:, 0, 0, 0]]
    assert splits["test"].labels.tolist() == [99, 98, 97]


def test_cifar10c_severity_5_is_the_last_fifth_split_into_train_val_test(host, tmp_path):
    data = cifar10c_archive(per_severity=10)
    task = make_task("cifar10c", corruption="contrast", severity=5,
                     **serve(host, "c10c", {"CIFAR-10-C.tar": data}))
    meta, out_dir = run("cifar10c_contrast", task, tmp_path)
    assert meta["classes"] == CIFAR10_NAMES
    # 10 images: round(10 × 0.2) = 2 to test, then round(8 × 0.2) = 2 of the rest to val.
    assert meta["splits"] == {"train": 6, "val": 2, "test": 2}
    rows = []
    for part in splits_of(out_dir).values():
        assert (part.images == part.images[:, :1, :1, :1]).all()  # each image is one value
        values = part.images[:, 0, 0, 0].tolist()
        assert part.labels.tolist() == [value % 10 for value in values]
        rows += values
    assert sorted(rows) == list(range(40, 50))


def test_a_subset_is_class_balanced_seeded_and_recorded_while_the_test_split_stays_whole(host, tmp_path):
    """CIFAR-10-C with 50 images a severity (value = row 200..249, label = value % 10): 10 to test, then a
    subset of 20 // 10 classes = 2 per class drawn from the 40 left, 80/20 into 16 train and 4 val."""
    keys = serve(host, "c10c-subset", {"CIFAR-10-C.tar": cifar10c_archive(per_severity=50)})
    whole_meta, whole_dir = run("whole", make_task("cifar10c", corruption="contrast", severity=5, **keys), tmp_path)
    picked = {}
    for seed in (42, 7):
        task = make_task("cifar10c", corruption="contrast", severity=5, subset={"images": 20, "seed": seed}, **keys)
        meta, out_dir = run(f"subset{seed}", task, tmp_path)
        assert meta["splits"] == {"train": 16, "val": 4, "test": 10}
        assert meta["provenance"]["subset"] == {"images": 20, "seed": seed}
        splits = splits_of(out_dir)
        pool = np.concatenate([splits["train"].images[:, 0, 0, 0], splits["val"].images[:, 0, 0, 0]]).astype(int)
        assert sorted(np.bincount(pool % 10, minlength=10).tolist()) == [2] * 10
        picked[seed] = sorted(pool.tolist())
        # The test split is the whole task's, image for image.
        assert np.array_equal(splits["test"].images, splits_of(whole_dir)["test"].images)
        assert not set(pool) & set(splits["test"].images[:, 0, 0, 0].tolist())
    assert picked[42] != picked[7]
    assert "subset" not in whole_meta["provenance"] and whole_meta["splits"] == {"train": 32, "val": 8, "test": 10}


def test_cifar10c_reads_the_chosen_corruption_and_severity(tmp_path):
    archive = tmp_path / "CIFAR-10-C.tar"
    archive.write_bytes(cifar10c_archive(per_severity=10))
    images, labels = read_severity(archive, "snow", 2)
    assert images[:, 0, 0, 0].tolist() == list(range(110, 120))
    assert labels.tolist() == list(range(10))
    with pytest.raises(UserError, match=r"no CIFAR-10-C/fog.npy; corruptions in it: \['contrast'"):
        read_severity(archive, "fog", 5)


def test_domainnet_domain_split_with_sorted_class_folders(host, tmp_path):
    data = domainnet_zip("sketch", per_class=5)
    task = make_task("domainnet", domain="sketch", store_size=8,
                     url=host.put("dn/sketch.zip", data), checksum=sha256(data))
    meta, out_dir = run("domainnet_sketch", task, tmp_path)
    assert meta["classes"] == DOMAINNET_CLASSES
    # 15 images: 3 to test, then round(12 × 0.2) = 2 to val.
    assert meta["splits"] == {"train": 10, "val": 2, "test": 3}
    seen = set()
    for part in splits_of(out_dir).values():
        assert part.images.shape[1:] == (8, 8, 3)
        pixel = part.images[:, 4, 4].astype(int)  # solid colour (80 class, 20 index, 100)
        assert np.abs(pixel[:, 0] - 80 * part.labels).max() <= 4
        assert np.abs(pixel[:, 2] - 100).max() <= 4
        seen |= {(int(label), round(g / 20))
                 for label, g in zip(part.labels, pixel[:, 1], strict=True)}
    assert seen == {(c, i) for c in range(3) for i in range(5)}


def test_flowers102_official_splits_and_classes(host, tmp_path):
    task = make_task("flowers102", store_size=8, **serve(host, "fl", flowers_files(12)))
    meta, out_dir = run("flowers102", task, tmp_path)
    assert len(meta["classes"]) == 102 and meta["classes"][0] == "pink primrose"
    assert meta["splits"] == {"train": 4, "val": 4, "test": 4}
    splits = splits_of(out_dir)
    assert splits["train"].labels.tolist() == [0, 1, 2, 3]  # image id k has label k (1-based)
    assert splits["test"].labels.tolist() == [8, 9, 10, 11]
    red = splits["val"].images[:, 4, 4, 0].astype(int)
    assert np.abs(red - 20 * (splits["val"].labels + 1)).max() <= 4


def test_oxford_pets_trainval_80_20_and_official_test(host, tmp_path):
    task = make_task("oxford_pets", store_size=8, **serve(host, "pets", pets_files(10, 4)))
    meta, out_dir = run("oxford_pets", task, tmp_path)
    assert meta["classes"] == ["Abyssinian", "American Bulldog", "Bengal"]
    assert meta["splits"] == {"train": 8, "val": 2, "test": 4}
    splits = splits_of(out_dir)
    assert splits["test"].labels.tolist() == [n % 3 for n in range(10, 14)]
    green = splits["test"].images[:, 4, 4, 1].astype(int)
    assert np.abs(green - 10 * np.arange(10, 14)).max() <= 4
    trainval_green = np.concatenate([splits[s].images[:, 4, 4, 1] for s in ("train", "val")])
    assert sorted(round(int(g) / 10) for g in trainval_green) == list(range(10))


# ImageNet val: 12 images of 4 classes; image k (1-based, as in the official file names) is red 20·k,
# of class CLASS_OF[k - 1] (an ILSVRC2012_ID, 1-based, as in the devkit's ground truth).
IMAGENET_WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
CLASS_OF = [3, 1, 4, 1, 2, 3, 2, 4, 1, 3, 4, 2]
# ImageFolder's order: the classes' images by WordNet id, then by file name; k of each, and its label
AUTHORS_ORDER = [2, 4, 9, 5, 7, 12, 1, 6, 10, 3, 8, 11]


def imagenet_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def imagenet_val_tar(classes: list[int] | None = None) -> bytes:
    """The flat official layout; with `classes`, one folder per WordNet id instead."""
    folder = (lambda k: f"{IMAGENET_WNIDS[classes[k - 1] - 1]}/") if classes else (lambda k: "")
    return tar_bytes({folder(k) + imagenet_name(k): jpeg((20 * k, 0, 0), (40, 30)) for k in range(1, 13)},
                     mode="w")


def imagenet_archives(tmp_path: Path) -> dict[str, Path]:
    files = {"val": (tmp_path / "ILSVRC2012_img_val.tar", imagenet_val_tar()),
             "devkit": (tmp_path / "ILSVRC2012_devkit_t12.tar.gz", imagenet_devkit(IMAGENET_WNIDS, CLASS_OF))}
    for path, data in files.values():
        path.write_bytes(data)
    return {key: path for key, (path, _) in files.items()}


def as_official(monkeypatch, archives: dict[str, Path], keys=("val", "devkit")) -> None:
    """Let generated archives pass as the official ones: torchvision's listed md5 sums become theirs."""
    for key in keys:
        name = tv_imagenet.ARCHIVE_META[key][0]
        monkeypatch.setitem(tv_imagenet.ARCHIVE_META, key, (name, md5(archives[key].read_bytes())[4:]))


def image_numbers(out_dir: Path) -> list[int]:
    return [round(int(red) / 20) for red in load_split(out_dir, "test").images[:, 8, 8, 0]]


def test_imagenet_val_official_tar_and_devkit_give_the_authors_order(tmp_path, monkeypatch):
    archives = imagenet_archives(tmp_path)
    as_official(monkeypatch, archives)
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": str(archives["val"]),
            "devkit": str(archives["devkit"])}
    meta, out_dir = run("imagenet_val", task, tmp_path)
    assert meta["classes"] == IMAGENET_WNIDS
    assert image_numbers(out_dir) == AUTHORS_ORDER
    assert load_split(out_dir, "test").labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # the first 6 images, as 12,800 of the real 50,000: all images of the first 2 classes
    assert sorted(image_numbers(out_dir)[:6]) == [k for k in range(1, 13) if CLASS_OF[k - 1] <= 2]
    provenance = meta["provenance"]
    assert provenance["order"] == "imagefolder" and provenance["devkit"] == task["devkit"]
    assert provenance["md5"] == {key: tv_imagenet.ARCHIVE_META[key][1] for key in ("devkit", "val")}
    assert not list((tmp_path / "raw" / "imagenet_val").iterdir())  # the unpacked scratch folder is gone


def test_imagenet_val_archive_without_torchvisions_md5_is_refused_in_one_line(tmp_path, monkeypatch):
    archives = imagenet_archives(tmp_path)
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": str(archives["val"]),
            "devkit": str(archives["devkit"])}
    found = md5(archives["devkit"].read_bytes())[4:]
    with pytest.raises(UserError) as caught:
        run("imagenet_val", task, tmp_path)
    assert str(caught.value) == (
        f"{archives['devkit']} has md5 {found}, not fa75699e90414af021442c21a62c3abf, which torchvision lists for "
        "the official ILSVRC2012_devkit_t12.tar.gz: point `devkit` of the imagenet_val task at the official file "
        "(download it again if it is damaged)")
    as_official(monkeypatch, archives, keys=("devkit",))
    with pytest.raises(UserError, match=r"ILSVRC2012_img_val.tar has md5 [0-9a-f]{32}, not "
                                        r"29b22e2961454d5413ddabcf34fc5622, .* point `path` of") as caught:
        run("imagenet_val", task, tmp_path)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "prepared" / "imagenet_val").exists()


@pytest.mark.parametrize("packed", [False, True], ids=["folder", "tar"])
def test_imagenet_val_class_folders_are_read_in_imagefolder_order(tmp_path, packed):
    tree = tmp_path / "val"
    with tarfile.open(fileobj=io.BytesIO(imagenet_val_tar(CLASS_OF))) as tar:
        tar.extractall(tree, filter="data")
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": str(tree)}
    if packed:
        task["path"] = str(tmp_path / "val.tar")
        Path(task["path"]).write_bytes(imagenet_val_tar(CLASS_OF))
    meta, out_dir = run("imagenet_val", task, tmp_path)
    reference = ImageFolder(str(tree))  # torchvision's reader, as the authors read the stream
    assert meta["classes"] == reference.classes == IMAGENET_WNIDS
    assert image_numbers(out_dir) == [int(Path(path).stem[-8:]) for path, _ in reference.samples] == AUTHORS_ORDER
    assert load_split(out_dir, "test").labels.tolist() == reference.targets
    assert meta["provenance"]["order"] == "imagefolder"


def test_imagenet_val_flat_tar_without_devkit_needs_order_file_name(tmp_path):
    archive = tmp_path / "ILSVRC2012_img_val.tar"
    archive.write_bytes(imagenet_val_tar())
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": str(archive)}
    with pytest.raises(UserError) as caught:
        run("imagenet_val", task, tmp_path)
    assert str(caught.value) == (
        f"{archive} holds ImageNet val images without classes (no class folders, no `devkit`), so the authors' "
        "order cannot be formed: in it (ImageFolder's: class folders sorted by WordNet id) the first 12,800 images "
        "are the 50 of each of the first 256 classes, in file-name order they mix all 1,000; set `devkit` of the "
        "imagenet_val task to ILSVRC2012_devkit_t12.tar.gz, or set `order: file_name` to pair in file-name order "
        "on purpose")
    meta, out_dir = run("imagenet_val", task | {"order": "file_name", "max_images": 4}, tmp_path)
    assert meta["classes"] == ["imagenet"] and meta["provenance"]["order"] == "file_name"
    part = load_split(out_dir, "test", verify=True)
    assert part.images.shape == (4, 16, 16, 3) and part.labels.tolist() == [0, 0, 0, 0]
    picked = image_numbers(out_dir)
    assert picked == sorted(set(picked)) and set(picked) <= set(range(1, 13))  # a subset, in order


def test_imagenet_val_class_folders_in_file_name_order_keep_their_labels(tmp_path):
    archive = tmp_path / "val.tar"
    archive.write_bytes(imagenet_val_tar(CLASS_OF))
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": str(archive), "order": "file_name"}
    meta, out_dir = run("imagenet_val", task, tmp_path)
    assert image_numbers(out_dir) == list(range(1, 13))
    assert load_split(out_dir, "test").labels.tolist() == [c - 1 for c in CLASS_OF]
    _, capped = run("imagenet_val", task | {"max_images": 5}, tmp_path / "capped")
    picked = image_numbers(capped)  # a subset in the stream's order, not the folders'
    assert len(picked) == 5 and picked == sorted(picked)


def test_imagenet_val_devkit_needs_the_tar_not_a_folder(tmp_path):
    archives = imagenet_archives(tmp_path)
    (tmp_path / "val").mkdir()
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": str(tmp_path / "val"),
            "devkit": str(archives["devkit"])}
    with pytest.raises(UserError, match=r"^`devkit` sorts the official ILSVRC2012_img_val.tar into class folders, "
                                        r"but `path` .*/val is a folder; point `path` at that tar"):
        run("imagenet_val", task, tmp_path)
    task |= {"path": str(archives["val"]), "devkit": str(tmp_path / "missing.tar.gz")}
    with pytest.raises(UserError, match="ImageNet val devkit .*missing.tar.gz does not exist; fix `devkit`"):
        run("imagenet_val", task, tmp_path)


def test_imagenet_val_folder_with_class_subfolders_is_labelled_by_them(tmp_path):
    folder = tmp_path / "val"
    for synset, colour in (("n01440764", (250, 0, 0)), ("n01443537", (0, 250, 0))):
        (folder / synset).mkdir(parents=True)
        for k in range(2):
            (folder / synset / f"img{k}.JPEG").write_bytes(jpeg(colour, (30, 40)))
    (folder / "LOC_synset_mapping.txt").write_text("not an image\n")
    task = {"source": "imagenet_val", "store_size": 8, "split_seed": 42, "path": str(folder)}
    meta, out_dir = run("imagenet_val", task, tmp_path)
    assert meta["classes"] == ["n01440764", "n01443537"]
    part = load_split(out_dir, "test")
    assert part.labels.tolist() == [0, 0, 1, 1]
    assert (part.images[:2, 4, 4, 0] > 240).all() and (part.images[2:, 4, 4, 1] > 240).all()


def test_imagenet_val_without_a_path_says_how_to_provide_one(tmp_path):
    task = {"source": "imagenet_val", "store_size": 16, "split_seed": 42, "path": None}
    with pytest.raises(UserError, match="cannot be downloaded freely.*set `path`") as caught:
        run("imagenet_val", task, tmp_path)
    assert "\n" not in str(caught.value)
    task["path"] = str(tmp_path / "missing.tar")
    with pytest.raises(UserError, match="does not exist"):
        run("imagenet_val", task, tmp_path)


CORRUPTIBLE = {
    "cifar10": ({}, lambda: {"cifar-10-python.tar.gz": cifar10_archive()},
                "cifar-10-python.tar.gz"),
    "cifar10c": ({"corruption": "snow", "severity": 5},
                 lambda: {"CIFAR-10-C.tar": cifar10c_archive()}, "CIFAR-10-C.tar"),
    "domainnet": ({"domain": "clipart"}, lambda: {"clipart.zip": domainnet_zip()}, "clipart.zip"),
    "flowers102": ({}, flowers_files, "setid.mat"),
    "oxford_pets": ({}, pets_files, "annotations.tar.gz"),
}


@pytest.mark.parametrize("source", sorted(CORRUPTIBLE))
def test_a_corrupted_download_is_rejected_and_deleted(host, tmp_path, source):
    extra, build, damaged = CORRUPTIBLE[source]
    files = build()
    keys = serve(host, f"bad-{source}", files)
    broken = bytearray(files[damaged])
    broken[len(broken) // 2] ^= 0xFF
    host.put(f"bad-{source}/{damaged}", bytes(broken))
    task = make_task(source, **extra, **keys)
    with pytest.raises(UserError, match=f"checksum mismatch for {damaged}") as caught:
        run(source, task, tmp_path)
    assert "\n" not in str(caught.value) and keys["checksums"][damaged] in str(caught.value)
    assert not (tmp_path / "prepared" / source).exists()
    assert not [p for p in (tmp_path / "raw").rglob(f"{damaged}*")]


def test_an_interrupted_download_resumes_with_a_range_request(host, tmp_path, capsys):
    data = cifar10_archive()
    name = "resume/cifar-10-python.tar.gz"
    task = make_task("cifar10", url=host.put(name, data), checksum=md5(data))
    half = len(data) // 2
    host.break_next(name, half)
    with pytest.raises(UserError, match="run again to resume"):
        run("cifar10", task, tmp_path)
    part = tmp_path / "raw" / "cifar10" / "cifar-10-python.tar.gz.part"
    assert part.stat().st_size == half
    assert not (tmp_path / "prepared" / "cifar10").exists()
    meta, _ = run("cifar10", task, tmp_path)
    assert meta["splits"] == {"train": 16, "val": 4, "test": 5}
    assert [(r.range, r.status) for r in host.requests if r.path == name] == [
        (None, 200), (f"bytes={half}-", 206)]
    assert not part.exists()
    assert "resume cifar-10-python.tar.gz at" in capsys.readouterr().err


def test_a_server_without_range_support_sends_the_whole_file_again(host, tmp_path):
    data = b"0123456789" * 1000
    resource = Resource("blob.bin", host.put("norange/blob.bin", data), md5(data))
    (tmp_path / "blob.bin.part").write_bytes(b"junk" * 100)
    host.set_ranges(False)
    try:
        path = fetch(resource, tmp_path)
    finally:
        host.set_ranges(True)
    assert path.read_bytes() == data
    assert [(r.range, r.status) for r in host.requests if r.path == "norange/blob.bin"] == [
        ("bytes=400-", 200)]


def test_a_complete_part_file_is_verified_without_fetching_more(host, tmp_path):
    data = b"abc" * 1000
    resource = Resource("whole.bin", host.put("whole/whole.bin", data), sha256(data))
    (tmp_path / "whole.bin.part").write_bytes(data)
    assert fetch(resource, tmp_path).read_bytes() == data
    assert [r.status for r in host.requests if r.path == "whole/whole.bin"] == [416]


def test_a_missing_file_names_the_url(host, tmp_path):
    resource = Resource("gone.bin", host.url("nowhere/gone.bin"), md5(b""))
    with pytest.raises(UserError, match=r"cannot download .*nowhere/gone.bin \(HTTP 404"):
        fetch(resource, tmp_path)


def test_a_host_that_is_down_names_the_task_url_status_and_the_mirror_keys(host, tmp_path):
    task = make_task("domainnet", domain="clipart", url=host.url("down/clipart.zip"), checksum=md5(b"clipart"))
    with pytest.raises(UserError) as failed:
        run("clipart", task, tmp_path)
    assert str(failed.value) == (
        f"task clipart: cannot download clipart.zip from {host.url('down/clipart.zip')} (HTTP 404 Not Found); "
        "if the host is down, point the task at a mirror of the same file with tasks.clipart.data.url: <mirror URL> "
        f"(the download is still checked against {md5(b'clipart')}; tasks.clipart.data.checksum: md5:<hex> replaces "
        "that sum for a copy known to differ)")


def test_a_host_that_is_down_for_one_of_several_files_names_the_file_keyed_mirror_keys(host, tmp_path):
    keys = serve(host, "pets-down", pets_files(10, 4))
    keys["urls"]["annotations.tar.gz"] = host.url("pets-down/gone/annotations.tar.gz")
    with pytest.raises(UserError) as failed:
        run("oxford_pets", make_task("oxford_pets", store_size=8, **keys), tmp_path)
    assert str(failed.value).startswith(
        "task oxford_pets: cannot download annotations.tar.gz from "
        f"{host.url('pets-down/gone/annotations.tar.gz')} (HTTP 404 Not Found); if the host is down, point the task "
        "at a mirror of the same file with tasks.oxford_pets.data.urls: {annotations.tar.gz: <mirror URL>} (the "
        f"download is still checked against {keys['checksums']['annotations.tar.gz']}; "
        "tasks.oxford_pets.data.checksums: {annotations.tar.gz: md5:<hex>} replaces")


def test_a_mirror_set_by_url_is_still_checked_against_the_checksum(host, tmp_path):
    data = cifar10_archive()
    task = make_task("cifar10", url=host.put("mirror/cifar-10-python.tar.gz", data + b"changed"),
                     checksum=md5(data))
    with pytest.raises(UserError, match=r"^checksum mismatch for cifar-10-python.tar.gz from .*mirror/"):
        run("cifar10", task, tmp_path)


def test_jobs_sharing_a_raw_folder_download_once(host, tmp_path):
    data = cifar10c_archive()
    keys = {"url": host.put("shared/CIFAR-10-C.tar", data), "checksum": md5(data)}
    tasks = {c: make_task("cifar10c", corruption=c, severity=5, **keys)
             for c in ("contrast", "snow")}
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(prepare_task, f"cifar10c_{c}", task, tmp_path / c, tmp_path / "raw")
                for c, task in tasks.items()]
        metas = [job.result() for job in jobs]
    assert [m["splits"]["train"] for m in metas] == [6, 6]
    assert [r.path for r in host.requests].count("shared/CIFAR-10-C.tar") == 1


def test_overrides_and_checksums_are_checked():
    assert resolve(FLOWERS_FILES, {"checksums": {"setid.mat": "md5:" + "a" * 32}})[2].checksum == (
        "md5:" + "a" * 32)
    with pytest.raises(UserError, match="set urls: {filename: url}"):
        resolve(FLOWERS_FILES, {"url": "http://example.org/x"})
    with pytest.raises(UserError, match=r"unknown files \['102flowers.tar'\]"):
        resolve(FLOWERS_FILES, {"urls": {"102flowers.tar": "http://example.org/x"}})
    assert parse_checksum("SHA256:" + "AB" * 32) == ("sha256", "ab" * 32)
    for bad in ("md5:1234", "sha1:" + "a" * 40, "a" * 32):
        with pytest.raises(UserError, match="is not md5:<32 hex digits> or sha256"):
            parse_checksum(bad)


def test_unknown_sources_and_missing_keys_are_named(tmp_path):
    with pytest.raises(UserError, match="source 'mnist' unknown; allowed: synthetic, cifar10, cifar100, "):
        prepare_task("m", {"source": "mnist"}, tmp_path / "m", tmp_path / "raw")
    with pytest.raises(UserError, match=r"task c \(cifar10c\) needs corruption, severity"):
        prepare_task("c", make_task("cifar10c"), tmp_path / "c", tmp_path / "raw")


def test_prepared_writer_writes_what_write_prepared_writes(tmp_path):
    rng = np.random.default_rng(0)
    splits = {split: (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8),
                      rng.integers(0, 3, n).astype(np.int64))
              for split, n in (("train", 5), ("test", 3))}
    classes, provenance = ["a", "b", "c"], {"source": "test"}
    write_prepared(tmp_path / "whole" / "task", splits, classes, provenance)
    with prepared_writer(tmp_path / "streamed" / "task", classes, provenance, 4) as writer:
        for split, (images, labels) in splits.items():
            writer.add_split(split, len(labels))
            writer.append(split, images[:2], labels[:2])
            writer.append(split, images[2:], labels[2:])
    for file in ("meta.json", "train_images.npy", "train_labels.npy", "test_images.npy"):
        assert (tmp_path / "whole/task" / file).read_bytes() == (
            tmp_path / "streamed/task" / file).read_bytes()
    assert writer.meta == read_meta(tmp_path / "streamed" / "task")


def test_a_prepared_writer_with_missing_rows_publishes_nothing(tmp_path):
    with pytest.raises(ValueError, match="train: 1 of 2 rows written"), \
            prepared_writer(tmp_path / "task", ["a"], {}, 4) as writer:
        writer.add_split("train", 2)
        writer.append("train", np.zeros((1, 4, 4, 3), np.uint8), np.zeros(1, np.int64))
    assert list(tmp_path.iterdir()) == []


def test_fit_square_resizes_the_shorter_side_then_centre_crops():
    # 24 × 12: blue | red (12 px) | green. Shorter side to 8 → 16 × 8; the centre 8 × 8 is the
    # red band, its outer columns blended by the antialiasing filter.
    bands = np.zeros((12, 24, 3), np.uint8)
    bands[:, :6, 2], bands[:, 6:18, 0], bands[:, 18:, 1] = 255, 255, 255
    square = fit_square(Image.fromarray(bands), 8)
    assert square.shape == (8, 8, 3) and square.dtype == np.uint8
    assert (square[:, 2:6] == [255, 0, 0]).all()
    assert square[0, 0, 2] > 0 and square[0, 7, 1] > 0
    assert (fit_square(bands, 8) == square).all()  # arrays take the same path
    assert fit_square(square, 8) is square  # already stored-size arrays pass through


def test_an_unpacked_archive_is_reused_until_it_changes(host, tmp_path):
    data = cifar10_archive()
    raw = tmp_path / "raw" / "cifar10"
    task = make_task("cifar10", url=host.put("unpack/cifar-10-python.tar.gz", data),
                     checksum=md5(data))
    run("cifar10", task, tmp_path)
    marker = raw / ".cifar-10-python.tar.gz.extracted"
    assert marker.read_text() == task["checksum"]
    (raw / "cifar-10-batches-py" / "test_batch").unlink()  # only a re-extraction brings it back
    with pytest.raises(UserError, match="lacks files of cifar-10-python.tar.gz"):
        run("cifar10", task, tmp_path)
    marker.unlink()
    meta, _ = run("cifar10", task, tmp_path)
    assert meta["splits"]["test"] == 5
