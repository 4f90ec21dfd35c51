"""This project's hot paths against the authors' style, side by side in one process.

    PYTHONPATH=src python3 benchmarks/bench.py --quick     # under a minute on 2 CPU cores
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

Timed windows of the two sides alternate (``rounds``) so that a change in machine load hits both;
warm-up is excluded, and so is starting a DataLoader's workers (its first batch is fetched before the
clock starts; the data path does not count that batch either). The project's data-path windows are
lengthened to at least ``min_window_s``, since its few-millisecond windows would otherwise swing with a
single scheduler stall; images/s are per window, so window lengths need not match.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import resource
import sys
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
from vitplasticity.prepared import Split

# Dense bf16 tensor-core peaks (TFLOPS) by device-name fragment; first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


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
    data_steps: int = 16  # batches per baseline window
    min_window_s: float = 0.5  # the project's data windows are lengthened to at least this
    arch: str = "vit_tiny_patch16_224"  # finetuning model
    depth: int | None = None  # None: the architecture's own
    train_batch: int = 8
    micro_batch: int | None = None  # gradient accumulation, same on both sides; None: whole batch
    train_steps: int = 2  # per timed window
    lr: float = 0.01
    plasticity_arch: str = "vit_tiny_patch16_224"
    pair_batch: int = 16
    pairs: int = 32  # per timed window


def quick_config() -> BenchConfig:
    """Under a minute on a 2-core CPU."""
    return BenchConfig(workers=min(2, os.cpu_count() or 1))


def full_config(device: torch.device) -> BenchConfig:
    """Larger batches and windows; ViT-B/16 at batch 512 when on a GPU."""
    if device.type == "cuda":  # a GPU host has cores to spare for the authors' 8 workers
        workers = min(8, os.cpu_count() or 1)
        return BenchConfig(num_images=4096, workers=workers, plasticity_workers=workers, rounds=3, data_batch=512,
                           data_steps=8, arch="vit_base_patch16_224", train_batch=512, micro_batch=128, train_steps=4,
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


def shuffled_loader(split: Split, transform: Callable, batch: int, batches: int, workers: int,
                    device: torch.device) -> DataLoader:
    """`batches` random batches through per-sample PIL transforms."""
    sampler = RandomSampler(range(len(split.labels)), replacement=True, num_samples=batch * batches)
    return DataLoader(PILImages(split.images, split.labels, transform), batch_size=batch, sampler=sampler,
                      num_workers=workers, drop_last=True, pin_memory=device.type == "cuda")


def build_models(arch: str, cfg: BenchConfig, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(baseline, project): identical weights; the baseline's attention is written out by hand."""
    extra = {} if cfg.depth is None else {"depth": cfg.depth}
    project = timm.create_model(arch, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.img_size,
                                drop_rate=0.0, drop_path_rate=0.0, **extra).to(device)
    baseline = copy.deepcopy(project)
    for block in baseline.blocks:
        block.attn.fused_attn = False
    return baseline, project


# A window does its untimed set-up and returns the timed part, which returns the number of images it processed.
Window = Callable[[], Callable[[], int]]


def _timed(window: Window, device: torch.device) -> tuple[int, float]:
    """Run one window's timed part once under `torch.utils.benchmark.Timer` (which waits for the GPU)."""
    run = window()
    count = []
    seconds = Timer(stmt="count.append(run())", globals={"run": run, "count": count}).timeit(1).mean
    return count[0], seconds


def _primed(loader: DataLoader) -> Iterator:
    """The loader's batches, its workers started and the first batch fetched (so before any clock starts)."""
    iterator = iter(loader)
    return itertools.chain([next(iterator)], iterator)


def compare(name: str, baseline: Window, project: Window, warmup: tuple[Window, Window], rounds: int,
            device: torch.device) -> dict:
    """Images/s of both sides from alternating windows, after one untimed warm-up window each."""
    for window in warmup:
        _timed(window, device)
    totals = {"baseline": [0, 0.0], "project": [0, 0.0]}
    for r in range(rounds):
        for side, window in (("baseline", baseline), ("project", project)):
            count, seconds = _timed(window, device)
            totals[side][0] += count
            totals[side][1] += seconds
            print(f"  {name} round {r + 1}/{rounds} {side}: {count} images in {seconds:.2f} s", flush=True)
    base, proj = (totals[s][0] / totals[s][1] for s in ("baseline", "project"))
    return {"baseline_images_per_s": base, "project_images_per_s": proj, "speedup": proj / base}


# --- (a) data path ---------------------------------------------------------------------------


