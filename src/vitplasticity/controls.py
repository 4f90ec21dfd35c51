"""Parameter-matched control arms: a component's capacity apart from its plasticity (study-spec §8).

Arms differ in size by orders of magnitude: one LayerNorm holds 2d parameters per block, MHA and
FC1 4d² + 4d each. Two controls restrict a component to a chosen size, so a reader can see whether
it wins beyond its size:

- **Matched count** (`mask_to_count`): in every block a fixed subset of the component's parameter
  entries, as many as another component holds in that block (say LN1's 2d), is trained; a gradient
  mask zeroes every other entry's gradient, so with weight decay 0 (the study's setting) they never
  move, under SGD with momentum as under AdamW. The subset is drawn uniformly without replacement
  from a generator seeded by (``mask_seed``, layer): the same entries for every training seed.
- **LoRA** (`add_lora`; Hu et al., ICLR 2022): every linear layer of the component (for MHA, timm's
  fused ``qkv`` and ``proj``) gets a trainable low-rank update, x ↦ W x + b + (α / r) B A x, with A
  (r × in) drawn as PyTorch initialises a linear layer, B (out × r) zero, α = r; W and b stay frozen.
  The new parameters live inside the wrapped layer (``blocks.{i}.attn.qkv.lora_a``), so the component
  map counts them as the component's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitplasticity.components import block_parameters, component_of
from vitplasticity.errors import UserError

# The linear layers LoRA wraps, per component (attribute paths inside a timm Block).
LORA_LAYERS = {"mha": ("attn.qkv", "attn.proj"), "fc1": ("mlp.fc1",), "fc2": ("mlp.fc2",)}


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-`rank` update (α = rank, so the update's scale is 1)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be at least 1, got {rank}; set the arm's lora_rank to 1 or more")
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


def add_lora(model: nn.Module, component: str, rank: int) -> int:
    """Wrap the component's linear layers in every block with `LoRALinear`; return the LoRA parameter count.

    Call after `components.set_trainable`: the component's own parameters are frozen, so of it only the
    LoRA factors train (the component map counts them as the component's).
    """
    if component not in LORA_LAYERS:
        raise UserError(f"LoRA applies to {', '.join(LORA_LAYERS)}, not '{component}'; change the arm's components")
    for params in block_parameters(model).values():
        for name, param in params:
            if component_of(name) == component:
                param.requires_grad_(False)
    added = 0
    for block in model.blocks:
        for path in LORA_LAYERS[component]:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            layer = getattr(parent, name)
            if not isinstance(layer, nn.Linear):
                raise UserError(f"cannot add LoRA to {path}: it is a {type(layer).__name__}, not a linear layer")
            wrapped = LoRALinear(layer, rank)
            setattr(parent, name, wrapped)
            added += wrapped.lora_a.numel() + wrapped.lora_b.numel()
    return added


def _frozen_base(param_name: str) -> bool:
    return ".base." in param_name


def mask_to_count(model: nn.Module, component: str, match: str, mask_seed: int = 0) -> int:
    """Train only as many entries of `component` per block as `match` holds there; return the total trained.

    Registers a gradient hook on each of the component's parameters; call after `set_trainable`.
    Raises `UserError` when `match` holds more entries than `component` in a block.
    """
    groups = block_parameters(model)
    kept = 0
    for layer in range(len(model.blocks)):
        params = [(n, p) for n, p in groups.get((component, layer), []) if not _frozen_base(n)]
        budget = sum(p.numel() for _, p in groups.get((match, layer), []))
        total = sum(p.numel() for _, p in params)
        if budget > total:
            raise UserError(f"cannot restrict {component} to {match}'s count in block {layer}: {match} has {budget} "
                            f"entries, {component} only {total}; match a smaller component")
        generator = torch.Generator().manual_seed(mask_seed * 100_003 + layer)
        chosen = torch.zeros(total, dtype=torch.bool)
        chosen[torch.randperm(total, generator=generator)[:budget]] = True
        start = 0
        for _, param in params:
            mask = chosen[start : start + param.numel()].view_as(param).to(param.device, param.dtype)
            param.register_hook(lambda grad, mask=mask: grad * mask)
            start += param.numel()
        kept += budget
    return kept
