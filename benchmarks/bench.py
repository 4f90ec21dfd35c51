"""This project's hot paths against the authors' style, side by side in one process.

    PYTHONPATH=src python3 benchmarks/bench.py --quick --threads 1   # 49 s on 2 idle CPU cores
    PYTHONPATH=src python3 benchmarks/bench.py --out bench.json [--device cuda]

Each comparison uses the same model shape, batch and output shape on both sides.

- Baseline (the authors' code, restated): a torch ``Dataset`` turning uint8 arrays into PIL images,
  transformed one sample at a time by torchvision (RandomResizedCrop + flip, or Resize + CenterCrop;
  ToTensor; Normalize) in a ``DataLoader``; float32 everywhere; attention written out (q @ kᵀ, softmax,
  @ v); plasticity as their analysis loop does it: per batch and stream one embedding pass, every
  component of every block applied to it separately, all outputs kept (moved to the CPU) and the
  distances taken afterwards.
- Project: prepared uint8 arrays (whole on the GPU when small, as training keeps them) →
  ``transforms.train_batch`` (batched crop, flip, normalise); timm's fused SDPA attention; bf16 autocast
  and a fused optimizer on GPU; the training loop's step; ``plasticity.measure``.

Timed windows of the two sides alternate (``rounds``) so that a change in machine load hits both. Each
window does its set-up untimed, then its timed part runs exactly once between two ``perf_counter``
readings (the GPU synchronised before each), under the same torch thread count on both sides, and returns
the images it processed, counted as it went. A baseline window's set-up brings its DataLoader to a steady
state (`steady_batches`): the batches its workers prepare as they start (workers x prefetch factor) are
fetched and dropped untimed, so the timed batches' data preparation happens while the clock runs. Every
window of either side is lengthened to last at least ``window_s`` (calibrated on the second of two untimed
runs; `lengthened`), on any machine: a window of fixed size that lasts long enough on one machine is a few
milliseconds on a faster one, at the mercy of a single scheduler stall. Images/s are per window, so window
lengths need not match.

No figure is printed unchecked (`check`): a window whose timed call processed another number of images than
it was set up for (an iterator consumed before the clock started), or that lasted less than ``min_window_s``
(a no-op), makes its comparison invalid: one line says why, and no ratio is given. Finetuning and plasticity
windows are also checked for a FLOP rate (their side's FLOPs per image, counted over its warm-up window) over
this machine's peak; data-path windows, where torch counts no FLOPs (PIL, batched crops), for output bytes per
second over twice a memory copy's rate measured at start, and they count only float32 batches of the model's
input shape.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.benchmark import Timer
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms as T

from vitplasticity import plasticity, runtime, training, transforms
from vitplasticity.components import BLOCK_COMPONENTS
from vitplasticity.errors import UserError
from vitplasticity.preflight import rated_peak_flops
from vitplasticity.prepared import Split

PREFETCH_FACTOR = 2  # batches in flight per DataLoader worker (PyTorch's default)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the three comparisons; the defaults are the quick benchmark's."""

    source_size: int = 32  # side of the prepared uint8 images (CIFAR-like)
    img_size: int = 224  # model input side
    num_images: int = 512  # random images per prepared array
    num_classes: int = 10
    # Baseline DataLoader workers per comparison. On 2 CPU cores these are the baseline's fastest settings:
    # workers compete with the model for the cores. The authors use 0 for training, 8 for plasticity.
    workers: int = 2  # data path
    train_workers: int = 0
    plasticity_workers: int = 0  # per stream (two loaders)
    rounds: int = 2  # alternating timed windows per side
    data_batch: int = 32
    data_steps: int = 16  # batches per data-path window, at least
    window_s: float = 0.5  # every timed window is lengthened to last at least this (`lengthened`)
    min_window_s: float = 0.25  # a shorter timed window is no measurement (`check`)
    threads: int | None = None  # torch threads on both sides; None: torch's default
    arch: str = "vit_tiny_patch16_224"  # finetuning model
    depth: int | None = None  # None: the architecture's own
    train_batch: int = 8
    micro_batch: int | None = None  # gradient accumulation, same on both sides; None: whole batch
    train_steps: int = 2  # per timed window, at least
    lr: float = 0.01
    plasticity_arch: str = "vit_tiny_patch16_224"
    pair_batch: int = 16
    pairs: int = 32  # per timed window, at least


