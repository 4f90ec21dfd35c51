"""`vitplasticity recommend` end to end, the imagefolder task source and the local model source."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import ROOT, planned_jobs, snakemake
from PIL import Image
from safetensors.torch import load_file, save_file

from vitplasticity import cli, components, recommend, transforms
from vitplasticity.datasets.images import fit_square
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.errors import UserError
from vitplasticity.fileio import sha256_file
from vitplasticity.jobs import fetch
from vitplasticity.models import load_checkpoint
from vitplasticity.prepared import load_split, read_meta
from vitplasticity.recommend import cross_pairs, lora_plan, unordered_pair, within_pairs
from vitplasticity.settings import build

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
# Shrunk members of each family: timm name, keyword arguments.
FAMILIES = {
    "dinov2": ("vit_small_patch14_reg4_dinov2", {"img_size": 28, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    "deit3": ("deit3_small_patch16_224", {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    "siglip": ("vit_base_patch16_siglip_224", {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    "clip": ("vit_base_patch16_clip_224", {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}),
}
# The timm modules of the 2-block TINY ViT that LoRA adapts for each linear component.
LORA_TARGETS = {
    "mha": {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv", "blocks.1.attn.proj"},
    "fc1": {"blocks.0.mlp.fc1", "blocks.1.mlp.fc1"},
    "fc2": {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"},
}
# The finetuning jobs of the config `recommend` writes: 8 arms × 3 learning rates × 2 seeds.
SNIPPET_JOBS = {"prepare_dataset": 2, "fetch_checkpoint": 1, "measure_plasticity": 1, "compute_bounds": 1,
                "finetune": 48, "linear_probe": 1, "aggregate": 1, "figures": 1, "all": 1}


def _image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=6, seed=0) -> Path:
    """Class sub-folders of random images of assorted sizes."""
    rng = np.random.default_rng(seed)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (30 + 3 * i, 44, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _weights(path: Path, name: str, kwargs: dict, num_classes: int = 10) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _recommend(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["recommend", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _code_block(report: str, language: str, index: int = 0) -> str:
    return re.findall(rf"```{language}\n(.*?)```", report, flags=re.S)[index]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """One recommend run on a tiny ViT's weights file and a generated image folder, no reference."""
    root = tmp_path_factory.mktemp("recommend")
    data = _image_folder(root / "my_images")
    weights = _weights(root / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = root / "report"
    code = cli.main(["recommend", "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                     json.dumps(TINY), "--data", str(data), "--pairs", "40", "--batch-size", "16",
                     "--modes", "embedding,hidden", "--out", str(out)])
    assert code == 0
    return root, out


def test_recommend_report_ranks_every_component_in_both_modes(tiny_report):
    _, out = tiny_report
    ranking = pd.read_csv(out / "ranking.csv").to_dict("records")
    for mode in ("embedding", "hidden"):
        rows = [r for r in ranking if r["mode"] == mode]
        assert sorted(r["component"] for r in rows) == sorted(components.BLOCK_COMPONENTS)
        assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
        assert all(r["layer_min"] <= r["mean"] <= r["layer_max"] and r["ci95"] >= 0 for r in rows)
    per_layer = pd.read_csv(out / "plasticity_per_layer.csv")
    assert len(per_layer) == 2 * 5 * 2 and set(per_layer["n"]) == {40}  # modes × components × layers
    tokens = json.loads((out / "token_norms.json").read_text())
    assert tokens["pairs"] == 40 and tokens["num_tokens"] == 17 and tokens["embed_dim"] == 32
    assert (out / "plasticity_vs_depth.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "No --reference was given, so each pair is two different images of your folder" in report


def test_recommend_never_pairs_an_image_with_itself(tiny_report):
    _, out = tiny_report
    pairs = (out / "pairs.csv").read_text().splitlines()[1:]
    assert len(pairs) == 40
    assert all(first != second for first, second in (line.split(",") for line in pairs))
    first, second = within_pairs(5, 23, np.random.default_rng(1))
    # 5 images make 10 unordered pairs of two different images: all of them, none twice, 23 asked or not.
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [
        (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]


@pytest.mark.parametrize("count", [2, 3, 7, 30])
def test_unordered_pair_numbers_every_pair_once(count):
    first, second = unordered_pair(np.arange(count * (count - 1) // 2), count)
    assert list(zip(first.tolist(), second.tolist(), strict=True)) == [
        (i, j) for i in range(count) for j in range(i + 1, count)]


def test_cross_pairs_are_distinct_and_capped_at_every_combination():
    first, second = cross_pairs(3, 4, 100, np.random.default_rng(0))
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [(i, j) for i in range(3) for j in range(4)]
    first, second = cross_pairs(50, 40, 300, np.random.default_rng(0))
    assert len(set(zip(first.tolist(), second.tolist(), strict=True))) == 300


def test_pairs_beyond_what_the_images_give_are_counted_as_distinct_pairs(tmp_path, capsys):
    """12 images give 66 distinct pairs; 5,000 asked is reported as 66, with the cycling said, as are the images
    (not the pair count) in the JSON and the figure title."""
    data = _image_folder(tmp_path / "twelve", classes=("a", "b"), per_class=6)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "report"
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--pairs", "5000", "--batch-size", "33",
                              "--out", str(out))
    assert code == 0, err
    tokens = json.loads((out / "token_norms.json").read_text())
    assert (tokens["pairs"], tokens["pairs_asked"], tokens["images"]) == (66, 5000, 12)
    assert "reference_images" not in tokens and tokens["most_pairs_per_image"] == 11
    assert set(pd.read_csv(out / "plasticity_per_layer.csv")["n"]) == {66}
    assert len((out / "pairs.csv").read_text().splitlines()) == 1 + 66
    report = (out / "report.md").read_text()
    assert ("Pairs: 66 distinct pairs of two different images, out of 12 images of --data; 5,000 were asked for, "
            "but these images give no more distinct pairs (a repeated pair is no new evidence). The images are "
            "cycled: one image is in up to 11 pairs.") in report


def test_reference_pairs_report_distinct_images_per_stream(tmp_path, capsys):
    reference = _image_folder(tmp_path / "reference", classes=("x",), per_class=3, seed=1)
    data = _image_folder(tmp_path / "data", classes=("a",), per_class=5, seed=2)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "report"
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--reference", str(reference), "--pairs", "15",
                              "--out", str(out))
    assert code == 0, err
    tokens = json.loads((out / "token_norms.json").read_text())
    assert (tokens["pairs"], tokens["reference_images"], tokens["downstream_images"]) == (15, 3, 5)
    assert (tokens["most_pairs_per_reference_image"], tokens["most_pairs_per_downstream_image"]) == (5, 3)
    assert ("Pairs: 15 distinct pairs of a --reference image and a --data image, out of 3 reference and 5 data "
            "images. The images are cycled: one image is in up to 5 pairs.") in (out / "report.md").read_text()
    # The study the report writes pairs every reference image too: all 3 in the split plasticity reads.
    written = yaml.safe_load((out / "workflow_config.yaml").read_text())["tasks"]["reference"]["data"]
    assert prepare_task("reference", written | {"split_seed": 0}, tmp_path / "prepared", None)["splits"] == {
        "train": 0, "val": 0, "test": 3}


def test_two_images_make_one_pair_and_are_refused_before_any_work(tmp_path, capsys):
    data = _image_folder(tmp_path / "two", classes=("a",), per_class=2)
    code, _, err = _recommend(capsys, "--model", "no_such_model_is_opened", "--data", str(data), "--pairs", "5000",
                              "--out", str(tmp_path / "report"))
    assert code != 0 and not (tmp_path / "report").exists()
    assert err.strip().splitlines()[-1] == (
        f"vitplasticity recommend: error: --data {data} holds 2 images: they make 1 distinct pair, and plasticity "
        "needs at least 2; give 3 images or more (or a --reference folder)")


def test_freeze_list_trains_exactly_the_named_parameters(tiny_report):
    _, out = tiny_report
    report = (out / "report.md").read_text()
    names = (out / "trainable_parameters.txt").read_text().split()
    top = pd.read_csv(out / "ranking.csv").iloc[0]["component"]
    namespace = {"NUM_CLASSES": 3}
    exec(_code_block(report, "python"), namespace)  # noqa: S102 (the 5-line snippet as the report prints it)
    model = namespace["model"]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == names
    assert set(trained) == {n for n, _ in model.named_parameters() if components.component_of(n) in {top, "head"}}
    assert model.head.out_features == 3


def test_lora_config_applies_to_the_timm_model(tiny_report):
    from peft import LoraConfig, get_peft_model

    _, out = tiny_report
    config = LoraConfig.from_pretrained(str(out / "lora"))
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY)
    peft_model = get_peft_model(model, config)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    targets = re.compile(config.target_modules)
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n in trained if ".lora_A." in n}
    assert adapted and all(targets.fullmatch(name) for name in adapted)
    ranking = pd.read_csv(out / "ranking.csv")
    embedding = ranking[ranking["mode"] == "embedding"]  # the first of --modes
    top_linear = next(c for c in embedding.sort_values("rank")["component"] if c in LORA_TARGETS)
    assert adapted == LORA_TARGETS[top_linear]
    assert any(n.endswith("head.modules_to_save.default.weight") for n in trained)
    assert peft_model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize(("order", "component", "saved"), [
    (["fc1", "ln1", "mha", "fc2", "ln2"], "fc1", ["norm", "head"]),
    (["ln2", "ln1", "fc2", "mha", "fc1"], "fc2", ["norm2", "norm1", "norm", "head"]),
    (["mha", "fc2", "fc1", "ln1", "ln2"], "mha", ["norm", "head"]),
])
def test_lora_plan_targets_the_first_linear_component_of_the_order(order, component, saved):
    """TINY has no LayerScale (ls1, ls2 are Identity) and a class-token head (fc_norm is Identity)."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY)
    first, target, to_save = lora_plan(order, model)
    assert (first, to_save) == (component, saved)
    matched = {name for name, _ in model.named_modules() if re.fullmatch(target, name)}
    assert matched == LORA_TARGETS[component]


def test_workflow_config_of_the_report_plans_every_arm(tiny_report, tmp_path):
    _, out = tiny_report
    result = snakemake(tmp_path, "-n", "--quiet", "rules", config=out / "workflow_config.yaml")
    assert planned_jobs(result.stdout + result.stderr) == SNIPPET_JOBS


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recommend_on_each_family(family, tmp_path, capsys):
    name, kwargs = FAMILIES[family]
    weights = _weights(tmp_path / f"{family}.safetensors", name, kwargs)
    reference = _image_folder(tmp_path / "reference", classes=("a",), per_class=4, seed=1)
    data = _image_folder(tmp_path / "data", classes=("x", "y"), per_class=3)
    code, stdout, stderr = _recommend(capsys, "--model", str(weights), "--arch", name, "--arch-kwargs",
                                      json.dumps(kwargs), "--data", str(data), "--reference", str(reference),
                                      "--pairs", "10", "--out", str(tmp_path / "report"))
    assert code == 0, stderr
    assert "report:" in stdout
    report = (tmp_path / "report" / "report.md").read_text()
    assert "No --reference" not in report
    pairs = (tmp_path / "report" / "pairs.csv").read_text().splitlines()
    assert len(pairs) == 11 and all(line.split(",")[0].startswith("a/") for line in pairs[1:])
    head = re.search(r"- head \((.*)", report).group(1)
    if family == "siglip":
        assert head.startswith("linear: the attention pool replaced by mean pooling + linear")
        assert "avg-pooled patch tokens" in head
    else:
        assert "the class token" in head
    if family == "clip":
        assert "norm_pre, a LayerNorm applied to E before block 0 (CLIP): it is part of E" in report
    if family == "dinov2":
        assert "(14 px patches), class token, 4 register tokens" in report
    namespace = {"NUM_CLASSES": 2}
    exec(_code_block(report, "python"), namespace)  # noqa: S102 (the report's snippet, run as a user would)
    trained = [n for n, p in namespace["model"].named_parameters() if p.requires_grad]
    assert trained == (tmp_path / "report" / "trainable_parameters.txt").read_text().split()
    assert not any(n.startswith("attn_pool.") for n in namespace["model"].state_dict())


def test_a_model_the_map_does_not_cover_is_one_line(tmp_path, capsys):
    weights = _weights(tmp_path / "relpos.safetensors", "vit_relpos_small_patch16_224",
                       {"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2})
    data = _image_folder(tmp_path / "data", classes=("x",), per_class=3)
    code, _, stderr = _recommend(capsys, "--model", str(weights), "--arch", "vit_relpos_small_patch16_224",
                                 "--data", str(data), "--out", str(tmp_path / "report"))
    assert code == 2
    assert stderr == (
        "vitplasticity recommend: error: vit_relpos_small_patch16_224 is a VisionTransformerRelPos, not a timm "
        "VisionTransformer; the component map covers timm 'vit_*' and 'deit*' models (ViT, AugReg, DeiT/DeiT3, "
        "DINOv2, CLIP, SigLIP); choose one of those\n")
    assert not (tmp_path / "report").exists()


def test_weights_file_without_arch_is_one_line(tmp_path, capsys):
    weights = _weights(tmp_path / "w.safetensors", "vit_tiny_patch16_224", TINY)
    data = _image_folder(tmp_path / "data", classes=("x",), per_class=3)
    code, _, stderr = _recommend(capsys, "--model", str(weights), "--data", str(data), "--out", str(tmp_path / "r"))
    assert code == 2
    assert stderr == (f"vitplasticity recommend: error: {weights} is a weights file: name its timm architecture "
                      "with --arch, e.g. --arch vit_base_patch16_224 (a tag such as .augreg_in21k picks its "
                      "normalisation)\n")


def test_imagefolder_keeps_given_splits_and_splits_the_rest(tmp_path):
    root = tmp_path / "images"
    _image_folder(root / "train", per_class=10)
    _image_folder(root / "test", classes=("dog", "fox"), per_class=2, seed=3)
    task = {"source": "imagefolder", "path": str(root), "store_size": 16, "split_seed": 42, "val_fraction": 0.2}
    meta = prepare_task("mine", task, tmp_path / "prepared", None)
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["splits"] == {"train": 24, "val": 6, "test": 4}  # val held out of train/, test/ kept
    test = load_split(tmp_path / "prepared", "test")
    assert test.labels.tolist() == [1, 1, 2, 2]  # test/ has no cat: labels follow train/'s classes
    again = prepare_task("mine", task, tmp_path / "again", None)
    assert again["checksums"] == meta["checksums"]  # the same seed gives the same split


def test_imagefolder_without_split_folders_is_split_by_seed(tmp_path):
    root = _image_folder(tmp_path / "images", per_class=10)
    task = {"source": "imagefolder", "path": str(root), "store_size": 16, "split_seed": 7}
    meta = prepare_task("mine", task, tmp_path / "prepared", None)
    assert meta["splits"] == {"train": 19, "val": 5, "test": 6}  # 30 → 6 test, then 24 → 5 val
    assert read_meta(tmp_path / "prepared")["provenance"]["split_folders"] == []


def test_own_data_example_config_plans_its_jobs(tmp_path):
    _image_folder(tmp_path / "my_images")
    result = snakemake(tmp_path, "-n", "--quiet", "rules", config=ROOT / "config" / "own_data.yaml")
    assert planned_jobs(result.stdout + result.stderr) == SNIPPET_JOBS


def test_local_model_source_records_the_file_sha256(tmp_path):
    weights = _weights(tmp_path / "mine.safetensors", "vit_tiny_patch16_224", TINY)
    settings = build("fetch", {"model": "mine", "source": "local", "path": str(weights),
                               "timm_name": "vit_tiny_patch16_224", "kwargs": TINY, "img_size": 32})
    record = fetch(settings, tmp_path / "ckpt" / "mine.safetensors")
    assert record["provenance"]["sha256"] == sha256_file(weights)
    assert record["provenance"]["kind"] == "local" and record["provenance"]["pretrained_num_classes"] == 10
    model, _ = load_checkpoint(tmp_path / "ckpt" / "mine.safetensors", num_classes=4)
    original = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY)
    original.load_state_dict(load_file(str(weights)))
    assert torch.equal(model.blocks[1].mlp.fc2.weight, original.blocks[1].mlp.fc2.weight)


def test_recommend_takes_a_timm_name_from_the_hub_cache(tmp_path):
    name, tag, commit = "vit_tiny_patch16_224", "augreg_in21k", "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / f"models--timm--{name}.{tag}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    _weights(snapshot / "model.safetensors", name, {}, num_classes=21843)
    data = _image_folder(tmp_path / "data", classes=("x",), per_class=3)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, "-m", "vitplasticity.cli", "recommend", "--model", f"{name}.{tag}",
                             "--data", str(data), "--pairs", "4", "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "report" / "workflow_config.yaml").read_text())
    assert config["models"]["model"] == {"source": "timm", "timm_name": name, "pretrained_tag": tag,
                                         "img_size": 224, "head": "native"}
    assert f'timm.create_model("{name}.{tag}", pretrained=True, num_classes=NUM_CLASSES)' in (
        tmp_path / "report" / "report.md").read_text()


def _ranking(values: dict[str, float], mode: str = "embedding") -> pd.DataFrame:
    rows = sorted(values.items(), key=lambda item: -item[1])
    return pd.DataFrame([{"mode": mode, "component": c, "label": components.LABELS[c], "mean": v, "ci95": 0.0,
                          "rank": rank} for rank, (c, v) in enumerate(rows, start=1)])


PAPER_LIKE = {"mha": 2.0, "fc1": 1.2, "fc2": 0.9, "ln2": 0.5, "ln1": 0.4}


def test_conditions_hold_at_the_papers_token_scale_and_fail_far_from_it():
    """The paper's r = 19.4 at d = 768 is σ = 0.70. The DINOv2-S case (RMS 1.71 at d = 384, σ = 0.087) is 8.0
    times below it, with LayerNorms 22.1 against FC1 0.68 (32 times): two conditions fail."""
    paper = recommend.conditions(_ranking(PAPER_LIKE), {"downstream_rms_token_norm": 19.4, "embed_dim": 768},
                                 ("embedding",))
    assert [(c.name, c.holds) for c in paper] == [("token scale", True), ("layer norms not dominant", True)]
    dino = recommend.conditions(_ranking({"ln2": 22.1, "ln1": 17.9, "fc1": 0.68, "fc2": 0.36, "mha": 0.05}),
                                {"downstream_rms_token_norm": 1.71, "embed_dim": 384}, ("embedding",))
    assert [(c.name, c.holds) for c in dino] == [("token scale", False), ("layer norms not dominant", False)]
    assert dino[0].text.startswith("the embedding's token σ (RMS token norm 1.71 / √384) is 0.0873, 8.0 times below "
                                   "the paper's 0.70")
    assert dino[1].text.startswith("the most plastic LayerNorm is 32.5 times the most plastic linear component")
    both = pd.concat([_ranking(PAPER_LIKE), _ranking({**PAPER_LIKE, "fc1": 3.0}, mode="hidden")])
    agree = recommend.conditions(both, {"downstream_rms_token_norm": 19.4, "embed_dim": 768}, ("embedding", "hidden"))
    assert agree[2] == recommend.Condition("modes agree", False, "the most plastic component per mode: embedding "
                                           "MHA, hidden FC1; they disagree.")


def _scaled_embedding(model: torch.nn.Module, factor: float) -> None:
    """E = patch_embed(x) + pos_embed (with the class token) times `factor`: every term scaled."""
    with torch.no_grad():
        for tensor in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.pos_embed, model.cls_token):
            tensor.mul_(factor)


def test_the_headline_is_withheld_when_the_embedding_is_scaled_down_tenfold(tmp_path, capsys):
    """A tiny ViT whose embedding is set to the paper's token σ, then the same model with E scaled down 10×:
    the first report gives the paper's answer, the second names the failed condition and withholds it."""
    data = _image_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY)
    norm = timm.data.resolve_data_config({}, model=model)
    pixels = np.stack([fit_square(Image.open(path).convert("RGB"), 32) for path in sorted(data.rglob("*.png"))])
    images = transforms.eval_batch(pixels, 32, torch.device("cpu"), norm["mean"], norm["std"])
    with torch.no_grad():
        sigma = float(model._pos_embed(model.patch_embed(images)).square().mean().sqrt())
    _scaled_embedding(model, recommend.PAPER_TOKEN_SIGMA / sigma)
    reports = {}
    for name, factor in (("paper_scale", 1.0), ("tenfold_smaller", 0.1)):
        _scaled_embedding(model, factor)
        weights = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                                  json.dumps(TINY), "--data", str(data), "--pairs", "30", "--out", str(tmp_path / name))
        assert code == 0, err
        reports[name] = (tmp_path / name / "report.md").read_text()
    assert "- holds: token scale:" in reports["paper_scale"]
    assert "- **does not hold**: token scale:" in reports["tenfold_smaller"]
    assert "**No settled answer: the paper's criterion points to" in reports["tenfold_smaller"]


