"""Preflight: whether a study's batches fit this machine and what its jobs will cost here, measured in seconds.

For each (model, optimizer) of the study's experiments, on the device the jobs use (`runtime.device`): a few real
training steps (`training.train_step`, the finetuning job's own step) at the study's batch and the runtime's
micro-batch (automatic: the largest that fits, as jobs pick it), for arm ``all`` and one single block component
(`SINGLE_ARMS`), and one plasticity batch (`plasticity.measure` at ``runtime.plasticity_batch``). Weights and
images are random (the cost of a step does not depend on their values); images are stored at the side of the
model's tasks. From the measured step times and the study's plan (runs and steps per experiment, as the workflow
plans them) it projects device-hours per experiment (`project`).

Also the measuring primitives of ``benchmarks/device.py``: peak memory, timed steps, executed FLOPs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitplasticity import budget, components, models, plasticity, runtime, streaming, training, transforms
from vitplasticity.errors import UserError
from vitplasticity.prepared import Split
from vitplasticity.registry import lr_label

# Dense bf16 tensor-core peaks (TFLOPS) by device-name fragment, from the vendors' data sheets; first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
# The single-component arm measured beside `all`: the first of these the study defines (MHA and FC1 carry the
# most weights of a block, so their weight gradients cost the most).
SINGLE_ARMS = ("mha", "fc1", "fc2", "ln1", "ln2")
WARMUP_STEPS = 2  # untimed: allocator, kernels and the optimizer state settle
TIMED_STEPS = 3
NUM_CLASSES = 1000  # the head's width: at least any downstream task's (its cost is negligible beside the blocks)
GIB = 2**30


# --- measuring primitives -----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field: str) -> int | None:
    """A memory field (VmHWM, VmRSS) of /proc/self/status in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or on a CPU the process's peak resident set (Linux clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # refused: the peak since the process started
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak memory since `reset_peak_memory`: tensors allocated on the GPU, or on a CPU the process's peak resident
    set (VmHWM: everything the process holds, libraries included); None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_bytes("VmHWM")


