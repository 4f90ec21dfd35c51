"""`vitplasticity recommend`: which components of a pretrained ViT to finetune on your images.

From a model (a timm name, a weights file and its timm architecture, or a checkpoint this
project wrote) and an image folder, measure each block component's plasticity
(`plasticity.measure`, study-spec §3) and write a report folder:

- ``report.md``: what each selection criterion (`registry.CRITERIA`) would train, side by side, the
  plasticity ranking, what it means, and every artefact below in one page;
- ``criteria.csv`` (per criterion: its ranking of the components, first choice, wall time);
- ``ranking.csv`` (per mode and component: mean over layers, 95% CI, layer range, rank),
  ``plasticity_per_layer.csv``, ``token_norms.json``, ``plasticity_vs_depth.{png,pdf}``;
- ``trainable_parameters.txt``: the parameters to unfreeze (the first choice of ``--criterion``,
  by default the paper's plasticity, in every block, plus the head; with ``--budget``, the (component, layer)
  units that criterion selects within the budget, plus the head), one name a line;
- ``lora/adapter_config.json``: a `peft` LoraConfig on that criterion's first linear component (with
  ``--budget``: on the linear modules of its units, their other modules trained whole; not written when its
  units hold no linear module);
- ``selection.json`` (with ``--budget``): per criterion the units it selects within the budget
  (`budget.select`, the workflow's budget arms), their parameter count and fraction, where the criteria agree,
  and with ``--pilot`` the held-out accuracy of short finetuning runs of every distinct selection, the
  linear probe and a random selection of the same budget (`run_pilot`);
- ``workflow_config.yaml``: the study config that runs every finetuning arm on these images;
- ``pairs.csv``: which two images each pair holds (first: --reference, or --data when no
  reference is given; second: --data), by path inside the folder.

The folder appears whole or not at all.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from vitplasticity import budget, criteria, models, plasticity, selection, training
from vitplasticity.components import (
    BLOCK_COMPONENTS,
    LABELS,
    THEORETICAL_RANK,
    component_of,
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
from vitplasticity.fileio import atomic_dir, check_writable, write_json
from vitplasticity.prepared import Split
from vitplasticity.registry import CRITERIA
from vitplasticity.runtime import pick_device, seed_everything

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
    criterion: str | None = None  # whose freeze list and peft config are written; None: plasticity, first mode
    others: tuple[str, ...] | None = None  # criteria beside plasticity to measure (`OTHER_CRITERIA`); None: all
    budget: float | None = None  # a fraction (0, 1] of the block parameters, or a whole count of them above 1
    pilot: bool = False  # short finetuning runs of the selections at the budget (`run_pilot`)
    pilot_steps: int | None = None  # None: as many as fit `pilot_seconds` (`pilot_steps`)
    pilot_seconds: float | None = None  # None: the device's default (`PILOT_DEFAULTS`), as for the two below
    pilot_images: int | None = None
    pilot_seeds: int | None = None
    pilot_lr: float | None = None  # None: `PILOT_LR`


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


# Criteria from the gradients of a classifier: they need labelled images (two classes or more).
GRADIENT_CRITERIA = ("relative_gradient_norm", "fisher")
GRADIENT_BATCHES = 4  # batches of --batch-size labelled images (the study's criteria.gradient_batches default)
# Measured for every criterion's cost, not an opinion about the data: left out of the agreement check.
SIZE_CRITERION = "trainable_params"


def criterion_label(name: str) -> str:
    """How the report names a criterion of `registry.CRITERIA`."""
    if name.startswith("plasticity_"):
        mode = name.removeprefix("plasticity_")
        return f"plasticity, {mode} mode" + (" (the paper's answer)" if mode == "embedding" else "")
    return {"relative_gradient_norm": "relative gradient norm", "fisher": "Fisher (SPT)", "fps": "FPS",
            "kappatune": "KappaTune (peft)", "trainable_params": "size (trainable parameters)"}[name]


# The criteria beside plasticity that `--criteria` may name (all of them by default).
OTHER_CRITERIA = tuple(name for name in CRITERIA if not name.startswith("plasticity_"))


def check_others(others: tuple[str, ...] | None) -> tuple[str, ...]:
    """The criteria beside plasticity to measure: `others` (checked against `OTHER_CRITERIA`), all when None."""
    if others is None:
        return OTHER_CRITERIA
    unknown = [name for name in others if name not in OTHER_CRITERIA]
    if unknown:
        raise UserError(f"--criteria {','.join(unknown)} unknown; choose among {','.join(OTHER_CRITERIA)} (plasticity "
                        "is always measured), or give an empty --criteria '' for plasticity alone")
    return others


def check_criterion(name: str, modes: tuple[str, ...], classes: int, others: tuple[str, ...] = OTHER_CRITERIA
                    ) -> None:
    """`--criterion` must be a criterion this run measures: a plasticity mode of `modes`, one of `others`, and a
    gradient criterion only with labels (`classes` ≥ 2). UserError naming the fix."""
    if name not in CRITERIA:
        raise UserError(f"--criterion {name} unknown; known: {', '.join(CRITERIA)}")
    if not name.startswith("plasticity_") and name not in others:
        raise UserError(f"--criterion {name} is not measured: --criteria {','.join(others) or repr('')} leaves it "
                        f"out; add {name} to --criteria")
    mode = name.removeprefix("plasticity_")
    if name.startswith("plasticity_") and mode not in modes:
        raise UserError(f"--criterion {name} is plasticity in {mode} mode, which --modes {','.join(modes)} does not "
                        f"measure; add {mode} to --modes")
    if name in GRADIENT_CRITERIA and classes < 2:
        raise UserError(f"--criterion {name} needs labels, and --data holds one class; put the images in class "
                        "sub-folders (two or more) or choose another criterion")


def labelled_images(data: ImageFiles, count: int, size: int, seed: int, rows: np.ndarray) -> Split:
    """A seeded sample of min(`count`, all) of the images `rows` of `data` (the rows the criteria may read,
    `measured_rows`) with their class labels (gradient criteria, FPS)."""
    rows = np.sort(np.random.default_rng(seed).choice(rows, min(count, len(rows)), replace=False))
    return Split(read_images(data, rows, size, "labelled images"), data.labels[rows])


def side_by_side(scores: pd.DataFrame, wall_s: dict[str, float]) -> pd.DataFrame:
    """Each criterion's choice of block component, in `registry.CRITERIA`'s order.

    `scores`: criterion, component, layer, value (as `criteria.measure` gives them); `wall_s`: criterion → wall
    time in seconds. A component's score is its mean over the layers the criterion scores
    (`criteria.component_scores`), turned by `selection.oriented` (an unscored component after every scored
    one). Columns criterion, label, order (components, chosen first first; ties in `BLOCK_COMPONENTS` order),
    ranking (text, tied components joined by "="), first, wall_s.
    """
    means = criteria.component_scores(scores)
    rows = []
    for name in [c for c in CRITERIA if c in set(means["criterion"])]:
        part = means[means["criterion"] == name].set_index("component")["score"].reindex(list(BLOCK_COMPONENTS))
        turned = selection.oriented(part, name).sort_values(ascending=False, kind="stable")
        text = LABELS[turned.index[0]]
        for previous, (component, value) in zip(turned.to_numpy(), turned.iloc[1:].items(), strict=False):
            text += (" = " if value == previous else " > ") + LABELS[component]
        rows.append({"criterion": name, "label": criterion_label(name), "order": turned.index.tolist(),
                     "ranking": text, "first": turned.index[0], "wall_s": wall_s[name]})
    return pd.DataFrame(rows)


def criteria_caption(data: ImageFiles, labelled: int, others: tuple[str, ...] = OTHER_CRITERIA) -> str:
    """What the side-by-side table shows, and whether the gradient criteria used `labelled` images of `data` or
    were skipped (0), and why; which criteria `--criteria` left out (`others`: those measured)."""
    line = ("Each criterion of the study (`vitplasticity.criteria`) ranks the five block components (score: mean "
            "over the layers; the end of its scale chosen first as the study declares it; a component it cannot "
            "score last) on this model and your images; its first choice is what it would train. Plasticity "
            "modes are measured together (their shared wall time is shown), as are the relative gradient norm "
            "and Fisher. As a table: `criteria.csv`.")
    left_out = [name for name in OTHER_CRITERIA if name not in others]
    if labelled:
        line += (f" The gradient criteria use the labels of --data's {len(data.classes)} classes: a fresh linear "
                 f"head's cross-entropy on {labelled:,} images.")
    elif set(GRADIENT_CRITERIA) & set(others):
        line += (" Relative gradient norm and Fisher were skipped: they need labels, and --data holds one class.")
    if left_out:
        line += f" Not measured, as --criteria asked: {', '.join(criterion_label(name) for name in left_out)}."
    return line


def preprocessing_line(model: Model) -> str:
    """How the images were made model inputs, and where the model's own pretrained config or the study differ."""
    record, cfg = model.record, getattr(model.network, "pretrained_cfg", None) or {}
    line = (f"Input: each image resized (shorter side, bilinear, antialiased) to {record['img_size']} px and "
            f"centre-cropped, normalised with mean {record['mean']} and std {record['std']}.")
    differs = [f"{key} {cfg[key]}" for key, same in (("interpolation", "bilinear"), ("crop_pct", 1.0))
               if cfg.get(key) not in (None, same)]
    if differs:
        line += (f" timm's pretrained config of this model names {' and '.join(differs)}; the measurement and the "
                 "study resize bilinear and crop the full square, a small shift of the inputs.")
    from vitplasticity.transforms import IMAGENET_MEAN, IMAGENET_STD

    if (tuple(record["mean"]), tuple(record["std"])) != (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)):
        line += (" The study config below normalises every model with ImageNet's mean and std (the study's "
                 "protocol), not these, so its plasticity can differ from this report's.")
    return line


