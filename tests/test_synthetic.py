"""The procedural image source of the quick study: deterministic, balanced, and each shift really shifts."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from vitplasticity.datasets import synthetic
from vitplasticity.prepared import load_split, read_meta


def _digest(images, labels):
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def _make(kind="source", split="train", count=40, size=16, seed=0, name="shapes", **kwargs):
    return synthetic.generate(name, kind, split, count, size, seed, **kwargs)


def test_same_seed_same_bytes():
    first, second = _make(), _make()
    assert _digest(*first[:2]) == _digest(*second[:2])
    assert first[2] == second[2]


@pytest.mark.parametrize("change", [{"seed": 1}, {"split": "test"}, {"name": "other"}])
def test_other_seed_split_or_name_gives_other_images(change):
    assert _digest(*_make()[:2]) != _digest(*_make(**change)[:2])


def test_task_seed_is_stable_and_separates_splits():
    assert synthetic.task_seed("shapes", 0, "train") == synthetic.task_seed("shapes", 0, "train")
    seeds = {synthetic.task_seed("shapes", s, split) for s in (0, 1) for split in ("train", "val", "test")}
    assert len(seeds) == 6
    assert all(0 <= s < 2**64 for s in seeds)


@pytest.mark.parametrize(("kind", "extra"), [("source", {}), ("novel", {}), ("sketch", {}),
                                             ("corrupt", {"corruption": "gaussian_noise"}),
                                             ("corrupt", {"corruption": "motion_blur", "severity": 3}),
                                             ("corrupt", {"corruption": "contrast"})])
def test_each_kind_generates_uint8_balanced(kind, extra):
    images, labels, classes = _make(kind=kind, count=50, size=20, **extra)
    assert images.shape == (50, 20, 20, 3) and images.dtype == np.uint8
    assert labels.shape == (50,) and labels.dtype == np.int64
    assert len(classes) == 5
    assert np.bincount(labels, minlength=5).tolist() == [10] * 5
    assert images.std() > 5  # not blank


def test_classes_of_each_kind():
    source = ["circle", "square", "triangle", "cross", "ring"]
    assert _make(kind="source")[2] == source
    assert _make(kind="novel")[2] == ["diamond", "hexagon", "bar", "half_disk", "tee"]  # no shape of the source
    assert _make(kind="sketch")[2] == source


def test_labels_balanced_when_count_is_not_a_multiple():
    counts = np.bincount(_make(count=23)[1], minlength=5)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 23


def test_labels_are_shuffled():
    labels = _make(count=50)[1]
    assert labels.tolist() != [i % 5 for i in range(50)]


@pytest.mark.parametrize("corruption", synthetic.CORRUPTIONS)
def test_corruption_changes_images_of_the_same_draw(corruption):
    clean, clean_labels, _ = _make(count=20)
    corrupted, labels, _ = _make(kind="corrupt", count=20, corruption=corruption)
    assert np.array_equal(labels, clean_labels)  # the same shapes were drawn, then corrupted
    assert np.abs(corrupted.astype(int) - clean.astype(int)).mean() > 2


def test_contrast_scales_deviation_from_the_image_mean():
    clean = _make(count=10)[0].astype(float) / 255
    low = _make(kind="corrupt", count=10, corruption="contrast", severity=5)[0].astype(float) / 255
    ratio = low.std(axis=(1, 2, 3)) / clean.std(axis=(1, 2, 3))
    np.testing.assert_allclose(ratio, 0.12, atol=0.02)  # severity 5 keeps 12% of the contrast
    np.testing.assert_allclose(low.mean(axis=(1, 2, 3)), clean.mean(axis=(1, 2, 3)), atol=2 / 255)


def test_severity_increases_noise():
    clean = _make(count=10)[0].astype(float)
    mild = _make(kind="corrupt", count=10, corruption="gaussian_noise", severity=1)[0].astype(float)
    harsh = _make(kind="corrupt", count=10, corruption="gaussian_noise", severity=5)[0].astype(float)
    assert np.abs(harsh - clean).mean() > 2 * np.abs(mild - clean).mean()


def test_sketch_is_grey_ink_on_light_paper():
    sketch = _make(kind="sketch", count=20)[0].astype(int)
    source = _make(kind="source", count=20)[0].astype(int)
    # Colourless up to the per-channel pixel noise; the source's shapes and backgrounds are coloured.
    assert np.abs(sketch[..., 0] - sketch[..., 1]).mean() < 0.5 * np.abs(source[..., 0] - source[..., 1]).mean()
    assert np.median(sketch) > 180 > np.median(source)


def test_shapes_differ_between_classes():
    """The class is visible: the mean image of each class differs from the others'."""
    images, labels, _ = _make(count=200, size=16)
    means = np.stack([images[labels == c].astype(float).mean(0) for c in range(5)])
    gaps = [np.abs(means[a] - means[b]).mean() for a in range(5) for b in range(a + 1, 5)]
    assert min(gaps) > 1.0


