"""Batched image transforms on the device, from prepared uint8 arrays.

Semantics follow torchvision's: eval is Resize(size) (shorter side) + CenterCrop(size);
train is RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip;
both end with mean/std normalisation. Resizing is bilinear and antialiased as PIL's and
``F.interpolate(..., antialias=True)``: each output axis is a weight matrix over the source
axis (a triangle filter widened by the shrink factor, taps only inside the crop, mirrored
for a flip), so a crop, resize and flip of a whole batch is one pass per axis (`_resample`),
with no per-sample Python in the hot loop.
"""

from __future__ import annotations

import ctypes
import math
import platform

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _keep_freed_memory_for_reuse() -> None:
    """Have glibc serve large blocks from its heap and keep them after `free`.

    By default glibc maps large blocks (above a threshold that adapts up to 32 MB) afresh and
    returns them on `free`, so every batch page-faults its whole output again: a 128-image 224 px
    batch (77 MB) took 3-4x as long on a 2-core CPU. A cache of reused output buffers would avoid
    this too, but would hand callers tensors that the next batch overwrites. No effect off glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


_keep_freed_memory_for_reuse()


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1] on `device`."""
    batch = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # copies out of a memmap
    batch = batch.to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(batch: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def _resize_weights(low: torch.Tensor, high: torch.Tensor, length: int, size: int,
                    reverse: torch.Tensor | None = None) -> torch.Tensor:
    """Weights resampling the source pixels [low, high) of an axis `length` long to `size` pixels. (B, size, length)

    `low` and `high` are (B,) whole-pixel bounds; `reverse` (B,) bool mirrors the output where true.
    As PIL's bilinear filter: output pixel i samples at low + (i + 0.5) * scale with a triangle filter
    of half-width max(scale, 1), and each row sums to 1.
    """
    scale = ((high - low) / size)[:, None]  # (B, 1)
    position = torch.arange(size, device=low.device, dtype=low.dtype) + 0.5  # (size,)
    if reverse is not None:
        position = torch.where(reverse[:, None], size - position, position)  # (B, size)
    centre = (low[:, None] + position * scale)[..., None]  # (B, size, 1)
    support = scale.clamp(min=1.0)[..., None]  # (B, 1, 1)
    pixel = torch.arange(length, device=low.device, dtype=low.dtype) + 0.5  # (length,)
    inside = (pixel >= low[:, None, None]) & (pixel < high[:, None, None])  # (B, 1, length)
    # The triangle's height 1 / support is left out: normalising the rows divides it away.
    weights = (support - (pixel - centre).abs_()).clamp_(min=0).mul_(inside)  # (B, size, length)
    return weights.div_(weights.sum(-1, keepdim=True))


def _resample(batch: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ image @ colsᵀ per image and channel. (B, 3, S_y, S_x)

    batch (B, 3, H, W); rows (B, S_y, H) or (S_y, H) and cols (B, S_x, W) or (S_x, W) from
    `_resize_weights`, covering at most the whole axis. The column pass is a matrix product on the
    small source. The row pass writes the large output; a row of `rows` has at most
    ceil(2 · max(H / S_y, 1)) nonzero weights, consecutive, so it is that many weighted source rows
    summed per output row: an embedding bag over the source rows, a fraction of a dense product's work.
    """
    count, channels, height, _ = batch.shape
    size_y, size_x = rows.shape[-2], cols.shape[-2]
    wide = batch.flatten(1, 2) @ cols.transpose(-1, -2)  # (B, 3·H, S_x)
    taps = min(height, math.ceil(2 * max(height / size_y, 1.0)))
    first = (rows > 0).int().argmax(-1, keepdim=True)  # (..., S_y, 1)
    source = first + torch.arange(taps, device=rows.device)  # (..., S_y, taps)
    weights = rows.gather(-1, source.clamp(max=height - 1)) * (source < height)  # beyond the edge: weight 0
    image = torch.arange(count * channels, device=rows.device).view(count, channels, 1, 1)
    index = source.clamp(max=height - 1).unsqueeze(-3) + image * height  # rows of `wide`: (B, 3, S_y, taps)
    weights = weights.unsqueeze(-3).expand(index.shape)
    out = F.embedding_bag(index.reshape(-1, taps), wide.view(-1, size_x), mode="sum",
                          per_sample_weights=weights.reshape(-1, taps))  # (B·3·S_y, S_x)
    return out.view(count, channels, size_y, size_x)


def resize_center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bilinear, antialiased), then centre-crop. (B, 3, size, size)"""
    height, width = batch.shape[-2:]
    if (height, width) == (size, size):
        return batch
    scale = size / min(height, width)
    axes = []
    for length in (height, width):
        resized = max(size, round(length * scale))
        offset = (resized - size) // 2
        whole = _resize_weights(batch.new_zeros(1), batch.new_full((1,), float(length)), length, resized)
        axes.append(whole[0, offset : offset + size])  # (size, length)
    return _resample(batch, *axes)


def sample_crop_boxes(
    count: int, height: int, width: int, generator: torch.Generator,
    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), tries: int = 10,
) -> torch.Tensor:
    """torchvision's RandomResizedCrop parameters for a batch, vectorised. (count, 4) x1 y1 x2 y2"""
    area = height * width
    target = area * torch.empty(count, tries).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(count, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w = torch.sqrt(target * aspect).round()
    crop_h = torch.sqrt(target / aspect).round()
    valid = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full((count,), -1))
    # Fallback as torchvision: the whole image clamped to the ratio range, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fb_w, fb_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fb_w, fb_h = round(height * ratio[1]), height
    else:
        fb_w, fb_h = width, height
    rows = torch.arange(count)
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, crop_w[rows, pick], torch.tensor(float(fb_w)))
    h = torch.where(first >= 0, crop_h[rows, pick], torch.tensor(float(fb_h)))
    u = torch.rand(count, 2, generator=generator)
    x1 = torch.where(first >= 0, torch.floor(u[:, 0] * (width - w + 1)), torch.floor((width - w) / 2))
    y1 = torch.where(first >= 0, torch.floor(u[:, 1] * (height - h + 1)), torch.floor((height - h) / 2))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def sample_crop_flip(
    count: int, height: int, width: int, generator: torch.Generator, scale=(0.08, 1.0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of `random_resized_crop_flip` for `count` images: crop boxes (count, 4) and flips (count,).

    Drawing them for a whole batch at once makes the augmentation independent of how the
    batch is later split into micro-batches.
    """
    boxes = sample_crop_boxes(count, height, width, generator, scale=scale)
    flips = torch.rand(count, generator=generator) < 0.5
    return boxes, flips


def crop_flip(batch: torch.Tensor, size: int, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box, resize to (size, size) and flip where `flips` says. (B, 3, size, size)"""
    count, _, height, width = batch.shape
    x1, y1, x2, y2 = boxes.to(batch.device, batch.dtype).unbind(1)
    flips = flips.to(batch.device)
    # Both axes in one call, rows then columns: (2B, size, max(H, W)); a flip mirrors the columns.
    weights = _resize_weights(torch.cat([y1, x1]), torch.cat([y2, x2]), max(height, width), size,
                              reverse=torch.cat([torch.zeros_like(flips), flips]))
    return _resample(batch, weights[:count, :, :height], weights[count:, :, :width])


def random_resized_crop_flip(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip for a whole batch. (B, 3, size, size)"""
    count, _, height, width = batch.shape
    return crop_flip(batch, size, *sample_crop_flip(count, height, width, generator))


# Both batch functions normalise the small source before resizing: every resize weight row sums
# to 1, so resizing commutes with the per-channel affine normalisation.


def eval_batch(images, size: int, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised eval tensor (B, 3, size, size)."""
    return resize_center_crop(normalize(to_tensor(images, device), mean, std), size)


def train_batch(images, size: int, device: torch.device, generator: torch.Generator | None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, draws: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> torch.Tensor:
    """uint8 (B, H, W, 3) → augmented, normalised train tensor (B, 3, size, size).

    `draws` (boxes, flips) from `sample_crop_flip` replace drawing from `generator`.
    """
    batch = normalize(to_tensor(images, device), mean, std)
    if draws is None:
        return random_resized_crop_flip(batch, size, generator)
    return crop_flip(batch, size, *draws)
