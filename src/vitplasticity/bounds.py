"""Theoretical upper bounds on each component's rate of change, per block (study-spec §4).

- LN1, LN2: the largest entry of the LayerNorm gain γ (the authors' max(γ)).
- FC1, FC2: spectral norm of the weight.
- MHA: Σ_h ||W_O^h||₂ ||W_V^h||₂ sqrt(3n + (12n + 3) r⁴ ||W_Q^h W_K^hᵀ / sqrt(d_h)||₂²)
  (Castin, Ablin & Peyré 2024, summed over heads). Head h owns rows h·d_h..(h+1)·d_h
  of W_Q, W_K, W_V (in timm's (out, in) layout) and the matching columns of W_O.
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from vitplasticity.components import LABELS, fc1_weight

HEAD_SLICING = "rows of W_Q, W_K, W_V (output features per head), columns of W_O"


def spectral_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(matrix.double(), ord=2).item()


def mha_bound(qkv_weight: torch.Tensor, proj_weight: torch.Tensor, num_heads: int, n: int, r: float) -> float:
    """Sum over heads of the per-head self-attention Lipschitz bound."""
    dim = proj_weight.shape[0]
    head_dim = dim // num_heads
    w_q, w_k, w_v = qkv_weight.double().split(dim, dim=0)  # each (D, D): (out, in)
    total = 0.0
    for h in range(num_heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        # Scores are x W_q^T W_k x^T / sqrt(d_h): the (in, in) matrix W_q^hT W_k^h.
        a = spectral_norm(w_q[rows].T @ w_k[rows] / math.sqrt(head_dim))
        v = spectral_norm(w_v[rows])
        o = spectral_norm(proj_weight.double()[:, rows])
        total += o * v * math.sqrt(3 * n + (12 * n + 3) * r**4 * a**2)
    return total


@torch.no_grad()
def theoretical_bounds(model: torch.nn.Module, radius: float) -> pd.DataFrame:
    """One row per (layer, component): the bound, with n and r used."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    rows = []
    depth = len(model.blocks)
    for layer, block in enumerate(model.blocks):
        values = {
            "ln1": block.norm1.weight.max().item(),
            "ln2": block.norm2.weight.max().item(),
            "fc1": spectral_norm(fc1_weight(block.mlp)),
            "fc2": spectral_norm(block.mlp.fc2.weight),
            "mha": mha_bound(block.attn.qkv.weight, block.attn.proj.weight, block.attn.num_heads, n, radius),
        }
        for component, bound in values.items():
            rows.append({"component": component, "label": LABELS[component], "layer": layer,
                         "depth_pct": 100.0 * (layer + 1) / depth, "bound": bound, "n": n, "r": radius})
    return pd.DataFrame(rows)