def test_chunks_do_not_change_shape_or_balance():
    images, labels, _ = _make(count=600, size=8)  # two chunks of 512 and 88
    assert images.shape == (600, 8, 8, 3)
    assert np.bincount(labels).tolist() == [120] * 5


def test_unknown_kind_and_corruption_raise():
    with pytest.raises(ValueError, match="unknown synthetic kind 'blurry'|unknown synthetic kind blurry"):
        _make(kind="blurry")
    with pytest.raises(ValueError, match="unknown corruption fog"):
        _make(kind="corrupt", corruption="fog")


def test_source_shape_is_lighter_than_its_background_in_every_channel():
    """The shape's pixels (the brightest in summed intensity) are lighter in each channel than the rest."""
    images = _make(count=30, size=32)[0].astype(float)
    brightness = images.sum(-1).reshape(30, -1)
    for image, level in zip(images.reshape(30, -1, 3), brightness, strict=True):
        shape = level > np.quantile(level, 0.9)  # every source shape covers more than 10% of the image
        rest = level < np.quantile(level, 0.5)
        assert (image[shape].mean(0) > image[rest].mean(0) + 0.05 * 255).all()


def test_a_synthetic_task_is_prepared_by_the_command_line_without_loading_torch(tmp_path):
    """`vitplasticity prepare` of a synthetic task: through the task-source registry, no download
    folder, and none of torch or torchvision loaded (every prepare job pays its imports)."""
    data = {"source": "synthetic", "kind": "corrupt", "corruption": "contrast", "severity": 2, "image_size": 16,
            "n_train": 10, "n_val": 5, "n_test": 5, "seed": 3}
    out = tmp_path / "corrupt"
    code = ("import json, sys; from vitplasticity import cli; code = cli.main(sys.argv[1:]); "
            "print(json.dumps([code, sorted(m for m in ('torch', 'torchvision') if m in sys.modules)]))")
    settings = json.dumps({"name": "corrupt", "data": data})
    done = subprocess.run([sys.executable, "-c", code, "prepare", "--settings", settings, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(done.stdout) == [0, []]
    assert "corrupt: generated test (5 images)" in done.stderr
    meta = read_meta(out)
    assert meta["splits"] == {"train": 10, "val": 5, "test": 5}
    defaults = {"split_seed": 42, "val_fraction": 0.2, "test_fraction": 0.2}  # the schema's, filled in by the CLI
    assert meta["provenance"] == {"generator": "vitplasticity.datasets.synthetic", **data, **defaults}
    images, labels, _ = synthetic.generate("corrupt", "corrupt", "val", 5, 16, 3, corruption="contrast", severity=2)
    val = load_split(out, "val", verify=True)
    assert np.array_equal(val.images, images) and np.array_equal(val.labels, labels)


def test_a_subset_pools_train_and_val_draws_a_balance_of_every_class_and_keeps_the_test_split(tmp_path):
    """40 train + 20 val images of 5 classes pooled; a subset of 16 // 5 = 3 a class (15), round(15 × 0.2) = 3 to
    val; the test split is generated as without a subset."""
    from vitplasticity.datasets.sources import prepare_task

    task = {"source": "synthetic", "kind": "novel", "image_size": 16, "n_train": 40, "n_val": 20, "n_test": 10,
            "seed": 0, "split_seed": 42, "val_fraction": 0.2}
    plain = prepare_task("novel", task, tmp_path / "plain", None)
    meta = prepare_task("novel", dict(task, subset={"images": 16, "seed": 42}), tmp_path / "subset", None)
    assert meta["splits"] == {"train": 12, "val": 3, "test": 10} and plain["splits"]["train"] == 40
    assert meta["provenance"]["subset"] == {"images": 16, "seed": 42}
    labels = np.concatenate([load_split(tmp_path / "subset", split).labels for split in ("train", "val")])
    assert np.bincount(labels).tolist() == [3] * 5
    assert np.array_equal(load_split(tmp_path / "subset", "test").images, load_split(tmp_path / "plain", "test").images)
    # Every subset image is one of the generated train or val images.
    pool = {image.tobytes() for split in ("train", "val") for image in load_split(tmp_path / "plain", split).images}
    assert all(image.tobytes() in pool for split in ("train", "val")
               for image in load_split(tmp_path / "subset", split).images)
