"""The paper study's dress rehearsal: config/config.yaml plus config/rehearsal.yaml, every job, on CPU.

The slow test runs the whole paper workflow (every task in its real file format and image size,
every arm and experiment, ViT-B/16, ViT-L/16 and ViT-H/14 at their real widths and token counts,
one block deep) against a local dataset host and a hub cache of random weights, and fails if any
job fails. The fast tests check the overlay and its inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, planned_jobs
from http_fixture import DatasetHost
from rehearsal import (
    OVERLAY,
    PAPER_CONFIG,
    archives,
    build,
    checksums_problems,
    environment,
    host_port,
    merged_config,
)

from vitplasticity.datasets.sources import prepare_task
from vitplasticity.prepared import load_split, read_meta

# Every job of the paper study, with one lr and one seed: main 11 tasks x (9 arms + 2 controls), AdamW 4 x (9 arms
# + rank-8 LoRA), model size (1 + 1) x 9 arms, low data 4 tasks x 6 arms, and MHA+FC1's own arm on 2 tasks (its
# arms all, mha and fc1 are main's runs).
PLANNED = {
    "prepare_dataset": 16, "fetch_checkpoint": 3, "measure_plasticity": 17, "measure_criteria": 17,
    "compute_bounds": 17, "linear_probe": 17, "finetune": 11 * 11 + 4 * 10 + (1 + 1) * 9 + 4 * 6 + 2 + 8,
    "aggregate": 7, "figures": 7, "compare_to_paper": 1, "all": 1,
}
# The class counts that shape heads and probes, as the real datasets have them.
CLASSES = {"cifar10": 10, "cifar100": 100, "contrast": 10, "clipart": 345, "sketch": 345, "flowers102": 102,
           "oxford_pets": 37, "imagenet_val": 4}


def _snakemake(study, *args, timeout=3600):
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(study),
               "--configfile", str(PAPER_CONFIG), str(OVERLAY), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment(study))


def _failed_logs(study) -> str:
    """The last lines of every job log that ends in an error."""
    tails = []
    for log in sorted((study / "results" / "logs").rglob("*.log")):
        text = log.read_text(errors="replace")
        if "Error" in text or "Traceback" in text:
            tails.append(f"--- {log.relative_to(study)}\n" + "\n".join(text.splitlines()[-8:]))
    return "\n".join(tails)


def test_overlay_merges_into_the_paper_config_key_by_key():
    paper, config = merged_config([]), merged_config([OVERLAY])
    # Nested mappings merge: the paper's architecture stays, the overlay adds only depth.
    for name, model in paper["models"].items():
        assert config["models"][name] == model | {"kwargs": {"depth": 1}}
    assert config["models"]["vit_h14"]["patch_size"] == 14
    # Tasks keep their source, store size and split keys, and gain the local host's URL and a cap.
    for name, task in paper["tasks"].items():
        for key, value in task["data"].items():
            if key not in ("path", "subset"):
                assert config["tasks"][name]["data"][key] == value, (name, key)
    # The low-data subsets keep their seed, smaller: one image of every class.
    assert {name: task["data"]["subset"] for name, task in config["tasks"].items() if "subset" in task["data"]} == {
        "cifar100_low": {"images": 100, "seed": 42}, "motion_blur_low": {"images": 10, "seed": 42},
        "clipart_low": {"per_class": 1, "seed": 42}, "oxford_pets_low": {"images": 37, "seed": 42}}
    assert config["tasks"]["clipart"]["data"]["domain"] == "clipart"
    assert config["tasks"]["snow"]["data"] | {"url": None} == paper["tasks"]["snow"]["data"] | {
        "url": None, "checksum": "md5:92b88aad43888e226d999f8d2f09a3da", "max_images": 12}
    # Lists replace: one lr, one seed; the experiments, arms and plasticity modes are the paper's.
    assert config["tasks"]["clipart"]["lrs"] == [0.01] and config["finetune"]["seeds"] == [0]
    assert config["arms"] == paper["arms"] and config["controls"] == paper["controls"]
    arms = [arm for arm in paper["experiments"]["main"]["arms"] if arm in paper["arms"]]
    main = paper["experiments"]["main"] | {"arms": [*arms, "mha_as_ln1", "mha_lora1"]}
    budget = paper["experiments"]["budget"] | {"tasks": ["cifar100"]}
    assert config["experiments"] == paper["experiments"] | {"main": main, "budget": budget}
    assert config["selection"] == paper["selection"] | {"budgets": [0.4], "random_draws": 1}
    assert config["plasticity"]["modes"] == ["embedding", "hidden"]
    assert config["plasticity"]["reference_task"] == "imagenet_val"


def test_rehearsal_archives_are_those_the_overlay_pins():
    assert archives() == archives()  # byte for byte on every build, so checksums can be pinned
    assert checksums_problems(merged_config([OVERLAY])) == []


def test_max_images_caps_every_split_and_keeps_every_class(tmp_path):
    files = archives()
    host = DatasetHost(tmp_path / "host")
    try:
        url = host.put("clipart.zip", files["domainnet/clipart.zip"])
        config = merged_config([OVERLAY])
        task = dict(config["tasks"]["clipart"]["data"], url=url, max_images=5, val_fraction=0.2, test_fraction=0.2)
        meta = prepare_task("clipart", task, tmp_path / "clipart", tmp_path / "raw")
    finally:
        host.close()
    assert meta["splits"] == {"train": 5, "val": 5, "test": 5}
    assert len(meta["classes"]) == 345
    assert meta["provenance"]["max_images"] == 5
    test = load_split(tmp_path / "clipart", "test")
    assert test.images.shape == (5, 256, 256, 3)


def test_the_low_data_tasks_draw_one_image_of_every_class_from_the_rehearsal_archives(tmp_path):
    files = archives()
    host = DatasetHost(tmp_path / "host")
    config = merged_config([OVERLAY])
    try:
        for name, path in (("cifar100_low", "cifar-100-python.tar.gz"), ("motion_blur_low", "CIFAR-10-C.tar"),
                           ("clipart_low", "domainnet/clipart.zip")):
            data = dict(config["tasks"][name]["data"], url=host.put(path, files[path]), max_images=None,
                        split_seed=42, val_fraction=0.2, test_fraction=0.2)
            meta = prepare_task(name, data, tmp_path / name, tmp_path / "raw" / name)
            classes = len(meta["classes"])
            assert meta["splits"]["train"] + meta["splits"]["val"] == classes, name
            labels = np.concatenate([load_split(tmp_path / name, split).labels for split in ("train", "val")])
            assert sorted(labels.tolist()) == list(range(classes)), name
            assert meta["provenance"]["subset"]["seed"] == 42
    finally:
        host.close()


def check_results(study) -> None:
    """What a finished rehearsal must hold: the real class counts, stored sizes, token counts and widths,
    both plasticity modes with their pair counts, every run and every experiment's figures."""
    results = study / "results"
    for task, count in CLASSES.items():
        meta = read_meta(study / "data" / "prepared" / task)
        assert len(meta["classes"]) == count, task
    # Stored sizes as the paper stores them: 256 px ImageNet val and DomainNet beside 32 px CIFAR.
    assert read_meta(study / "data" / "prepared" / "imagenet_val")["image_size"] == 256
    assert read_meta(study / "data" / "prepared" / "cifar10")["image_size"] == 32
    # Token counts and widths: ViT-B/16 and ViT-L/16 197 tokens, ViT-H/14 257.
    shapes = {model: json.loads((results / "plasticity" / model / "clipart" / "embedding.json").read_text())
              for model in ("vit_b16", "vit_l16", "vit_h14")}
    assert {m: (s["num_tokens"], s["embed_dim"]) for m, s in shapes.items()} == {
        "vit_b16": (197, 768), "vit_l16": (197, 1024), "vit_h14": (257, 1280)}
    plasticity = pd.read_csv(results / "tables" / "main" / "plasticity.csv")
    assert set(plasticity["mode"]) == {"embedding", "hidden"}
    assert set(plasticity["pairs"]) == {16}
    cifar = plasticity[plasticity["task"] == "cifar10"]
    # The distinct images the 16 pairs use: 16 of the 24 reference images, the 12 test images cycled.
    assert set(cifar["downstream_images"]) == {12} and set(cifar["reference_images"]) == {16}
    # ImageNet val in the authors' order: the 16 pairs take the images of the first 3 of its 4 classes
    assert set(plasticity["reference_order"]) == {"imagefolder"} and set(plasticity["reference_classes"]) == {3}
    assert np.isfinite(plasticity["mean"]).all()
    runs = pd.read_csv(results / "tables" / "main" / "runs.csv")
    assert len(runs) == 11 * 11  # 9 arms and 2 controls
    low = pd.read_csv(results / "tables" / "low_data" / "runs.csv")
    assert len(low) == 4 * 6 and "emb" not in set(low["arm"])
    assert "mha_fc1" in set(pd.read_csv(results / "tables" / "mha_fc1" / "runs.csv")["arm"])
    selection = pd.read_csv(results / "tables" / "budget" / "selection.csv")  # 7 selectors and 1 random draw
    assert len(pd.read_csv(results / "tables" / "budget" / "runs.csv")) == 6 + 8 and len(selection) > 0
    for experiment in ("main", "adamw", "size_large", "size_huge", "low_data", "mha_fc1", "budget"):
        assert (results / "figures" / experiment / "plasticity_vs_rank.png").stat().st_size > 0
    assert (results / "tables" / "main" / "paper_comparison.csv").is_file()