def test_split_folders_are_splits_and_only_train_is_measured(tmp_path, capsys):
    """--data with train/ and test/ is two splits, not two classes: the train split's three classes are read, and
    no test image is paired."""
    data = tmp_path / "split"
    _image_folder(data / "train", classes=("cat", "dog", "fox"), per_class=2, seed=1)
    _image_folder(data / "test", classes=("cat", "dog", "fox"), per_class=1, seed=2)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "report"
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--pairs", "10", "--out", str(out))
    assert code == 0, err
    paired = pd.read_csv(out / "pairs.csv")
    assert {name.split("/")[0] for name in [*paired["first"], *paired["second"]]} == {"cat", "dog", "fox"}
    assert json.loads((out / "token_norms.json").read_text())["images"] == 6
    assert "its train/ split (6 images) was measured, and its test images were not looked at" in (
        (out / "report.md").read_text())


def test_one_class_is_measured_with_its_meaning_said_and_refused_by_the_study(tmp_path, capsys):
    data = _image_folder(tmp_path / "one", classes=("cat",), per_class=4)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "report"
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--pairs", "6", "--out", str(out))
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "--data holds one class: plasticity needs no labels, so the measurement stands" in report
    assert "Relative gradient norm and Fisher were skipped: they need labels, and --data holds one class." in report
    assert "fisher" not in set(pd.read_csv(out / "criteria.csv")["criterion"])
    result = snakemake(tmp_path, "-n", config=out / "workflow_config.yaml", check=False)
    assert result.returncode != 0
    assert (f"config key 'tasks.my_images.data.path': {data} holds one class (cat), and experiment 'main' finetunes "
            "a classifier on it; put the images in at least two class sub-folders") in result.stderr