def agreement(chosen: pd.DataFrame) -> tuple[bool, str]:
    """Whether the criteria (all but size) put the same component first, and a sentence saying which choose what."""
    opinions = chosen[chosen["criterion"] != SIZE_CRITERION]
    groups = opinions.groupby("first", sort=False)["criterion"].agg(list)
    text = "; ".join(f"{LABELS[first]} by {', '.join(names)}" for first, names in groups.items())
    if len(groups) == 1:
        return True, f"every criterion but size puts {LABELS[groups.index[0]]} first."
    return False, f"the criteria disagree on the top choice ({text})."


STEP_BATCH = 4  # images of the timed training steps that project the study's cost


def step_seconds(model: torch.nn.Module, size: int, device: torch.device, batch: int, steps: int = 2) -> float:
    """Wall time (s) of one SGD training step of `model` with every parameter trained (the "all" arm, the
    dearest) on `batch` random images of `size` px: the mean of `steps` steps after one warm-up step. The
    model is copied; the original is untouched."""
    trained = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    took = 0.0
    for step in range(steps + 1):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(trained(images), labels).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        took += (time.perf_counter() - began) * (step > 0)
    return took / steps


def projected_cost(config: dict, step_s: float, batch: int) -> str:
    """The finetuning runs `config` plans and their projected device time, from a measured step of `batch`
    images taking `step_s` seconds (scaled linearly in images per step: an estimate, not a measurement)."""
    task, finetune = config["tasks"]["my_images"], config["finetune"]
    runs = len(config["arms"]) * len(task["lrs"]) * len(finetune["seeds"])
    hours = runs * task["steps"] * finetune["batch_size"] * step_s / batch / 3600
    return (f"Its size: {len(config['arms'])} arms × {len(task['lrs'])} learning rates × {len(finetune['seeds'])} "
            f"seeds = {runs} finetuning runs of {task['steps']:,} steps at batch {finetune['batch_size']} and "
            f"{config['models']['model']['img_size']} px, about {float(f'{hours:.3g}'):,g} device-hours on the "
            f"device this report was made on (a training step of {batch} images with every parameter trained took "
            f"{step_s:.3g} s here, scaled linearly to the batch: high where a step's fixed cost dominates; arms that "
            "freeze more cost less). Lower `steps`, "
            "`lrs`, `seeds` or the `arms` to fit your machine.")


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
    return first, rf"blocks\.\d+\.{LORA_MODULES[first]}", saved + head_modules(model)


def head_modules(model: torch.nn.Module) -> list[str]:
    """The modules of the head component that hold parameters (`modules_to_save` of every LoraConfig written)."""
    return [name for name in ("norm", "fc_norm", "attn_pool", "head", "head_dist")
            if sum(p.numel() for p in (getattr(model, name, None) or torch.nn.Identity()).parameters())]