def device_memory_bytes(device: torch.device) -> int:
    """Memory of the device: the GPU's total, or the machine's physical memory for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} torch thread{'s' if threads != 1 else ''}"


def rated_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: the override, else `PEAK_TFLOPS`, else None (a CPU, an unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in PEAK_TFLOPS if fragment in name), None)


def executed_flops_per_image(model: torch.nn.Module, img_size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one `img_size` image with the model's current trainable set (`FlopCounterMode`:
    matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        logits = model(torch.zeros(1, 3, img_size, img_size, device=device))
        F.cross_entropy(logits, torch.zeros(1, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def activation_bytes_per_image(model: torch.nn.Module, img_size: int, device: torch.device) -> int:
    """Bytes autograd keeps for the backward pass per image, under autocast with the model's trainable set: the
    tensors saved by a forward of 2 images less those of 1 image (what does not scale with the images, such as
    weights and their autocast copies, cancels)."""
    def saved(count: int) -> int:
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), runtime.autocast(device):
            model(torch.zeros(count, 3, img_size, img_size, device=device))
        return sum(seen.values())

    model.train()
    return max(0, saved(2) - saved(1))


def time_steps(model: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray,
               cfg: training.TrainConfig, device: torch.device, warmup_steps: int, timed_steps: int,
               forward: Callable[[torch.Tensor], torch.Tensor] | None = None, prefetch: int = 0) -> dict:
    """Images/s of the training loop's step (`training.train_step`) on `images` (uint8 (N, H, W, 3), on the device
    or the host): `timed_steps` steps of `cfg.batch_size` timed after `warmup_steps` untimed ones, at
    `cfg.micro_batch` (None: `training.largest_micro_batch`, as jobs pick it); `forward` defaults to the model.

    Returns images_per_s, step_s (s), micro_batch, peak_memory_gib (GiB, over the timed steps, see
    `peak_memory_bytes`; None where unreadable), images (counted as given to the timed steps), planned_images,
    seconds.
    """
    forward = model if forward is None else forward
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = training.make_optimizer(params, cfg, device)
    model.train()
    micro = cfg.micro_batch or training.largest_micro_batch(forward, model, images, labels, cfg, device)
    fetch = training.batch_fetcher(images, labels, cfg, device)
    steps = range(warmup_steps + timed_steps)
    prefetcher = streaming.Prefetcher(fetch, steps, prefetch) if prefetch else None
    get = prefetcher.get if prefetcher else fetch
    height, width = images.shape[1:3]

    def step(index: int) -> int:
        batch_images, batch_labels = get(index)
        draws = transforms.sample_crop_flip(cfg.batch_size, height, width, runtime.step_generator(0, index, 1))
        training.train_step(forward, optimizer, params, batch_images, batch_labels, draws, cfg, micro, device)
        return len(batch_labels)

    try:
        for index in steps[:warmup_steps]:
            step(index)
        synchronize(device)
        reset_peak_memory(device)
        began = time.perf_counter()
        done = sum(step(index) for index in steps[warmup_steps:])
        synchronize(device)
        seconds = time.perf_counter() - began
    finally:
        if prefetcher:
            prefetcher.close()
    peak = peak_memory_bytes(device)
    return {"images_per_s": done / seconds, "step_s": seconds / timed_steps, "micro_batch": micro,
            "peak_memory_gib": None if peak is None else peak / GIB, "timed_steps": timed_steps, "images": done,
            "planned_images": cfg.batch_size * timed_steps, "seconds": seconds}


# --- advice and projection ------------------------------------------------------------------------------


def micro_batch_that_fits(batch: int, micro: int, peak_bytes: float, activation_bytes: float,
                          limit_bytes: float) -> int | None:
    """The largest micro-batch `batch // 2**k` (at most `micro`) whose peak fits `limit_bytes`, or None if even 1
    does not: the peak measured at `micro` less the activations (`activation_bytes` per image) of the images it
    no longer holds at once. Example: batch 512 measured at micro-batch 512 with an 80 GiB peak and 0.125 GiB per
    image, limit 40 GiB: 256 needs 48 GiB, 128 needs 32 GiB, so 128."""
    size = batch
    while True:
        if size <= micro and peak_bytes - (micro - size) * activation_bytes <= limit_bytes:
            return size
        if size == 1:
            return None
        size //= 2


def planned_runs(settings: Mapping) -> list[dict]:
    """The finetuning runs the workflow plans for `settings` (a validated study config), one row per experiment,
    task and arm: {experiment, model, task, optimizer, arm, components, runs, steps}.

    An experiment's arms are its `arms`, else every arm and control, then the budget arms when it sets
    `selection`; `components` is what the arm trains whole (a control: its one component; a budget arm: none, it
    trains the units its selector picks). `runs` = the task's lrs x the seeds, each of `steps` optimizer steps,
    less the runs an earlier experiment already plans: the same model, task, optimizer, arm and rate (lr x
    lr_scale, as its run folder names it, `registry.lr_label`), which the workflow runs once.
    """
    budget_arms = list(budget.arms(settings["selection"]))
    arms = {**settings["arms"], **{name: [c["component"]] for name, c in settings["controls"].items()},
            **{name: [] for name in budget_arms}}
    seeds = len(settings["finetune"]["seeds"])
    rows, planned = [], set()
    for name, exp in settings["experiments"].items():
        named = exp.get("arms") or [arm for arm in arms if arm not in budget_arms]
        for task in exp["tasks"]:
            spec = settings["tasks"][task]
            rates = dict.fromkeys(lr_label(lr * exp["lr_scale"]) for lr in spec["lrs"])
            for arm in named + (budget_arms if exp["selection"] else []):
                new = [rate for rate in rates if (exp["model"], task, exp["optimizer"], arm, rate) not in planned]
                if not new:
                    continue
                planned.update((exp["model"], task, exp["optimizer"], arm, rate) for rate in new)
                rows.append({"experiment": name, "model": exp["model"], "task": task, "optimizer": exp["optimizer"],
                             "arm": arm, "components": arms[arm], "runs": len(new) * seeds, "steps": spec["steps"]})
    return rows


def arm_proxy(arm_components: list[str], single: str) -> str:
    """The measured arm whose step time stands for an arm of `arm_components`: `single` for one block component
    (every block arm back-propagates through all blocks; they differ in the weight gradients of one component) or
    for a budget arm (none whole: a few units), else ``all`` (the embedding, or several components: at most arm
    `all`'s time)."""
    if not arm_components or (len(arm_components) == 1 and arm_components[0] in components.BLOCK_COMPONENTS):
        return single
    return "all"


def project(settings: Mapping, step_s: Mapping[str, Mapping[str, Mapping[str, float]]],
            plasticity_batch_s: Mapping[str, float], plasticity_batch: int) -> dict:
    """Device-hours of each experiment of `settings` (a validated study config) from measured step times.

    `step_s[model][optimizer][arm]` (s) for the arms ``all`` and the single one; an experiment's runs are those
    `planned_runs` gives it, each `steps` x the step time of its arm's proxy (`arm_proxy`). Plasticity jobs (one
    per model and task of the experiments): ceil(n_pairs / plasticity_batch) batches x `plasticity_batch_s[model]`.
    Evaluation passes, criteria and checkpoint jobs are not counted (`assumptions` says so).
    """
    out = {name: {"runs": 0, "steps": 0, "gpu_hours": 0.0} for name in settings["experiments"]}
    for row in planned_runs(settings):
        measured = step_s[row["model"]][row["optimizer"]]
        single = next(arm for arm in measured if arm != "all")
        projected = out[row["experiment"]]
        projected["runs"] += row["runs"]
        projected["steps"] += row["runs"] * row["steps"]
        projected["gpu_hours"] += row["runs"] * row["steps"] * measured[arm_proxy(row["components"], single)] / 3600
    total = sum(projected["gpu_hours"] for projected in out.values())
    pairs = settings["plasticity"]["n_pairs"]
    jobs = sorted({(exp["model"], task) for exp in settings["experiments"].values() for task in exp["tasks"]})
    seconds = sum(math.ceil(pairs / plasticity_batch) * plasticity_batch_s[model] for model, _ in jobs)
    out["plasticity"] = {"jobs": len(jobs), "gpu_hours": seconds / 3600}
    out["total_gpu_hours"] = total + seconds / 3600
    out["assumptions"] = ("training steps x the measured step time of the arm (arms of one block component and "
                          "budget arms: the single component's; others: arm all's), one device per run, no "
                          "data-loading stalls; plasticity batches as measured; evaluation passes, criteria and "
                          "checkpoints not counted")
    return out


# --- the preflight --------------------------------------------------------------------------------------


def _model_tasks(settings: Mapping, model: str) -> list[str]:
    return sorted({task for exp in settings["experiments"].values() if exp["model"] == model for task in exp["tasks"]})


def _stored_side(settings: Mapping, tasks: list[str], model: str) -> int:
    """Side of the images `tasks` store (the largest), else the model's input side."""
    sides = [settings["tasks"][t]["data"].get("store_size") or settings["tasks"][t]["data"].get("image_size")
             for t in tasks]
    return max([s for s in sides if s] or [settings["models"][model]["img_size"]])


def _random_split(count: int, side: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (count, side, side, 3), dtype=np.uint8),
                 rng.integers(0, NUM_CLASSES, count).astype(np.int64))