def bench_data(cfg: BenchConfig, device: torch.device) -> dict:
    """uint8 arrays → normalised, augmented `img_size` float batches on the device."""
    split = random_split(cfg.num_images, cfg.source_size, cfg.num_classes, seed=0)
    images = training.resident(split.images, device)
    step = 0

    def baseline_window(batches: int) -> Callable[[], int]:
        loader = shuffled_loader(split, train_transform(cfg.img_size), cfg.data_batch, batches + 1, cfg.workers,
                                 device)
        iterator = _primed(loader)
        next(iterator)  # not timed, not counted
        return lambda: sum(len(images.to(device, non_blocking=True)) for images, _ in iterator)

    def project_run(batches: int) -> int:
        nonlocal step
        for _ in range(batches):
            index = training.batch_indices(cfg.num_images, cfg.data_batch, step, seed=0)
            transforms.train_batch(images[index], cfg.img_size, device, runtime.step_generator(0, step, 1))
            step += 1
        return batches * cfg.data_batch

    def project_window(batches: int) -> Callable[[], int]:
        return lambda: project_run(batches)

    project_batches = _batches_for(cfg.min_window_s, cfg.data_steps, project_run, device)
    return compare("data path", lambda: baseline_window(cfg.data_steps), lambda: project_window(project_batches),
                   (lambda: baseline_window(1), lambda: project_window(1)), cfg.rounds, device)


def _batches_for(seconds: float, batches: int, run: Callable[[int], int], device: torch.device) -> int:
    """How many batches `run` needs to last at least `seconds`, from one untimed run of `batches`.

    A window of a few milliseconds would be at the mercy of one scheduler stall.
    """
    _, elapsed = _timed(lambda: lambda: run(batches), device)
    return max(batches, math.ceil(batches * seconds / max(elapsed, 1e-6)))


# --- (b) finetuning step ---------------------------------------------------------------------


def flops_per_image(model: torch.nn.Module, img_size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one image (matmuls and convolutions, as FlopCounterMode counts)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device)).sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: the override, else the table, else None."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for fragment, tflops in PEAK_TFLOPS if fragment in name), None)


def bench_finetune(cfg: BenchConfig, device: torch.device, override_tflops: float | None = None) -> dict:
    """Data + forward + backward + clip + SGD step, every parameter trained."""
    split = random_split(cfg.num_images, cfg.source_size, cfg.num_classes, seed=1)
    train_images = training.resident(split.images, device)
    baseline, project = build_models(cfg.arch, cfg, device)
    per_image = flops_per_image(baseline, cfg.img_size, device)
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

    def baseline_run(batches: Iterable, steps: int) -> int:
        for i, (images, labels) in enumerate(batches):
            if i % accumulate == 0:
                base_opt.zero_grad(set_to_none=True)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = F.cross_entropy(baseline(images), labels) * (micro / cfg.train_batch)
            loss.backward()
            loss.item()
            if (i + 1) % accumulate == 0:
                torch.nn.utils.clip_grad_norm_(baseline.parameters(), 1.0)
                base_opt.step()
        return steps * cfg.train_batch

    def baseline_window(steps: int) -> Callable[[], int]:
        loader = shuffled_loader(split, train_transform(cfg.img_size), micro, steps * accumulate, cfg.train_workers,
                                 device)
        batches = _primed(loader)
        return lambda: baseline_run(batches, steps)

    def project_run(steps: int) -> int:
        """The training loop's step (`training.train_step`) on the loop's batches and draws."""
        nonlocal step
        for _ in range(steps):
            index = training.batch_indices(cfg.num_images, cfg.train_batch, step, seed=0)
            draws = transforms.sample_crop_flip(cfg.train_batch, cfg.source_size, cfg.source_size,
                                                runtime.step_generator(0, step, stream=1))
            labels = torch.as_tensor(split.labels[index], device=device)
            training.train_step(project, proj_opt, proj_params, train_images[index], labels, draws, train_cfg, micro,
                                device)
            step += 1
        return steps * cfg.train_batch

    def project_window(steps: int) -> Callable[[], int]:
        return lambda: project_run(steps)

    result = compare("finetune step", lambda: baseline_window(cfg.train_steps),
                     lambda: project_window(cfg.train_steps), (lambda: baseline_window(1), lambda: project_window(1)),
                     cfg.rounds, device)
    result["flops_per_image"] = per_image
    peak = peak_flops(device, override_tflops)
    for side in ("baseline", "project"):
        achieved = per_image * result[f"{side}_images_per_s"]
        result[f"{side}_tflops"] = achieved / 1e12
        result[f"{side}_mfu"] = achieved / peak if peak else None
    result["peak_tflops"] = peak / 1e12 if peak else None
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