def unit_lora_plan(units: list[budget.Unit], model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, modules_to_save) of a LoraConfig that trains exactly `units` and the head: the full names
    of the units' ``nn.Linear`` modules (e.g. ``blocks.3.attn.qkv``), which LoRA adapts, and of their other
    modules holding parameters (LayerNorms, LayerScale: ``blocks.3.norm1``, ``blocks.3.ls1``), trained whole, then
    the head's (`head_modules`). Units in `budget.canonical` order."""
    linear, whole = [], []
    for component, layer in budget.canonical(units):
        for name, module in model.blocks[layer].named_modules():
            own = [key for key, _ in module.named_parameters(recurse=False)]
            if own and component_of(f"blocks.{layer}.{name}.{own[0]}") == component:
                (linear if isinstance(module, torch.nn.Linear) else whole).append(f"blocks.{layer}.{name}")
    return linear, whole + head_modules(model)


def check_budget(value: float) -> None:
    """--budget must be a fraction in (0, 1] of the block parameters or a whole count above 1; UserError otherwise."""
    if not math.isfinite(value) or value <= 0 or (value > 1 and value != int(value)):
        raise UserError(f"--budget {value:.12g}: give a fraction of the block parameters in (0, 1], e.g. 0.028, or a "
                        "whole count of parameters, e.g. 2000000")


def budget_allowance(value: float, sizes: dict[budget.Unit, int]) -> int:
    """The block parameters --budget `value` allows on a model of unit `sizes` (`budget.unit_sizes`): ⌊value · Σ
    sizes⌋ for a fraction (`budget.limit`), the count itself above 1. UserError when it exceeds the blocks or
    fits no unit."""
    check_budget(value)
    total = sum(sizes.values())
    allowed = budget.allowance({"budget": value} if value <= 1 else {"params": int(value)}, sizes)
    if allowed > total:
        raise UserError(f"--budget {allowed:,} parameters is more than the model's {total:,} block parameters; give "
                        f"a count up to {total:,} or a fraction, e.g. 0.028")
    smallest = min(sizes, key=sizes.get)
    if allowed < sizes[smallest]:
        raise UserError(f"--budget {value:.12g} allows {allowed:,} block parameters, fewer than the smallest unit "
                        f"({budget.unit_label(smallest)}, {sizes[smallest]:,}); give at least {sizes[smallest]:,} "
                        "parameters")
    return allowed


# The pilot's defaults per device type (`--pilot`): the seconds all its runs' training steps may take together
# (`pilot_steps` turns them into steps per run, within `steps`' bounds), images per step, images read from --data
# (a quarter held out), seeds per selection. A ViT-B/16 step of 8 images with every parameter trained takes about
# 10 s on a 2-core CPU (so the floor of 5 steps rules there); a 0.2 M-parameter ViT at 32 px, about 0.01 s.
PILOT_DEFAULTS = {"cpu": {"seconds": 120, "steps": (5, 100), "batch": 8, "images": 96, "seeds": 1},
                  "cuda": {"seconds": 60, "steps": (20, 500), "batch": 32, "images": 512, "seeds": 2}}
PILOT_LR = 0.01  # SGD with momentum, the middle learning rate of the study `workflow_config` writes (--pilot-lr)
HELD_OUT_EVERY = 4  # of each class's pilot images, the 2nd, 6th, 10th, … are held out


@dataclass(frozen=True)
class PilotPlan:
    """What `run_pilot` trains on: its step budget and the rows of --data it trains on and holds out."""

    steps: int | None  # None until `pilot_steps` fits them to `seconds`
    batch: int
    seeds: tuple[int, ...]
    train_rows: np.ndarray
    held_out_rows: np.ndarray
    seconds: float  # what the runs' training steps may take together when `steps` is not given
    bounds: tuple[int, int]  # the fewest and most steps `pilot_steps` chooses
    lr: float = PILOT_LR
    step_s: float = math.nan  # a measured step (s) with every parameter trained, when `pilot_steps` chose the steps


def layer_ranges(layers: list[int]) -> str:
    """Sorted layers as ranges: [0, 1, 2, 5] → '0–2, 5'."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(f"{low}" if low == high else f"{low}–{high}" for low, high in runs)


def units_text(units: list[budget.Unit]) -> str:
    """Units by component in `BLOCK_COMPONENTS` order, layers as ranges: 'MHA 11 · LN1 0–11'; 'none' when empty."""
    parts = [f"{LABELS[c]} {layer_ranges([layer for unit, layer in units if unit == c])}"
             for c in BLOCK_COMPONENTS if any(unit == c for unit, _ in units)]
    return " · ".join(parts) or "none"


@dataclass
class AtBudget:
    """--budget on the model: what it allows, what each criterion selects within it, and the pilot's runs."""

    value: float  # as given: a fraction, or a count above 1
    allowed: int  # block parameters it allows
    sizes: dict[budget.Unit, int]  # parameters per unit of the model
    units: dict[str, list[budget.Unit]]  # criterion → the units it selects, in the order taken
    plan: PilotPlan | None = None  # with --pilot
    runs: pd.DataFrame | None = None  # `run_pilot`'s rows
    pilot_s: float = math.nan  # the pilot's wall time

    @property
    def total(self) -> int:
        """The model's block parameters (every unit)."""
        return sum(self.sizes.values())

    def params(self, units: list[budget.Unit]) -> int:
        """The parameters of `units`."""
        return sum(self.sizes[unit] for unit in units)


def select_at_budget(scores: pd.DataFrame, names: list[str], sizes: dict[budget.Unit, int], value: float,
                     allowed: int) -> AtBudget:
    """Each criterion of `names` turned from its per-unit `scores` (criterion, component, layer, value) into the
    units it selects within `allowed` block parameters, by `budget.select` (the workflow's budget arms)."""
    return AtBudget(value, allowed, sizes, {
        name: budget.select({"selector": name, "params": allowed}, sizes, budget.unit_scores(scores, name))
        for name in names})


