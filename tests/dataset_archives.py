"""Tiny archives in the real datasets' layouts, with pixels that tell which image they are."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile

import numpy as np
import scipy.io
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (20, 12)) -> bytes:
    """A solid-colour JPEG of (width, height) `size`."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def mat(payload: dict) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, payload)
    return buffer.getvalue()


def cifar_rows(codes: list[int]) -> np.ndarray:
    """CIFAR's row layout (N, 3072): R plane = code, G = row index, B = 2 × column index."""
    planes = np.empty((len(codes), 3, 32, 32), dtype=np.uint8)
    planes[:, 0] = np.array(codes, dtype=np.uint8)[:, None, None]
    planes[:, 1] = np.arange(32, dtype=np.uint8)[:, None]
    planes[:, 2] = 2 * np.arange(32, dtype=np.uint8)[None, :]
    return planes.reshape(len(codes), 3072)


def cifar10_archive(per_batch: int = 4, test: int = 5) -> bytes:
    """cifar-10-python.tar.gz: train image k has code k (label k % 10), test image i 200 + i."""
    files = {}
    for batch in range(5):
        codes = list(range(batch * per_batch, (batch + 1) * per_batch))
        entry = {"data": cifar_rows(codes), "labels": [code % 10 for code in codes]}
        files[f"cifar-10-batches-py/data_batch_{batch + 1}"] = pickle.dumps(entry)
    test_entry = {"data": cifar_rows([200 + i for i in range(test)]), "labels": list(range(test))}
    files["cifar-10-batches-py/test_batch"] = pickle.dumps(test_entry)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": CIFAR10_NAMES})
    return tar_bytes(files)


def cifar100_archive(train: int = 10, test: int = 3) -> bytes:
    """cifar-100-python.tar.gz: train image k has code k and fine label 7k, test image i 200 + i."""
    names = [f"class{i:02d}" for i in range(100)]

    def entry(codes, labels):
        return pickle.dumps({"data": cifar_rows(codes), "fine_labels": labels,
                             "coarse_labels": [label // 5 for label in labels]})

    files = {
        "cifar-100-python/train": entry(list(range(train)), [7 * k for k in range(train)]),
        "cifar-100-python/test": entry([200 + i for i in range(test)],
                                       [99 - i for i in range(test)]),
        "cifar-100-python/meta": pickle.dumps({"fine_label_names": names,
                                               "coarse_label_names": names[:20]}),
    }
    return tar_bytes(files)


def cifar10c_archive(per_severity: int = 10) -> bytes:
    """CIFAR-10-C.tar: row j of <corruption>.npy is filled with j (+100 for snow); label j % 10."""
    rows = 5 * per_severity
    codes = np.arange(rows, dtype=np.uint8)[:, None, None, None]
    contrast = np.broadcast_to(codes, (rows, 32, 32, 3)).copy()
    files = {
        "CIFAR-10-C/contrast.npy": npy(contrast),
        "CIFAR-10-C/snow.npy": npy(contrast + 100),
        "CIFAR-10-C/labels.npy": npy((np.arange(rows) % 10).astype(np.uint8)),
    }
    return tar_bytes(files, mode="w")


DOMAINNET_CLASSES = ["axe", "bee", "cat"]


def domainnet_zip(domain: str = "clipart", per_class: int = 5) -> bytes:
    """<domain>.zip: <domain>/<class>/<domain>_<c>_<i>.jpg in colour (80 c, 20 i, 100)."""
    files = {}
    for c, name in enumerate(DOMAINNET_CLASSES):
        for i in range(per_class):
            files[f"{domain}/{name}/{domain}_{c:03d}_{i:06d}.jpg"] = jpeg((80 * c, 20 * i, 100))
    return zip_bytes(files)


def flowers_files(images: int = 12) -> dict[str, bytes]:
    """Image id k (1-based) has colour (20 k, 0, 0) and label k; split in thirds train/val/test."""
    ids = np.arange(1, images + 1)
    archive = tar_bytes({f"jpg/image_{k:05d}.jpg": jpeg((20 * int(k), 0, 0)) for k in ids})
    third = images // 3
    return {
        "102flowers.tgz": archive,
        "imagelabels.mat": mat({"labels": ids[None, :]}),
        "setid.mat": mat({"trnid": ids[None, :third], "valid": ids[None, third:2 * third],
                          "tstid": ids[None, 2 * third:]}),
    }


PET_BREEDS = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]  # (breed, species)


def pets_files(trainval: int = 10, test: int = 4) -> dict[str, bytes]:
    """Image n (0-based, trainval first) is breed n % 3, colour (0, 10 n, 50 × breed)."""
    images, lines = {}, {"trainval": [], "test": []}
    for n in range(trainval + test):
        breed, species = PET_BREEDS[n % 3]
        image_id = f"{breed}_{n + 1}"
        images[f"images/{image_id}.jpg"] = jpeg((0, 10 * n, 50 * (n % 3)))
        split = "trainval" if n < trainval else "test"
        lines[split].append(f"{image_id} {n % 3 + 1} {species} {n + 1}\n")
    annotations = {f"annotations/{split}.txt": "".join(rows).encode()
                   for split, rows in lines.items()}
    return {"images.tar.gz": tar_bytes(images), "annotations.tar.gz": tar_bytes(annotations)}


def imagenet_devkit(wnids: list[str], ground_truth: list[int]) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat and data/ILSVRC2012_validation_ground_truth.txt.

    meta.mat's `synsets` is a struct array with the real file's fields in its order; the classes
    are ILSVRC2012_IDs 1..len(wnids) (leaves, num_children 0), followed by one parent synset
    (ID len(wnids) + 1, num_children > 0) that readers must skip, as the real file has 860 of them.
    The ground truth holds one ID per validation image, in file-name order.
    """
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O"),
              ("children", "O"), ("wordnet_height", "O"), ("num_train_images", "O")]
    synsets = np.zeros(len(wnids) + 1, dtype=fields)
    for index, wnid in enumerate([*wnids, "n00001740"]):
        parent = index == len(wnids)
        synsets[index] = (index + 1, wnid, "entity" if parent else f"class {wnid}, thing {index}", "a gloss",
                          len(wnids) if parent else 0, np.arange(1, len(wnids) + 1, dtype=np.float64)
                          if parent else np.zeros(0), 1 if parent else 0, 0 if parent else 1300)
    truth = "".join(f"{label}\n" for label in ground_truth).encode()
    return tar_bytes({"ILSVRC2012_devkit_t12/data/meta.mat": mat({"synsets": synsets}),
                      "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth})
