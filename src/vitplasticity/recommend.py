"""`vitplasticity recommend`: which components of a pretrained ViT to finetune on your images.

From a model (a timm name, a weights file and its timm architecture, or a checkpoint this
project wrote) and an image folder, measure each block component's plasticity
(`plasticity.measure`, study-spec §3) and write a report folder:

- ``report.md``: the ranking, what it means, and every artefact below in one page;
- ``ranking.csv`` (per mode and component: mean over layers, 95% CI, layer range, rank),
  ``plasticity_per_layer.csv``, ``token_norms.json``, ``plasticity_vs_depth.{png,pdf}``;
- ``trainable_parameters.txt``: the parameters to unfreeze (the recommended component in
  every block, plus the head), one name a line;
- ``lora/adapter_config.json``: a `peft` LoraConfig on the most plastic linear component;
- ``workflow_config.yaml``: the study config that runs every finetuning arm on these images;
- ``pairs.csv``: which two images each pair holds (first: --reference, or --data when no
  reference is given; second: --data), by path inside the folder.

The folder appears whole or not at all.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from vitplasticity import models, plasticity
from vitplasticity.components import (
    BLOCK_COMPONENTS,
    LABELS,
    THEORETICAL_RANK,
    count_by_component,
    describe,
    has_attention_pool,
    set_trainable,
    use_linear_head,
)
from vitplasticity.config import check_model_shape
from vitplasticity.datasets.imagefiles import ImageFiles
from vitplasticity.datasets.images import fit_square
from vitplasticity.errors import UserError
from vitplasticity.fileio import atomic_dir, check_writable
from vitplasticity.prepared import Split
from vitplasticity.runtime import pick_device

# Components LoRA can adapt (linear maps); LayerNorms go to `modules_to_save`.
LORA_MODULES = {"mha": r"attn\.(qkv|proj)", "fc1": r"mlp\.fc1", "fc2": r"mlp\.fc2"}
SAVED_MODULES = {"ln1": ["norm1"], "ln2": ["norm2"], "mha": ["ls1"], "fc2": ["ls2"]}
ARMS = {"all": ["emb", *BLOCK_COMPONENTS], **{c: [c] for c in BLOCK_COMPONENTS},
        "smooth": ["ln1", "ln2"], "non_smooth": ["mha", "fc1", "fc2"]}


@dataclass
class Request:
    """What the user asked for (`vitplasticity recommend --help`)."""

    model: str
    data: Path
    out: Path
    arch: str | None = None
    arch_kwargs: dict | None = None
    reference: Path | None = None
    pairs: int = 2000
    modes: tuple[str, ...] = ("embedding",)
    head: str = "linear"
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0


@dataclass
class Model:
    """The model to measure, its checkpoint record, and how to build it again in user code."""

    network: torch.nn.Module
    record: dict
    name: str  # how the report names it
    create: str  # the timm.create_model(...) call that loads its pretrained weights
    config: dict  # its entry under `models:` in a study config


def open_model(spec: str, arch: str | None, head: str, arch_kwargs: dict | None = None) -> Model:
    """A timm name ('vit_base_patch16_224.augreg_in21k'), a weights file with `arch`, or a checkpoint
    with its sidecar (written by this project's fetch/pretrain)."""
    path = Path(spec).expanduser()
    if path.is_file():
        sidecar = models.sidecar_path(path)
        if arch is None and path.suffix == ".safetensors" and sidecar.exists():
            model, record = models.load_checkpoint(path, num_classes=0)
            if head == "linear" and has_attention_pool(model):
                use_linear_head(model)
                record = dict(record, arch=dict(record["arch"], head="linear"))
            kwargs = record["arch"].get("kwargs", {})
            create = _create_call(record["arch"]["timm_name"], kwargs, file=path)
            entry = {"source": "local", "path": str(path), "timm_name": record["arch"]["timm_name"],
                     "img_size": record["img_size"], "kwargs": kwargs}
            entry["head"] = record["arch"].get("head", "native")
            return Model(model.eval(), record, path.name, create, entry)
        if arch is None:
            raise UserError(f"{path} is a weights file: name its timm architecture with --arch, "
                            "e.g. --arch vit_base_patch16_224 (a tag such as .augreg_in21k picks its normalisation)")
        timm_name, tag = models.split_timm_name(arch)
        kwargs = arch_kwargs or {}
        model, record = models.open_pretrained("local", timm_name, path=path, pretrained_tag=tag, head=head,
                                               kwargs=kwargs, mean_std="timm")
        entry = {"source": "local", "path": str(path), "timm_name": timm_name, "img_size": record["img_size"]}
        entry |= {"kwargs": kwargs} if kwargs else {}
        entry["head"] = record["arch"].get("head", "native")
        return Model(model, record, path.name, _create_call(timm_name, kwargs, file=path), entry)
    if path.suffix in models.WEIGHT_SUFFIXES or os.sep in spec:
        raise UserError(f"weights file {path} does not exist; check the path given to --model")
    if arch is not None:
        raise UserError("--arch is for a weights file; with a timm name give the name and tag to --model alone")
    timm_name, tag = models.split_timm_name(spec)
    model, record = models.open_pretrained("timm", timm_name, pretrained_tag=tag, head=head, mean_std="timm")
    entry = {"source": "timm", "timm_name": timm_name, "pretrained_tag": tag, "img_size": record["img_size"]}
    return Model(model, record, f"{timm_name}.{tag}", _create_call(f"{timm_name}.{tag}", {}),
                 entry | {"head": record["arch"].get("head", "native")})


def _create_call(name: str, kwargs: dict, file: Path | None = None) -> str:
    extra = f', pretrained_cfg_overlay={{"file": "{file}"}}' if file else ""
    extra += "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f'timm.create_model("{name}", pretrained=True, num_classes=NUM_CLASSES{extra})'


def cross_pairs(n_first: int, n_second: int, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """min(`pairs`, n_first x n_second) distinct (first image, second image) pairs, drawn uniformly without
    repeats from every combination. Two (m,) int64 arrays."""
    drawn = rng.choice(n_first * n_second, size=min(pairs, n_first * n_second), replace=False)
    return drawn // n_second, drawn % n_second


def within_pairs(count: int, pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """min(`pairs`, count (count - 1) / 2) distinct pairs of two different images out of `count` (≥ 2), drawn
    uniformly without repeats from every unordered pair (a distance is symmetric: (a, b) and (b, a) are one
    pair). Two (m,) int64 arrays, first < second."""
    space = count * (count - 1) // 2
    return unordered_pair(rng.choice(space, size=min(pairs, space), replace=False), count)


def unordered_pair(k: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-th pair (i, j), i < j < `count`, of the rows i = 0, 1, … each listing j = i + 1, …, count - 1.
    Row i starts at offset i (2 count - i - 1) / 2; i is found in floating point, then corrected exactly."""
    k = np.asarray(k, dtype=np.int64)
    width = 2 * count - 1
    i = np.floor((width - np.sqrt(np.maximum(width**2 - 8.0 * k, 0.0))) / 2).astype(np.int64)

    def offset(row: np.ndarray) -> np.ndarray:
        return row * (2 * count - row - 1) // 2
    i -= offset(i) > k
    i += offset(i + 1) <= k
    return i, k - offset(i) + i + 1


def read_images(files: ImageFiles, rows: np.ndarray, size: int, what: str) -> np.ndarray:
    """The images at `rows`, each resized (shorter side) and centre-cropped to `size`. uint8 (n, size, size, 3)"""
    out = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        loaded = pool.map(lambda row: fit_square(files[int(row)][0], size), rows)
        for i, image in enumerate(tqdm(loaded, total=len(rows), desc=f"reading {what}", unit="image")):
            out[i] = image
    return out


def _open_folder(path: Path, flag: str, split: str = "") -> ImageFiles:
    """The images of folder `path` (class sub-folders or flat), or of its `split` sub-folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{flag} {path} is not a folder; give a folder of images (class sub-folders allowed)")
    return ImageFiles(path, root=split, flat_class="images")


def data_split(path: Path) -> str:
    """The sub-folder of --data that `recommend` measures: ``train`` when the folder is split into
    ``train/`` (``val/``, ``test/``) as the `imagefolder` source reads it, the data a practitioner
    trains on (no look at the test images); else the whole folder ("")."""
    return "train" if (Path(path).expanduser() / "train").is_dir() else ""


def rank_components(table: pd.DataFrame) -> pd.DataFrame:
    """Per (mode, component): mean over layers of the per-layer means, its 95% CI, layer range and rank.

    CI of the layer mean: 1.96 · sqrt(Σ_l std_l² / n_l) / L (pairs' sampling error, layers
    taken as independent).
    """
    rows = []
    for (mode, component), part in table.groupby(["mode", "component"]):
        layers = len(part)
        rows.append({
            "mode": mode, "component": component, "label": LABELS[component], "mean": part["mean"].mean(),
            "ci95": 1.96 * math.sqrt(float((part["std"] ** 2 / part["n"]).sum())) / layers,
            "layer_min": part["mean"].min(), "layer_max": part["mean"].max(), "layers": layers,
            "theoretical_rank": THEORETICAL_RANK[component],
        })
    frame = pd.DataFrame(rows)
    frame["rank"] = frame.groupby("mode")["mean"].rank(ascending=False, method="first").astype(int)
    return frame.sort_values(["mode", "rank"]).reset_index(drop=True)


def lora_plan(order: list[str], model: torch.nn.Module) -> tuple[str, str, list[str]]:
    """(component LoRA adapts, target_modules regex, modules_to_save) for a plasticity order.

    LoRA adapts the most plastic linear component (its timm modules, fused ``qkv`` included);
    LayerNorm components ranked above it, its LayerScale and the head are trained whole.
    """
    first = next(c for c in order if c in LORA_MODULES)
    saved = [name for c in order[: order.index(first)] for name in SAVED_MODULES[c]]
    if first in SAVED_MODULES and not isinstance(getattr(model.blocks[0], SAVED_MODULES[first][0]),
                                                 torch.nn.Identity):
        saved += SAVED_MODULES[first]
    saved += [name for name in ("norm", "fc_norm", "attn_pool", "head", "head_dist")
              if sum(p.numel() for p in (getattr(model, name, None) or torch.nn.Identity()).parameters())]
    return first, rf"blocks\.\d+\.{LORA_MODULES[first]}", saved


def workflow_config(model: Model, data: Path, reference: Path | None, pairs: int) -> dict:
    """A study config that prepares these images and runs every finetuning arm, the probe and plasticity."""
    size = model.record["img_size"]
    store = max(size, round(size * 256 / 224))
    if reference is not None:
        reference_task = {"data": {"source": "imagefolder", "path": str(reference), "store_size": store}}
    else:
        # The workflow pairs a reference stream with the task: it needs images like the pretraining data.
        reference_task = {"data": {"source": "imagenet_val", "path": "ILSVRC2012_img_val.tar", "order": "file_name",
                                   "store_size": store, "max_images": pairs}}
    entry = {k: str(v) if isinstance(v, Path) else v for k, v in model.config.items()}
    return {
        "study": "own_data",
        "models": {"model": entry},
        "tasks": {"reference": reference_task,
                  "my_images": {"data": {"source": "imagefolder", "path": str(data), "store_size": store},
                                "steps": 2000, "eval_every": 200, "lrs": [0.003, 0.01, 0.03]}},
        "arms": ARMS,
        "finetune": {"batch_size": 128, "warmup_steps": 200, "seeds": [0, 1]},
        "plasticity": {"reference_task": "reference", "n_pairs": pairs, "modes": ["embedding", "hidden"]},
        "experiments": {"main": {"model": "model", "tasks": ["my_images"], "optimizer": "sgd"}},
    }


# The paper's operating point: the authors' token radius r = 19.4 (RMS token norm of E, CIFAR-10 test images,
# ViT-B/16 in21k, d = 768; study-spec §4), a token standard deviation σ = r / √d ≈ 0.70.
PAPER_TOKEN_SIGMA = 19.4 / 768**0.5
TOKEN_SIGMA_FACTOR = 3.0  # σ more than this many times off the paper's: its reading of the LayerNorms is in doubt
LAYERNORM_DOMINANCE = 10.0  # a LayerNorm this many times every linear component's plasticity: its 1/σ speaks


@dataclass(frozen=True)
class Condition:
    """One condition under which the paper's reading (most plastic = finetune best) was observed."""

    name: str
    holds: bool
    text: str


def conditions(ranking: pd.DataFrame, stats: dict, modes: tuple[str, ...]) -> list[Condition]:
    """The paper's conditions, checked on this measurement (the first of `modes` is the one reported):

    - token scale: the embedding's token standard deviation σ = RMS token norm / √d on the user's images within
      `TOKEN_SIGMA_FACTOR` of the paper's (`PAPER_TOKEN_SIGMA`); a LayerNorm's rate of change scales as
      max|γ| / σ (study-spec §8), so far from it the LayerNorms' place in the ranking is set by the scale of E;
    - LayerNorms not dominant: no LayerNorm above `LAYERNORM_DOMINANCE` times every linear component;
    - modes agree: every measured mode puts the same component first.
    """
    rms, width = stats["downstream_rms_token_norm"], stats["embed_dim"]
    sigma = rms / width**0.5
    factor = max(sigma / PAPER_TOKEN_SIGMA, PAPER_TOKEN_SIGMA / sigma)
    found = [Condition(
        "token scale", factor <= TOKEN_SIGMA_FACTOR,
        f"the embedding's token σ (RMS token norm {rms:.3g} / √{width}) is {sigma:.3g}, {factor:.1f} times "
        f"{'below' if sigma < PAPER_TOKEN_SIGMA else 'above'} the paper's {PAPER_TOKEN_SIGMA:.2f} (r = 19.4 at "
        f"d = 768); a LayerNorm's plasticity scales as 1/σ, so "
        + ("it is comparable with the paper's." if factor <= TOKEN_SIGMA_FACTOR else
           "the LayerNorms' place in this ranking reflects the scale of E more than their use for finetuning."))]
    part = ranking[ranking["mode"] == modes[0]].set_index("component")["mean"]
    norms, linear = part[["ln1", "ln2"]], part[["mha", "fc1", "fc2"]]
    ratio = norms.max() / linear.max() if linear.max() > 0 else math.inf
    found.append(Condition(
        "layer norms not dominant", ratio <= LAYERNORM_DOMINANCE,
        f"the most plastic LayerNorm is {ratio:.3g} times the most plastic linear component ({modes[0]} mode)"
        + ("." if ratio <= LAYERNORM_DOMINANCE else
           f", over {LAYERNORM_DOMINANCE:g} times: the ranking is led by the LayerNorms' 1/σ scaling.")))
    firsts = {mode: ranking[ranking["mode"] == mode].iloc[0]["component"] for mode in modes}
    if len(firsts) > 1:
        agree = len(set(firsts.values())) == 1
        found.append(Condition("modes agree", agree, "the most plastic component per mode: " + ", ".join(
            f"{mode} {LABELS[c]}" for mode, c in firsts.items()) + ("." if agree else "; they disagree.")))
    return found


def _words(ranking: pd.DataFrame, stats: dict, modes: tuple[str, ...], within: bool, counts: dict) -> list[str]:
    mode = modes[0]
    part = ranking[ranking["mode"] == mode]
    order = part["component"].tolist()
    top, second = part.iloc[0], part.iloc[1]
    failed = [c for c in conditions(ranking, stats, modes) if not c.holds]
    measured = (f"P = {top['mean']:.4g} ± {top['ci95']:.2g} (mean over layers, 95% CI), "
                f"{counts[top['component']]:,} parameters over all blocks.")
    if failed:
        lines = [f"**No settled answer: the paper's criterion points to {top['label']}, but "
                 f"{' and '.join(c.name for c in failed)} {'does' if len(failed) == 1 else 'do'} not hold** (see "
                 f"Conditions). {top['label']} is the most plastic component in {mode} mode, {measured} Compare "
                 "the arms by finetuning on your data (the workflow config below) before trusting this order."]
    else:
        lines = [f"**Finetune {top['label']}** (with the head), the paper's answer: it is the most plastic "
                 f"component in {mode} mode, {measured}"]
    lines.append("Order, most plastic first: " + " > ".join(f"{r.label} {r.mean:.3g}" for r in part.itertuples())
                 + ".")
    if top["mean"] - top["ci95"] <= second["mean"] + second["ci95"]:
        lines.append(f"{top['label']} and {second['label']} overlap within their 95% CIs: either is a sound choice; "
                     "the workflow config below compares them by finetuning.")
    theory = sorted(BLOCK_COMPONENTS, key=THEORETICAL_RANK.get)
    agree = "agrees with" if order == theory else "differs from"
    lines.append(f"This order {agree} the paper's theoretical one (MHA > FC1 > FC2 > LN2 > LN1). In the paper, "
                 "under the conditions checked below, the most plastic components also gave the best finetuning "
                 "accuracy.")
    if within:
        lines.append("No --reference was given, so each pair is two different images of your folder (never an "
                     "image with itself). The paper pairs an image like the pretraining data with one of yours, "
                     "measuring how each component reacts to the shift from pretraining to your data; these pairs "
                     "measure its reaction to the variation inside your data. Values are therefore not the "
                     "paper's quantity; pass --reference with images like the pretraining data (e.g. ImageNet "
                     "validation images for ImageNet-pretrained models) to measure it.")
    return lines


def pairs_line(stats: dict, within: bool) -> str:
    """What was measured, in distinct images and distinct pairs, and whether an image served in several pairs."""
    if within:
        line = (f"Pairs: {stats['pairs']:,} distinct pairs of two different images, out of {stats['images']:,} "
                f"images of --data")
        most = stats["most_pairs_per_image"]
    else:
        line = (f"Pairs: {stats['pairs']:,} distinct pairs of a --reference image and a --data image, out of "
                f"{stats['reference_images']:,} reference and {stats['downstream_images']:,} data images")
        most = max(stats["most_pairs_per_reference_image"], stats["most_pairs_per_downstream_image"])
    if stats["pairs"] < stats["pairs_asked"]:
        line += (f"; {stats['pairs_asked']:,} were asked for, but these images give no more distinct pairs (a "
                 "repeated pair is no new evidence)")
    line += "."
    if most > 1:
        line += (f" The images are cycled: one image is in up to {most:,} pairs. Pairs sharing an image are not "
                 "independent, so the 95% intervals below, which treat pairs as independent, are narrower than the "
                 "evidence; more images narrow them where more pairs of the same images cannot.")
    return line


def data_line(path: Path, data: ImageFiles) -> str:
    """Which images of --data were measured, and what a single class means for the answer."""
    line = ""
    if data_split(path):
        line += (f" --data is split into train/val/test folders: its train/ split ({len(data):,} images) was "
                 "measured, and its test images were not looked at.")
    if len(data.classes) < 2:
        line += (" --data holds one class: plasticity needs no labels, so the measurement stands, but the study "
                 "config below cannot train a classifier on one class; put the images in class sub-folders before "
                 "running it.")
    return line


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4g")


def run(request: Request) -> dict:
    """Measure, rank and write the report folder; returns {'ranking', 'recommended', 'out'}."""
    if request.pairs < 2:
        raise UserError(f"--pairs {request.pairs}: give at least 2 pairs")
    bad = [m for m in request.modes if m not in plasticity.MODES]
    if bad:
        raise UserError(f"--modes {','.join(bad)} unknown; allowed: {','.join(plasticity.MODES)}")
    check_writable(request.out, "--out")
    split = data_split(request.data)
    data = _open_folder(request.data, "--data", split)
    reference = _open_folder(request.reference, "--reference") if request.reference else None
    if reference is None and len(data) < 3:
        made = len(data) * (len(data) - 1) // 2
        raise UserError(f"--data {request.data} holds {len(data)} image{'s' * (len(data) != 1)}: they make {made} "
                        f"distinct pair{'s' * (made != 1)}, and plasticity needs at least 2; give 3 images or more "
                        "(or a --reference folder)")
    if reference is not None and len(reference) * len(data) < 2:
        raise UserError("--reference and --data hold 1 image each: they make 1 distinct pair, and plasticity needs "
                        "at least 2; give more images")
    model = open_model(request.model, request.arch, request.head, request.arch_kwargs)
    try:  # the model entry the report writes is checked as the workflow checks it, before any measuring
        check_model_shape("model", model.config)
    except UserError as error:
        raise UserError(f"the model as given cannot run in the study the report writes: {error}") from None
    size = model.record["img_size"]
    rng = np.random.default_rng(request.seed)
    if reference is None:
        first, second = within_pairs(len(data), request.pairs, rng)
        first_files, first_name = data, "images"
    else:
        first, second = cross_pairs(len(reference), len(data), request.pairs, rng)
        first_files, first_name = reference, "reference images"
    # Read each image a pair uses once; the pairs index the images read.
    if reference is None:
        used = np.unique(np.concatenate([first, second]))
        pixels = Split(read_images(data, used, size, "images"), np.zeros(len(used), dtype=np.int64))
        streams = (pixels, pixels)
        rows = (np.searchsorted(used, first), np.searchsorted(used, second))
    else:
        streams, rows = [], []
        for files, picked, what in ((first_files, first, first_name), (data, second, "images")):
            used = np.unique(picked)
            streams.append(Split(read_images(files, used, size, what), np.zeros(len(used), dtype=np.int64)))
            rows.append(np.searchsorted(used, picked))
    device = pick_device(request.device)
    with tqdm(total=len(first), desc=f"plasticity ({', '.join(request.modes)})", unit="pair") as bar:
        table, stats = plasticity.measure(
            model.network, streams[0], streams[1], len(first), request.batch_size, size, device,
            tuple(request.modes), tuple(model.record["mean"]), tuple(model.record["std"]),
            progress=lambda _: bar.update(min(request.batch_size, len(first) - bar.n)), pairs=tuple(rows))
    stats.update(pairs_asked=request.pairs, **pair_counts(first, second, within=reference is None))
    if reference is None:  # one folder: "reference" and "downstream" would name the two halves of a pair
        for key in ("reference_images", "downstream_images"):
            stats.pop(key)
        table = table.drop(columns=["reference_images", "downstream_images"]).assign(images=stats["images"])
    ranking = rank_components(table)
    return write_report(request, model, data, first_files, (first, second), table, stats, ranking)


def pair_counts(first: np.ndarray, second: np.ndarray, within: bool) -> dict:
    """Distinct images each stream gives to the pairs (one folder's images when `within`), and the most pairs any
    one image is in: above 1, a stream is cycled."""
    if within:
        images = np.concatenate([first, second])
        return {"images": len(np.unique(images)), "most_pairs_per_image": int(np.bincount(images).max())}
    return {"reference_images": len(np.unique(first)), "downstream_images": len(np.unique(second)),
            "most_pairs_per_reference_image": int(np.bincount(first).max()),
            "most_pairs_per_downstream_image": int(np.bincount(second).max())}


def write_report(request: Request, model: Model, data: ImageFiles, first_files: ImageFiles, pairs: tuple,
                 table: pd.DataFrame, stats: dict, ranking: pd.DataFrame) -> dict:
    from peft import LoraConfig

    from vitplasticity.figures import plasticity_vs_depth

    mode = request.modes[0]
    order = ranking[ranking["mode"] == mode]["component"].tolist()
    top = order[0]
    counts = count_by_component(model.network)
    shown = models.build(model.record["arch"], num_classes=max(2, len(data.classes)))
    trainable = set_trainable(shown, [top])
    lora_component, target, saved = lora_plan(order, shown)
    words = describe(shown)  # the model as it will be trained: with the head the task needs
    within = request.reference is None
    linear_note = ""
    if model.record["arch"].get("head") == "linear":
        linear_note = 'model.reset_classifier(NUM_CLASSES, global_pool="avg")  # the linear head, as measured\n'
    snippet = (f"import timm\nmodel = {model.create}\n{linear_note}"
               f'names = set(open("{request.out / "trainable_parameters.txt"}").read().split())\n'
               "for name, parameter in model.named_parameters():\n    parameter.requires_grad_(name in names)\n")
    config = workflow_config(model, Path(request.data), request.reference, request.pairs)
    head_kind = "as the architecture defines it"
    if model.record["arch"].get("head") == "linear":
        native = model.record["provenance"].get("native_head_params")
        head_kind = ("linear: the attention pool replaced by mean pooling + linear"
                     + (f"; the native attention-pool head would train {native:,} parameters" if native else ""))
    shown_rank = ranking[["mode", "rank", "label", "mean", "ci95", "layer_min", "layer_max", "theoretical_rank"]]
    report = [
        f"# Which components to finetune: {model.name} on {request.data}", "",
        *_words(ranking, stats, tuple(request.modes), within, counts), "",
        "## Conditions", "", "Under which the paper observed that the most plastic components finetune best:", "",
        *[f"- {'holds' if c.holds else '**does not hold**'}: {c.name}: {c.text}"
          for c in conditions(ranking, stats, tuple(request.modes))], "",
        "## Ranking", "", "Plasticity per component, mean over the layers (per layer: `plasticity_per_layer.csv`; "
        "figure: `plasticity_vs_depth.png`).", "", _markdown(shown_rank), "",
        pairs_line(stats, within) + data_line(request.data, data) + f" Tokens per image {stats['num_tokens']}, width "
        f"{stats['embed_dim']}; input {model.record['img_size']} px, normalised with mean {model.record['mean']} "
        f"and std {model.record['std']}.", "",
        "## What the components hold in this model", "",
        f"- emb: {words['emb']}.", f"- head ({head_kind}; for {max(2, len(data.classes))} classes): "
        f"{words['head']}.", *([f"- {words['layer_scale']}."] if words["layer_scale"] else []),
        "- ln1, mha, ln2, fc1, fc2: `norm1`, `attn` (fused `qkv` and `proj`, with LayerScale `ls1` where present), "
        "`norm2`, `mlp.fc1`, `mlp.fc2` (with LayerScale `ls2`) of every block.", "",
        "## Train it", "",
        f"`trainable_parameters.txt`: the {len(trainable)} parameters of {LABELS[top]} in every block and the head. "
        "In PyTorch:", "", "```python", snippet.rstrip(), "```", "",
        f"With LoRA (`peft`): `lora/adapter_config.json` adapts {LABELS[lora_component]} (the most plastic linear "
        f"component; target_modules `{target}`) and trains {', '.join(saved)} whole (LoRA cannot adapt a "
        "LayerNorm).", "", "```python", "from peft import LoraConfig, get_peft_model",
        f'model = get_peft_model(model, LoraConfig.from_pretrained("{request.out / "lora"}"))', "```", "",
        "## Compare the arms by finetuning", "",
        "`workflow_config.yaml` prepares your images (your train/val/test sub-folders, or a seeded 60/20/20 split), "
        "finetunes every arm and the linear probe, and tabulates them: "
        "`snakemake --cores all --configfile workflow_config.yaml`."
        + ("" if not within else " Set the reference task's `path` to images like the pretraining data first."),
        "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "",
    ]
    with atomic_dir(request.out) as tmp:
        table.insert(0, "model", model.name)
        table.to_csv(tmp / "plasticity_per_layer.csv", index=False)
        ranking.to_csv(tmp / "ranking.csv", index=False)
        (tmp / "token_norms.json").write_text(pd.Series(stats).to_json(indent=2) + "\n")
        plasticity_vs_depth(table, tmp)
        (tmp / "trainable_parameters.txt").write_text("\n".join(trainable) + "\n")
        LoraConfig(r=8, lora_alpha=16, target_modules=target, modules_to_save=saved).save_pretrained(tmp / "lora")
        (tmp / "workflow_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        first, second = pairs
        pd.DataFrame({"first": [first_files.names[i] for i in first],
                      "second": [data.names[i] for i in second]}).to_csv(tmp / "pairs.csv", index=False)
        (tmp / "report.md").write_text("\n".join(report))
    return {"ranking": ranking, "recommended": top, "lora": lora_component,
            "summary": _words(ranking, stats, tuple(request.modes), within, counts),
            "conditions": conditions(ranking, stats, tuple(request.modes))}

