"""`vitplasticity recommend` end to end, the imagefolder task source and the local model source."""

from __future__ import annotations

import json
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
from vitplasticity.fileio import sha256_file
from vitplasticity.jobs import fetch
from vitplasticity.models import load_checkpoint
from vitplasticity.prepared import load_split, read_meta
from vitplasticity.recommend import cross_pairs, lora_plan, unordered_pair, within_pairs

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
    settings = {"source": "local", "path": str(weights), "timm_name": "vit_tiny_patch16_224", "kwargs": TINY,
                "img_size": 32}
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
    assert "--data holds one class: plasticity needs no labels, so the measurement stands" in (
        (out / "report.md").read_text())
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