def quick_config() -> BenchConfig:
    """Small sizes (duration: the module docstring)."""
    return BenchConfig(workers=min(2, os.cpu_count() or 1))


def full_config(device: torch.device) -> BenchConfig:
    """Larger batches and windows; ViT-B/16 at batch 512 when on a GPU."""
    if device.type == "cuda":  # a GPU host has cores to spare for the authors' 8 workers
        workers = min(8, os.cpu_count() or 1)
        return BenchConfig(num_images=4096, workers=workers, plasticity_workers=workers, rounds=3, data_batch=512,
                           data_steps=32, arch="vit_base_patch16_224", train_batch=512, micro_batch=128, train_steps=4,
                           plasticity_arch="vit_base_patch16_224", pair_batch=128, pairs=512)
    return BenchConfig(num_images=1024, workers=min(2, os.cpu_count() or 1), rounds=3, data_batch=128, data_steps=8,
                       train_batch=32, train_steps=3, pair_batch=32, pairs=128)


class PILImages(Dataset):
    """The authors' kind of dataset: one PIL image per item, transformed on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def train_transform(size: int) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])


def eval_transform(size: int) -> T.Compose:
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)])


def random_split(count: int, size: int, num_classes: int, seed: int) -> Split:
    """A prepared-format split of uniform random uint8 images."""
    rng = np.random.default_rng(seed)
    return Split(images=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
                 labels=rng.integers(0, num_classes, count).astype(np.int64))


def steady_batches(split: Split, transform: Callable, batch: int, images: int, workers: int, device: torch.device,
                   shuffle: bool = True) -> Iterator:
    """`images` images of `split` in batches of `batch` through per-sample PIL `transform` in a DataLoader with
    `workers` workers, in steady state: drawn at random with replacement (`shuffle`), else in order, wrapping.

    A DataLoader keeps workers x its prefetch factor (`PREFETCH_FACTOR`) batches in flight. The loader is given
    that many batches more, and those, which its workers prepare as they start, are fetched and dropped here,
    before any clock starts; the workers are then preparing the first batches returned. So a timed part over the
    returned batches holds all of their data preparation but what the workers did on at most `workers` of them
    while the last dropped ones were fetched (none without workers: then nothing is dropped or started here).
    """
    lead = workers * PREFETCH_FACTOR
    total = lead * batch + images
    indices = (RandomSampler(range(len(split.labels)), replacement=True, num_samples=total) if shuffle
               else [i % len(split.labels) for i in range(total)])
    loader = DataLoader(PILImages(split.images, split.labels, transform), batch_size=batch, sampler=indices,
                        num_workers=workers, prefetch_factor=PREFETCH_FACTOR if workers else None,
                        pin_memory=device.type == "cuda")
    iterator = iter(loader)
    for _ in range(lead):
        next(iterator)
    return iterator


def build_models(arch: str, cfg: BenchConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(baseline, project): identical weights; the baseline's attention is written out by hand."""
    extra = {} if cfg.depth is None else {"depth": cfg.depth}
    project = timm.create_model(arch, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.img_size,
                                drop_rate=0.0, drop_path_rate=0.0, **extra).to(device)
    baseline = copy.deepcopy(project)
    for block in baseline.blocks:
        block.attn.fused_attn = False
    return baseline, project


# Single-precision FLOPs per cycle and core by the widest vector extension the processor reports: two FMA
# pipes x lanes x 2 (a fused multiply-add is two FLOPs).
VECTOR_FLOPS_PER_CYCLE = (("avx512f", 64), ("avx2", 32), ("avx", 16), ("sse2", 8))
BOOST = 1.5  # a core may run up to this much above the clock it reports (turbo)
MEASURED_MARGIN = 2.0  # without a known peak: this many times the best matmul rate measured here


@dataclass(frozen=True)
class Limits:
    """What a window must respect to be a measurement (`check`)."""

    peak_flops: float  # FLOP/s this machine cannot exceed
    peak_source: str  # how `peak_flops` was found, for the output
    matmul_flops: float  # best dense matmul FLOP/s measured at start (float32 on a CPU, bf16 on a GPU)
    min_window_s: float
    copy_bytes_per_s: float = math.inf  # bytes written per second by a large memory copy measured at start
    rated: bool = False  # `peak_flops` is the device's rated peak (given, or the GPU table): fit for MFU