def test_an_image_size_the_study_refuses_is_refused_before_measuring(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", per_class=2)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps({**TINY, "img_size": 36}), "--data", str(data), "--out", str(tmp_path / "r"))
    assert code == 2 and not (tmp_path / "r").exists()
    assert err == ("vitplasticity recommend: error: the model as given cannot run in the study the report writes: "
                   "config key 'models.model.img_size': 36 is not divisible by the patch size 8; choose a multiple "
                   "of 8\n")


def test_the_report_leads_with_every_criterion_side_by_side(tiny_report):
    """Each criterion measured (both plasticity modes, relative gradient norm, Fisher, FPS, KappaTune, size) ranks
    the five components; size's ranking is hand-checkable (d = 32: MHA 4·32² + 4·32 = 4,224 = FC1 > FC2 4,128 >
    LayerNorms 64), KappaTune has no κ for a LayerNorm, and plasticity's is the ranking's."""
    _, out = tiny_report
    chosen = pd.read_csv(out / "criteria.csv").set_index("criterion")
    assert chosen.index.tolist() == ["plasticity_embedding", "plasticity_hidden", "relative_gradient_norm", "fisher",
                                     "fps", "kappatune", "trainable_params"]
    assert chosen.loc["trainable_params", "ranking"] == "MHA = FC1 > FC2 > LN1 = LN2"
    assert chosen.loc["trainable_params", "first"] == "mha"
    assert chosen.loc["kappatune", "order"].split()[-2:] == ["ln1", "ln2"]
    ranking = pd.read_csv(out / "ranking.csv")
    assert chosen.loc["plasticity_embedding", "order"].split() == ranking[ranking["mode"] == "embedding"][
        "component"].tolist()
    assert (chosen["wall_s"] > 0).all()
    report = (out / "report.md").read_text()
    assert re.findall(r"^## .*", report, flags=re.M)[0] == "## What each criterion would train"
    assert "| plasticity, embedding mode (the paper's answer) |" in report
    assert "The gradient criteria use the labels of --data's 3 classes: a fresh linear head's cross-entropy on 18 " \
           "images." in report
    assert "- **does not hold**: criteria agree on the top choice: the criteria disagree on the top choice (" in report


def _scores(values: dict[str, list[float]]) -> pd.DataFrame:
    """Two layers per component, each scoring `values[criterion]` in `BLOCK_COMPONENTS` order (ln1 mha ln2 fc1 fc2)."""
    return pd.DataFrame([{"criterion": name, "component": c, "layer": layer, "value": v}
                         for name, row in values.items() for c, v in zip(components.BLOCK_COMPONENTS, row, strict=True)
                         for layer in (0, 1)])


def test_criteria_agree_or_disagree_on_the_top_choice():
    """KappaTune (lower first, LayerNorms unscored) and plasticity put FC1 first: they agree whatever size says;
    Fisher's MHA makes them disagree, and the condition names who chooses what."""
    agreeing = recommend.side_by_side(_scores({"plasticity_embedding": [0.1, 0.2, 0.3, 5.0, 0.4],
                                               "kappatune": [np.nan, 3.0, np.nan, 1.0, 2.0],
                                               "trainable_params": [2, 8, 2, 8, 7]}),
                                      {"plasticity_embedding": 1.0, "kappatune": 2.0, "trainable_params": 0.0})
    assert agreeing["ranking"].tolist() == ["FC1 > FC2 > LN2 > MHA > LN1", "FC1 > FC2 > MHA > LN1 = LN2",
                                            "MHA = FC1 > FC2 > LN1 = LN2"]
    assert recommend.agreement(agreeing) == (True, "every criterion but size puts FC1 first.")
    disagreeing = recommend.side_by_side(_scores({"plasticity_embedding": [0.1, 0.2, 0.3, 5.0, 0.4],
                                                  "fisher": [1.0, 9.0, 2.0, 3.0, 4.0],
                                                  "kappatune": [np.nan, 3.0, np.nan, 1.0, 2.0]}),
                                         {"plasticity_embedding": 1.0, "fisher": 2.0, "kappatune": 0.1})
    ranking = recommend.rank_components(pd.DataFrame(
        [{"mode": "embedding", "component": c, "mean": v, "std": 0.0, "n": 10}
         for c, v in zip(components.BLOCK_COMPONENTS, [0.1, 0.2, 0.3, 5.0, 0.4], strict=True)]))
    found = {c.name: c for c in recommend.conditions(ranking, {"downstream_rms_token_norm": 19.4, "embed_dim": 768},
                                                       ("embedding",), disagreeing)}
    assert not found["criteria agree on the top choice"].holds
    assert found["criteria agree on the top choice"].text == (
        "the criteria disagree on the top choice (FC1 by plasticity_embedding, kappatune; MHA by fisher).")


def test_criterion_picks_what_the_freeze_list_and_lora_train(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", per_class=2)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "report"
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--pairs", "10", "--criterion", "trainable_params",
                              "--out", str(out))
    assert code == 0, err
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY)
    assert (out / "trainable_parameters.txt").read_text().split() == [
        n for n, _ in model.named_parameters() if components.component_of(n) in {"mha", "head"}]
    lora = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert lora["target_modules"] == r"blocks\.\d+\.attn\.(qkv|proj)"
    assert "the first choice of size (trainable parameters) (`--criterion trainable_params`" in (
        (out / "report.md").read_text())


