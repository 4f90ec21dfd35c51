"""Plasticity: the average rate of change of each component (study-spec §3).

For a component f and image pairs (a, b), P(f) = mean over pairs of
||f(x_a) - f(x_b)||_F / ||x_a - x_b||_F, where x is

- ``embedding`` mode (the paper's): the pretrained embedding E(image), fed to every
  component of every block (FC2 receives E zero-padded to 4d);
- ``hidden`` mode (an extension): the input that actually reaches the component at
  its depth.

a comes from the pretraining-distribution stream, b from the downstream test split,
paired index by index. All components of all layers are measured from one embedding
pass per batch, and the statistics are streamed (memory does not grow with pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from vitplasticity import transforms
from vitplasticity.components import BLOCK_COMPONENTS, LABELS, apply_component, embed, hidden_inputs
from vitplasticity.errors import UserError
from vitplasticity.prepared import Split

MODES = ("embedding", "hidden")


class RunningStats:
    """Count, mean and variance of a stream of values (float64 sums per key)."""

    def __init__(self) -> None:
        self.count: dict[tuple, int] = {}
        self.total: dict[tuple, float] = {}
        self.squares: dict[tuple, float] = {}

    def add(self, key: tuple, values: torch.Tensor) -> None:
        values = values.double()
        self.count[key] = self.count.get(key, 0) + values.numel()
        self.total[key] = self.total.get(key, 0.0) + values.sum().item()
        self.squares[key] = self.squares.get(key, 0.0) + values.square().sum().item()

    def summary(self, key: tuple) -> tuple[float, float, int]:
        """Mean, sample standard deviation and count."""
        n = self.count[key]
        mean = self.total[key] / n
        var = max(0.0, (self.squares[key] - n * mean * mean) / (n - 1)) if n > 1 else 0.0
        return mean, math.sqrt(var), n


def _frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norm of a (B, N, D) token matrix. (B,)"""
    return x.float().flatten(1).norm(dim=1)


def _pair_ratios(out: torch.Tensor, half: int, denominator: torch.Tensor) -> torch.Tensor:
    return _frobenius(out[:half] - out[half:]) / denominator


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    reference: Split,
    downstream: Split,
    n_pairs: int,
    batch_size: int,
    img_size: int,
    device: torch.device,
    modes: tuple[str, ...] = ("embedding",),
    mean=transforms.IMAGENET_MEAN,
    std=transforms.IMAGENET_STD,
    progress: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, dict]:
    """Plasticity per (mode, component, layer) and token-norm statistics of E per stream."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"plasticity modes {unknown} unknown; allowed: {', '.join(MODES)}")
    pairs = min(n_pairs, len(reference.labels), len(downstream.labels))
    if pairs < 2:
        raise UserError(
            f"plasticity needs at least 2 image pairs, the streams give {pairs}; raise n_pairs or use larger splits"
        )
    model.eval().to(device)
    ratios, tokens, skipped = RunningStats(), RunningStats(), 0
    for start in range(0, pairs, batch_size):
        stop = min(start + batch_size, pairs)
        images = np.concatenate([reference.images[start:stop], downstream.images[start:stop]])
        emb = embed(model, transforms.eval_batch(images, img_size, device, mean, std)).float()  # (2B, N, D)
        half = stop - start
        token_norms = emb.norm(dim=-1)  # (2B, N)
        for stream, part in (("reference", token_norms[:half]), ("downstream", token_norms[half:])):
            tokens.add((stream, "mean_token_norm"), part.mean(dim=1))
            tokens.add((stream, "rms_token_norm"), part.square().mean(dim=1).sqrt())
        if "embedding" in modes:
            denominator = _frobenius(emb[:half] - emb[half:])
            keep = denominator > 0
            skipped += int((~keep).sum())
            for layer, block in enumerate(model.blocks):
                for component in BLOCK_COMPONENTS:
                    out = apply_component(block, component, emb)
                    ratios.add(("embedding", component, layer), _pair_ratios(out, half, denominator)[keep])
        if "hidden" in modes:
            hidden = emb
            for layer, block in enumerate(model.blocks):
                inputs, hidden_next = hidden_inputs(block, hidden)
                for component in BLOCK_COMPONENTS:
                    x = inputs[component]
                    denominator = _frobenius(x[:half] - x[half:])
                    keep = denominator > 0
                    out = apply_component(block, component, x)
                    ratios.add(("hidden", component, layer), _pair_ratios(out, half, denominator)[keep])
                hidden = hidden_next
        progress(f"plasticity: {stop}/{pairs} pairs")
    rows = []
    depth = len(model.blocks)
    for mode, component, layer in ratios.count:
        value, spread, n = ratios.summary((mode, component, layer))
        rows.append({
            "mode": mode, "component": component, "label": LABELS[component], "layer": layer,
            "depth_pct": 100.0 * (layer + 1) / depth, "mean": value, "std": spread, "n": n,
            "ci95": 1.96 * spread / math.sqrt(n),
        })
    stats = {"pairs": pairs, "skipped_identical_pairs": skipped, "num_tokens": int(emb.shape[1]),
             "embed_dim": int(emb.shape[2])}
    for key in tokens.count:
        stats[f"{key[0]}_{key[1]}"] = tokens.summary(key)[0]
    return pd.DataFrame(rows), stats


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean plasticity over layers per (mode, component), with the empirical rank (1 = most plastic)."""
    summary = table.groupby(["mode", "component"], as_index=False)["mean"].mean()
    summary["rank"] = summary.groupby("mode")["mean"].rank(ascending=False).astype(int)
    return summary.sort_values(["mode", "rank"]).reset_index(drop=True)