def _build(settings: Mapping, model: str, device: torch.device) -> torch.nn.Module:
    spec = settings["models"][model]
    arch = models.architecture(spec["timm_name"], spec.get("kwargs") or {}, spec["img_size"])
    with device:  # initialised where it runs
        return models.build({**arch, "head": spec["head"]}, NUM_CLASSES)


def single_arm(settings: Mapping) -> str:
    """The single-component arm measured beside `all` (`SINGLE_ARMS`)."""
    found = next((arm for arm in SINGLE_ARMS if settings["arms"].get(arm) == [arm]), None)
    if found is None or "all" not in settings["arms"]:
        raise UserError("the preflight measures the arms `all` and one single block component; the config's arms "
                        f"define {', '.join(settings['arms'])}; add e.g. `all: [emb, ln1, mha, ln2, fc1, fc2]` "
                        "and `mha: [mha]` to arms")
    return found


def measure(settings: Mapping, rt, device: torch.device, progress: Callable[[str], None] = print) -> dict:
    """Measure every (model, optimizer) of the experiments of `settings` (a validated study config) under runtime
    settings `rt` (`machine.Runtime`) on `device`; see the module docstring. Returns the results without the
    fit check (`assess`)."""
    single = single_arm(settings)
    arms = {"all": settings["arms"]["all"], single: settings["arms"][single]}
    ft = settings["finetune"]
    batch = ft["batch_size"]
    peak = rated_peak_flops(device)
    results: dict = {"device": {"name": device_name(device), "type": device.type,
                                "memory_gib": device_memory_bytes(device) / GIB,
                                "peak_memory": ("CUDA allocator peak" if device.type == "cuda" else
                                                "process peak resident set (VmHWM)"),
                                "peak_tflops": None if peak is None else peak / 1e12},
                     "batch_size": batch, "runtime_micro_batch": rt.micro_batch,
                     "warmup_steps": WARMUP_STEPS, "timed_steps": TIMED_STEPS, "models": {}, "plasticity": {}}
    plans = sorted({(exp["model"], exp["optimizer"]) for exp in settings["experiments"].values()})
    for model_name, optimizer in plans:
        spec = settings["models"][model_name]
        side = _stored_side(settings, _model_tasks(settings, model_name), model_name)
        split = _random_split(max(batch, 2), side, seed=0)
        images = training.resident(split.images, device)
        cfg = training.TrainConfig(
            steps=WARMUP_STEPS + TIMED_STEPS, eval_every=1, batch_size=batch, lr=1e-3, seed=0,
            img_size=spec["img_size"], optimizer=optimizer, weight_decay=ft["weight_decay"],
            clip_norm=ft["clip_norm"], micro_batch=rt.micro_batch, prefetch=0)
        for arm, arm_components in arms.items():
            model = _build(settings, model_name, device)
            components.set_trainable(model, arm_components)
            flops = executed_flops_per_image(model, spec["img_size"], device)
            activations = activation_bytes_per_image(model, spec["img_size"], device)
            forward = torch.compile(model) if rt.compile else model
            result = _steps_that_fit(model, forward, images, split.labels, cfg, device)
            achieved = flops * result["images_per_s"]
            result.update(stored_side=side, flops_per_image=flops, achieved_tflops=achieved / 1e12,
                          mfu=achieved / peak if peak else None, activation_mib_per_image=activations / 2**20)
            results["models"].setdefault(model_name, {}).setdefault(optimizer, {})[arm] = result
            progress(f"  {model_name} {optimizer} {arm}: {result['images_per_s']:.1f} images/s")
            del model, forward
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for model_name in sorted({model for model, _ in plans}):
        results["plasticity"][model_name] = _plasticity_batch(settings, rt, model_name, device)
    return results


