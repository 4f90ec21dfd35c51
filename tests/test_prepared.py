"""The prepared-dataset folder: roundtrip, meta.json, damage detection and atomic writes."""

import hashlib
import json

import numpy as np
import pytest

from vitplasticity.errors import UserError
from vitplasticity.prepared import load_split, prepared_writer, read_meta, write_prepared

CLASSES = ["circle", "square", "triangle"]


def _arrays(count, size=8, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = (np.arange(count) % len(CLASSES)).astype(np.int64)
    return images, labels


@pytest.fixture()
def task(tmp_path):
    folder = tmp_path / "shapes"
    splits = {"train": _arrays(12, seed=1), "val": _arrays(6, seed=2), "test": _arrays(9, seed=3)}
    write_prepared(folder, splits, CLASSES, {"generator": "test", "seed": 0})
    return folder, splits


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_roundtrip(task):
    folder, splits = task
    for name, (images, labels) in splits.items():
        split = load_split(folder, name)
        assert np.array_equal(split.images, images) and split.images.dtype == np.uint8
        assert np.array_equal(split.labels, labels) and split.labels.dtype == np.int64
        assert isinstance(split.images, np.memmap)  # memory-mapped, not read whole


def test_meta_content(task):
    folder, _ = task
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == read_meta(folder)
    assert meta["format_version"] == 1
    assert meta["name"] == "shapes"
    assert meta["classes"] == CLASSES
    assert meta["splits"] == {"train": 12, "val": 6, "test": 9}
    assert list(meta["splits"]) == ["train", "val", "test"]
    assert meta["image_size"] == 8
    assert meta["provenance"] == {"generator": "test", "seed": 0}
    files = sorted(f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("images", "labels"))
    assert sorted(meta["checksums"]) == files
    for name, digest in meta["checksums"].items():
        assert digest == _sha256(folder / name)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*files, "meta.json"])


def test_missing_file_names_it_and_the_fix(task):
    folder, _ = task
    (folder / "val_labels.npy").unlink()
    with pytest.raises(UserError) as error:
        load_split(folder, "val")
    message = str(error.value)
    assert "val_labels.npy is missing" in message and "prepare it again" in message
    assert load_split(folder, "train").labels.shape == (12,)  # other splits still load


def test_missing_meta_and_split(tmp_path, task):
    folder, _ = task
    with pytest.raises(UserError, match="is not a prepared task \\(no meta.json\\)"):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match=r"has no 'extra' split \(has \['test', 'train', 'val'\]\)"):
        load_split(folder, "extra")
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is not valid JSON.*prepare it again"):
        load_split(folder, "train")


@pytest.mark.parametrize("keep", [0.5, 40, 6, 0])
def test_truncated_npy_is_a_user_error(task, keep):
    folder, _ = task
    path = folder / "train_images.npy"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(UserError) as error:
        load_split(folder, "train")
    message = str(error.value)
    assert "train_images.npy is truncated or corrupt" in message and "prepare it again" in message


def test_not_an_npy_file_is_a_user_error(task):
    folder, _ = task
    (folder / "test_labels.npy").write_bytes(b"garbage, not an array")
    with pytest.raises(UserError, match="test_labels.npy is truncated or corrupt"):
        load_split(folder, "test")


def test_count_mismatch_with_meta(task):
    folder, _ = task
    images, labels = _arrays(5)
    np.save(folder / "val_images.npy", images)
    np.save(folder / "val_labels.npy", labels)
    with pytest.raises(UserError, match="meta.json says 6 samples, arrays hold 5 images and 5 labels"):
        load_split(folder, "val")


@pytest.mark.parametrize(("bad", "reach"),
                         [(3, "labels span 0..3"), (7, "labels span 0..7"), (-1, "labels span -1..2")])
