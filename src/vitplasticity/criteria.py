"""Selection criteria measured side by side on one model, task and set of images (study-spec §8).

Each criterion scores every unit, one block component in one block: (component, layer) of ``ln1 mha ln2
fc1 fc2``. Which end of a criterion's scale is chosen first is declared once, in `registry.CRITERIA`
(the names and their order live there too); `selection` compares their rankings with the finetuning
ranking.

- ``plasticity_embedding``, ``plasticity_hidden``, ``plasticity_scale_free``: `plasticity.measure` in
  that mode (the paper's definition, the hidden-state extension, and the variant invariant to the
  scale of E). Higher first.
- ``relative_gradient_norm``: ‖∇θ‖ / ‖θ‖ of the unit's parameters, the norms taken over all of its
  tensors together, averaged over a few batches of the downstream training split (the criterion of
  Auto-RGN in surgical fine-tuning: Lee et al., ICLR 2023). Gradients of the cross-entropy through a
  freshly initialised linear head (seeded), as finetuning starts; eval transform, model in eval mode.
  Higher first.
- ``fisher``: SPT's parameter sensitivity (He et al., "Sensitivity-Aware Visual Parameter-Efficient
  Fine-Tuning", ICCV 2023), a diagonal empirical Fisher estimate: each parameter's squared mini-batch
  gradient summed over the same batches (and the same backward passes) as the relative gradient norm,
  then the **mean** over the unit's parameters, Σ_b ‖∇_unit L_b‖² / n_unit. The mean, not the sum: the
  sum grows with the unit's size and would rank units much as ``trainable_params`` does, while a budget
  already charges a unit for its size; the mean is the sensitivity per trained parameter. Higher first.
- ``fps``: FPS's importance (Yang, Wei and Lin, "FPS: Feedforward-based Parameter Selection for
  Efficient Fine-Tuning", arXiv:2510.27359, 2025), I(w_jk) = |w_jk| · E|a_k|, the expectation over the
  images and tokens of the same batches, forward passes only (no head, no gradient); a_k the input
  feature k of the weight's module: for an ``nn.Linear`` its input, for an ``nn.LayerNorm`` its
  normalised input x̂ (the γ_k it scales). A unit's score is the **mean** of I over the weight entries
  of its ``nn.Linear`` and ``nn.LayerNorm`` modules (biases, which have no input, and other modules
  such as LayerScale are not scored), for the reason given for ``fisher``. Higher first.
- ``kappatune``: the order of peft's `KappaTuneSelector.get_best_targets` (condition number
  σ_max/σ_min of each ``nn.Linear`` weight, lowest first; peft's public API gives the order, not κ).
  A unit's score is the position (1 = lowest κ), among the block units, at which that list first names
  one of its modules: MHA's qkv or proj, whichever is better conditioned; FC1 and FC2 one module each.
  A LayerNorm unit has no κ: NaN, placed after every unit with a κ. Lower first.
- ``trainable_params``: the unit's parameter count (ties share a rank). Higher first.

Every criterion also reports its cost: wall time and the peak memory it adds above the loaded model
(`cost`): on a GPU from PyTorch's allocator statistics, on Linux from the process's peak resident set
(reset through ``/proc/self/clear_refs`` before each criterion; memory the allocator already holds
from earlier work is reused without being counted again); elsewhere not measured. Criteria computed
from one set of passes (``relative_gradient_norm`` and ``fisher``) are timed together and each reports
that cost, which is what either costs alone; the job pays it once.
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
from vitplasticity.components import block_parameters, component_of
from vitplasticity.prepared import Split
from vitplasticity.training import batch_indices


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


def gradient_criteria(model: torch.nn.Module, train: Split, num_classes: int, batch_size: int, batches: int,
                      img_size: int, device: torch.device, seed: int = 0,
                      mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD) -> dict[str, pd.DataFrame]:
    """``relative_gradient_norm`` and ``fisher`` per (component, layer) from one set of backward passes.

    Over `batches` seeded batches of `batch_size` images of `train` (`training.batch_indices`), g_b the
    gradient of batch b's mean cross-entropy: relative_gradient_norm = mean_b ‖g_b,unit‖ / ‖θ_unit‖
    (dimensionless), fisher = Σ_b ‖g_b,unit‖² / n_unit (squared loss units per parameter), n_unit the
    unit's parameter count (the module docstring says why the mean over parameters). The model gets a new
    `num_classes` linear head (initialised from `seed`); every parameter is given a gradient for the
    measurement and the model is left as it was found apart from the head. Returns {criterion: frame
    with columns component, layer, value}.
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
    sizes = {key: sum(p.numel() for p in params) for key, params in groups.items()}
    ratios, squares = dict.fromkeys(groups, 0.0), dict.fromkeys(groups, 0.0)
    try:
        for step in range(batches):
            index = batch_indices(len(train.labels), batch_size, step, seed)
            images = transforms.eval_batch(train.images[index], img_size, device, mean, std)
            labels = torch.as_tensor(np.asarray(train.labels[index]), device=device)
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(images).float(), labels).backward()
            for key, params in groups.items():
                square = float(sum(p.grad.double().square().sum() for p in params if p.grad is not None))
                squares[key] += square
                ratios[key] += square ** 0.5 / float(weight_norms[key]) if weight_norms[key] > 0 else float("nan")
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {"relative_gradient_norm": _frame({key: total / batches for key, total in ratios.items()}),
            "fisher": _frame({key: total / sizes[key] for key, total in squares.items()})}