@pytest.mark.parametrize(("args", "message"), [
    (["--criterion", "plasticity_scale_free"], "--criterion plasticity_scale_free is plasticity in scale_free mode, "
     "which --modes embedding does not measure; add scale_free to --modes"),
    (["--criterion", "loss"], "--criterion loss unknown; known: plasticity_embedding, plasticity_hidden, "
     "plasticity_scale_free, relative_gradient_norm, fisher, fps, kappatune, trainable_params"),
    (["--criterion", "fisher", "--one-class"], "--criterion fisher needs labels, and --data holds one class; put the "
     "images in class sub-folders (two or more) or choose another criterion"),
    (["--arch-kwargs", json.dumps({**TINY, "pretrained_cfg_overlay": {"mean": [0, 0, 0]}})],
     "--arch-kwargs pretrained_cfg_overlay: preprocessing is not read from timm's pretrained config here; mean and "
     "std come from the --arch tag (or the checkpoint), the input size from img_size, and images are resized "
     "(bilinear) and centre-cropped; remove it"),
])
def test_what_cannot_be_measured_as_asked_is_one_line_before_any_work(args, message, tmp_path, capsys):
    classes = ("cat",) if "--one-class" in args else ("cat", "dog")
    data = _image_folder(tmp_path / "data", classes=classes, per_class=3)
    args = [a for a in args if a != "--one-class"]
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    kwargs = [] if "--arch-kwargs" in args else ["--arch-kwargs", json.dumps(TINY)]
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", *kwargs,
                              "--data", str(data), *args, "--out", str(tmp_path / "r"))
    assert code == 2 and not (tmp_path / "r").exists()
    assert err == f"vitplasticity recommend: error: {message}\n"


