"""The training loop shared by pretraining and every finetuning arm.

Reads top to bottom: config → data → optimizer → loop (accumulate, clip, step, eval,
checkpoint) → test at the best-validation state. A run folder's ``state.pt`` (trainable
tensors, optimizer, history) lets an interrupted run resume and end with exactly the
metrics of an uninterrupted one, because every random draw depends only on (seed, step).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitplasticity import streaming, transforms
from vitplasticity.errors import UserError
from vitplasticity.fileio import atomic_path
from vitplasticity.prepared import Split
from vitplasticity.runtime import autocast, step_generator
from vitplasticity.schedule import learning_rate

OPTIMIZERS = ("sgd", "adamw")
HISTORY_COLUMNS = ("step", "loss", "lr", "grad_norm", "val_loss", "val_acc")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    eval_every: int
    batch_size: int
    lr: float
    seed: int
    img_size: int
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    clip_norm: float = 1.0
    micro_batch: int | None = None  # None: automatic (whole batch on CPU, largest that fits on GPU)
    compile: bool = False  # torch.compile the forward pass
    prefetch: int = 2  # batches gathered ahead on a worker thread when the split streams from the host; 0: none
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    eval_batch: int = 256
    mean: tuple[float, ...] = transforms.IMAGENET_MEAN
    std: tuple[float, ...] = transforms.IMAGENET_STD

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Invariants, each failing with the key and the fix; checked when the config is made (and by
        `dataclasses.replace`), before a job writes anything."""
        if self.steps <= 0:
            raise UserError(f"steps must be positive, got {self.steps}; set steps to at least 1")
        if not 0 < self.eval_every <= self.steps:
            raise UserError(f"eval_every must be in 1..steps ({self.steps}), got {self.eval_every}; "
                            "set eval_every between 1 and steps")
        if self.batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {self.batch_size}; set batch_size to at least 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UserError(f"lr must be a positive number, got {self.lr}; set lr to a positive finite number")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer '{self.optimizer}' unknown; allowed: {', '.join(OPTIMIZERS)}")
        if self.micro_batch is not None and not 0 < self.micro_batch <= self.batch_size:
            raise UserError(f"micro_batch must be in 1..batch_size ({self.batch_size}), got {self.micro_batch}; "
                            "set runtime.micro_batch in that range, or null for automatic")
        if self.prefetch < 0:
            raise UserError(f"prefetch must be 0 or more, got {self.prefetch}; set runtime.prefetch to 0 (off) or a "
                            "number of batches")


@dataclass
class Result:
    status: str  # "completed" or "diverged"
    best_val_acc: float
    best_step: int
    test_acc: float | None
    test_loss: float | None
    diverged_step: int | None
    steps_done: int
    history: list[dict]


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device):
    fused = device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None)