def _steps_that_fit(model: torch.nn.Module, forward, images, labels: np.ndarray, cfg: training.TrainConfig,
                    device: torch.device) -> dict:
    """`time_steps` at `cfg.micro_batch`, halved after each out-of-memory error until a step fits; the
    micro-batches that ran out are `out_of_memory_at` (then the one measured is the one that fits)."""
    failed: list[int] = []
    micro = cfg.micro_batch
    while True:
        try:
            result = time_steps(model, images, labels, replace(cfg, micro_batch=micro), device, WARMUP_STEPS,
                                TIMED_STEPS, forward)
            return {**result, "out_of_memory_at": failed}
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            failed.append(micro or cfg.batch_size)
            if failed[-1] == 1:
                raise UserError(f"one image at a time does not fit the memory of {device_name(device)}; "
                                "run the study on a device with more memory") from None
            micro = failed[-1] // 2


def _plasticity_batch(settings: Mapping, rt, model_name: str, device: torch.device) -> dict:
    """Seconds per plasticity batch of `rt.plasticity_batch` pairs: two batches timed after one untimed."""
    spec = settings["models"][model_name]
    pairs = rt.plasticity_batch
    reference_side = _stored_side(settings, [settings["plasticity"]["reference_task"]], model_name)
    reference = _random_split(pairs * 2, reference_side, seed=1)
    downstream = _random_split(pairs * 2, _stored_side(settings, _model_tasks(settings, model_name), model_name),
                               seed=2)
    model = _build(settings, model_name, device).eval()
    modes = tuple(settings["plasticity"]["modes"])

    def run(n_pairs: int) -> None:
        plasticity.measure(model, reference, downstream, n_pairs, pairs, spec["img_size"], device, modes,
                           progress=lambda _: None)

    run(pairs)
    synchronize(device)
    reset_peak_memory(device)
    began = time.perf_counter()
    run(2 * pairs)
    synchronize(device)
    seconds = (time.perf_counter() - began) / 2
    peak = peak_memory_bytes(device)
    return {"pairs": pairs, "batch_s": seconds, "pairs_per_s": pairs / seconds, "modes": list(modes),
            "peak_memory_gib": None if peak is None else peak / GIB}


