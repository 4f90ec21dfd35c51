"""One-shot device benchmark: what the paper study costs on this GPU, within a time budget.

Run from a checkout, with nothing installed beyond PyTorch, timm, numpy, pandas, pillow, PyYAML and
safetensors, and py-cpuinfo with ``--device cpu`` (no network, random weights):

    PYTHONPATH=src python3 benchmarks/device.py --out device.json          # starts no stage after 200 s (--budget-s)
    PYTHONPATH=src python3 benchmarks/device.py --tiny --out device.json   # seconds on a CPU (the test suite)

Stages, each written to the JSON as soon as it ends (a run cut short still reports what it measured):

1. ``finetune``: ViT-B/16 at 224 px, batch 512, bf16 autocast, arms ``all``, ``mha``, ``ln1``: the training
   loop's own step (`training.train_step`) on a resident split: images/s, executed FLOPs per image
   (`torch.utils.flop_counter`, forward + backward with the arm's trainable set), achieved TFLOP/s, MFU
   against the device's dense bf16 peak, peak memory, micro-batch.
2. ``compile``: the same for arm ``mha`` with ``torch.compile`` (compile time reported apart).
3. ``baseline``: the authors' style for the ratio: float32, attention written out, per-sample PIL transforms
   in a DataLoader, arm ``all``.
4. ``data_path``: streamed (memory-mapped 256 px uint8 on the host, gathered ahead into pinned memory)
   against resident (on the device) storage at DomainNet-like 256 px, arm ``all``: step images/s of each.
5. ``plasticity``: 12,800 pairs (ImageNet-val-like 256 px against CIFAR-like 32 px), embedding and hidden
   modes: pairs/s.
6. ``sizes``: one timed step each of ViT-L/16 and ViT-H/14 (arm ``all``) after one warm-up step.
7. ``projection``: GPU-hours of each experiment of ``config/config.yaml`` from the measured step times
   (arms without a measurement of their own take the closest measured one, as ``ARM_PROXY`` says; a budget
   arm, ``mha``'s) plus the evaluation passes at the measured forward rate (``eval_rate``, checked as the
   stages are; left out when invalid); the arithmetic is in the JSON.

The last line printed is the summary. ``--budget-s`` skips the stages that would start after it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import bench
import numpy as np
import timm
import torch
import torch.nn.functional as F
import yaml

from vitplasticity import components, plasticity, preflight, runtime, training, transforms
from vitplasticity.prepared import Split
from vitplasticity.settings import fill_defaults

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_TFLOPS = dict(preflight.PEAK_TFLOPS)["H100"]  # dense, SXM: the rated peaks' one home
CONSUMER_MFU = 0.4  # the utilisation a good ViT-B/16 training step reaches
# Arms without a measurement of their own take the step time of the closest measured arm: every block arm
# back-propagates through all blocks (its block 0 is trainable), so arms differ mainly in weight gradients.
ARM_PROXY = {"all": "all", "emb": "all", "non_smooth": "all", "mha_fc1": "all", "mha": "mha", "fc1": "mha",
             "fc2": "mha", "ln1": "ln1", "ln2": "ln1", "smooth": "ln1"}
ARCHS = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224", "vit_h14": "vit_huge_patch14_224"}
# Validation and test sizes per task (images) under the study's splits (study-spec §5), from each dataset's
# official split sizes: CIFAR 50,000 train (20% val) and 10,000 test; CIFAR-10-C 10,000 per corruption (20% test,
# then 20% of the rest val); DomainNet clipart 48,833 and sketch 70,386 images; Flowers102 1,020 val and 6,149
# test; Oxford-IIIT Pet 3,680 trainval (20% val) and 3,669 test. The low-data tasks validate on 20% of their
# subset (CIFAR-100 and CIFAR-10-C 1,000 images, clipart 3,450, Pet 999) and test on the whole task's test split.
EVAL_SIZES = {
    "cifar10": (10_000, 10_000), "cifar100": (10_000, 10_000),
    **{c: (1_600, 2_000) for c in ("contrast", "gaussian_noise", "motion_blur", "snow", "speckle_noise")},
    "clipart": (7_813, 9_767), "sketch": (11_262, 14_077), "flowers102": (1_020, 6_149),
    "oxford_pets": (736, 3_669),
    "cifar100_low": (200, 10_000), "motion_blur_low": (200, 2_000), "clipart_low": (690, 9_767),
    "oxford_pets_low": (200, 3_669),
}


@dataclass(frozen=True)
class DeviceConfig:
    """Sizes of every stage; the defaults are the GPU run's, `tiny()` the CPU test's."""

    arch: str = "vit_base_patch16_224"
    depth: int | None = None  # None: the architecture's own
    img_size: int = 224
    store_size: int = 256  # side of the stored uint8 images (DomainNet-like)
    num_images: int = 2048  # images in each random split
    num_classes: int = 345
    batch: int = 512
    warmup_steps: int = 3
    timed_steps: int = 10
    arms: tuple[str, ...] = ("all", "mha", "ln1")
    compile_arm: str = "mha"
    compile_backend: str = "inductor"  # the tiny CPU mode traces with "eager": inductor's C++ build takes minutes
    baseline_steps: int = 3
    baseline_workers: int = 8
    pairs: int = 12_800
    pair_batch: int = 256
    reference_size: int = 256
    downstream_size: int = 32
    size_archs: tuple[str, ...] = ("vit_large_patch16_224", "vit_huge_patch14_224")
    host_images: int = 4096  # in the memory-mapped file of the host-gather stage
    host_batches: int = 16
    eval_batches: int = 20  # timed forward batches of the evaluation rate
    min_window_s: float = 0.25  # a shorter timed window is no measurement (`bench.check`)

    @staticmethod
    def tiny() -> DeviceConfig:
        return DeviceConfig(depth=1, img_size=112, store_size=48, num_images=16, num_classes=10, batch=4,
                            warmup_steps=1, timed_steps=1, baseline_steps=1, baseline_workers=0, pairs=8, pair_batch=4,
                            reference_size=48, host_images=32, host_batches=2, eval_batches=2,
                            compile_backend="eager", min_window_s=0.0)


def _peak_gib(device: torch.device) -> float | None:
    peak = preflight.peak_memory_bytes(device)
    return None if peak is None else peak / preflight.GIB


def random_split(cfg: DeviceConfig, count: int, size: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8),
                 rng.integers(0, cfg.num_classes, count).astype(np.int64))


def build(arch: str, cfg: DeviceConfig, device: torch.device, arm: str | None = "all") -> torch.nn.Module:
    extra = {} if cfg.depth is None else {"depth": cfg.depth}
    with device:  # initialised where it runs: ViT-H's 632 M parameters take seconds to initialise on a CPU
        model = timm.create_model(arch, pretrained=False, num_classes=cfg.num_classes, img_size=cfg.img_size,
                                  drop_rate=0.0, drop_path_rate=0.0, **extra)
    if arm is not None:
        components.set_trainable(model, _arm_components(arm))
    return model


def _arm_components(arm: str) -> list[str]:
    return list(components.BLOCK_COMPONENTS) + ["emb"] if arm == "all" else [arm]


def time_steps(model: torch.nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray, cfg: DeviceConfig,
               device: torch.device, compile_model: bool = False, prefetch: int = 0) -> dict:
    """`preflight.time_steps` at `cfg`'s batch, image size and step counts (the micro-batch automatic)."""
    train_cfg = training.TrainConfig(steps=cfg.warmup_steps + cfg.timed_steps, eval_every=1, batch_size=cfg.batch,
                                     lr=0.01, seed=0, img_size=cfg.img_size, prefetch=prefetch)
    forward = torch.compile(model, backend=cfg.compile_backend) if compile_model else model
    return preflight.time_steps(model, images, labels, train_cfg, device, cfg.warmup_steps, cfg.timed_steps,
                                forward, prefetch)