def unit_agreement(units: dict[str, list[budget.Unit]]) -> dict:
    """Where the selections of the criteria (all but size) agree and differ: {'compared': their names, 'all': the
    units every one selects, 'most': those more than half but not all select, 'few': unit → the criteria that
    select it, for the units half of them or fewer select (with two criteria or more)}; units in `budget.canonical`
    order."""
    opinions = {name: set(chosen) for name, chosen in units.items() if name != SIZE_CRITERION}
    counts = Counter(unit for chosen in opinions.values() for unit in chosen)
    n = len(opinions)
    return {"compared": list(opinions),
            "all": budget.canonical(unit for unit, k in counts.items() if k == n),
            "most": budget.canonical(unit for unit, k in counts.items() if n / 2 < k < n),
            "few": {unit: [name for name, chosen in opinions.items() if unit in chosen]
                    for unit in budget.canonical(unit for unit, k in counts.items() if k <= n / 2 and n > 1)}}


def budget_table(at: AtBudget) -> pd.DataFrame:
    """Per criterion: its label, the units it selects (`units_text`), their parameters and share of the blocks'."""
    return pd.DataFrame([{"criterion": criterion_label(name), "units selected": units_text(chosen),
                          "block parameters": f"{at.params(chosen):,}",
                          "share of the blocks": f"{100 * at.params(chosen) / at.total:.3g}%"}
                         for name, chosen in at.units.items()])


def budget_words(at: AtBudget) -> list[str]:
    """The budget in words, and where the criteria's selections agree and differ."""
    asked = f"{at.value:g} of the block parameters" if at.value <= 1 else f"{int(at.value):,} parameters"
    lines = [f"--budget {asked}: at most {at.allowed:,} of the model's {at.total:,} block parameters "
             f"({100 * at.allowed / at.total:.3g}%; the embedding and the head are not counted, the head always "
             "trains). Each criterion takes its units (one block component in one block) in its order and skips a "
             "unit that would exceed the budget, as the workflow's budget arms do (`vitplasticity.budget`); its "
             "units and their sizes: `selection.json`."]
    found = unit_agreement(at.units)
    compared = len(found["compared"])
    if compared < 2:
        lines.append("Only one criterion (size aside) was measured: there is no agreement to check.")
        return lines
    distinct = len({frozenset(at.units[name]) for name in found["compared"]})
    line = (f"Agreement among the {compared} criteria but size ({distinct} distinct selection"
            f"{'s' * (distinct != 1)}): " + (f"every one selects {units_text(found['all'])}" if found["all"] else
                                             "no unit is selected by every one"))
    if found["most"]:
        line += f"; most (over half) select {units_text(found['most'])}"
    if found["few"]:
        line += "; they differ on " + ", ".join(f"{units_text([unit])} ({', '.join(names)})"
                                                for unit, names in found["few"].items())
    lines.append(line + ".")
    return lines


def plan_pilot(request: Request, data: ImageFiles, device: torch.device) -> PilotPlan | None:
    """The pilot's budget (the flags, else `PILOT_DEFAULTS` of the device type) and its images: a seeded sample of
    --data, of which `HELD_OUT_EVERY`'s share of each class is held out (from training and from every criterion,
`measured_rows`). Checked before any work: UserError when
    --budget is missing, --data holds one class, a flag is below 1, or no image can be held out; None without
    --pilot (a --pilot-* flag without it is a UserError)."""
    flags = {"steps": request.pilot_steps, "seconds": request.pilot_seconds, "images": request.pilot_images,
             "seeds": request.pilot_seeds}
    if not request.pilot:
        given = [f"--pilot-{key}" for key, value in (flags | {"lr": request.pilot_lr}).items() if value is not None]
        if given:
            raise UserError(f"{given[0]} is a setting of the pilot, and --pilot is not given; add --pilot or remove it")
        return None
    if request.budget is None:
        raise UserError("--pilot finetunes each criterion's selection at a budget; give --budget too, e.g. "
                        "--budget 0.028")
    if len(data.classes) < 2:
        raise UserError("--pilot needs labels, and --data holds one class; put the images in class sub-folders (two "
                        "or more), or leave --pilot out")
    low = [f"--pilot-{key} {value:g}" for key, value in flags.items() if value is not None and value < 1]
    if low:
        raise UserError(f"{low[0]}: give 1 or more")
    if request.pilot_lr is not None and not 0 < request.pilot_lr < 10:
        raise UserError(f"--pilot-lr {request.pilot_lr:g}: give an SGD learning rate above 0 and below 10, e.g. 0.03")
    defaults = PILOT_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    steps = request.pilot_steps
    seconds, images, seeds = (defaults[key] if flags[key] is None else flags[key]
                              for key in ("seconds", "images", "seeds"))
    rows = np.random.default_rng(request.seed).permutation(len(data))[:images]
    labels = data.labels[rows]
    rank = np.array([np.count_nonzero(labels[:i] == label) for i, label in enumerate(labels)])
    held = rank % HELD_OUT_EVERY == 1
    if not held.any():
        raise UserError(f"--pilot holds out one of each class's first {HELD_OUT_EVERY} images, and none of the "
                        f"{len(rows)} pilot images shares its class with another; give more --pilot-images")
    return PilotPlan(steps, defaults["batch"], tuple(range(request.seed, request.seed + seeds)), np.sort(rows[~held]),
                     np.sort(rows[held]), float(seconds), defaults["steps"],
                     PILOT_LR if request.pilot_lr is None else request.pilot_lr)


def pilot_steps(plan: PilotPlan, runs: int, step_s: float) -> PilotPlan:
    """`plan` with its steps per run: as given (--pilot-steps), else as many as let `runs` runs (selections x
    seeds) at `step_s` seconds a step (every parameter trained: an upper bound) fit in `plan.seconds`, within
    `plan.bounds`."""
    if plan.steps is not None:
        return plan
    low, high = plan.bounds
    fitting = math.floor(plan.seconds / (runs * step_s)) if step_s > 0 else high
    return replace(plan, steps=min(high, max(low, fitting)), step_s=step_s)


def measured_rows(data: ImageFiles, plan: PilotPlan | None) -> np.ndarray:
    """The rows of --data the criteria read (plasticity's pairs, the labelled images): all but the pilot's
    held-out images, which are set aside before anything is measured so that no selection has seen them."""
    every = np.arange(len(data))
    return every if plan is None else np.setdiff1d(every, plan.held_out_rows)