def test_the_normalisation_of_the_tag_is_measured_and_shown(tmp_path, capsys):
    """One weights file under two timm tags (DINO: ImageNet mean/std; AugReg: 0.5): each report measures and states
    its own; the embedding's token norm differs, so the normalisation reached the measurement."""
    data = _image_folder(tmp_path / "data", per_class=2)
    weights = _weights(tmp_path / "small.safetensors", "vit_small_patch16_224", TINY)
    norms = {}
    for tag in ("dino", "augreg_in21k"):
        out = tmp_path / tag
        code, _, err = _recommend(capsys, "--model", str(weights), "--arch", f"vit_small_patch16_224.{tag}",
                                  "--arch-kwargs", json.dumps(TINY), "--data", str(data), "--pairs", "10",
                                  "--out", str(out))
        assert code == 0, err
        cfg = timm.models.get_pretrained_cfg(f"vit_small_patch16_224.{tag}")
        report = (out / "report.md").read_text()
        assert (f"Input: each image resized (shorter side, bilinear, antialiased) to 32 px and centre-cropped, "
                f"normalised with mean {list(cfg.mean)} and std {list(cfg.std)}. timm's pretrained config of this "
                "model names interpolation bicubic and crop_pct 0.9;") in report
        norms[tag] = json.loads((out / "token_norms.json").read_text())["downstream_rms_token_norm"]
        assert (tokens := json.loads((out / "token_norms.json").read_text())["num_tokens"]) == 17, tokens
    assert norms["dino"] != pytest.approx(norms["augreg_in21k"], rel=1e-3)


def test_imagefolder_reference_stream_puts_every_image_in_test(tmp_path):
    root = _image_folder(tmp_path / "photos", classes=("a", "b"), per_class=5)
    task = {"source": "imagefolder", "path": str(root), "store_size": 16, "split_seed": 42, "reference_stream": True}
    meta = prepare_task("reference", task, tmp_path / "prepared", None)
    assert meta["splits"] == {"train": 0, "val": 0, "test": 10}
    assert len(load_split(tmp_path / "prepared", "test").labels) == 10
    _image_folder(root / "train", classes=("a",), per_class=1)
    with pytest.raises(UserError) as error:
        prepare_task("reference", task | {"test_fraction": 0.5}, tmp_path / "again", None)
    assert str(error.value) == (f"image folder {root}: reference_stream puts every image in the test split, so it "
                                "takes no train/ sub-folder or test_fraction; remove them or reference_stream")


def test_only_the_reference_task_may_be_a_reference_stream(tmp_path):
    _image_folder(tmp_path / "my_images")
    config = yaml.safe_load((ROOT / "config" / "own_data.yaml").read_text())
    task = next(iter(config["experiments"].values()))["tasks"][0]
    config["tasks"][task]["data"]["reference_stream"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", config=tmp_path / "config.yaml", check=False)
    assert result.returncode != 0
    assert (f"config key 'tasks.{task}.data.reference_stream': only the plasticity reference task "
            f"('{config['plasticity']['reference_task']}') can put every image in its test split (nothing is left "
            "to train on); remove reference_stream or name the task in plasticity.reference_task") in result.stderr
    config["tasks"][task]["data"]["reference_stream"] = False
    config["tasks"][config["plasticity"]["reference_task"]]["data"]["reference_stream"] = True  # an imagenet_val
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", config=tmp_path / "config.yaml", check=False)
    assert (f"config key 'tasks.{config['plasticity']['reference_task']}.data.reference_stream': only an "
            "imagefolder source can put every image in its test split; remove it") in result.stderr


def test_the_snippet_states_its_size_and_projected_cost(tiny_report):
    """48 runs × 2,000 steps × 128 images at 0.5 s per 4 images = 1,536,000 s = 427 hours; the report states the
    snippet's size and a cost from a training step it timed."""
    _, out = tiny_report
    config = yaml.safe_load((out / "workflow_config.yaml").read_text())
    line = recommend.projected_cost(config, 0.5, 4)
    assert line.startswith("Its size: 8 arms × 3 learning rates × 2 seeds = 48 finetuning runs of 2,000 steps at "
                           "batch 128 and 32 px, about 427 device-hours on the device this report was made on (a "
                           "training step of 4 images with every parameter trained took 0.5 s here")
    report = (out / "report.md").read_text()
    assert "Its size: 8 arms × 3 learning rates × 2 seeds = 48 finetuning runs of 2,000 steps" in report
    assert "`snakemake -s CHECKOUT/Snakefile --directory DIR --cores all --configfile workflow_config.yaml`" in report
    assert "about 8,790 device-hours" in recommend.projected_cost(config, 10.3, 4)  # 8,789.3 to 3 digits, no e+03
    assert recommend.step_seconds(timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY), 32,
                                  torch.device("cpu"), 2) > 0