def executed_flops_per_image(model: torch.nn.Module, cfg: DeviceConfig, device: torch.device) -> float:
    return preflight.executed_flops_per_image(model, cfg.img_size, device)


def _checked(result: dict, flops: float, limits: bench.Limits) -> dict:
    """`result` (images, planned_images, seconds, images_per_s) with achieved TFLOP/s, MFU against a rated peak,
    and `invalid`: why `bench.check` refuses it as a measurement, or None."""
    timed = bench.Timed(result["images"], result["planned_images"], result["seconds"])
    achieved = flops * result["images_per_s"]
    return {**result, "flops_per_image": flops, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / limits.peak_flops if limits.rated else None,
            "invalid": bench.check(timed, flops, limits)}


# --- stages -------------------------------------------------------------------------------------------


def stage_finetune(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    images = training.resident(split.images, device)
    out = {}
    for arm in cfg.arms:
        model = build(cfg.arch, cfg, device, arm)
        flops = executed_flops_per_image(model, cfg, device)
        out[arm] = _checked(time_steps(model, images, split.labels, cfg, device), flops, limits)
        out[arm]["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        del model
        print(f"  finetune {arm}: {_rate(out[arm])}, MFU {_pct(out[arm]['mfu'])}", flush=True)
    return out


def stage_compile(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    images = training.resident(split.images, device)
    model = build(cfg.arch, cfg, device, cfg.compile_arm)
    flops = executed_flops_per_image(model, cfg, device)
    began = time.perf_counter()
    result = time_steps(model, images, split.labels, cfg, device, compile_model=True)
    total = time.perf_counter() - began
    result = _checked(result, flops, limits)
    result["arm"] = cfg.compile_arm
    result["compile_and_warmup_s"] = total - result["seconds"]
    return result


def stage_baseline(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    """Float32, attention written out, per-sample PIL transforms in a DataLoader; arm `all`.

    One untimed warm-up step on a batch of its own; then a fresh DataLoader is brought to its steady state
    (`bench.steady_batches`: the batches its workers prepare as they start are dropped untimed) and the clock runs
    over its next `cfg.baseline_steps` steps, whose data preparation falls inside the clock."""
    baseline = build(cfg.arch, cfg, device, "all")
    for block in baseline.blocks:
        block.attn.fused_attn = False
    flops = executed_flops_per_image(baseline, cfg, device)
    optimizer = torch.optim.SGD(baseline.parameters(), lr=0.01, momentum=0.9)
    baseline.train()
    preflight.reset_peak_memory(device)

    def step(images: torch.Tensor, labels: torch.Tensor) -> int:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(baseline(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(baseline.parameters(), 1.0)
        optimizer.step()
        loss.item()
        return len(labels)

    step(*next(bench.steady_batches(split, bench.train_transform(cfg.img_size), cfg.batch, cfg.batch, 0, device)))
    batches = bench.steady_batches(split, bench.train_transform(cfg.img_size), cfg.batch,
                                   cfg.baseline_steps * cfg.batch, cfg.baseline_workers, device)
    preflight.synchronize(device)
    began = time.perf_counter()
    done = sum(step(images, labels) for images, labels in batches)
    preflight.synchronize(device)
    seconds = time.perf_counter() - began
    result = {"images_per_s": done / seconds, "step_s": seconds / cfg.baseline_steps, "images": done,
              "planned_images": cfg.batch * cfg.baseline_steps, "seconds": seconds,
              "peak_memory_gib": _peak_gib(device), "workers": cfg.baseline_workers}
    return _checked(result, flops, limits)


def stage_data_path(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    """Arm `all` with the split resident on the device against streamed from a memory-mapped file."""
    model = build(cfg.arch, cfg, device, "all")
    flops = executed_flops_per_image(model, cfg, device)
    resident = torch.from_numpy(split.images).to(device) if device.type == "cuda" else split.images
    out = {"resident": _checked(time_steps(model, resident, split.labels, cfg, device), flops, limits)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train_images.npy"
        np.save(path, split.images)
        mapped = np.load(path, mmap_mode="r")
        out["streamed"] = _checked(time_steps(model, mapped, split.labels, cfg, device, prefetch=2), flops, limits)
    out["streamed_over_resident"] = out["streamed"]["images_per_s"] / out["resident"]["images_per_s"]
    return out


def stage_plasticity(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    """Pairs/s of `plasticity.measure` in each mode, after an untimed warm-up of one batch of pairs."""
    reference = random_split(cfg, cfg.pairs, cfg.reference_size, seed=5)
    downstream = random_split(cfg, cfg.pairs, cfg.downstream_size, seed=6)
    model = build(cfg.arch, cfg, device, arm=None)
    out = {}
    for mode in ("embedding", "hidden"):
        plasticity.measure(model, reference, downstream, max(2, cfg.pair_batch), cfg.pair_batch, cfg.img_size,
                           device, modes=(mode,), progress=lambda _: None)
        preflight.reset_peak_memory(device)
        preflight.synchronize(device)
        began = time.perf_counter()
        table, _ = plasticity.measure(model, reference, downstream, cfg.pairs, cfg.pair_batch, cfg.img_size, device,
                                      modes=(mode,), progress=lambda _: None)
        preflight.synchronize(device)
        seconds = time.perf_counter() - began
        pairs = int(table["n"].max())  # the pairs whose ratios were taken
        timed = bench.Timed(pairs, cfg.pairs, seconds)
        out[mode] = {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
                     "peak_memory_gib": _peak_gib(device), "invalid": bench.check(timed, 0.0, limits)}
    return out


def stage_sizes(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    images = training.resident(split.images, device)
    out = {}
    for arch in cfg.size_archs:
        model = build(arch, cfg, device, "all")
        flops = executed_flops_per_image(model, cfg, device)
        out[arch] = _checked(time_steps(model, images, split.labels, replace(cfg, warmup_steps=1, timed_steps=1),
                                         device), flops, limits)
        del model
    return out


def eval_rate(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    """Forward images/s at evaluation (bf16 autocast, batch `cfg.batch`) over `cfg.eval_batches` timed batches,
    after one untimed, whose forward FLOPs `FlopCounterMode` counts; checked as every other window (`_checked`)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build(cfg.arch, cfg, device, arm=None).eval()
    images = training.resident(split.images, device)

    def forward(start: int) -> int:
        batch = transforms.eval_batch(images[start : start + cfg.batch], cfg.img_size, device)
        with runtime.autocast(device):
            model(batch).float().argmax(-1).sum().item()
        return len(batch)

    starts = [(i * cfg.batch) % max(1, len(split.labels) - cfg.batch + 1) for i in range(cfg.eval_batches)]
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            warm = forward(0)
        preflight.synchronize(device)
        began = time.perf_counter()
        done = sum(forward(start) for start in starts)
        preflight.synchronize(device)
        seconds = time.perf_counter() - began
    result = {"images_per_s": done / seconds, "images": done, "planned_images": cfg.batch * cfg.eval_batches,
              "seconds": seconds}
    return _checked(result, counter.get_total_flops() / warm, limits)


def projection(results: dict, config_path: Path, forward_rate: float | None) -> dict:
    """GPU-hours per experiment of the study config: Σ runs × (steps × step time + eval images / forward rate),
    over the runs the workflow plans (`preflight.planned_runs`, on the config with its schema defaults).

    Only valid measurements enter: an experiment whose own runs' arms (or their proxies) lack a valid step time is
    left out with the reason, and the total names it (`total_leaves_out`); ViT-L/H step times are ViT-B's per arm
    scaled by the measured arm-`all` ratio, so without a valid ViT-B `all` they are left out too; with
    `forward_rate` None (no valid evaluation rate) evaluation passes are left out of every figure, as
    `assumptions` then says.
    """
    study = fill_defaults(yaml.safe_load(config_path.read_text()))
    base = {arm: r for arm, r in results.get("finetune", {}).items() if not r["invalid"]}
    per_arch_step = {"vit_base_patch16_224": {arm: r["step_s"] for arm, r in base.items()}}
    size_ratio = {"vit_base_patch16_224": 1.0}
    sizes = {arch: r for arch, r in results.get("sizes", {}).items() if not r["invalid"]}
    out: dict = {}
    if sizes and "all" not in base:
        out["sizes_left_out"] = f"{', '.join(sizes)}: no valid ViT-B arm `all` step time to scale ViT-B's arms by"
    elif sizes:
        for arch, r in sizes.items():  # only arm `all` measured: scale B's arm step times by its ratio
            size_ratio[arch] = r["step_s"] / base["all"]["step_s"]
            per_arch_step[arch] = {arm: step * size_ratio[arch]
                                   for arm, step in per_arch_step["vit_base_patch16_224"].items()}
    planned = preflight.planned_runs(study)
    total = 0.0
    for name, exp in study["experiments"].items():
        arch = ARCHS.get(exp["model"], exp["model"])
        steps_by_arm = per_arch_step.get(arch, {})
        rows = [row for row in planned if row["experiment"] == name]
        proxy = [_arm_proxy(row["arm"], row["components"]) for row in rows]
        missing = sorted(set(proxy) - steps_by_arm.keys())
        if missing:
            out[name] = {"skipped": f"no valid step time measured for {arch}, arms {', '.join(missing)}"}
            continue
        seconds = 0.0
        for row, arm in zip(rows, proxy, strict=True):
            n_val, n_test = EVAL_SIZES.get(row["task"], (0, 0))
            eval_images = row["steps"] // study["tasks"][row["task"]]["eval_every"] * n_val + n_test
            eval_s = eval_images / forward_rate * size_ratio[arch] if forward_rate else 0.0
            seconds += row["runs"] * (row["steps"] * steps_by_arm[arm] + eval_s)
        out[name] = {"runs": sum(row["runs"] for row in rows), "gpu_hours": seconds / 3600}
        total += seconds / 3600
    out["total_gpu_hours"] = total
    skipped = [name for name, r in out.items() if isinstance(r, dict) and "skipped" in r]
    if skipped:
        out["total_leaves_out"] = skipped
    evaluation = ("evaluation passes at the measured ViT-B forward rate scaled by the model's step-time ratio"
                  if forward_rate else "evaluation passes LEFT OUT (no valid forward rate measured)")
    out["assumptions"] = ("steps x measured step time of the arm (or its proxy, ARM_PROXY; a control arm: its "
                          f"component's; a budget arm: mha's) at batch 512; {evaluation}; no data loading stalls "
                          "(resident splits); one GPU per run")
    return out


def _arm_proxy(arm: str, trained: list[str]) -> str:
    """The measured arm standing for `arm`, which trains `trained` whole: ``mha`` for a budget arm (no whole
    component: a few units), else its own entry of `ARM_PROXY`, else (a control, or an arm of the user's) its one
    component's entry, else ``all``."""
    if not trained:
        return "mha"
    return ARM_PROXY.get(arm) or (ARM_PROXY.get(trained[0], "all") if len(trained) == 1 else "all")


def stage_host_gather(cfg: DeviceConfig, device: torch.device, limits: bench.Limits, split: Split) -> dict:
    """Host side of the streamed path: images/s gathered from a 256 px memory-mapped file into batch buffers
    (pinned on a GPU host, pageable elsewhere), with 1 and 2 gathering threads, against the rate at which a
    ViT-B/16 training step at `CONSUMER_MFU` of an H100's dense bf16 peak would consume images."""
    from concurrent.futures import ThreadPoolExecutor

    images = cfg.host_images
    meta, full = torch.device("meta"), replace(cfg, depth=None, img_size=224)  # FLOPs counted without computing
    flops = executed_flops_per_image(build("vit_base_patch16_224", full, meta, "all"), full, meta)
    consumer = CONSUMER_MFU * H100_BF16_TFLOPS * 1e12 / flops
    rng = np.random.default_rng(7)
    out = {"consumer_images_per_s": consumer, "vit_b16_flops_per_image": flops, "store_size": cfg.store_size,
           "images": images, "batch": cfg.batch, "pinned": device.type == "cuda"}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train_images.npy"
        stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8,
                                           shape=(images, cfg.store_size, cfg.store_size, 3))
        for start in range(0, images, 256):
            stored[start : start + 256] = rng.integers(0, 256, stored[start : start + 256].shape, dtype=np.uint8)
        stored.flush()
        del stored
        mapped = np.load(path, mmap_mode="r")
        for threads in (1, 2):
            buffers = [torch.empty((cfg.batch, cfg.store_size, cfg.store_size, 3), dtype=torch.uint8,
                                   pin_memory=device.type == "cuda") for _ in range(threads)]
            # Warm-up batches (the pool's threads, the buffers' pages) are other steps than the timed ones.
            warm = [training.batch_indices(images, cfg.batch, step, seed=0)
                    for step in range(cfg.host_batches, cfg.host_batches + threads)]
            batches = [training.batch_indices(images, cfg.batch, step, seed=0) for step in range(cfg.host_batches)]

            def gather(job: tuple[int, np.ndarray], buffers=buffers, threads=threads) -> int:
                np.take(mapped, job[1], axis=0, out=buffers[job[0] % threads][: len(job[1])].numpy())
                return len(job[1])

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(gather, enumerate(warm)))
                began = time.perf_counter()
                done = sum(pool.map(gather, enumerate(batches)))
                seconds = time.perf_counter() - began
            rate = done / seconds
            reason = bench.check(bench.Timed(done, cfg.batch * cfg.host_batches, seconds), 0.0, limits)
            out[f"threads_{threads}"] = {"images_per_s": rate, "ratio_to_consumer": rate / consumer,
                                         "invalid": reason}
            print(f"  host gather, {threads} thread(s): " + (f"INVALID: {reason}" if reason else
                  f"{rate:.0f} images/s = {rate / consumer:.2f} x the {consumer:.0f} images/s a ViT-B/16 step at "
                  f"{100 * CONSUMER_MFU:.0f}% of an H100 consumes"), flush=True)
    return out


STAGES: dict[str, Callable] = {"finetune": stage_finetune, "baseline": stage_baseline, "data_path": stage_data_path,
                               "host_gather": stage_host_gather, "plasticity": stage_plasticity,
                               "sizes": stage_sizes, "compile": stage_compile}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _rate(result: dict) -> str:
    return "INVALID" if result.get("invalid") else f"{result['images_per_s']:.0f} images/s"


def summary_line(results: dict) -> str:
    ft = results.get("finetune", {})
    parts = [f"device {results['machine']['name']}"]
    for arm, r in ft.items():
        parts.append(f"{arm} {_rate(r)} MFU {_pct(r['mfu'])}")
    if "baseline" in results and "all" in ft:
        valid = not results["baseline"]["invalid"] and not ft["all"]["invalid"]
        ratio = ft["all"]["images_per_s"] / results["baseline"]["images_per_s"]
        parts.append(f"vs baseline x{ratio:.2f}" if valid else "vs baseline INVALID")
    if "compile" in results:
        parts.append(f"compiled {results['compile']['arm']} {_rate(results['compile'])}")
    if "data_path" in results:
        path = results["data_path"]
        valid = not path["streamed"]["invalid"] and not path["resident"]["invalid"]
        ratio = f"{path['streamed_over_resident']:.2f}" if valid else "INVALID"
        parts.append(f"streamed/resident {ratio}")
    if "plasticity" in results:
        parts.append("plasticity " + ", ".join(f"{m} " + ("INVALID" if r["invalid"] else f"{r['seconds']:.1f} s")
                                               for m, r in results["plasticity"].items()))
    if "projection" in results:
        left_out = results["projection"].get("total_leaves_out")
        parts.append(f"projected {results['projection']['total_gpu_hours']:.0f} GPU-hours"
                     + (f" without {', '.join(left_out)} (no valid step time)" if left_out else ""))
    return "summary: " + "; ".join(parts)


def _write(path: Path, results: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run(cfg: DeviceConfig, device: torch.device, out: Path, budget_s: float, peak_tflops: float | None,
        stages: list[str]) -> dict:
    started = time.perf_counter()
    limits = bench.measure_limits(device, cfg.min_window_s, peak_tflops)
    print(f"peak {limits.peak_flops / 1e12:.4g} TFLOP/s ({limits.peak_source}); matmul measured now "
          f"{limits.matmul_flops / 1e12:.4g} TFLOP/s, memory copy {limits.copy_bytes_per_s / 1e9:.3g} GB/s; shortest "
          f"valid window {limits.min_window_s} s", flush=True)
    results = {"machine": bench.machine(device), "config": asdict(cfg), "limits": asdict(limits),
               "peak_tflops": limits.peak_flops / 1e12 if limits.rated else None, "skipped": [], "errors": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, results)
    split = random_split(cfg, cfg.num_images, cfg.store_size, seed=0)
    for name in stages:
        stage = STAGES[name]
        elapsed = time.perf_counter() - started
        if elapsed > budget_s:
            results["skipped"].append(name)
            print(f"{name}: skipped ({elapsed:.0f} s spent of a {budget_s:.0f} s budget)", flush=True)
            continue
        print(f"{name} ...", flush=True)
        began = time.perf_counter()
        try:
            results[name] = stage(cfg, device, limits, split)
        except Exception as exc:  # noqa: BLE001 - one stage failing must not lose the others' figures
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: failed: {results['errors'][name]}", flush=True)
        results.setdefault("stage_seconds", {})[name] = time.perf_counter() - began
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _write(out, results)
    if "finetune" in results:
        results["eval_rate"] = forward = eval_rate(cfg, device, limits, split)
        if forward["invalid"]:
            print(f"evaluation rate INVALID: {forward['invalid']}; the projection leaves evaluation out", flush=True)
        results["projection"] = projection(results, ROOT / "config" / "config.yaml",
                                           None if forward["invalid"] else forward["images_per_s"])
    results["total_seconds"] = time.perf_counter() - started
    _write(out, results)
    print(summary_line(results), flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("device.json"), help="JSON written after every stage")
    parser.add_argument("--tiny", action="store_true", help="seconds on a CPU: one block, batch 4 (for tests)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--budget-s", type=float, default=200.0, help="start no stage after this many seconds")
    parser.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak when the table lacks it")
    args = parser.parse_args(argv)
    cfg = DeviceConfig.tiny() if args.tiny else DeviceConfig()
    stages = args.stages.split(",") if args.stages else list(STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    return run(cfg, runtime.pick_device(args.device), args.out, args.budget_s, args.peak_tflops, stages)


if __name__ == "__main__":
    main(sys.argv[1:])