def pilot_candidates(at: AtBudget, draw: int) -> list[dict]:
    """The pilot's selections: the linear probe (no unit), each distinct selection of `at` with every criterion
    that chose it, and a random selection of the same budget (`budget.select`, draw `draw`): {units, chosen_by}."""
    candidates: dict[frozenset, dict] = {frozenset(): {"units": [], "chosen_by": ["linear probe"]}}
    drawn = budget.select({"selector": budget.RANDOM, "params": at.allowed, "draw": draw}, at.sizes)
    for name, units in [*at.units.items(), (budget.RANDOM, drawn)]:
        candidates.setdefault(frozenset(units), {"units": budget.canonical(units), "chosen_by": []})[
            "chosen_by"].append(name)
    return list(candidates.values())


def run_pilot(model: Model, data: ImageFiles, candidates: list[dict], plan: PilotPlan, device: torch.device
              ) -> pd.DataFrame:
    """Short finetuning runs on --data through the study's training loop (`training.train`, as the workflow's
    budget arms: `components.set_trainable` on the units and the head): one per selection of `candidates`
    (`pilot_candidates`: the linear probe, each distinct selection at the budget, a random one), each
    `plan.steps` SGD steps of `plan.batch` images per seed, evaluated once, at the end, on the held-out images.

    Returns one row per run: selection (`units_text`), chosen_by (list of names; "linear probe" or "random"
    for those), units (labels), trainable_params (the head included), val_acc (% per seed; None where it
    diverged), steps (optimizer steps per seed), in the order probe, criteria, random.
    """
    size, rows = model.record["img_size"], np.concatenate([plan.train_rows, plan.held_out_rows])
    pixels = read_images(data, rows, size, "pilot images")
    held = np.isin(rows, plan.held_out_rows)
    splits = {"train": Split(pixels[~held], data.labels[rows[~held]]),
              "val": Split(pixels[held], data.labels[rows[held]])}
    found = []
    with tqdm(total=len(candidates) * len(plan.seeds), desc="pilot", unit="run") as bar:
        for candidate in candidates:
            accuracy, steps = [], []
            for seed in plan.seeds:
                seed_everything(seed)
                network = copy.deepcopy(model.network)
                network.reset_classifier(len(data.classes))
                set_trainable(network, [], candidate["units"])
                cfg = training.TrainConfig(steps=plan.steps, eval_every=plan.steps, batch_size=plan.batch,
                                           lr=plan.lr, seed=seed, img_size=size, mean=tuple(model.record["mean"]),
                                           std=tuple(model.record["std"]))
                result = training.train(network, splits, cfg, device, progress=bar.set_postfix_str)
                accuracy.append(100 * result.best_val_acc if result.status == "completed" else None)
                steps.append(len(result.history))
                bar.update()
            found.append({"selection": units_text(candidate["units"]) if candidate["units"] else "head only",
                          "chosen_by": candidate["chosen_by"],
                          "units": [budget.unit_label(unit) for unit in candidate["units"]],
                          "trainable_params": sum(p.numel() for p in network.parameters() if p.requires_grad),
                          "val_acc": accuracy, "steps": steps})
    return pd.DataFrame(found)


def _accuracy_text(values: list[float | None]) -> str:
    """Held-out accuracy over seeds: 'mean' (one seed) or 'mean ± std' (population std), diverged seeds named."""
    kept = [value for value in values if value is not None]
    if not kept:
        return "diverged"
    text = f"{np.mean(kept):.1f}" + (f" ± {np.std(kept):.1f}" if len(kept) > 1 else "")
    return text + (f" ({len(values) - len(kept)} of {len(values)} seeds diverged)" if len(kept) < len(values) else "")


