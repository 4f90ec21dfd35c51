"""Small builders shared by the unit tests: tiny timm ViTs and in-memory splits."""

from __future__ import annotations

import numpy as np
import timm
import torch

from vitplasticity.prepared import Split

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def tiny_vit(num_classes: int = 5, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-block, 32-wide timm ViT on 32 px images (16 patches + class token), in eval mode."""
    torch.manual_seed(seed)
    kwargs = {**TINY, **overrides}
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **kwargs)
    return model.eval()


def random_split(count: int, size: int = 32, num_classes: int = 5, seed: int = 0) -> Split:
    """Uniform-noise uint8 images with balanced labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = (np.arange(count) % num_classes).astype(np.int64)
    return Split(images=images, labels=labels)