def test_label_beyond_classes_is_a_user_error(task, bad, reach):
    folder, splits = task
    labels = splits["train"][1].copy()
    labels[4] = bad
    np.save(folder / "train_labels.npy", labels)
    with pytest.raises(UserError) as error:
        load_split(folder, "train")
    assert reach in str(error.value) and "meta.json lists 3 classes" in str(error.value)
    assert "prepare it again" in str(error.value)


def test_verify_detects_a_flipped_byte(task):
    folder, _ = task
    path = folder / "test_images.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    assert load_split(folder, "test").images.shape == (9, 8, 8, 3)  # without verify the damage goes unseen
    with pytest.raises(UserError, match="test_images.npy does not match its checksum in meta.json"):
        load_split(folder, "test", verify=True)
    assert load_split(folder, "train", verify=True).labels.shape == (12,)


def _leftovers(parent, keep="shapes"):
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


@pytest.mark.parametrize(("broken", "message"), [
    ({"images": np.zeros((4, 8, 8, 3), dtype=np.float32)}, r"val: images must be uint8 \(N, H, W, 3\), got float32 "
                                                           r"\(4, 8, 8, 3\)"),
    ({"images": np.zeros((4, 8, 6, 3), dtype=np.uint8)}, r"val: images must be square, got \(8, 6\)$"),
    ({"labels": np.array([0, 1, 2], dtype=np.int64)}, "val: 4 images but 3 labels"),
    ({"labels": np.array([0, 1, 2, 3], dtype=np.int64)}, r"val: labels outside 0\.\.2"),
])
def test_failed_write_leaves_no_folder_and_no_temp_dirs(tmp_path, broken, message):
    good = _arrays(4)
    bad = (broken.get("images", good[0]), broken.get("labels", good[1]))
    with pytest.raises(ValueError, match=message):
        write_prepared(tmp_path / "shapes", {"train": good, "val": bad}, CLASSES, {})
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_previous_folder(task):
    folder, splits = task
    before = (folder / "meta.json").read_text()
    with pytest.raises(ValueError):
        write_prepared(folder, {"train": (splits["train"][0], splits["train"][1] + 5)}, CLASSES, {})
    assert (folder / "meta.json").read_text() == before
    assert _leftovers(folder.parent) == []
    assert load_split(folder, "train", verify=True).labels.shape == (12,)


def test_streaming_writer_matches_write_prepared(tmp_path):
    train, test = _arrays(10, seed=4), _arrays(4, seed=5)
    with prepared_writer(tmp_path / "streamed", CLASSES, {"p": 1}, image_size=8) as writer:
        writer.add_split("train", 10)
        writer.add_split("test", 4)
        writer.append("train", train[0][:6], train[1][:6])
        writer.append("test", *test)
        writer.append("train", train[0][6:], train[1][6:])
    whole = write_prepared(tmp_path / "whole", {"train": train, "test": test}, CLASSES, {"p": 1})
    streamed = read_meta(tmp_path / "streamed")
    assert streamed["checksums"] == whole["checksums"]
    assert {k: v for k, v in streamed.items() if k != "name"} == {k: v for k, v in whole.items() if k != "name"}
    assert np.array_equal(load_split(tmp_path / "streamed", "train").images, train[0])


def test_streaming_writer_incomplete_or_failing_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="train: 3 of 10 rows written"), \
            prepared_writer(tmp_path / "partial", CLASSES, {}, image_size=8) as writer:
        writer.add_split("train", 10)
        writer.append("train", *_arrays(3))
    with pytest.raises(RuntimeError, match="download failed"), \
            prepared_writer(tmp_path / "failing", CLASSES, {}, image_size=8) as writer:
        writer.add_split("train", 3)
        raise RuntimeError("download failed")
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_rejects_overflow(tmp_path):
    with pytest.raises(ValueError, match="cannot append 4 images and 4 labels at row 0 of 3"), \
            prepared_writer(tmp_path / "t", CLASSES, {}, image_size=8) as writer:
        writer.add_split("train", 3)
        writer.append("train", *_arrays(4))
    assert list(tmp_path.iterdir()) == []