def pilot_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The pilot's runs as the report shows them (`run_pilot`'s rows)."""
    def chooser(name: str) -> str:
        return {"linear probe": "linear probe (baseline)", budget.RANDOM: "random (the floor)"}.get(
            name, criterion_label(name) if name in CRITERIA else name)
    return pd.DataFrame({"selection": runs["selection"],
                         "chosen by": runs["chosen_by"].map(lambda names: "; ".join(map(chooser, names))),
                         "trainable parameters": runs["trainable_params"].map("{:,}".format),
                         "held-out accuracy (%)": runs["val_acc"].map(_accuracy_text)})


def selection_record(at: AtBudget, criterion: str, device: torch.device, data: ImageFiles) -> dict:
    """``selection.json``: the budget, each criterion's units (labels, in the order taken), their parameters and
    share, the agreement (`unit_agreement`), the criterion whose artefacts are written, and the pilot's settings,
    held-out images of `data` (paths inside --data) and runs."""
    found = unit_agreement(at.units)
    record = {
        "budget": {"given": at.value, "allowed_params": at.allowed, "block_params": at.total},
        "criteria": {name: {"units": [budget.unit_label(unit) for unit in units], "params": at.params(units),
                            "share": at.params(units) / at.total} for name, units in at.units.items()},
        "agreement": {"compared": found["compared"], "all": [budget.unit_label(unit) for unit in found["all"]],
                      "most": [budget.unit_label(unit) for unit in found["most"]],
                      "few": {budget.unit_label(unit): names for unit, names in found["few"].items()}},
        "written": criterion}
    if at.plan is not None:
        record["pilot"] = {"steps": at.plan.steps, "batch": at.plan.batch, "lr": at.plan.lr,
                           "seeds": list(at.plan.seeds), "train_images": len(at.plan.train_rows),
                           "held_out_images": len(at.plan.held_out_rows),
                           "held_out_files": [data.names[i] for i in at.plan.held_out_rows], "device": device.type,
                           "wall_s": at.pilot_s, "runs": at.runs.to_dict("records")}
    return record


def pilot_words(plan: PilotPlan, runs: pd.DataFrame, wall_s: float, device: torch.device) -> list[str]:
    """What the pilot ran, on what, in how long, and how far such a short check can be trusted."""
    held, seeds = len(plan.held_out_rows), len(plan.seeds)
    floor = runs[runs["chosen_by"].map(lambda names: budget.RANDOM in names)]["val_acc"].iloc[0]
    spreads = [np.std(kept) for values in runs["val_acc"] if len(kept := [v for v in values if v is not None]) > 1]
    spread = (f"over {seeds} seeds the accuracies spread by up to {max(spreads):.2g} points (std)" if spreads else
              "with one seed the spread over seeds is not measured (--pilot-seeds 3 measures it)")
    chosen = ("" if math.isnan(plan.step_s) else
              f"; as many as fit the pilot's {plan.seconds:g} s of training on this device at {plan.step_s:.3g} s a "
              f"step with every parameter trained, within {plan.bounds[0]}–{plan.bounds[1]}: `--pilot-seconds`")
    return [f"Each run trains the selection and a fresh head for {plan.steps} SGD steps of {plan.batch} images (lr "
            f"{plan.lr:g}: `--pilot-lr`, momentum 0.9, cosine decay, the study's crops and flips; "
            f"`--pilot-steps`{chosen}) on "
            f"{len(plan.train_rows):,} images of --data, and is evaluated once, at the end, on {held:,} other images "
            f"of it (about a quarter of each class among the {len(plan.train_rows) + held:,} drawn, set aside before "
            "anything was measured: no criterion read them; `--pilot-images`; "
            f"one image is {100 / held:.2g} points), for {seeds} seed{'s' * (seeds != 1)} (`--pilot-seeds`): "
            f"{len(runs) * seeds} runs in {wall_s:.0f} s on {device.type}.",
            f"How far to trust it: {plan.steps} steps are the start of finetuning, not its end, and one learning rate "
            f"may suit one selection better than another; {spread}; the random selection's "
            f"{_accuracy_text(floor)}% is the floor: a selection that does not beat it by more than the seed spread "
            "has shown nothing here. For a verdict, finetune the arms with the workflow config below."]


def workflow_config(model: Model, data: Path, reference: Path | None, pairs: int) -> dict:
    """A study config that prepares these images and runs every finetuning arm, the probe and plasticity. Paths
    are absolute, so the study runs from any folder (``snakemake --directory``)."""
    size = model.record["img_size"]
    data, reference = Path(data).expanduser().resolve(), reference and Path(reference).expanduser().resolve()
    store = max(size, round(size * 256 / 224))
    if reference is not None:
        # Every reference image in the split plasticity reads, as `recommend` pairs them.
        reference_task = {"data": {"source": "imagefolder", "path": str(reference), "store_size": store,
                                   "reference_stream": True}}
    else:
        # The workflow pairs a reference stream with the task: it needs images like the pretraining data.
        reference_task = {"data": {"source": "imagenet_val", "path": "ILSVRC2012_img_val.tar", "order": "file_name",
                                   "store_size": store, "max_images": pairs}}
    entry = {k: str(v) if isinstance(v, Path) else v for k, v in model.config.items()}
    if "path" in entry:
        entry["path"] = str(Path(entry["path"]).expanduser().resolve())
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


def conditions(ranking: pd.DataFrame, stats: dict, modes: tuple[str, ...],
               chosen: pd.DataFrame | None = None) -> list[Condition]:
    """The paper's conditions, checked on this measurement (the first of `modes` is the one reported):

    - token scale: the embedding's token standard deviation σ = RMS token norm / √d on the user's images within
      `TOKEN_SIGMA_FACTOR` of the paper's (`PAPER_TOKEN_SIGMA`); a LayerNorm's rate of change scales as
      max|γ| / σ (study-spec §8), so far from it the LayerNorms' place in the ranking is set by the scale of E;
    - LayerNorms not dominant: no LayerNorm above `LAYERNORM_DOMINANCE` times every linear component;
    - modes agree: every measured mode puts the same component first;
    - criteria agree on the top choice: every criterion of `chosen` (`side_by_side`) but size puts the same
      component first.
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
    if chosen is not None:
        found.append(Condition("criteria agree on the top choice", *agreement(chosen)))
    return found


def _words(ranking: pd.DataFrame, stats: dict, modes: tuple[str, ...], within: bool, counts: dict,
           chosen: pd.DataFrame | None = None) -> list[str]:
    mode = modes[0]
    part = ranking[ranking["mode"] == mode]
    order = part["component"].tolist()
    top, second = part.iloc[0], part.iloc[1]
    failed = [c for c in conditions(ranking, stats, modes, chosen) if not c.holds]
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
    """Measure every criterion, rank and write the report folder; returns {'ranking', 'recommended' (the first
    choice of the criterion written), 'lora' (the component the LoraConfig adapts; with --budget, its
    target_modules, empty when no LoraConfig is written), 'criteria' (`side_by_side`), 'summary', 'conditions', 'budget'
    (`budget_table`, None without --budget), 'pilot' (`pilot_table`, None without --pilot)}."""
    if request.pairs < 2:
        raise UserError(f"--pairs {request.pairs}: give at least 2 pairs")
    if request.budget is not None:
        check_budget(request.budget)
    bad = [m for m in request.modes if m not in plasticity.MODES]
    if bad:
        raise UserError(f"--modes {','.join(bad)} unknown; allowed: {','.join(plasticity.MODES)}")
    check_writable(request.out, "--out")
    split = data_split(request.data)
    data = _open_folder(request.data, "--data", split)
    if request.reference and data_split(request.reference):
        raise UserError(f"--reference {request.reference} has a train/ sub-folder, but the reference stream is every "
                        "image of its folder (the study puts them all in the split plasticity reads); give a folder "
                        "of images, flat or in class sub-folders")
    reference = _open_folder(request.reference, "--reference") if request.reference else None
    chosen_name = request.criterion or f"plasticity_{request.modes[0]}"
    check_criterion(chosen_name, tuple(request.modes), len(data.classes), check_others(request.others))
    device = pick_device(request.device)
    plan = plan_pilot(request, data, device)
    refused = sorted({"pretrained_cfg", "pretrained_cfg_overlay"} & set(request.arch_kwargs or {}))
    if refused:
        raise UserError(f"--arch-kwargs {refused[0]}: preprocessing is not read from timm's pretrained config here; "
                        "mean and std come from the --arch tag (or the checkpoint), the input size from img_size, "
                        "and images are resized (bilinear) and centre-cropped; remove it")
    measured = measured_rows(data, plan)
    besides = "" if plan is None else f" besides the {len(plan.held_out_rows)} --pilot holds out"
    if reference is None and len(measured) < 3:
        made = len(measured) * (len(measured) - 1) // 2
        raise UserError(f"--data {request.data} holds {len(measured)} image{'s' * (len(measured) != 1)}{besides}: "
                        f"they make {made} distinct pair{'s' * (made != 1)}, and plasticity needs at least 2; give 3 "
                        "images or more (or a --reference folder)")
    if reference is not None and len(reference) * len(measured) < 2:
        raise UserError(f"--reference and --data hold 1 image each{besides}: they make 1 distinct pair, and "
                        "plasticity needs at least 2; give more images")
    model = open_model(request.model, request.arch, request.head, request.arch_kwargs)
    try:  # the model entry the report writes is checked as the workflow checks it, before any measuring
        check_model_shape("model", model.config)
    except UserError as error:
        raise UserError(f"the model as given cannot run in the study the report writes: {error}") from None
    sizes = budget.unit_sizes(model.network)
    allowed = None if request.budget is None else budget_allowance(request.budget, sizes)
    size = model.record["img_size"]
    rng = np.random.default_rng(request.seed)
    if reference is None:
        first, second = (measured[i] for i in within_pairs(len(measured), request.pairs, rng))
        first_files, first_name = data, "images"
    else:
        first, second = cross_pairs(len(reference), len(measured), request.pairs, rng)
        second = measured[second]
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
    with (tqdm(total=len(first), desc=f"plasticity ({', '.join(request.modes)})", unit="pair") as bar,
          criteria.cost(device) as plasticity_cost):
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
    scores, wall_s, labelled = other_criteria(request, model, data, device, measured)
    scores = pd.concat([scores, table.assign(criterion="plasticity_" + table["mode"], value=table["mean"])[
        ["criterion", "component", "layer", "value"]]], ignore_index=True)
    wall_s |= {f"plasticity_{mode}": plasticity_cost.wall_s for mode in request.modes}
    chosen = side_by_side(scores, wall_s)
    at = None if allowed is None else select_at_budget(scores, chosen["criterion"].tolist(), sizes, request.budget,
                                                      allowed)
    if plan is not None:
        began = time.perf_counter()
        candidates = pilot_candidates(at, request.seed)
        pilot_step_s = math.nan if plan.steps is not None else step_seconds(
            model.network, model.record["img_size"], device, plan.batch)
        plan = pilot_steps(plan, len(candidates) * len(plan.seeds), pilot_step_s)
        at.plan, at.runs = plan, run_pilot(model, data, candidates, plan, device)
        at.pilot_s = time.perf_counter() - began
    step_s = step_seconds(models.build(model.record["arch"], num_classes=max(2, len(data.classes))),
                          model.record["img_size"], device, STEP_BATCH)
    return write_report(request, model, data, first_files, (first, second), table, stats, ranking, chosen,
                        chosen_name, labelled, step_s, at, device)