def batch_indices(num_samples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: epochs are seeded permutations, so any step is reproducible."""
    per_epoch = max(1, num_samples // batch_size)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    chunk = order[offset * batch_size : (offset + 1) * batch_size]
    if len(chunk) < batch_size:  # fewer samples than one batch: sample with wrap-around
        chunk = order.repeat(math.ceil(batch_size / num_samples))[:batch_size]
    return np.sort(chunk.numpy())


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split (eval transform)."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(split.labels), cfg.eval_batch):
        chunk = split.images[start : start + cfg.eval_batch]
        images = transforms.eval_batch(chunk, cfg.img_size, device, cfg.mean, cfg.std)
        labels = np.array(split.labels[start : start + cfg.eval_batch])  # a copy: memmaps are read-only
        labels = torch.as_tensor(labels, device=device)
        with autocast(device):
            logits = model(images)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    count = len(split.labels)
    return total_loss / count, correct / count


# Share of the free GPU memory that a split may take when kept there whole; the rest is left to the
# model, its optimizer state and activations (the micro-batch adapts to what is left).
RESIDENT_SHARE = 0.4


def resident(images: np.ndarray, device: torch.device, share: float = RESIDENT_SHARE) -> np.ndarray | torch.Tensor:
    """A uint8 split kept on the GPU whole when it fits in `share` of the free device memory, else left on the
    host (memory-mapped) to be streamed batch by batch. On an H200 (about 139 GiB free) every paper dataset is
    kept whole; on a 24 GiB GPU, DomainNet sketch at 256 px (about 14 GB) streams."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if images.nbytes <= share * free:
            return torch.from_numpy(np.asarray(images)).to(device)
    return images


def largest_micro_batch(forward, model, images, labels, cfg: TrainConfig, device: torch.device) -> int:
    """Halve the micro-batch from the full batch until a forward + backward fits in GPU memory."""
    if device.type != "cuda":
        return cfg.batch_size
    size = cfg.batch_size
    while size > 1:
        try:
            part = np.arange(size) % len(labels)
            batch = transforms.eval_batch(images[part], cfg.img_size, device, cfg.mean, cfg.std)
            target = torch.as_tensor(np.asarray(labels)[part], device=device)
            with autocast(device):
                F.cross_entropy(forward(batch).float(), target).backward()
            model.zero_grad(set_to_none=True)
            return size
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            size //= 2
    return 1


def batch_fetcher(images: np.ndarray | torch.Tensor, labels: np.ndarray, cfg: TrainConfig,
                   device: torch.device) -> Callable[[int], streaming.Batch]:
    """The function giving step → that step's training batch (uint8 images, labels), drawn by `batch_indices`."""
    if isinstance(images, torch.Tensor):  # resident on the device
        targets = torch.as_tensor(np.asarray(labels), device=images.device)

        def gather_resident(index: np.ndarray) -> streaming.Batch:
            index = torch.from_numpy(index).to(images.device)
            return images[index], targets[index]
        gather = gather_resident
    else:
        gather = streaming.host_gather(images, labels, device)
    return lambda step: gather(batch_indices(len(labels), cfg.batch_size, step, cfg.seed))


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], images: torch.Tensor, labels: torch.Tensor,
               draws: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig, micro: int,
               device: torch.device) -> tuple[float, float]:
    """One optimizer step on a batch: uint8 `images` (B, H, W, 3) and `labels` (B,), B = cfg.batch_size.

    Micro-batches of `micro` images are cropped and flipped with the batch's `draws` (boxes (B, 4), flips (B,)
    from `transforms.sample_crop_flip`), normalised, forwarded under autocast, and their cross-entropy gradients
    accumulated to the batch mean; then the gradient norm is clipped to `cfg.clip_norm` and the optimizer steps.
    Returns (mean loss in nats, gradient norm before clipping). A non-finite loss skips the optimizer step: the
    run has diverged. The host waits for the device once per step, to read the two numbers.
    """
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, cfg.batch_size, micro):
        part = slice(start, start + micro)
        batch = transforms.train_batch(images[part], cfg.img_size, device, None, cfg.mean, cfg.std,
                                       draws=(draws[0][part], draws[1][part]))
        target = labels[part].to(device, non_blocking=True)
        with autocast(device):
            loss = F.cross_entropy(forward(batch).float(), target) * (len(target) / cfg.batch_size)
        loss.backward()
        step_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
    loss_value, norm_value = torch.stack([step_loss, grad_norm.to(step_loss)]).tolist()
    if math.isfinite(loss_value):
        optimizer.step()
    return loss_value, norm_value


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# Machine settings that may change between an interrupted run and its resumption.
_RESUMABLE_CHANGES = ("micro_batch", "eval_batch", "compile", "prefetch")