def assess(results: dict, limit_gib: float) -> dict:
    """Mark each measurement `fits` (peak within `limit_gib`) and, where it does not, `fitting_micro_batch`
    (`micro_batch_that_fits`, from the measured peak and activation memory per image; None: not even 1)."""
    results["memory_limit_gib"] = limit_gib
    for by_optimizer in results["models"].values():
        for by_arm in by_optimizer.values():
            for r in by_arm.values():
                peak = r["peak_memory_gib"]
                if r["out_of_memory_at"]:  # measured: the micro-batch that ran
                    r["fits"], r["fitting_micro_batch"] = False, r["micro_batch"]
                    continue
                r["fits"] = None if peak is None else peak <= limit_gib
                r["fitting_micro_batch"] = None if r["fits"] in (None, True) else micro_batch_that_fits(
                    results["batch_size"], r["micro_batch"], peak * GIB, r["activation_mib_per_image"] * 2**20,
                    limit_gib * GIB)
    return results


def summary(results: dict) -> str:
    """The lines a user reads: peak memory against the limit, images/s and MFU per measurement, the micro-batch
    that would fit where one does not, and the projected device-hours."""
    dev = results["device"]
    kind = "GPU" if dev["type"] == "cuda" else "CPU"
    lines = [f"preflight on {dev['name']}: {kind} figures, batch {results['batch_size']}, memory limit "
             f"{results['memory_limit_gib']:.1f} GiB ({dev['peak_memory']} measured)"]
    advice = []
    for model, by_optimizer in results["models"].items():
        for optimizer, by_arm in by_optimizer.items():
            for arm, r in by_arm.items():
                peak = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
                mfu = (f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None
                       else "MFU none (no rated peak for this device)")
                fits = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[r["fits"]]
                if r["out_of_memory_at"]:
                    fits = f"out of memory at micro-batch {', '.join(map(str, r['out_of_memory_at']))}"
                micro = f"{r['micro_batch']}{' (automatic)' if results['runtime_micro_batch'] is None else ''}"
                lines.append(f"  {model} {optimizer} arm {arm}: micro-batch {micro}, peak {peak} "
                             f"({fits}), {r['images_per_s']:.1f} images/s, {r['step_s']:.3f} s/step, {mfu}")
                if r["fits"] is False:
                    advice.append((model, optimizer, arm, r))
    for model, r in results["plasticity"].items():
        lines.append(f"  {model} plasticity: {r['batch_s']:.3f} s per batch of {r['pairs']} pairs")
    for model, optimizer, arm, r in advice:
        size = r["fitting_micro_batch"]
        how = (f"measured: micro-batch {', '.join(map(str, r['out_of_memory_at']))} ran out of memory"
               if r["out_of_memory_at"] else "computed from the measured activation memory per image")
        lines.append(f"  {model} ({optimizer}, arm {arm}) does not fit: " + (
            f"set runtime.micro_batch: {size} ({how})" if size
            else "not even at runtime.micro_batch: 1; use a device with more memory"))
    projection = results["projection"]
    hours = ", ".join(f"{name} {p['gpu_hours']:.2f} ({p['runs']} runs)" for name, p in projection.items()
                      if isinstance(p, dict) and "runs" in p)
    lines.append(f"  projected {kind}-hours: {hours}, plasticity {projection['plasticity']['gpu_hours']:.2f}; "
                 f"total {projection['total_gpu_hours']:.2f} (training steps and plasticity only)")
    return "\n".join(lines)


def run(settings: Mapping, rt, out: Path, memory_limit_gib: float | None = None,
        progress: Callable[[str], None] = print) -> dict:
    """The preflight: measure, check against `memory_limit_gib` (default the device's memory), project, write
    `out` (JSON) and print the summary. Returns the results."""
    from vitplasticity.fileio import write_json

    device = runtime.pick_device(rt.device)
    results = measure(settings, rt, device, progress)
    assess(results, memory_limit_gib if memory_limit_gib is not None else results["device"]["memory_gib"])
    step_s = {model: {opt: {arm: r["step_s"] for arm, r in by_arm.items()} for opt, by_arm in by_opt.items()}
              for model, by_opt in results["models"].items()}
    results["projection"] = project(settings, step_s, {m: r["batch_s"] for m, r in results["plasticity"].items()},
                                    rt.plasticity_batch)
    write_json(out, results)
    print(summary(results), flush=True)
    return results