def cpu_peak_flops(cores: int) -> tuple[float, str] | None:
    """Float32 peak of `cores` cores: cores x reported clock x `BOOST` x FLOPs per cycle of the widest vector unit.

    None when the processor reports no clock or no known vector extension (not x86).
    """
    import cpuinfo  # py-cpuinfo: clock and flags on any OS

    info = cpuinfo.get_cpu_info()
    hz = max(info.get("hz_advertised", [0])[0], info.get("hz_actual", [0])[0])
    per_cycle = next(((flag, flops) for flag, flops in VECTOR_FLOPS_PER_CYCLE if flag in info.get("flags", [])), None)
    if not hz or per_cycle is None:
        return None
    flag, flops = per_cycle
    return (cores * hz * BOOST * flops,
            f"{cores} cores x {hz / 1e9:.2f} GHz x {BOOST} boost x {flops} FLOP/cycle ({flag})")


def measured_matmul_flops(device: torch.device) -> float:
    """Best rate of a dense square matmul (float32 on a CPU, bf16 on a GPU) over `blocked_autorange` blocks."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    timer = Timer(stmt="a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    return 2 * size**3 / min(timer.blocked_autorange(min_run_time=0.5).times)


def measured_copy_bytes_per_s(device: torch.device) -> float:
    """Best rate of a 256 MiB tensor copy on `device` over `blocked_autorange` blocks, in bytes written per second."""
    source = torch.empty(64 * 2**20, device=device)  # float32
    target = torch.empty_like(source)
    timer = Timer(stmt="target.copy_(source)", globals={"target": target, "source": source},
                  num_threads=torch.get_num_threads())
    return source.nbytes / min(timer.blocked_autorange(min_run_time=0.3).times)


def measure_limits(device: torch.device, min_window_s: float, override_tflops: float | None = None) -> Limits:
    """The peak every window is checked against: the override, the GPU table, the CPU's vector units, or else
    `MEASURED_MARGIN` times the matmul rate measured now."""
    matmul = measured_matmul_flops(device)
    table = rated_peak_flops(device, override_tflops)
    cpu = cpu_peak_flops(len(os.sched_getaffinity(0))) if device.type == "cpu" and table is None else None
    if table:
        peak, source = table, "given" if override_tflops else "dense bf16 table"
    elif cpu:
        peak, source = cpu
    else:
        peak, source = MEASURED_MARGIN * matmul, f"{MEASURED_MARGIN} x the measured matmul rate"
    return Limits(peak, source, matmul, min_window_s, measured_copy_bytes_per_s(device), rated=bool(table))


# A window does its untimed set-up and returns its timed part and the images it is set up to process;
# the timed part returns the images it processed, counted as it goes.
Window = Callable[[], tuple[Callable[[], int], int]]


@dataclass(frozen=True)
class Timed:
    """One timed call: what it processed and how long it took."""

    images: int  # processed, as counted by the timed call itself
    planned: int  # what its window was set up to process
    seconds: float
    flops: float = 0.0  # counted by FlopCounterMode (matmuls, convolutions, attention), when asked


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(window: Window, device: torch.device, count_flops: bool = False) -> Timed:
    """Set `window` up, then run its timed part exactly once between two clock readings (the GPU synchronised
    before each); with `count_flops`, under `FlopCounterMode` (slower: for warm-up windows only)."""
    run, planned = window()
    counter = FlopCounterMode(display=False) if count_flops else None
    with counter or contextlib.nullcontext():
        _sync(device)
        began = time.perf_counter()
        images = run()
        _sync(device)
        seconds = time.perf_counter() - began
    return Timed(images, planned, seconds, float(counter.get_total_flops()) if counter else 0.0)


def check(timed: Timed, flops_per_image: float, limits: Limits, bytes_per_image: float = 0.0) -> str | None:
    """Why `timed` cannot be a real measurement, or None: another image count than planned, a window shorter
    than `limits.min_window_s`, more FLOP/s (at `flops_per_image`) than `limits.peak_flops`, or more output bytes
    per second (at `bytes_per_image`) than `MEASURED_MARGIN` x `limits.copy_bytes_per_s` (a copy reads and writes
    each byte, so writing alone may be up to twice as fast)."""
    if timed.images != timed.planned:
        return (f"the timed call processed {timed.images} images, not the {timed.planned} its window was set up "
                f"for (consumed before the clock started?)")
    if timed.seconds < limits.min_window_s:
        return f"the window lasted {timed.seconds:.4f} s, under the {limits.min_window_s} s minimum (a no-op?)"
    achieved = flops_per_image * timed.images / timed.seconds
    if achieved > limits.peak_flops:
        return (f"{achieved / 1e12:.4g} TFLOP/s achieved, over this machine's peak of "
                f"{limits.peak_flops / 1e12:.4g} TFLOP/s ({limits.peak_source})")
    written = bytes_per_image * timed.images / timed.seconds
    if written > MEASURED_MARGIN * limits.copy_bytes_per_s:
        return (f"{written / 1e9:.4g} GB/s of output written, over {MEASURED_MARGIN} x the "
                f"{limits.copy_bytes_per_s / 1e9:.4g} GB/s a memory copy wrote at start")
    return None


@dataclass(frozen=True)
class Side:
    """One side of a comparison: `window(n)` is its window over n units (batches, steps, pairs), of which a timed
    window has at least `units` (more when `lengthened` asks) and its warm-up window `warm`."""

    window: Callable[[int], Window]
    units: int
    warm: int = 1


def compare(name: str, baseline: Side, project: Side, rounds: int, device: torch.device, limits: Limits,
            window_s: float, bytes_per_image: float = 0.0) -> dict:
    """Images/s of both sides: each side's fastest of `rounds` alternating timed windows (the one least slowed
    by other work on the machine), each window lengthened to last at least `window_s` (`lengthened`).

    Each side first runs its warm-up window once, untimed for throughput, under `FlopCounterMode`: its FLOPs
    per image. Every window is then checked (`check`); if any fails, the comparison's figures are None and
    `invalid` lists the reasons. FLOPs count only what torch runs in this process (not PIL, not DataLoader
    workers); `bytes_per_image`, the output each image is written as, gives the check of output bytes per second.
    """
    sides = {"baseline": baseline, "project": project}
    problems, per_image, units = [], {}, {}
    for side, spec in sides.items():
        warm = time_once(spec.window(spec.warm), device, count_flops=True)
        reason = check(warm, 0.0, replace(limits, min_window_s=0.0))
        if reason:
            problems.append(f"{side} warm-up: {reason}")
        per_image[side] = warm.flops / warm.images if warm.images else 0.0
        units[side] = lengthened(window_s, spec.units, spec.window, device)
    windows: dict[str, list[Timed]] = {side: [] for side in sides}
    for r in range(rounds):
        for side, spec in sides.items():
            timed = time_once(spec.window(units[side]), device)
            reason = check(timed, per_image[side], limits, bytes_per_image)
            if reason:
                problems.append(f"{side} round {r + 1}: {reason}")
            windows[side].append(timed)
            print(f"  {name} round {r + 1}/{rounds} {side}: {timed.images} images in {timed.seconds:.3f} s"
                  + (f" INVALID: {reason}" if reason else ""), flush=True)
    result: dict = {"invalid": problems}
    for side, timed in windows.items():
        rate = max(t.images / t.seconds for t in timed) if not problems else None
        result[f"{side}_images_per_s"] = rate
        result[f"{side}_windows"] = [asdict(t) for t in timed]
        result[f"{side}_flops_per_image"] = per_image[side]
        result[f"{side}_tflops"] = rate * per_image[side] / 1e12 if rate else None
    result["speedup"] = result["project_images_per_s"] / result["baseline_images_per_s"] if not problems else None
    return result


# --- (a) data path ---------------------------------------------------------------------------


def bench_data(cfg: BenchConfig, device: torch.device, limits: Limits) -> dict:
    """uint8 arrays → normalised, augmented `img_size` float batches on the device.

    Only float32 (B, 3, `img_size`, `img_size`) outputs count as images (another output leaves its window short of
    its planned images), and their bytes per second are checked against the memory copy rate (`check`): torch
    counts no FLOPs for PIL or for the batched transforms.
    """
    split = random_split(cfg.num_images, cfg.source_size, cfg.num_classes, seed=0)
    images = training.resident(split.images, device)
    shape = (3, cfg.img_size, cfg.img_size)
    step = 0

    def counted(batch: torch.Tensor) -> int:
        return len(batch) if batch.dtype == torch.float32 and tuple(batch.shape[1:]) == shape else 0

    def baseline_window(batches: int) -> tuple[Callable[[], int], int]:
        iterator = steady_batches(split, train_transform(cfg.img_size), cfg.data_batch, batches * cfg.data_batch,
                                  cfg.workers, device)
        return lambda: sum(counted(batch.to(device, non_blocking=True)) for batch, _ in iterator), \
            batches * cfg.data_batch

    def project_run(batches: int) -> int:
        nonlocal step
        done = 0
        for _ in range(batches):
            index = training.batch_indices(cfg.num_images, cfg.data_batch, step, seed=0)
            done += counted(transforms.train_batch(images[index], cfg.img_size, device,
                                                   runtime.step_generator(0, step, 1)))
            step += 1
        return done

    def project_window(batches: int) -> Window:
        return lambda: (lambda: project_run(batches), batches * cfg.data_batch)

    return compare("data path", Side(lambda batches: lambda: baseline_window(batches), cfg.data_steps),
                   Side(project_window, cfg.data_steps), cfg.rounds, device, limits, cfg.window_s,
                   bytes_per_image=4 * math.prod(shape))


LENGTHEN_AT_MOST = 10_000  # times the asked units: a window that stays instant this long is a no-op (`check`)


def lengthened(seconds: float, units: int, window: Callable[[int], Window], device: torch.device) -> int:
    """How many units (batches, steps, pairs) `window` needs to last at least `seconds`, from the second of two
    untimed runs of `units` (the first pays one-time costs: allocations, lazy initialisation, worker start-up);
    never fewer than `units`, never more than `LENGTHEN_AT_MOST` times them.

    A window of a few milliseconds would be at the mercy of one scheduler stall.
    """
    time_once(window(units), device)
    elapsed = time_once(window(units), device).seconds
    return min(max(units, math.ceil(units * seconds / max(elapsed, 1e-9))), LENGTHEN_AT_MOST * units)


# --- (b) finetuning step ---------------------------------------------------------------------


def bench_finetune(cfg: BenchConfig, device: torch.device, limits: Limits) -> dict:
    """Data + forward + backward + clip + SGD step, every parameter trained."""
    split = random_split(cfg.num_images, cfg.source_size, cfg.num_classes, seed=1)
    train_images = training.resident(split.images, device)
    baseline, project = build_models(cfg.arch, cfg, device)
    micro = cfg.micro_batch or cfg.train_batch
    if cfg.train_batch % micro:
        raise UserError(f"bench: train_batch ({cfg.train_batch}) must be a multiple of micro_batch ({micro})")
    accumulate = cfg.train_batch // micro
    train_cfg = training.TrainConfig(steps=1, eval_every=1, batch_size=cfg.train_batch, lr=cfg.lr, seed=0,
                                     img_size=cfg.img_size, micro_batch=cfg.micro_batch)
    base_opt = torch.optim.SGD(baseline.parameters(), lr=cfg.lr, momentum=0.9)
    proj_params = list(project.parameters())
    proj_opt = training.make_optimizer(proj_params, train_cfg, device)
    baseline.train()
    project.train()
    step = 0

    def baseline_run(batches: Iterable) -> int:
        done = 0
        for i, (images, labels) in enumerate(batches):
            if i % accumulate == 0:
                base_opt.zero_grad(set_to_none=True)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(baseline(images), labels) * (micro / cfg.train_batch)
            loss.backward()
            loss.item()
            done += len(images)
            if (i + 1) % accumulate == 0:
                torch.nn.utils.clip_grad_norm_(baseline.parameters(), 1.0)
                base_opt.step()
        return done

    def baseline_window(steps: int) -> Window:
        def set_up() -> tuple[Callable[[], int], int]:
            batches = steady_batches(split, train_transform(cfg.img_size), micro, steps * cfg.train_batch,
                                     cfg.train_workers, device)
            return lambda: baseline_run(batches), steps * cfg.train_batch
        return set_up

    def project_run(steps: int) -> int:
        """The training loop's step (`training.train_step`) on the loop's batches and draws."""
        nonlocal step
        done = 0
        for _ in range(steps):
            index = training.batch_indices(cfg.num_images, cfg.train_batch, step, seed=0)
            draws = transforms.sample_crop_flip(cfg.train_batch, cfg.source_size, cfg.source_size,
                                                runtime.step_generator(0, step, stream=1))
            labels = torch.as_tensor(split.labels[index], device=device)
            training.train_step(project, proj_opt, proj_params, train_images[index], labels, draws, train_cfg, micro,
                                device)
            done += len(index)
            step += 1
        return done

    def project_window(steps: int) -> Window:
        return lambda: (lambda: project_run(steps), steps * cfg.train_batch)

    result = compare("finetune step", Side(baseline_window, cfg.train_steps), Side(project_window, cfg.train_steps),
                     cfg.rounds, device, limits, cfg.window_s)
    rated = limits.peak_flops if limits.rated else None
    for side in ("baseline", "project"):
        achieved = result[f"{side}_tflops"]
        result[f"{side}_mfu"] = achieved * 1e12 / rated if rated and achieved is not None else None
    result["peak_tflops"] = rated / 1e12 if rated else None
    return result


# --- (c) plasticity --------------------------------------------------------------------------


def _decompose(model: torch.nn.Module, images: torch.Tensor) -> dict:
    """E and each block component applied to E separately, every output moved to the CPU."""
    x = model._pos_embed(model.patch_embed(images))  # E: (B, N, D)
    outputs = {"embedding": x.cpu()}
    zeros = torch.zeros_like(x)
    for layer, block in enumerate(model.blocks):
        outputs[("ln1", layer)] = block.norm1(x).cpu()
        outputs[("mha", layer)] = block.attn(x).cpu()
        outputs[("ln2", layer)] = block.norm2(x).cpu()
        outputs[("fc1", layer)] = block.mlp.fc1(x).cpu()
        outputs[("fc2", layer)] = block.mlp.fc2(torch.cat((x, zeros, zeros, zeros), dim=-1)).cpu()
    return outputs


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(start_dim=1).sum(dim=-1).sqrt()


@torch.no_grad()
def reference_plasticity(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                         device: torch.device) -> dict[tuple[str, int], float]:
    """The authors' plasticity loop: mean over pairs of ||f(E(a)) - f(E(b))||_F / ||E(a) - E(b)||_F."""
    model.eval()
    sums: dict[tuple[str, int], float] = {}
    count = 0
    for a, b in batches:
        out_a, out_b = _decompose(model, a.to(device)), _decompose(model, b.to(device))
        denominator = _distance(out_a.pop("embedding").to(device), out_b.pop("embedding").to(device))
        for key in list(out_a):
            ratio = _distance(out_a.pop(key).to(device), out_b.pop(key).to(device)) / denominator
            sums[key] = sums.get(key, 0.0) + ratio.double().sum().item()
        count += len(denominator)
    return {key: total / count for key, total in sums.items()}