def _resume_key(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with the run that saved the state."""
    record = config_record(cfg)
    return {k: v for k, v in record.items() if k not in _RESUMABLE_CHANGES}


def _save_state(path: Path, step: int, model, optimizer, best: dict, history: list[dict],
                key: dict | None = None) -> None:
    state = {
        "settings": key,
        "step": step,
        "params": {n: p.detach().cpu().clone() for n, p in _trainable(model).items()},
        "optimizer": optimizer.state_dict(),
        "best": best,
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path, model, optimizer, key: dict | None = None) -> tuple[int, dict, list[dict]] | None:
    """Restore a saved state (safely: tensors and plain data only); None if another run's settings saved it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file means: start over
        # Not torch's text: it suggests weights_only=False, which would run whatever the file holds.
        raise UserError(f"resume state {path} is unreadable ({type(exc).__name__}: not a file of tensors and "
                        "plain data); delete it to restart the run") from exc
    params = _trainable(model)
    if not isinstance(state, dict) or not {"step", "params", "optimizer", "best", "history"} <= state.keys():
        raise UserError(f"resume state {path} is not a training state; delete it to restart the run")
    saved = state["params"]
    if (key is not None and state.get("settings") != key) or saved.keys() != params.keys() or any(
            saved[name].shape != params[name].shape for name in params):
        return None
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as exc:
        raise UserError(f"resume state {path} does not fit this run's optimizer ({exc}); "
                        "delete it to restart the run") from exc
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    return state["step"], state["best"], state["history"]


def train(
    model: torch.nn.Module,
    splits: dict[str, Split],
    cfg: TrainConfig,
    device: torch.device,
    state_path: Path | None = None,
    on_eval: Callable[[list[dict]], None] | None = None,
    progress: Callable[[str], None] = print,
    on_resume: Callable[[list[dict]], None] | None = None,
) -> Result:
    """Train the model's trainable parameters; return the best-validation test result (without a "test" split in
    `splits`: the validation result alone, test_acc and test_loss None, the model left at its last step).

    `on_eval` gets the history rows since its last call after each evaluation, once that evaluation's
    state is saved; `on_resume` gets the saved history when a run resumes from `state_path` (the model
    then holds the weights of its last row's step, whose `on_eval` an interruption may have cut short).
    """
    model.to(device)
    params = list(_trainable(model).values())
    optimizer = make_optimizer(params, cfg, device)
    forward = torch.compile(model) if cfg.compile else model
    train_images = resident(splits["train"].images, device)
    micro = cfg.micro_batch or largest_micro_batch(forward, model, train_images, splits["train"].labels, cfg, device)
    if micro < cfg.batch_size:
        progress(f"micro-batch {micro}, {-(-cfg.batch_size // micro)} accumulation steps per batch of {cfg.batch_size}")
    start_step, best, history = 0, {"val_acc": -1.0, "step": -1, "params": None}, []
    resume_key = _resume_key(cfg)
    if state_path is not None and state_path.exists():
        resumed = _load_state(state_path, model, optimizer, resume_key)
        if resumed is None:
            progress(f"{state_path} was saved by a run with other settings or components; starting over")
        else:
            start_step, best, history = resumed
            progress(f"resuming from step {start_step}")
            if on_resume is not None:
                on_resume(history)
    reported, began, diverged_step = len(history), time.time(), None
    fetch = batch_fetcher(train_images, splits["train"].labels, cfg, device)
    height, width = train_images.shape[1:3]
    with contextlib.ExitStack() as stack:
        if isinstance(train_images, np.ndarray) and cfg.prefetch:  # streamed from the host: gather ahead
            fetch = stack.enter_context(streaming.Prefetcher(fetch, range(start_step, cfg.steps), cfg.prefetch)).get
        for step in range(start_step, cfg.steps):
            model.train()
            lr = learning_rate(step, cfg.lr, cfg.warmup_steps, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch_images, batch_labels = fetch(step)  # (B, H, W, 3) uint8, (B,)
            # Augmentation is drawn for the whole batch, so the micro-batch size cannot change it.
            boxes, flips = transforms.sample_crop_flip(cfg.batch_size, height, width,
                                                       step_generator(cfg.seed, step, stream=1), scale=cfg.crop_scale)
            step_loss, grad_norm = train_step(forward, optimizer, params, batch_images, batch_labels, (boxes, flips),
                                              cfg, micro, device)
            if not math.isfinite(step_loss):
                diverged_step = step
                history.append({"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": float("nan")})
                progress(f"step {step + 1}: loss is {step_loss}; the run diverged")
                break
            row = {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                val_loss, val_acc = evaluate(model, splits["val"], cfg, device)
                row.update(val_loss=val_loss, val_acc=val_acc)
                if val_acc > best["val_acc"]:
                    best = {"val_acc": val_acc, "step": step + 1,
                            "params": {n: p.detach().cpu().clone() for n, p in _trainable(model).items()}}
                history.append(row)
                rate = (step + 1 - start_step) / max(time.time() - began, 1e-9)
                progress(f"step {step + 1}/{cfg.steps} loss {step_loss:.4f} val_acc {val_acc:.4f} "
                         f"({rate:.1f} steps/s)")
                if state_path is not None and step + 1 < cfg.steps:
                    _save_state(state_path, step + 1, model, optimizer, best, history, resume_key)
                if on_eval is not None:
                    on_eval(history[reported:])
                    reported = len(history)
            else:
                history.append(row)
    if diverged_step is not None:
        if on_eval is not None:
            on_eval(history[reported:])
        return Result("diverged", best["val_acc"], best["step"], None, None, diverged_step + 1,
                      diverged_step + 1, history)
    if "test" not in splits:
        return Result("completed", best["val_acc"], best["step"], None, None, None, cfg.steps, history)
    with torch.no_grad():
        trainable = _trainable(model)
        for name, value in best["params"].items():
            trainable[name].copy_(value)
    test_loss, test_acc = evaluate(model, splits["test"], cfg, device)
    return Result("completed", best["val_acc"], best["step"], test_acc, test_loss, None, cfg.steps, history)


def config_record(cfg: TrainConfig) -> dict:
    record = asdict(cfg)
    record["betas"], record["mean"], record["std"] = list(cfg.betas), list(cfg.mean), list(cfg.std)
    record["crop_scale"] = list(cfg.crop_scale)
    return record