def bench_plasticity(cfg: BenchConfig, device: torch.device) -> dict:
    """Every component of every block, embedding mode, `pairs` image pairs per window."""
    reference = random_split(max(cfg.num_images, cfg.pairs), cfg.source_size, cfg.num_classes, seed=2)
    downstream = random_split(max(cfg.num_images, cfg.pairs), cfg.source_size, cfg.num_classes, seed=3)
    baseline, project = build_models(cfg.plasticity_arch, cfg, device)

    def baseline_run(streams: list[Iterator], pairs: int) -> int:
        reference_plasticity(baseline, ((a, b) for (a, _), (b, _) in zip(*streams, strict=True)), device)
        return 2 * pairs

    def baseline_window(pairs: int) -> Callable[[], int]:
        streams = [_primed(DataLoader(PILImages(s.images[:pairs], s.labels[:pairs], eval_transform(cfg.img_size)),
                                      batch_size=cfg.pair_batch, num_workers=cfg.plasticity_workers,
                                      pin_memory=device.type == "cuda"))
                   for s in (reference, downstream)]
        return lambda: baseline_run(streams, pairs)

    def project_run(pairs: int) -> int:
        plasticity.measure(project, reference, downstream, pairs, cfg.pair_batch, cfg.img_size, device,
                           modes=("embedding",), progress=lambda _: None)
        return 2 * pairs

    def project_window(pairs: int) -> Callable[[], int]:
        return lambda: project_run(pairs)

    warm = min(cfg.pairs, cfg.pair_batch)
    result = compare("plasticity", lambda: baseline_window(cfg.pairs), lambda: project_window(cfg.pairs),
                     (lambda: baseline_window(warm), lambda: project_window(warm)), cfg.rounds, device)
    result["measurements"] = len(project.blocks) * len(BLOCK_COMPONENTS)
    return result


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
    return (f"{label}: baseline {result['baseline_images_per_s']:.1f} images/s, project "
            f"{result['project_images_per_s']:.1f} images/s, speedup {result['speedup']:.2f}")


def run(cfg: BenchConfig, device: torch.device, out: Path | None = None, peak_tflops: float | None = None) -> dict:
    """Run the three comparisons, print a summary (last line: the three speedups) and return the results."""
    info = machine(device)
    print(f"bench on {info['name']} ({info['device']}, {info['torch_threads']} torch threads, "
          f"{info['cpu_count']} CPUs, load average {info['load_average']:.2f}); baseline DataLoader workers: "
          f"data path {cfg.workers}, finetuning {cfg.train_workers}, plasticity {cfg.plasticity_workers} per stream",
          flush=True)
    result = {"machine": info, "config": asdict(cfg)}
    result["data"] = bench_data(cfg, device)
    print(_line(f"data path ({cfg.source_size} px uint8 -> {cfg.img_size} px float, batch {cfg.data_batch})",
                result["data"]), flush=True)
    result["finetune"] = ft = bench_finetune(cfg, device, peak_tflops)
    print(_line(f"finetune step ({cfg.arch}, batch {cfg.train_batch}, SGD)", ft), flush=True)
    mfu = (f", MFU baseline {100 * ft['baseline_mfu']:.1f}% project {100 * ft['project_mfu']:.1f}% "
           f"of {ft['peak_tflops']:.0f} TFLOPS") if ft["peak_tflops"] else ""
    print(f"  {ft['flops_per_image'] / 1e9:.2f} GFLOP/image; achieved baseline {ft['baseline_tflops']:.3f} "
          f"TFLOPS, project {ft['project_tflops']:.3f} TFLOPS{mfu}", flush=True)
    result["plasticity"] = pl = bench_plasticity(cfg, device)
    print(_line(f"plasticity ({cfg.plasticity_arch}, {pl['measurements']} component-layers, {cfg.pairs} pairs)",
                pl), flush=True)
    result["peak_rss_mib"] = _peak_rss_mib(resource.RUSAGE_SELF)
    result["peak_rss_workers_mib"] = _peak_rss_mib(resource.RUSAGE_CHILDREN)
    print(f"peak RSS {result['peak_rss_mib']:.0f} MiB (largest DataLoader worker "
          f"{result['peak_rss_workers_mib']:.0f} MiB)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"data speedup {result['data']['speedup']:.2f}, finetune speedup {ft['speedup']:.2f}, "
          f"plasticity speedup {pl['speedup']:.2f}", flush=True)
    return result


def main(quick: bool, device: str, out: Path | None, peak_tflops: float | None = None, **overrides) -> dict:
    """Quick (under a minute on 2 CPU cores) or full; `overrides` replace config fields."""
    target = runtime.pick_device(device)
    cfg = quick_config() if quick else full_config(target)
    return run(replace(cfg, **overrides), target, out, peak_tflops)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="throughput of this project's paths against the authors' approach")
    parser.add_argument("--quick", action="store_true", help="small sizes: under a minute on a 2-core CPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak of this accelerator, for FLOPs utilisation")
    args = parser.parse_args(sys.argv[1:])
    main(args.quick, args.device, args.out, peak_tflops=args.peak_tflops)