def test_the_written_study_runs_in_a_folder_of_its_own(tmp_path, capsys, monkeypatch):
    """Relative --model, --data and --reference become absolute paths in the written config, so the study plans the
    same jobs from another folder (`snakemake -s CHECKOUT/Snakefile --directory DIR`)."""
    monkeypatch.chdir(tmp_path)
    _image_folder(tmp_path / "data", per_class=2)
    _image_folder(tmp_path / "photos", classes=("x",), per_class=3, seed=1)
    _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    code, _, err = _recommend(capsys, "--model", "tiny.safetensors", "--arch", "vit_tiny_patch16_224",
                              "--arch-kwargs", json.dumps(TINY), "--data", "data", "--reference", "photos",
                              "--pairs", "10", "--out", "report")
    assert code == 0, err
    config = yaml.safe_load((tmp_path / "report" / "workflow_config.yaml").read_text())
    assert config["tasks"]["my_images"]["data"]["path"] == str(tmp_path / "data")
    assert config["tasks"]["reference"]["data"]["path"] == str(tmp_path / "photos")
    assert config["models"]["model"]["path"] == str(tmp_path / "tiny.safetensors")
    (tmp_path / "study").mkdir()
    written = tmp_path / "report" / "workflow_config.yaml"
    result = snakemake(tmp_path / "study", "-n", "--quiet", "rules", config=written)
    assert planned_jobs(result.stdout + result.stderr) == SNIPPET_JOBS


def test_a_reference_split_into_train_and_test_is_one_line(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", per_class=2)
    _image_folder(tmp_path / "photos" / "train", classes=("x",), per_class=2)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--reference", str(tmp_path / "photos"),
                              "--out", str(tmp_path / "r"))
    assert code == 2 and not (tmp_path / "r").exists()
    assert err == (f"vitplasticity recommend: error: --reference {tmp_path / 'photos'} has a train/ sub-folder, but "
                   "the reference stream is every image of its folder (the study puts them all in the split "
                   "plasticity reads); give a folder of images, flat or in class sub-folders\n")


def test_criteria_beside_plasticity_can_be_narrowed_and_are_checked_before_work(tmp_path, capsys):
    data = _image_folder(tmp_path / "data", per_class=2)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    base = ["--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs", json.dumps(TINY),
            "--data", str(data), "--pairs", "10"]
    code, _, err = _recommend(capsys, *base, "--criteria", "kappatune,bogus", "--out", str(tmp_path / "a"))
    assert code == 2 and not (tmp_path / "a").exists()
    assert err.startswith("vitplasticity recommend: error: --criteria bogus unknown; choose among "
                          "relative_gradient_norm,fisher,fps,kappatune,trainable_params")
    code, _, err = _recommend(capsys, *base, "--criteria", "fisher", "--criterion", "kappatune",
                              "--out", str(tmp_path / "b"))
    assert code == 2 and err == ("vitplasticity recommend: error: --criterion kappatune is not measured: --criteria "
                                 "fisher leaves it out; add kappatune to --criteria\n")
    code, _, err = _recommend(capsys, *base, "--criteria", "", "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert set(pd.read_csv(tmp_path / "c" / "criteria.csv")["criterion"]) == {"plasticity_embedding"}
    assert ("Not measured, as --criteria asked: relative gradient norm, Fisher (SPT), FPS, KappaTune (peft), size "
            "(trainable parameters).") in (tmp_path / "c" / "report.md").read_text()


# TINY's units: LN1 and LN2 64 parameters each, MHA 4·32² + 4·32 = 4,224, FC1 32·128 + 128 = 4,224, FC2 128·32 + 32
# = 4,128; 12,704 a block, 25,408 in the two blocks.
TINY_BLOCK_PARAMS = 25_408


def _budget_run(tmp_path, capsys, *args: str, classes=("cat", "dog", "fox"), per_class=4) -> tuple[int, str, Path]:
    data = _image_folder(tmp_path / "data", classes=classes, per_class=per_class)
    weights = _weights(tmp_path / "tiny.safetensors", "vit_tiny_patch16_224", TINY)
    out = tmp_path / "report"
    code, _, err = _recommend(capsys, "--model", str(weights), "--arch", "vit_tiny_patch16_224", "--arch-kwargs",
                              json.dumps(TINY), "--data", str(data), "--pairs", "10", "--criteria", "trainable_params",
                              *args, "--out", str(out))
    return code, err, out


@pytest.mark.parametrize(("given", "size_units"), [
    # ⌊0.3 · 25,408⌋ = 7,622: size takes MHA.0 (4,224; ties keep layer, then component order), skips FC1.0, MHA.1,
    # FC1.1, FC2.0, FC2.1 (each would exceed it), then the four LayerNorms (4,480).
    ("0.3", ["mha.0", "ln1.0", "ln2.0", "ln1.1", "ln2.1"]),
    # 8,500 parameters: MHA.0 and FC1.0 (8,448); a LayerNorm more would make 8,512.
    ("8500", ["mha.0", "fc1.0"]),
])
def test_budget_selects_the_units_budget_select_gives(given, size_units, tmp_path, capsys):
    from vitplasticity import budget

    code, err, out = _budget_run(tmp_path, capsys, "--budget", given)
    assert code == 0, err
    record = json.loads((out / "selection.json").read_text())
    allowed = 7_622 if given == "0.3" else 8_500
    assert record["budget"] == {"given": float(given), "allowed_params": allowed, "block_params": TINY_BLOCK_PARAMS}
    assert record["criteria"]["trainable_params"]["units"] == size_units
    sizes = budget.unit_sizes(timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY))
    per_layer = pd.read_csv(out / "plasticity_per_layer.csv").assign(criterion="plasticity_embedding",
                                                                      value=lambda frame: frame["mean"])
    spec = {"budget": float(given)} if given == "0.3" else {"params": 8_500}
    expected = budget.select({"selector": "plasticity_embedding", **spec}, sizes,
                             budget.unit_scores(per_layer, "plasticity_embedding"))
    assert record["criteria"]["plasticity_embedding"]["units"] == [budget.unit_label(unit) for unit in expected]
    params = sum(sizes[unit] for unit in expected)
    assert record["criteria"]["plasticity_embedding"]["params"] == params <= allowed
    report = (out / "report.md").read_text()
    assert "## At the budget" in report and f"at most {allowed:,} of the model's 25,408 block parameters" in report


