"""Batched image transforms on the device, from prepared uint8 arrays.

Semantics follow torchvision's: eval is Resize(size) (shorter side) + CenterCrop(size);
train is RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + horizontal flip;
both end with mean/std normalisation. Crops and resizes of a whole batch run as one
``roi_align`` call, so no per-sample Python is in the hot loop.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1] on `device`."""
    batch = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images  # copies out of a memmap
    batch = batch.to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(batch: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return (batch - mean_t) / std_t


def resize_center_crop(batch: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bilinear, antialiased), then centre-crop. (B, 3, size, size)"""
    height, width = batch.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        batch = F.interpolate(batch, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        batch = batch[..., top : top + size, left : left + size]
    return batch


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
    count: int, height: int, width: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The random draws of `random_resized_crop_flip` for `count` images: crop boxes (count, 4) and flips (count,).

    Drawing them for a whole batch at once makes the augmentation independent of how the
    batch is later split into micro-batches.
    """
    boxes = sample_crop_boxes(count, height, width, generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return boxes, flips


def crop_flip(batch: torch.Tensor, size: int, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crop each image to its box, resize to (size, size) and flip where `flips` says. (B, 3, size, size)"""
    count = batch.shape[0]
    rois = torch.cat([torch.arange(count, dtype=torch.float32)[:, None], boxes], dim=1)
    out = roi_align(batch, rois.to(batch.device, batch.dtype), output_size=(size, size),
                    spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flips = flips.to(batch.device)
    return torch.where(flips[:, None, None, None], out.flip(-1), out)


def random_resized_crop_flip(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip for a whole batch. (B, 3, size, size)"""
    count, _, height, width = batch.shape
    return crop_flip(batch, size, *sample_crop_flip(count, height, width, generator))


def eval_batch(images, size: int, device: torch.device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised eval tensor (B, 3, size, size)."""
    return normalize(resize_center_crop(to_tensor(images, device), size), mean, std)


def train_batch(images, size: int, device: torch.device, generator: torch.Generator | None,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, draws: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> torch.Tensor:
    """uint8 (B, H, W, 3) → augmented, normalised train tensor (B, 3, size, size).

    `draws` (boxes, flips) from `sample_crop_flip` replace drawing from `generator`.
    """
    batch = to_tensor(images, device)
    if draws is None:
        return normalize(random_resized_crop_flip(batch, size, generator), mean, std)
    return normalize(crop_flip(batch, size, *draws), mean, std)