def bench_plasticity(cfg: BenchConfig, device: torch.device, limits: Limits) -> dict:
    """Every component of every block, embedding mode, at least `pairs` image pairs per timed window."""
    reference = random_split(max(cfg.num_images, cfg.pairs), cfg.source_size, cfg.num_classes, seed=2)
    downstream = random_split(max(cfg.num_images, cfg.pairs), cfg.source_size, cfg.num_classes, seed=3)
    baseline, project = build_models(cfg.plasticity_arch, cfg, device)

    def baseline_run(streams: list[Iterator]) -> int:
        done = 0

        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            nonlocal done
            for (a, _), (b, _) in zip(*streams, strict=True):
                done += len(a) + len(b)
                yield a, b
        reference_plasticity(baseline, pairs(), device)
        return done

    def baseline_window(pairs: int) -> Window:
        def set_up() -> tuple[Callable[[], int], int]:
            streams = [steady_batches(s, eval_transform(cfg.img_size), cfg.pair_batch, pairs, cfg.plasticity_workers,
                                      device, shuffle=False) for s in (reference, downstream)]
            return lambda: baseline_run(streams), 2 * pairs
        return set_up

    def project_run(pairs: int) -> int:
        table, _ = plasticity.measure(project, reference, downstream, pairs, cfg.pair_batch, cfg.img_size, device,
                                      modes=("embedding",), progress=lambda _: None)
        return 2 * int(table["n"].max())  # the pairs whose ratios were taken

    def project_window(pairs: int) -> Window:
        return lambda: (lambda: project_run(pairs), 2 * pairs)

    warm = min(cfg.pairs, cfg.pair_batch)
    result = compare("plasticity", Side(baseline_window, cfg.pairs, warm), Side(project_window, cfg.pairs, warm),
                     cfg.rounds, device, limits, cfg.window_s)
    result["measurements"] = len(project.blocks) * len(BLOCK_COMPONENTS)
    return result