def test_the_artefacts_of_a_criterion_at_a_budget_train_exactly_its_units(tmp_path, capsys):
    """--criterion trainable_params --budget 8500: MHA.0 and FC1.0 (above), the head (the final norm, the linear)."""
    from peft import LoraConfig, get_peft_model

    code, err, out = _budget_run(tmp_path, capsys, "--budget", "8500", "--criterion", "trainable_params")
    assert code == 0, err
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY)
    assert (out / "trainable_parameters.txt").read_text().split() == [
        n for n, _ in model.named_parameters()
        if n.startswith(("blocks.0.attn.", "blocks.0.mlp.fc1.", "norm.", "head."))]
    config = LoraConfig.from_pretrained(str(out / "lora"))
    assert sorted(config.target_modules) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1"]
    assert config.modules_to_save == ["norm", "head"]
    code, err, out = _budget_run(tmp_path / "again", capsys, "--budget", "0.3", "--criterion", "trainable_params")
    assert code == 0, err
    config = LoraConfig.from_pretrained(str(out / "lora"))
    assert sorted(config.target_modules) == ["blocks.0.attn.proj", "blocks.0.attn.qkv"]
    assert config.modules_to_save == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2", "norm",
                                      "head"]
    trained = {n.removeprefix("base_model.model.") for n, p in get_peft_model(model, config).named_parameters()
               if p.requires_grad}
    assert {n.split(".lora_")[0] for n in trained if ".lora_" in n} == {"blocks.0.attn.qkv", "blocks.0.attn.proj"}
    assert {n.split(".modules_to_save")[0] for n in trained if ".modules_to_save." in n} == set(
        config.modules_to_save)
    assert "the units size (trainable parameters) selects within the budget (LN1 0–1 · MHA 0 · LN2 0–1: 4,480 " \
           "block parameters)" in (out / "report.md").read_text()


@pytest.mark.parametrize(("given", "message"), [
    ("0", "--budget 0: give a fraction of the block parameters in (0, 1], e.g. 0.028, or a whole count of "
          "parameters, e.g. 2000000"),
    ("-3", "--budget -3: give a fraction of the block parameters in (0, 1], e.g. 0.028, or a whole count of "
           "parameters, e.g. 2000000"),
    ("1.5", "--budget 1.5: give a fraction of the block parameters in (0, 1], e.g. 0.028, or a whole count of "
            "parameters, e.g. 2000000"),
    ("30000", "--budget 30,000 parameters is more than the model's 25,408 block parameters; give a count up to "
              "25,408 or a fraction, e.g. 0.028"),
    ("0.002", "--budget 0.002 allows 50 block parameters, fewer than the smallest unit (ln1.0, 64); give at least 64 "
              "parameters"),
])
def test_a_budget_that_cannot_select_is_one_line_before_any_work(given, message, tmp_path, capsys):
    code, err, out = _budget_run(tmp_path, capsys, "--budget", given)
    assert code == 2 and not out.exists()
    assert err == f"vitplasticity recommend: error: {message}\n"


def test_the_pilot_trains_every_distinct_selection_the_probe_and_random_within_its_steps(tmp_path, capsys,
                                                                                        monkeypatch):
    from vitplasticity import budget, training

    steps, read = [], {}
    step, reader = training.train_step, recommend.read_images
    monkeypatch.setattr(training, "train_step", lambda *args: steps.append(1) or step(*args))

    def spy(files, rows, size, what):  # the images each reading names (what: "images", "labelled images", …)
        read[what] = read.get(what, set()) | {files.names[i] for i in rows}
        return reader(files, rows, size, what)

    monkeypatch.setattr(recommend, "read_images", spy)
    code, err, out = _budget_run(tmp_path, capsys, "--budget", "0.3", "--pilot", "--pilot-steps", "3",
                                 "--pilot-images", "12", "--pilot-seeds", "2", "--criteria", "fps,trainable_params",
                                 "--seed", "3")
    assert code == 0, err
    pilot = json.loads((out / "selection.json").read_text())["pilot"]
    # 12 images, 4 a class: the 2nd of each class is held out (the 6th, 10th, … of none).
    assert (pilot["train_images"], pilot["held_out_images"], pilot["steps"], pilot["seeds"]) == (9, 3, 3, [3, 4])
    held_out = set(pilot["held_out_files"])
    assert sorted(name.split("/")[0] for name in held_out) == ["cat", "dog", "fox"]
    # Set aside before anything is measured: FPS read the 9 others (all it may, under its 128), plasticity's pairs
    # none of them; the pilot read all 12.
    assert len(read["pilot images"]) == 12 and held_out < read["pilot images"]
    assert read["labelled images"] == read["pilot images"] - held_out
    assert read["images"] <= read["pilot images"] - held_out
    runs = pilot["runs"]
    assert runs[0]["chosen_by"] == ["linear probe"] and runs[0]["units"] == []
    assert runs[0]["trainable_params"] == 64 + 32 * 3 + 3  # the final norm and the 3-class linear head
    criteria = json.loads((out / "selection.json").read_text())["criteria"]
    chosen = {frozenset(criteria[name]["units"]) for name in ("plasticity_embedding", "fps", "trainable_params")}
    random_units = next(run["units"] for run in runs if "random" in run["chosen_by"])
    sizes = budget.unit_sizes(timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY))
    assert sorted(random_units) == sorted(map(budget.unit_label, budget.select(
        {"selector": "random", "params": 7_622, "draw": 3}, sizes)))  # the draw is --seed
    assert len(runs) == 1 + len(chosen | {frozenset(random_units)})  # one run per distinct selection
    assert sorted(name for run in runs for name in run["chosen_by"]) == sorted(
        ["linear probe", "plasticity_embedding", "fps", "random", "trainable_params"])
    assert all(run["steps"] == [3, 3] for run in runs)
    assert len(steps) == len(runs) * 2 * 3  # optimizer steps: runs × seeds × --pilot-steps
    assert all(round(accuracy * 3 / 100, 9) in (0, 1, 2, 3) for run in runs for accuracy in run["val_acc"])  # of 3
    report = (out / "report.md").read_text()
    assert "| selection | chosen by | trainable parameters | held-out accuracy (%) |" in re.sub(r" +", " ", report)
    assert "| head only | linear probe (baseline) | 163 |" in re.sub(r" +", " ", report)
    assert ("for 3 SGD steps of 8 images (lr 0.01: `--pilot-lr`, momentum 0.9, cosine decay, the study's crops and "
            "flips; `--pilot-steps`) on 9 images of --data, and is evaluated once, at the end, on 3 other "
            "images") in report
    assert "How far to trust it: 3 steps are the start of finetuning, not its end" in report


