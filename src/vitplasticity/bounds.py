"""Theoretical upper bounds on each component's rate of change, per block (study-spec §4).

Column ``bound`` is the paper's; column ``holding_bound`` is one that holds for the measured inputs
(embedding mode: every component fed E of both streams), from their extreme token statistics:

- LN1, LN2: the paper's max(γ) is not an upper bound when tokens are small. Per token,
  LN(a) − LN(b) = γ ⊙ (f(u) − f(v)) with u, v the centred tokens and f(u) = u / sqrt(‖u‖²/d + ε).
  f is √d times the first d coordinates of the unit vector along (u, sqrt(dε)), and for vectors
  ‖x/‖x‖ − y/‖y‖‖ ≤ ‖x − y‖ / min(‖x‖, ‖y‖) (scale the longer one onto the shorter one's sphere:
  a projection onto a ball, which does not expand distances). So
  ‖LN(a) − LN(b)‖ ≤ max|γ| ‖a − b‖ / min(σ_a, σ_b), σ = sqrt(Var(token) + ε), and over token matrices
  ‖LN(E_a) − LN(E_b)‖_F ≤ max|γ| / σ_min · ‖E_a − E_b‖_F with σ_min the smallest σ of any token of
  either stream. At σ_min = 1 it is the paper's max(γ); at small tokens it exceeds it.
- MHA: the same formula with r the largest token norm of either stream (the bound is for tokens in
  the ball of radius r; the paper's r is a mean), times max|γ| of LayerScale where a model has it.
  The formula is for attention without biases; timm's qkv has them, so the bound is taken on the
  inputs (x, 1), whose differences are those of x, with W_Q, W_K, W_V extended by their bias
  column and r by sqrt(r² + 1) (the value bias adds a constant that cancels; so does proj's).
- FC1, FC2: the spectral norm holds as it is (FC2's input is zero-padded: only d of its columns act),
  times max|γ| of LayerScale after FC2 where a model has it.

The paper's bounds:

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
def token_extremes(emb: torch.Tensor) -> dict[str, float]:
    """Smallest token standard deviation (over features, population) and largest token norm of E (B, N, D)."""
    emb = emb.double()
    return {"min_token_std": emb.var(dim=-1, unbiased=False).sqrt().min().item(),
            "max_token_norm": emb.norm(dim=-1).max().item()}


def _scale_max(module: torch.nn.Module) -> float:
    """max|γ| of a LayerScale; 1 for an identity."""
    gamma = getattr(module, "gamma", None)
    return gamma.abs().max().item() if gamma is not None else 1.0


def _with_bias_column(qkv: torch.nn.Linear) -> torch.Tensor:
    """[W | b] (3D, D + 1): with inputs (x, 1), the biased projections W x + b are linear (for the bound)."""
    if qkv.bias is None:
        return qkv.weight
    return torch.cat([qkv.weight, qkv.bias[:, None]], dim=1)


def layernorm_holding_bound(norm: torch.nn.Module, min_token_std: float) -> float:
    """max|γ| / sqrt(σ_min² + ε): a LayerNorm's rate of change on tokens of standard deviation ≥ σ_min."""
    gamma = norm.weight.abs().max().item() if norm.weight is not None else 1.0
    return gamma / math.sqrt(min_token_std**2 + norm.eps)


@torch.no_grad()
def theoretical_bounds(model: torch.nn.Module, radius: float, extremes: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per (layer, component): the paper's bound, with n and r used, and, given the streams' token
    `extremes` (`token_extremes`), the bound that holds for them."""
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
        holding = dict.fromkeys(values, math.nan)
        if extremes is not None:
            holding = {
                "ln1": layernorm_holding_bound(block.norm1, extremes["min_token_std"]),
                "ln2": layernorm_holding_bound(block.norm2, extremes["min_token_std"]),
                "fc1": values["fc1"],
                "fc2": values["fc2"] * _scale_max(block.ls2),
                "mha": mha_bound(_with_bias_column(block.attn.qkv), block.attn.proj.weight, block.attn.num_heads, n,
                                 math.sqrt(extremes["max_token_norm"] ** 2 + 1)) * _scale_max(block.ls1),
            }
        for component, bound in values.items():
            rows.append({"component": component, "label": LABELS[component], "layer": layer,
                         "depth_pct": 100.0 * (layer + 1) / depth, "bound": bound, "holding_bound": holding[component],
                         "n": n, "r": radius})
    return pd.DataFrame(rows)