def _frame(values: dict[tuple[str, int], float]) -> pd.DataFrame:
    return pd.DataFrame([{"component": c, "layer": layer, "value": value} for (c, layer), value in values.items()])


def _block_modules(model: torch.nn.Module, kinds: tuple[type, ...]) -> dict[str, tuple[torch.nn.Module, tuple]]:
    """Full module name → (module, (component, layer)) for the modules of `kinds` in the blocks' components."""
    found = {}
    for layer, block in enumerate(model.blocks):
        for name, module in block.named_modules():
            full = f"blocks.{layer}.{name}"
            if isinstance(module, kinds) and module.weight is not None:
                found[full] = (module, (component_of(full + ".weight"), layer))
    return found


def fps(model: torch.nn.Module, train: Split, batch_size: int, batches: int, img_size: int, device: torch.device,
        seed: int = 0, mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD) -> pd.DataFrame:
    """FPS importance per (component, layer): the mean over the unit's weight entries of |w_jk| · E|a_k|.

    E over every token of the images of the same `batches` seeded batches as `gradient_criteria`; a_k the
    module's input feature k (``nn.Linear``) or normalised input x̂_k (``nn.LayerNorm``); forward passes
    only, model in eval mode (formula and source: the module docstring). Columns component, layer, value
    (the units of the activations: the normalised input's for LayerNorms).
    """
    model.to(device).eval()
    modules = _block_modules(model, (torch.nn.Linear, torch.nn.LayerNorm))
    sums = {name: torch.zeros(module.weight.shape[-1], dtype=torch.float64, device=device)
            for name, (module, _) in modules.items()}
    counts = dict.fromkeys(modules, 0)

    def record(name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if isinstance(module, torch.nn.LayerNorm):
                x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            x = x.reshape(-1, x.shape[-1])
            sums[name] += x.abs().double().sum(dim=0)
            counts[name] += x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, (module, _) in modules.items()]
    try:
        with torch.no_grad():
            for step in range(batches):
                index = batch_indices(len(train.labels), batch_size, step, seed)
                model(transforms.eval_batch(train.images[index], img_size, device, mean, std))
    finally:
        for handle in handles:
            handle.remove()
    importance: dict[tuple[str, int], float] = {}
    entries: dict[tuple[str, int], int] = {}
    for name, (module, unit) in modules.items():
        activation = sums[name] / counts[name]
        weight = module.weight.detach().double().abs()
        importance[unit] = importance.get(unit, 0.0) + float((weight * activation).sum())  # broadcasts over rows
        entries[unit] = entries.get(unit, 0) + weight.numel()
    return _frame({unit: importance[unit] / entries[unit] for unit in importance})


def kappatune(model: torch.nn.Module) -> pd.DataFrame:
    """peft's KappaTune order per (component, layer): 1 for the unit whose ``nn.Linear`` comes first in
    `KappaTuneSelector.get_best_targets` (lowest condition number), counting each unit once, at its first
    module; NaN for a unit without an ``nn.Linear`` (LN1, LN2). Columns component, layer, value (a rank)."""
    from peft.helpers import KappaTuneSelector

    linears = _block_modules(model, (torch.nn.Linear,))
    position: dict[tuple[str, int], int] = {}
    for name in KappaTuneSelector(model, show_progress=False).get_best_targets():
        if name in linears:
            position.setdefault(linears[name][1], len(position) + 1)
    return _frame({unit: float(position.get(unit, float("nan"))) for unit in block_parameters(model)})


def measure(criteria: dict[str | tuple[str, ...], Callable], device: torch.device,
            progress: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run each criterion under `cost`: name → function giving component, layer, value rows, or a tuple of
    names → function giving {name: such rows} from one shared computation (each name reports its cost).

    Returns (scores: criterion, component, layer, value; costs: criterion, wall_s, peak_mib, measured_with,
    the "+"-joined names timed together).
    """
    scores, costs = [], []
    for names, run in criteria.items():
        with cost(device) as spent:
            tables = run()
        if isinstance(names, str):
            names, tables = (names,), {names: tables}
        for name in names:
            scores.append(tables[name].assign(criterion=name)[["criterion", "component", "layer", "value"]])
            costs.append({"criterion": name, "wall_s": spent.wall_s, "peak_mib": spent.peak_mib,
                          "measured_with": "+".join(names)})
        progress(f"criterion {'+'.join(names)}: {spent.wall_s:.1f} s, +{spent.peak_mib:.0f} MiB")
    return pd.concat(scores, ignore_index=True), pd.DataFrame(costs)


def component_scores(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean over the layers it scores per (criterion, component): the score `selection` ranks (NaN where no
    layer is scored, as for a LayerNorm under ``kappatune``). Columns criterion, component, score."""
    mean = scores.groupby(["criterion", "component"], as_index=False, sort=False)["value"].mean()
    return mean.rename(columns={"value": "score"})