@pytest.mark.parametrize(("args", "classes", "message"), [
    (["--budget", "0.3", "--pilot"], ("cat",), "--pilot needs labels, and --data holds one class; put the images in "
     "class sub-folders (two or more), or leave --pilot out"),
    (["--pilot"], ("cat", "dog"), "--pilot finetunes each criterion's selection at a budget; give --budget too, e.g. "
     "--budget 0.028"),
    (["--budget", "0.3", "--pilot-steps", "3"], ("cat", "dog"), "--pilot-steps is a setting of the pilot, and --pilot "
     "is not given; add --pilot or remove it"),
    (["--budget", "0.3", "--pilot-lr", "0.1"], ("cat", "dog"), "--pilot-lr is a setting of the pilot, and --pilot "
     "is not given; add --pilot or remove it"),
    (["--budget", "0.3", "--pilot", "--pilot-lr", "0"], ("cat", "dog"), "--pilot-lr 0: give an SGD learning rate "
     "above 0 and below 10, e.g. 0.03"),
    (["--budget", "0.3", "--pilot", "--pilot-seconds", "0.5"], ("cat", "dog"), "--pilot-seconds 0.5: give 1 or more"),
])
def test_a_pilot_that_cannot_run_is_one_line_before_any_work(args, classes, message, tmp_path, capsys):
    code, err, out = _budget_run(tmp_path, capsys, *args, classes=classes)
    assert code == 2 and not out.exists()
    assert err == f"vitplasticity recommend: error: {message}\n"


def test_unit_agreement_names_what_every_criterion_most_and_few_select():
    """Size is left out; of three criteria, two make 'most' and one is 'few' (half or fewer)."""
    found = recommend.unit_agreement({"plasticity_embedding": [("mha", 1), ("ln1", 0)],
                                      "fisher": [("ln1", 0), ("mha", 1), ("fc1", 0)],
                                      "fps": [("ln1", 0), ("fc2", 1)], "trainable_params": [("mha", 0)]})
    assert found == {"compared": ["plasticity_embedding", "fisher", "fps"], "all": [("ln1", 0)],
                     "most": [("mha", 1)], "few": {("fc1", 0): ["fisher"], ("fc2", 1): ["fps"]}}
    assert recommend.units_text([("ln1", 0), ("ln1", 1), ("ln1", 2), ("mha", 5), ("ln1", 7), ("ln1", 8)]) == (
        "LN1 0–2, 7–8 · MHA 5")


def test_the_pilot_holds_out_the_2nd_and_6th_image_of_each_class_and_no_criterion_reads_them(tmp_path):
    """12 images: cat 8, dog 3, fox 1, all drawn; held out per class in the seeded draw's order: the 2nd and 6th cat,
    the 2nd dog, no fox (its one image trains)."""
    for label, count in (("cat", 8), ("dog", 3), ("fox", 1)):
        _image_folder(tmp_path / "data", classes=(label,), per_class=count, seed=count)
    data = recommend._open_folder(tmp_path / "data", "--data")
    request = recommend.Request(model="m", data=tmp_path / "data", out=tmp_path / "out", budget=0.3, pilot=True,
                                pilot_images=12, seed=5)
    plan = recommend.plan_pilot(request, data, torch.device("cpu"))
    drawn = np.random.default_rng(5).permutation(12)
    in_order = {label: [row for row in drawn if data.labels[row] == label] for label in range(3)}
    assert sorted(plan.held_out_rows) == sorted([in_order[0][1], in_order[0][5], in_order[1][1]])
    assert sorted(np.concatenate([plan.train_rows, plan.held_out_rows])) == list(range(12))
    assert list(recommend.measured_rows(data, plan)) == sorted(plan.train_rows)
    assert list(recommend.measured_rows(data, None)) == list(range(12))
    again = recommend.plan_pilot(request, data, torch.device("cpu"))  # seeded: the same images
    assert again.held_out_rows.tolist() == plan.held_out_rows.tolist()


def test_a_budget_of_exactly_the_smallest_unit_selects_it():
    """Units of 64 (two LayerNorms) and 4,224: 64 parameters allow one LayerNorm, 63 none."""
    sizes = {("ln1", 0): 64, ("mha", 0): 4_224, ("ln2", 0): 64}
    assert recommend.budget_allowance(64, sizes) == 64
    assert recommend.budget_allowance(0.5, sizes) == 2_176  # ⌊0.5 · 4,352⌋
    with pytest.raises(UserError, match=r"^--budget 63 allows 63 block parameters, fewer than the smallest unit "
                                        r"\(ln1\.0, 64\); give at least 64 parameters$"):
        recommend.budget_allowance(63, sizes)


@pytest.mark.parametrize(("given", "step_s", "steps"), [
    (None, 0.1, 100),  # 120 s / (8 runs x 0.1 s) = 150 steps: the CPU's ceiling of 100
    (None, 1.0, 15),   # 120 / 8 = 15
    (None, 10.0, 5),   # 1.5 steps fit: the floor of 5 (a ViT-B/16 on a CPU)
    (7, 10.0, 7),      # --pilot-steps wins, and no step time is recorded
])
def test_the_pilots_steps_fill_its_seconds_within_the_devices_bounds(given, step_s, steps, tmp_path):
    _image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=4)
    data = recommend._open_folder(tmp_path / "data", "--data")
    request = recommend.Request(model="m", data=tmp_path / "data", out=tmp_path / "out", budget=0.3, pilot=True,
                                pilot_steps=given)
    plan = recommend.plan_pilot(request, data, torch.device("cpu"))
    assert (plan.seconds, plan.bounds, plan.batch) == (120.0, (5, 100), 8)
    chosen = recommend.pilot_steps(plan, 8, step_s)
    assert chosen.steps == steps
    assert math.isnan(chosen.step_s) if given else chosen.step_s == step_s


def test_data_too_small_once_the_pilot_holds_out_is_one_line_before_any_work(tmp_path, capsys):
    """2 images a class, 2 classes: the pilot holds out the 2nd of each, leaving 2 images, 1 pair, to measure."""
    code, err, out = _budget_run(tmp_path, capsys, "--budget", "0.3", "--pilot", classes=("cat", "dog"),
                                 per_class=2)
    assert code == 2 and not out.exists()
    assert err == (f"vitplasticity recommend: error: --data {tmp_path / 'data'} holds 2 images besides the 2 --pilot "
                   "holds out: they make 1 distinct pair, and plasticity needs at least 2; give 3 images or more (or "
                   "a --reference folder)\n")