# --- (d) selection criteria ------------------------------------------------------------------


def bench_criteria(arch: str, pairs: int, pair_batch: int, gradient_batches: int, gradient_batch: int,
                   device: torch.device) -> list[dict]:
    """Cost of each selection criterion (`registry.CRITERIA`) as the criteria job runs it (`criteria.measure`):
    random-init `arch` without a head, `pairs` pairs of 224 px reference against 32 px downstream images, the
    relative gradient norm and Fisher (one set of backward passes, timed together) and FPS (forward only)
    over `gradient_batches` batches of `gradient_batch` 32 px images (10 classes), KappaTune data-free.
    Rows: criterion, wall_s, peak_mib (added above the loaded model), measured_with, per_unit_s (per pair,
    per gradient or FPS image, or per run)."""
    from vitplasticity import criteria

    model = timm.create_model(arch, pretrained=False, num_classes=0).to(device)
    reference = random_split(pairs, 224, 10, seed=4)
    downstream = random_split(max(pairs, gradient_batch * gradient_batches), 32, 10, seed=5)
    headed = copy.deepcopy(model)

    def plasticity_in(mode: str) -> Callable:
        def run():
            table, _ = plasticity.measure(model, reference, downstream, pairs, pair_batch, 224, device, (mode,),
                                          progress=lambda _: None)
            return table.rename(columns={"mean": "value"})[["component", "layer", "value"]]
        return run

    measured = {f"plasticity_{mode}": plasticity_in(mode) for mode in ("embedding", "hidden", "scale_free")}
    measured["relative_gradient_norm", "fisher"] = lambda: criteria.gradient_criteria(
        headed, downstream, 10, gradient_batch, gradient_batches, 224, device)
    measured["fps"] = lambda: criteria.fps(model, downstream, gradient_batch, gradient_batches, 224, device)
    measured["kappatune"] = lambda: criteria.kappatune(model)
    measured["trainable_params"] = lambda: criteria.trainable_params(model)
    _, costs = criteria.measure(measured, device, progress=print)
    images = gradient_batch * gradient_batches
    units = {"relative_gradient_norm": images, "fisher": images, "fps": images, "kappatune": 1, "trainable_params": 1}
    return [{**row, "per_unit_s": row["wall_s"] / units.get(row["criterion"], pairs)}
            for row in costs.to_dict("records")]


