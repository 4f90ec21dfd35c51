"""Selection criteria measured side by side on one model, task and set of images (study-spec §8).

Each criterion scores every (component, layer) of the five block components; higher means "finetune
this one". `selection` compares their rankings with the finetuning ranking.

- ``plasticity_embedding``, ``plasticity_hidden``, ``plasticity_scale_free``: `plasticity.measure` in
  that mode (the paper's definition, the hidden-state extension, and the variant invariant to the
  scale of E).
- ``relative_gradient_norm``: ‖∇θ‖ / ‖θ‖ of the component's parameters at a layer, the norms taken over
  all of its tensors together, averaged over a few batches of the downstream training split (the
  criterion of Auto-RGN in surgical fine-tuning: Lee et al., ICLR 2023). Gradients of the
  cross-entropy through a freshly initialised linear head (seeded), as finetuning starts; eval
  transform, model in eval mode.
- ``trainable_params``: the component's parameter count in the block (ties share a rank).

Every criterion also reports its cost: wall time and the peak memory it adds above the loaded model
(`cost`): on a GPU from PyTorch's allocator statistics, on Linux from the process's peak resident set
(reset through ``/proc/self/clear_refs`` before each criterion; memory the allocator already holds
from earlier work is reused without being counted again); elsewhere not measured.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from vitplasticity import transforms
from vitplasticity.components import block_parameters
from vitplasticity.prepared import Split
from vitplasticity.training import batch_indices

CRITERIA = ("plasticity_embedding", "plasticity_hidden", "plasticity_scale_free", "relative_gradient_norm",
            "trainable_params")


@dataclass
class Cost:
    wall_s: float = float("nan")
    peak_mib: float = float("nan")  # added above the memory in use when the criterion started


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextlib.contextmanager
def cost(device: torch.device) -> Iterator[Cost]:
    """Measure the wall time and added peak memory of the block it wraps into the yielded `Cost`."""
    measured = Cost()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to now
            before = _status_kib("VmRSS") * 1024
        except OSError:
            before = None
    began = time.perf_counter()
    yield measured
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        measured.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    elif before is not None:
        measured.peak_mib = max(0, _status_kib("VmHWM") * 1024 - before) / 2**20
    measured.wall_s = time.perf_counter() - began


def trainable_params(model: torch.nn.Module) -> pd.DataFrame:
    """Parameter count per (component, layer). Columns component, layer, value."""
    rows = [{"component": c, "layer": layer, "value": float(sum(p.numel() for _, p in params))}
            for (c, layer), params in block_parameters(model).items()]
    return pd.DataFrame(rows)


def relative_gradient_norms(model: torch.nn.Module, train: Split, num_classes: int, batch_size: int, batches: int,
                            img_size: int, device: torch.device, seed: int = 0,
                            mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD) -> pd.DataFrame:
    """‖∇θ‖ / ‖θ‖ per (component, layer), mean over `batches` seeded batches of `train`.

    The model gets a new `num_classes` linear head (initialised from `seed`); every parameter is given a
    gradient for the measurement and the model is left as it was found apart from the head.
    Columns component, layer, value (dimensionless).
    """
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    model.to(device).eval()
    groups = {key: [p for _, p in params] for key, params in block_parameters(model).items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    weight_norms = {key: torch.sqrt(sum(p.detach().double().square().sum() for p in params))
                    for key, params in groups.items()}
    totals = dict.fromkeys(groups, 0.0)
    try:
        for step in range(batches):
            index = batch_indices(len(train.labels), batch_size, step, seed)
            images = transforms.eval_batch(train.images[index], img_size, device, mean, std)
            labels = torch.as_tensor(np.asarray(train.labels[index]), device=device)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images).float(), labels).backward()
            for key, params in groups.items():
                grad = torch.sqrt(sum(p.grad.double().square().sum() for p in params if p.grad is not None))
                totals[key] += float(grad / weight_norms[key]) if weight_norms[key] > 0 else float("nan")
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return pd.DataFrame([{"component": c, "layer": layer, "value": total / batches}
                         for (c, layer), total in totals.items()])


def measure(criteria: dict[str, Callable[[], pd.DataFrame]], device: torch.device,
            progress: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run each criterion (name → function giving component, layer, value rows) under `cost`.

    Returns (scores: criterion, component, layer, value; costs: criterion, wall_s, peak_mib).
    """
    scores, costs = [], []
    for name, run in criteria.items():
        with cost(device) as spent:
            table = run()
        scores.append(table.assign(criterion=name)[["criterion", "component", "layer", "value"]])
        costs.append({"criterion": name, "wall_s": spent.wall_s, "peak_mib": spent.peak_mib})
        progress(f"criterion {name}: {spent.wall_s:.1f} s, +{spent.peak_mib:.0f} MiB")
    return pd.concat(scores, ignore_index=True), pd.DataFrame(costs)


def component_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean over layers per (criterion, component): the score `selection` ranks. Columns criterion, component,
    score."""
    mean = scores.groupby(["criterion", "component"], as_index=False, sort=False)["value"].mean()
    return mean.rename(columns={"value": "score"})
