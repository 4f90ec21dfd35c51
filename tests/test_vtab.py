"""VTAB-1k: the vtab1k task source on a generated copy of the processed layout, the VTAB table, config/vtab.yaml."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, planned_jobs, snakemake, write_config
from PIL import Image
from vtab_fixture import COUNTS, SHADE, SHAPES, grey_levels, label_of, make_vtab

from vitplasticity import aggregate as agg
from vitplasticity.config import check_config
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.datasets.vtab1k import TASKS
from vitplasticity.errors import UserError
from vitplasticity.prepared import load_split


@pytest.fixture
def vtab(tmp_path) -> Path:
    return make_vtab(tmp_path / "vtab-1k")


def prepare(root: Path, task: str, out: Path, **keys) -> dict:
    data = {"source": "vtab1k", "path": str(root), "vtab_task": task, "store_size": 16} | keys
    return prepare_task(task, data, out / task, None)


@pytest.mark.parametrize("task", list(SHAPES))
def test_each_list_becomes_its_split_with_the_listed_labels_and_all_classes(vtab, tmp_path, task):
    meta = prepare(vtab, task, tmp_path / "prepared")
    classes = TASKS[task][1]
    assert meta["classes"] == [str(k) for k in range(classes)]
    assert meta["splits"] == {"train": 4, "val": 2, "test": 3} and meta["image_size"] == 16
    first = {"train": 0, "val": 4, "test": 6}  # the fixture numbers images train800, val200, test in turn
    for split, start in first.items():
        stored = load_split(tmp_path / "prepared" / task, split)
        numbers = range(start, start + COUNTS[{"train": "train800", "val": "val200", "test": "test"}[split]])
        assert stored.labels.tolist() == [label_of(n, classes) for n in numbers]
        # A uniform grey image stays that grey through JPEG, grayscale or RGBA decoding and the resize.
        assert grey_levels(stored.images) == [10 * n + SHADE[task] for n in numbers]
        assert stored.images.shape[1:] == (16, 16, 3)
    provenance = meta["provenance"]
    assert provenance["vtab_task"] == task and provenance["group"] == TASKS[task][0]
    assert provenance["lists"] == {"train800": 4, "val200": 2, "train800val200": 6, "test": 3}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", provenance["files_checksum"])


def test_the_checksum_covers_the_images_and_the_lists(vtab, tmp_path):
    before = prepare(vtab, "svhn", tmp_path / "a")["provenance"]["files_checksum"]
    assert prepare(vtab, "svhn", tmp_path / "b")["provenance"]["files_checksum"] == before
    image = vtab / "svhn" / "images" / "test" / "0008.png"
    image.write_bytes(image.read_bytes() + b"\0")  # same pixels, other bytes
    after_image = prepare(vtab, "svhn", tmp_path / "c")["provenance"]["files_checksum"]
    test_list = vtab / "svhn" / "test.txt"
    test_list.write_text(test_list.read_text() + "\n")  # same lines, other bytes
    after_list = prepare(vtab, "svhn", tmp_path / "d")["provenance"]["files_checksum"]
    assert len({before, after_image, after_list}) == 3


def test_the_image_is_squashed_to_the_square_not_cropped(tmp_path):
    root = tmp_path / "vtab-1k"
    folder = root / "kitti"
    folder.mkdir(parents=True)
    image = np.zeros((10, 40, 3), dtype=np.uint8)
    image[:, :10] = 200  # a bright left quarter: a centre crop would cut it off
    Image.fromarray(image).save(folder / "wide.png")
    Image.fromarray(image).save(folder / "wide_test.png")
    for name in ("train800", "val200"):
        (folder / f"{name}.txt").write_text("wide.png 3\n")
    (folder / "test.txt").write_text("wide_test.png 3\n")
    (folder / "train800val200.txt").write_text("wide.png 3\nwide.png 3\n")
    prepare(root, "kitti", tmp_path / "prepared")
    stored = load_split(tmp_path / "prepared" / "kitti", "test").images[0]
    assert stored[8, 0, 0] > 150 and stored[8, 15, 0] < 50


def break_list(root: Path, task: str, name: str, text: str | None) -> None:
    file = root / task / f"{name}.txt"
    if text is None:
        file.unlink()
    else:
        file.write_text(text)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("val200", None, "VTAB-1k split list {folder}/val200.txt is missing; restore it from the processed VTAB-1k "
                     "copy"),
    ("test", "images/test/0006.png\n", "{folder}/test.txt:1: 'images/test/0006.png' is not 'relative/path "
                                       "label'; fix or remove the line"),
    ("test", "images/test/0006.png seven\n", "{folder}/test.txt:1: 'images/test/0006.png seven' is not "
                                             "'relative/path label'; fix or remove the line"),
    ("test", "images/test/0006.png 2\n\nimages/test/0007.png 10\n",
     "{folder}/test.txt:3: label 10 is outside 0..9 (10 classes); fix the line or the task's vtab_task"),
    ("test", "images/test/0006.png -1\n",
     "{folder}/test.txt:1: label -1 is outside 0..9 (10 classes); fix the line or the task's vtab_task"),
    ("test", "../dtd/images/test/0006.jpg 1\n",
     "{folder}/test.txt:1: ../dtd/images/test/0006.jpg lies outside the task folder; list paths relative to it"),
    ("test", "", "VTAB-1k split list {folder}/test.txt lists no images; restore it from the processed VTAB-1k "
                 "copy"),
    ("train800val200", "images/train800/0000.png 0\n",
     "{folder}/train800val200.txt does not hold exactly the lines of train800.txt and val200.txt; restore the "
     "lists from the processed VTAB-1k copy"),
    ("test", "images/test/0006.png 1\nimages/train800/0002.png 6\n",
     "{folder}/test.txt lists 1 image(s) that train800val200.txt lists too (images/train800/0002.png first): test "
     "images must be unseen; restore the lists from the processed VTAB-1k copy"),
])
def test_a_missing_or_malformed_list_is_named_in_one_line(vtab, tmp_path, name, text, message):
    break_list(vtab, "svhn", name, text)
    with pytest.raises(UserError) as error:
        prepare(vtab, "svhn", tmp_path / "prepared")
    assert str(error.value) == message.format(folder=vtab / "svhn")
    assert not (tmp_path / "prepared" / "svhn").exists()


def test_missing_images_are_counted_and_the_first_named(vtab, tmp_path):
    (vtab / "dtd" / "images" / "test" / "0007.jpg").unlink()
    (vtab / "dtd" / "images" / "test" / "0008.jpg").unlink()
    with pytest.raises(UserError) as error:
        prepare(vtab, "dtd", tmp_path / "prepared")
    assert str(error.value) == (f"VTAB-1k task dtd: listed image {vtab}/dtd/images/test/0007.jpg is missing (2 of 9 "
                                "listed files missing); restore them from the processed VTAB-1k copy")


def test_a_damaged_image_is_named(vtab, tmp_path):
    damaged = vtab / "clevr_count" / "images" / "val200" / "0005.png"
    damaged.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match=re.escape(f"cannot read image {damaged} (")):
        prepare(vtab, "clevr_count", tmp_path / "prepared")


def test_a_missing_task_folder_and_an_unknown_task_are_named(vtab, tmp_path):
    with pytest.raises(UserError) as error:
        prepare(vtab, "kitti", tmp_path / "prepared")
    assert str(error.value) == (f"VTAB-1k task folder {vtab}/kitti does not exist; set `path` to the folder holding "
                                "the processed VTAB-1k task folders (kitti/ among them)")
    with pytest.raises(UserError) as error:
        prepare(vtab, "cifar10", tmp_path / "prepared")
    assert str(error.value).startswith("config key 'tasks.cifar10.data.vtab_task': 'cifar10' is not a VTAB-1k "
                                       "task; allowed: cifar, caltech101, dtd,")


def test_the_19_tasks_and_their_class_counts():
    counts = {task: classes for task, (_, classes) in TASKS.items()}
    assert counts == {"cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
                      "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
                      "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
                      "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9}
    groups = [group for group, _ in TASKS.values()]
    assert (groups.count("Natural"), groups.count("Specialized"), groups.count("Structured")) == (7, 4, 8)


BASE = {"Natural": 70.0, "Specialized": 80.0, "Structured": 40.0}


def vtab_runs() -> pd.DataFrame:
    """Hand-made runs of arms mha and all on the 19 tasks (named "v_<task>" in the config) and one other task.

    mha: lr 0.01 has the higher val200 accuracy (90) and test accuracies base ± 1 (mean: the group's base);
    lr 0.1 has the lower val accuracy (80) but a test accuracy 10 points higher, which selecting on test would
    take. all: at lr 0.01 a seed diverged, so lr 0.1 (val 50, test 60) is taken; dsprites_ori never ran.
    """
    rows = []
    for task, (group, _) in TASKS.items():
        base = BASE[group]
        for seed, delta in ((0, -1.0), (1, 1.0)):
            rows.append(("mha", task, 0.01, seed, "completed", 90.0, base + delta))
            rows.append(("mha", task, 0.1, seed, "completed", 80.0, base + 10.0))
            if task != "dsprites_ori":
                rows.append(("all", task, 0.01, seed, "diverged" if seed else "completed", 99.0, 99.0))
                rows.append(("all", task, 0.1, seed, "completed", 50.0, 60.0))
    rows.append(("mha", "other", 0.01, 0, "completed", 10.0, 10.0))  # not a VTAB task: left out
    frame = pd.DataFrame(rows, columns=["arm", "task", "lr", "seed", "status", "best_val_acc", "test_acc"])
    return frame.assign(task=lambda f: f["task"].where(f["task"] == "other", "v_" + f["task"]))


def test_the_vtab_table_selects_on_val200_and_averages_tasks_and_groups():
    vtab_tasks = {f"v_{task}": task for task in TASKS}
    probes = {f"v_{task}": 50.0 for task in TASKS} | {"other": 5.0}
    table = agg.vtab_table(vtab_runs(), vtab_tasks, probes, ["all", "mha"])
    assert table["method"].tolist() == ["all", "full finetuning (published)", "MHA", "linear probe",
                                        "linear probing (published)", "LoRA (published)", "SPT-LoRA (published)"]
    rows = table.set_index("method")
    mha = rows.loc["MHA"]
    assert mha["cifar"] == 70.0 and mha["eurosat"] == 80.0 and mha["kitti"] == 40.0  # lr 0.01, not 0.1
    assert (mha["Natural"], mha["Specialized"], mha["Structured"]) == (70.0, 80.0, 40.0)
    assert mha["mean"] == pytest.approx((7 * 70 + 4 * 80 + 8 * 40) / 19)  # 59.47
    assert mha["group_mean"] == pytest.approx((70 + 80 + 40) / 3)  # 63.33
    full = rows.loc["all"]
    assert full["cifar"] == 60.0 and full["Natural"] == 60.0 and full["Specialized"] == 60.0
    assert np.isnan(full["dsprites_ori"]) and np.isnan(full["Structured"])  # a group with a task missing: no mean
    assert np.isnan(full["mean"]) and np.isnan(full["group_mean"])
    assert rows.loc["linear probe", "group_mean"] == 50.0 and rows.loc["linear probe", "mean"] == 50.0
    published = rows.loc["full finetuning (published)"]
    assert (published["mean"], published["group_mean"]) == (65.6, 69.0)
    assert published["source"] == "Jia et al. 2022, Visual Prompt Tuning (ECCV), Table 1"
    assert rows.loc["linear probing (published)", "group_mean"] == 57.6
    assert rows.loc["LoRA (published)", "group_mean"] == "73.0–75.0"
    assert rows.loc["SPT-LoRA (published)", "group_mean"] == 76.4
    assert set(rows["kind"]) == {"study", "published"} and (rows.loc["MHA", "source"] == "this study")

    markdown = agg._markdown(agg._vtab_view(table), "{:.1f}", "method").splitlines()
    assert markdown[0] == ("| method | " + " | ".join(TASKS) + " | Natural | Specialized | Structured "
                           "| mean (19 tasks) | mean of group means | source |")
    assert markdown[4].startswith("| MHA | 70.0 | 70.0 |") and markdown[4].endswith(
        "| 70.0 | 80.0 | 40.0 | 59.5 | 63.3 | this study |")
    assert "| 60.0 | 60.0 | — | — | — | this study |" in markdown[2]


def test_the_vtab_table_lists_only_the_tasks_run_and_is_empty_without_vtab_tasks():
    runs = vtab_runs()
    two = {"v_cifar": "cifar", "v_kitti": "kitti"}
    table = agg.vtab_table(runs, two, {}, ["mha"])
    view = agg._vtab_view(table)
    assert list(view.columns[:2]) == ["cifar", "kitti"] and view.loc["MHA", "cifar"] == 70.0
    assert "linear probe" not in view.index
    assert agg.vtab_table(runs, {}, {}, ["mha"]).empty


def vtab_config() -> dict:
    return yaml.safe_load((ROOT / "config" / "vtab.yaml").read_text())


def test_config_vtab_holds_the_19_tasks_in_their_real_shapes():
    config = vtab_config()
    check_config(config)
    vtab = {name: task for name, task in config["tasks"].items() if task["data"]["source"] == "vtab1k"}
    assert {task["data"]["vtab_task"] for task in vtab.values()} == set(TASKS)
    assert config["experiments"]["vtab"]["tasks"] == list(TASKS)  # VTAB's order, each task under its own name
    assert {(task["steps"], task["eval_every"]) for task in vtab.values()} == {(2500, 125)}
    assert config["finetune"]["batch_size"] == 512 and config["plasticity"]["reference_task"] == "imagenet_val"
    assert config["experiments"]["vtab"]["arms"] == list(config["arms"])
    # The budget arms of the paper study's selection section, on every task.
    paper = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    assert config["selection"] == paper["selection"] and config["experiments"]["vtab"]["selection"] is True
    assert config["criteria"]["enabled"] is True


def test_an_unknown_vtab_task_fails_the_config_check_in_one_line():
    config = vtab_config()
    config["tasks"]["kitti"]["data"]["vtab_task"] = "kitty"
    with pytest.raises(UserError) as error:
        check_config(config)
    assert str(error.value).startswith("config key 'tasks.kitti.data.vtab_task': 'kitty' is not a VTAB-1k task; "
                                       "allowed: cifar, caltech101,")


def test_the_vtab_dry_run_plans_the_study_on_a_processed_copy(tmp_path):
    config = vtab_config()
    fixture = make_vtab(tmp_path / "vtab-1k")
    for task in config["tasks"].values():
        if task["data"]["source"] == "vtab1k":
            task["data"]["path"] = str(fixture)
    result = snakemake(tmp_path, "-n", "-p", config=write_config(tmp_path / "vtab.yaml", config), timeout=300)
    jobs = planned_jobs(result.stdout)
    assert jobs == {"fetch_checkpoint": 1, "prepare_dataset": 20,  # 19 tasks + the ImageNet reference stream
                    # tasks x lrs x seeds x (9 arms + 2 budgets x 10 budget arms) = 2,052 + 4,560
                    "finetune": 19 * 4 * 3 * (9 + 2 * 10),
                    "linear_probe": 19, "measure_criteria": 19, "measure_plasticity": 19, "compute_bounds": 19,
                    "aggregate": 1, "figures": 1, "all": 1}
    # The aggregation knows each task's VTAB name, for the vtab table.
    assert '"vtab_tasks": {"caltech101": "caltech101", "cifar": "cifar",' in result.stdout


def test_the_preflight_projection_counts_the_runs_the_vtab_dry_run_plans():
    from vitplasticity import preflight

    config = vtab_config()
    check_config(config)
    # One second a step for every arm: hours = runs x 2,500 steps / 3,600.
    projected = preflight.project(config, {"vit_b16": {"sgd": {"all": 1.0, "mha": 1.0}}}, {"vit_b16": 1.0}, 64)
    assert projected["vtab"]["runs"] == 19 * 4 * 3 * (9 + 20)
    assert projected["vtab"]["gpu_hours"] == pytest.approx(6612 * 2500 / 3600)
    config["experiments"]["vtab"]["selection"] = False
    assert preflight.project(config, {"vit_b16": {"sgd": {"all": 1.0, "mha": 1.0}}}, {"vit_b16": 1.0},
                             64)["vtab"]["runs"] == 2052


def test_a_path_with_spaces_is_read_up_to_the_label(vtab, tmp_path):
    folder = vtab / "svhn"
    (folder / "images" / "test" / "0006.png").rename(folder / "images" / "test" / "six six.png")
    lines = (folder / "test.txt").read_text().replace("images/test/0006.png", "images/test/six six.png")
    (folder / "test.txt").write_text(lines)
    prepare(vtab, "svhn", tmp_path / "prepared")
    stored = load_split(tmp_path / "prepared" / "svhn", "test")
    assert stored.labels.tolist() == [label_of(n, 10) for n in (6, 7, 8)]
    assert grey_levels(stored.images) == [62, 72, 82]


def test_a_vtab_task_goes_through_plasticity_finetuning_and_the_probe_into_the_vtab_table(vtab, tmp_path, capsys):
    from jobkit import ARCH, FINETUNE

    from vitplasticity import cli, models

    prepared = tmp_path / "data" / "prepared" / "dtd"
    prepare_task("dtd", {"source": "vtab1k", "path": str(vtab), "vtab_task": "dtd", "store_size": 16}, prepared, None)
    checkpoint = tmp_path / "vit.safetensors"
    models.save_checkpoint(checkpoint, models.build(ARCH, num_classes=5),
                           {"arch": ARCH, "img_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3,
                            "provenance": {"kind": "test"}})
    # Plasticity of the task's test images against a reference stream (another task of the copy, grayscale PNG).
    reference = tmp_path / "data" / "prepared" / "svhn"
    prepare_task("svhn", {"source": "vtab1k", "path": str(vtab), "vtab_task": "svhn", "store_size": 16}, reference,
                 None)
    plasticity = tmp_path / "plasticity" / "dtd.csv"
    assert cli.main(["plasticity", "--settings", json.dumps({"model": "vit", "task": "dtd", "reference_task": "svhn",
                                                             "n_pairs": 3, "modes": ["embedding", "hidden"]}),
                     "--checkpoint", str(checkpoint), "--task", str(prepared), "--reference", str(reference),
                     "--out-table", str(plasticity), "--out-stats", str(tmp_path / "plasticity" / "stats.json")]) == 0
    measured = pd.read_csv(plasticity)
    assert set(measured["mode"]) == {"embedding", "hidden"} and measured["mean"].notna().all()
    assert set(measured["pairs"]) == {3}
    arms = {"all": ["emb", "ln1", "mha", "ln2", "fc1", "fc2"], "mha": ["mha"]}
    runs = {}
    for arm, components in arms.items():
        for lr in (0.01, 0.3):
            run_dir = tmp_path / "runs" / arm / str(lr)
            settings = FINETUNE | {"task": "dtd", "arm": arm, "components": components, "lr": lr, "steps": 3,
                                   "eval_every": 1, "batch_size": 4, "warmup_steps": 0}
            assert cli.main(["finetune", "--settings", json.dumps(settings), "--checkpoint", str(checkpoint),
                             "--task", str(prepared), "--run-dir", str(run_dir)]) == 0
            runs[arm, lr] = json.loads((run_dir / "metrics.json").read_text())
    probe = tmp_path / "probe" / "dtd.json"
    assert cli.main(["probe", "--settings", json.dumps({"model": "vit", "task": "dtd"}), "--checkpoint",
                     str(checkpoint), "--task", str(prepared), "--out", str(probe)]) == 0
    out = tmp_path / "tables"
    settings = {"experiment": "vtab", "model": "vit", "tasks": ["dtd"], "arms": arms, "arm_order": list(arms),
                "vtab_tasks": {"dtd": "dtd"}}
    assert cli.main(["aggregate", "--settings", json.dumps(settings), "--runs",
                     *[str(tmp_path / "runs" / arm / str(lr) / "metrics.json") for arm, lr in runs],
                     "--probes", str(probe), "--plasticity", str(plasticity), "--out-dir", str(out)]) == 0
    table = pd.read_csv(out / "vtab.csv").set_index("method")
    for arm, label in (("all", "all"), ("mha", "MHA")):
        # The lr of the higher val200 accuracy (the smaller lr on a tie), its test accuracy in percent.
        chosen = max((0.3, 0.01), key=lambda lr: (runs[arm, lr]["best_val_acc"], -lr))
        assert table.loc[label, "dtd"] == pytest.approx(100 * runs[arm, chosen]["test_acc"])
    assert table.loc["linear probe", "dtd"] == pytest.approx(100 * json.loads(probe.read_text())["test_acc"])
    assert np.isnan(table.loc["MHA", "Natural"])  # one Natural task of seven: no group mean
    header = (out / "vtab.md").read_text().splitlines()[0]
    assert header == ("| method | dtd | Natural | Specialized | Structured | mean (19 tasks) | mean of group means "
                      "| source |")