# --- entry point -----------------------------------------------------------------------------


def _peak_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def _cpu_name() -> str:
    import cpuinfo  # py-cpuinfo: the processor's brand string on any OS

    return cpuinfo.get_cpu_info().get("brand_raw", "unknown CPU")


def machine(device: torch.device) -> dict:
    """What the figures came from."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "name": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "load_average": os.getloadavg()[0]}


def _line(label: str, result: dict) -> str:
    if result["invalid"]:
        return f"{label}: INVALID ({len(result['invalid'])} window(s)): {result['invalid'][0]}"
    return (f"{label}: baseline {result['baseline_images_per_s']:.1f} images/s, project "
            f"{result['project_images_per_s']:.1f} images/s, speedup {result['speedup']:.2f}")


def _speedup(result: dict) -> str:
    return "invalid" if result["speedup"] is None else f"{result['speedup']:.2f}"


def run(cfg: BenchConfig, device: torch.device, out: Path | None = None, peak_tflops: float | None = None) -> dict:
    """Run the three comparisons, print a summary (last line: the three speedups, or `invalid`) and return the
    results."""
    runtime.set_threads(cfg.threads)
    info = machine(device)
    limits = measure_limits(device, cfg.min_window_s, peak_tflops)
    print(f"bench on {info['name']} ({info['device']}, {info['cpu_count']} CPUs, load average "
          f"{info['load_average']:.2f}); {info['torch_threads']} torch threads on both sides (each DataLoader "
          f"worker: 1); baseline DataLoader workers: data path {cfg.workers}, finetuning {cfg.train_workers}, "
          f"plasticity {cfg.plasticity_workers} per stream", flush=True)
    print(f"peak {limits.peak_flops / 1e12:.4g} TFLOP/s ({limits.peak_source}); matmul measured now "
          f"{limits.matmul_flops / 1e12:.4g} TFLOP/s, memory copy {limits.copy_bytes_per_s / 1e9:.3g} GB/s; shortest "
          f"valid window {limits.min_window_s} s", flush=True)
    result = {"machine": info, "config": asdict(cfg), "limits": asdict(limits)}
    result["data"] = bench_data(cfg, device, limits)
    print(_line(f"data path ({cfg.source_size} px uint8 -> {cfg.img_size} px float, batch {cfg.data_batch})",
                result["data"]), flush=True)
    result["finetune"] = ft = bench_finetune(cfg, device, limits)
    print(_line(f"finetune step ({cfg.arch}, batch {cfg.train_batch}, SGD)", ft), flush=True)
    if not ft["invalid"]:
        mfu = (f", MFU baseline {100 * ft['baseline_mfu']:.1f}% project {100 * ft['project_mfu']:.1f}% "
               f"of {ft['peak_tflops']:.0f} TFLOPS") if ft["peak_tflops"] else ""
        print(f"  GFLOP/image baseline {ft['baseline_flops_per_image'] / 1e9:.2f}, project "
              f"{ft['project_flops_per_image'] / 1e9:.2f}; achieved baseline {ft['baseline_tflops']:.4f} TFLOPS, "
              f"project {ft['project_tflops']:.4f} TFLOPS{mfu}", flush=True)
    result["plasticity"] = pl = bench_plasticity(cfg, device, limits)
    print(_line(f"plasticity ({cfg.plasticity_arch}, {pl['measurements']} component-layers, {cfg.pairs} pairs)",
                pl), flush=True)
    result["peak_rss_mib"] = _peak_rss_mib(resource.RUSAGE_SELF)
    result["peak_rss_workers_mib"] = _peak_rss_mib(resource.RUSAGE_CHILDREN)
    result["load_average_end"] = os.getloadavg()[0]
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB (largest DataLoader worker "
          f"{result['peak_rss_workers_mib']:.0f} MiB); load average at the end {result['load_average_end']:.2f}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"data speedup {_speedup(result['data'])}, finetune speedup {_speedup(ft)}, "
          f"plasticity speedup {_speedup(pl)}", flush=True)
    return result


def main(quick: bool, device: str, out: Path | None, peak_tflops: float | None = None, **overrides) -> dict:
    """Quick (duration: the module docstring) or full; `overrides` replace config fields."""
    target = runtime.pick_device(device)
    cfg = quick_config() if quick else full_config(target)
    return run(replace(cfg, **overrides), target, out, peak_tflops)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="throughput of this project's paths against the authors' approach")
    parser.add_argument("--quick", action="store_true", help="small sizes (duration: this script's docstring)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak of this accelerator, for FLOPs utilisation and the validity check")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's)")
    parser.add_argument("--criteria", action="store_true",
                        help="instead: the cost of each selection criterion on ViT-B/16 (64 pairs, 2 x 16 images)")
    args = parser.parse_args(sys.argv[1:])
    overrides = {"threads": args.threads} if args.threads else {}
    if args.criteria:
        runtime.set_threads(args.threads)
        target = runtime.pick_device(args.device)
        info = machine(target)
        print(f"criteria on {info['name']} ({info['device']}), {info['torch_threads']} torch threads, load average "
              f"{info['load_average']:.2f}", flush=True)
        rows = bench_criteria("vit_base_patch16_224", 64, 32, 2, 16, target)
        for row in rows:
            print(f"{row['criterion']}: {row['wall_s']:.1f} s ({row['per_unit_s']:.3g} s per unit), "
                  f"+{row['peak_mib']:.0f} MiB", flush=True)
    else:
        main(args.quick, args.device, args.out, peak_tflops=args.peak_tflops, **overrides)