@pytest.mark.slow
def test_paper_rehearsal_runs_every_job(tmp_path):
    """About 20 minutes on an idle 2-core CPU: 316 jobs of about 8 s of CPU each, mostly start-up."""
    study = tmp_path / "study"
    config = merged_config([OVERLAY])
    assert checksums_problems(config) == []
    build(study, config)
    host = DatasetHost(study / "rehearsal" / "host", port=host_port(config))
    try:
        dry = _snakemake(study, "-n")
        assert dry.returncode == 0, dry.stderr[-3000:]
        planned = planned_jobs(dry.stdout)
        assert planned == PLANNED
        run = _snakemake(study, "--cores", "2", "--keep-going")
        assert run.returncode == 0, f"{run.stderr[-3000:]}\n{_failed_logs(study)}"
        report = _snakemake(study, "--report", str(study / "report.html"))
        assert report.returncode == 0, report.stderr[-3000:]
    finally:
        host.close()
    assert (study / "report.html").stat().st_size > 0
    check_results(study)


def test_full_depth_overlay_restores_the_paper_depths():
    import timm
    import torch

    config = merged_config([OVERLAY, OVERLAY.with_name("rehearsal-full-depth.yaml")])
    for name, model in config["models"].items():
        with torch.device("meta"):  # timm's own architecture, no memory
            default = timm.create_model(model["timm_name"], pretrained=False)
        assert model["kwargs"] == {"depth": len(default.blocks)}, name
    assert {name: model["kwargs"]["depth"] for name, model in config["models"].items()} == {
        "vit_b16": 12, "vit_l16": 24, "vit_h14": 32}


def test_every_report_caption_is_valid_restructuredtext():
    """`snakemake --report` renders captions with docutils; "|x|" there is a substitution, an error in the report."""
    import io

    from docutils.core import publish_doctree

    for caption in sorted((ROOT / "workflow" / "report").glob("*.rst")):
        warnings = io.StringIO()
        publish_doctree(caption.read_text(), settings_overrides={"warning_stream": warnings, "report_level": 2})
        assert warnings.getvalue() == "", f"{caption.name}: {warnings.getvalue()}"


def test_a_second_rehearsal_while_the_port_is_taken_is_one_line_and_builds_nothing(tmp_path):
    """The overlay's URLs name one port; a rehearsal started while another serves there stops before it builds."""
    import socket

    port = host_port(merged_config([OVERLAY]))
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port an earlier test left in TIME_WAIT
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run([sys.executable, str(ROOT / "tests" / "rehearsal.py"), str(tmp_path / "study")],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"cannot serve the rehearsal archives on 127.0.0.1:{port}, the port the overlay's dataset URLs name "
        "(Address already in use); wait for the rehearsal that serves there to end, or stop what listens there, "
        "then run this again"]
    assert not (tmp_path / "study").exists()