def other_criteria(request: Request, model: Model, data: ImageFiles, device: torch.device, rows: np.ndarray
                   ) -> tuple[pd.DataFrame, dict[str, float], int]:
    """The criteria of `registry.CRITERIA` other than plasticity on the model and --data (`criteria.measure`):
    the gradient criteria on `GRADIENT_BATCHES` batches of labelled images of `rows` (`measured_rows`) when --data
    has two classes or more (skipped otherwise), FPS on the same images, KappaTune and size. Returns (scores: criterion,
    component, layer, value; criterion → wall time in s; labelled images used, 0 when skipped)."""
    import sys

    size, norm = model.record["img_size"], (tuple(model.record["mean"]), tuple(model.record["std"]))
    others = check_others(request.others)
    gradients = len(data.classes) >= 2 and bool(set(GRADIENT_CRITERIA) & set(others))
    if not ({"fps"} & set(others) or gradients):
        images = Split(np.zeros((0, size, size, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64))
    else:
        images = labelled_images(data, GRADIENT_BATCHES * request.batch_size, size, request.seed, rows)
    batches = (request.batch_size, GRADIENT_BATCHES, size, device, request.seed, *norm)
    measured = {"fps": lambda: criteria.fps(model.network, images, *batches),
                "kappatune": lambda: criteria.kappatune(model.network),
                "trainable_params": lambda: criteria.trainable_params(model.network)}
    measured = {name: run for name, run in measured.items() if name in others}
    if gradients:
        headed = copy.deepcopy(model.network)  # gets a new head and gradients
        measured = {GRADIENT_CRITERIA: lambda: criteria.gradient_criteria(headed, images, len(data.classes),
                                                                          *batches)} | measured
    if not measured:
        return pd.DataFrame(columns=["criterion", "component", "layer", "value"]), {}, 0
    scores, costs = criteria.measure(measured, device, progress=lambda line: print(line, file=sys.stderr))
    return scores, dict(zip(costs["criterion"], costs["wall_s"], strict=True)), len(images.labels) * gradients


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
                 table: pd.DataFrame, stats: dict, ranking: pd.DataFrame, chosen: pd.DataFrame, chosen_name: str,
                 labelled: int, step_s: float, at: AtBudget | None = None, device: torch.device | None = None
                 ) -> dict:
    from peft import LoraConfig

    from vitplasticity.figures import plasticity_vs_depth

    modes = tuple(request.modes)
    order = chosen.set_index("criterion").loc[chosen_name, "order"]
    top = order[0]
    counts = count_by_component(model.network)
    shown = models.build(model.record["arch"], num_classes=max(2, len(data.classes)))
    if at is None:
        trainable = set_trainable(shown, [top])
        lora_component, target, saved = lora_plan(order, shown)
        train_line = (f"`trainable_parameters.txt`: the {len(trainable)} parameters of {LABELS[top]} in every block "
                      f"and the head, the first choice of {criterion_label(chosen_name)} (`--criterion {chosen_name}`; "
                      "another criterion's choice with `--criterion NAME`). In PyTorch:")
        lora_line = (f"With LoRA (`peft`): `lora/adapter_config.json` adapts {LABELS[lora_component]} (the first "
                     f"linear component of that criterion's ranking; target_modules `{target}`) and trains "
                     f"{', '.join(saved)} whole (LoRA cannot adapt a LayerNorm).")
    else:
        units = at.units[chosen_name]
        trainable = set_trainable(shown, [], units)
        target, saved = unit_lora_plan(units, shown)
        lora_component = target
        train_line = (f"`trainable_parameters.txt`: the {len(trainable)} parameters of the units "
                      f"{criterion_label(chosen_name)} selects within the budget ({units_text(units)}: "
                      f"{at.params(units):,} block parameters) and the head (`--criterion {chosen_name}`; another "
                      "criterion's selection with `--criterion NAME`). In PyTorch:")
        lora_line = (f"With LoRA (`peft`): `lora/adapter_config.json` adapts the linear modules of those units "
                     f"(target_modules {', '.join(f'`{name}`' for name in target)}) and trains {', '.join(saved)} "
                     "whole (LoRA cannot adapt a LayerNorm); a low-rank update of a module trains fewer parameters "
                     "than the budget counts for it." if target else
                     "No `lora/` is written: those units hold no linear module for LoRA to adapt (LoRA cannot adapt a "
                     "LayerNorm); train them whole with the list above.")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=target, modules_to_save=saved) if target else None
    words = describe(shown)  # the model as it will be trained: with the head the task needs
    within = request.reference is None
    linear_note = ""
    if model.record["arch"].get("head") == "linear":
        linear_note = 'model.reset_classifier(NUM_CLASSES, global_pool="avg")  # the linear head, as measured\n'
    snippet = (f"import timm\nmodel = {model.create}\n{linear_note}"
               f'names = set(open("{request.out / "trainable_parameters.txt"}").read().split())\n'
               "for name, parameter in model.named_parameters():\n    parameter.requires_grad_(name in names)\n")
    config = workflow_config(model, Path(request.data), request.reference, request.pairs)
    found = conditions(ranking, stats, modes, chosen)
    head_kind = "as the architecture defines it"
    if model.record["arch"].get("head") == "linear":
        native = model.record["provenance"].get("native_head_params")
        head_kind = ("linear: the attention pool replaced by mean pooling + linear"
                     + (f"; the native attention-pool head would train {native:,} parameters" if native else ""))
    shown_rank = ranking[["mode", "rank", "label", "mean", "ci95", "layer_min", "layer_max", "theoretical_rank"]]
    report = [
        f"# Which components to finetune: {model.name} on {request.data}", "",
        "## What each criterion would train", "", criteria_caption(data, labelled, check_others(request.others)), "",
        _markdown(chosen[["label", "ranking", "first", "wall_s"]].assign(first=chosen["first"].map(LABELS))
                  .rename(columns={"label": "criterion", "ranking": "ranking (first choice first)",
                                   "first": "first choice", "wall_s": "wall time (s)"})), "",
        agreement(chosen)[1][0].upper() + agreement(chosen)[1][1:], "",
        *([] if at is None else ["## At the budget", "", _markdown(budget_table(at)), "",
                                 *[line for text in budget_words(at) for line in (text, "")]]),
        *([] if at is None or at.plan is None else [
            "## Pilot: short finetuning on your images", "", _markdown(pilot_table(at.runs)), "",
            *[line for text in pilot_words(at.plan, at.runs, at.pilot_s, device) for line in (text, "")]]),
        "## The paper's answer: plasticity", "",
        *_words(ranking, stats, modes, within, counts, chosen), "",
        "## Conditions", "", "Under which the paper observed that the most plastic components finetune best:", "",
        *[f"- {'holds' if c.holds else '**does not hold**'}: {c.name}: {c.text}" for c in found], "",
        "## Ranking", "", "Plasticity per component, mean over the layers (per layer: `plasticity_per_layer.csv`; "
        "figure: `plasticity_vs_depth.png`).", "", _markdown(shown_rank), "",
        pairs_line(stats, within) + data_line(request.data, data) + f" Tokens per image {stats['num_tokens']}, width "
        f"{stats['embed_dim']}. " + preprocessing_line(model), "",
        "## What the components hold in this model", "",
        f"- emb: {words['emb']}.", f"- head ({head_kind}; for {max(2, len(data.classes))} classes): "
        f"{words['head']}.", *([f"- {words['layer_scale']}."] if words["layer_scale"] else []),
        "- ln1, mha, ln2, fc1, fc2: `norm1`, `attn` (fused `qkv` and `proj`, with LayerScale `ls1` where present), "
        "`norm2`, `mlp.fc1`, `mlp.fc2` (with LayerScale `ls2`) of every block.", "",
        "## Train it", "",
        train_line, "", "```python", snippet.rstrip(), "```", "", lora_line, "",
        *([] if lora is None else [
            "```python", "from peft import LoraConfig, get_peft_model",
            f'model = get_peft_model(model, LoraConfig.from_pretrained("{request.out / "lora"}"))', "```", ""]),
        "## Compare the arms by finetuning", "",
        "`workflow_config.yaml` prepares your images (your train/val/test sub-folders, or a seeded 60/20/20 split), "
        "finetunes every arm and the linear probe, and tabulates them: "
        "`snakemake --cores all --configfile workflow_config.yaml`."
        + ("" if not within else " Set the reference task's `path` to images like the pretraining data first.")
        + " To run it in a folder of its own: `snakemake -s CHECKOUT/Snakefile --directory DIR --cores all "
        "--configfile workflow_config.yaml` (CHECKOUT: this project's checkout). "
        + projected_cost(config, step_s, STEP_BATCH),
        "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "",
    ]
    with atomic_dir(request.out) as tmp:
        table.insert(0, "model", model.name)
        table.to_csv(tmp / "plasticity_per_layer.csv", index=False)
        ranking.to_csv(tmp / "ranking.csv", index=False)
        chosen.assign(order=chosen["order"].str.join(" ")).to_csv(tmp / "criteria.csv", index=False)
        (tmp / "token_norms.json").write_text(pd.Series(stats).to_json(indent=2) + "\n")
        plasticity_vs_depth(table, tmp)
        (tmp / "trainable_parameters.txt").write_text("\n".join(trainable) + "\n")
        if lora is not None:
            lora.save_pretrained(tmp / "lora")
        if at is not None:
            write_json(tmp / "selection.json", selection_record(at, chosen_name, device, data))
        (tmp / "workflow_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        first, second = pairs
        pd.DataFrame({"first": [first_files.names[i] for i in first],
                      "second": [data.names[i] for i in second]}).to_csv(tmp / "pairs.csv", index=False)
        (tmp / "report.md").write_text("\n".join(report))
    return {"ranking": ranking, "recommended": top, "lora": lora_component, "criteria": chosen,
            "summary": _words(ranking, stats, modes, within, counts, chosen), "conditions": found,
            "budget": None if at is None else budget_table(at),
            "pilot": None if at is None or at.runs is None else pilot_table(at.runs)}

