"""Plasticity: the average rate of change of each component (study-spec §3).

For a component f and image pairs (a, b), P(f) = mean over pairs of
||f(x_a) - f(x_b)||_F / ||x_a - x_b||_F, where x is

- ``embedding`` mode (the paper's): the pretrained embedding E(image), fed to every
  component of every block (FC2 receives E zero-padded to 4d);
- ``hidden`` mode (an extension): the input that actually reaches the component at
  its depth;
- ``scale_free`` mode (an extension): embedding mode with each image's E rescaled to unit
  token RMS, x = E / rms(E), rms(E) = ||E||_F / sqrt(N·D). A LayerNorm's rate of change
  scales as 1/||token|| and a linear map's does not, so the embedding-mode ranking depends
  on the scale of E; this one does not: E → cE leaves x, hence every value, unchanged, while
  the paper's LayerNorm values scale by 1/c. For maps whose output ignores input scale
  (LayerNorm) or is linear in it (FC1, FC2 up to biases, which cancel) it is the embedding
  value at unit token RMS.

a comes from the pretraining-distribution stream, b from the downstream test split,
paired index by index (`pair_indices`: the smaller stream is cycled up to `n_pairs`, as the
authors' loader does to reach 64 × 200 = 12,800 pairs). Each stream is transformed to the
model's input before the two are joined, so their stored image sizes may differ (ImageNet val
at 256 px beside CIFAR at 32 px). Norms, their ratios and the streamed sums are float64
(a Frobenius norm of a ViT-B FC1 output sums 600k squares). All components of all layers are measured from one embedding
pass per batch, and the statistics are streamed (memory does not grow with pairs). In
embedding mode only MHA is applied to both streams; the linear maps and LayerNorms are
reduced to products with the pair difference (`_EmbeddingNumerators`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, LayerScale

from vitplasticity import transforms
from vitplasticity.bounds import token_extremes
from vitplasticity.components import BLOCK_COMPONENTS, LABELS, apply_component, embed, hidden_inputs
from vitplasticity.errors import UserError
from vitplasticity.prepared import Split

MODES = ("embedding", "hidden", "scale_free")


class RunningStats:
    """Count, mean and variance of a stream of values per key, in float64.

    Batches are merged with Chan, Golub & LeVeque's pairwise update of (count, mean, M2), so
    the variance has no cancellation of a sum of squares against n·mean² (their 1983 note).
    """

    def __init__(self) -> None:
        self.count: dict[tuple, int] = {}
        self.mean: dict[tuple, float] = {}
        self.m2: dict[tuple, float] = {}

    def add(self, key: tuple, values: torch.Tensor) -> None:
        values = values.detach().double().flatten().cpu()
        m = values.numel()
        if m == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = (values - batch_mean).square().sum().item()
        n = self.count.get(key, 0)
        if n == 0:
            self.count[key], self.mean[key], self.m2[key] = m, batch_mean, batch_m2
            return
        delta = batch_mean - self.mean[key]
        total = n + m
        self.mean[key] += delta * m / total
        self.m2[key] += batch_m2 + delta * delta * n * m / total
        self.count[key] = total

    def summary(self, key: tuple) -> tuple[float, float, int]:
        """Mean, sample standard deviation and count; NaN, NaN, 0 when no value was added."""
        n = self.count.get(key, 0)
        if n == 0:
            return math.nan, math.nan, 0
        var = self.m2[key] / (n - 1) if n > 1 else 0.0
        return self.mean[key], math.sqrt(max(var, 0.0)), n


def pair_indices(n_reference: int, n_downstream: int, n_pairs: int,
                 loader_batch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Which reference and downstream image make each of `n_pairs` pairs. Two (n_pairs,) int64 arrays.

    Pairs are formed index by index (study-spec §3). Where a stream has fewer images than
    `n_pairs`, it is cycled, as the authors' loader cycles its smaller stream to reach
    64 × 200 = 12,800 pairs.

    With `loader_batch` B, each stream is read as the authors' code reads it: a DataLoader of
    batch B, unshuffled, with drop_last=True, repeated without end; so pair k takes image
    k mod (B·⌊N/B⌋) of each stream of N images. Otherwise every image is used and pass c over
    the smaller stream (the downstream one on a tie) is rotated by c images: pair k takes image
    (k + k // n_small) mod n_small of it and image k mod n_large of the other. So no pair
    repeats before the larger stream runs out as well, and when both streams hold the same
    images, a cycled pass never pairs an image with itself (pass c pairs image i with image i + c).
    Raises UserError for an empty stream or one shorter than B.
    """
    if min(n_reference, n_downstream) < 1:
        raise UserError(f"plasticity needs images in both streams, got {n_reference} reference and "
                        f"{n_downstream} downstream; check both tasks' test splits")
    k = np.arange(n_pairs, dtype=np.int64)
    if loader_batch is not None:
        for stream, count in (("reference", n_reference), ("downstream", n_downstream)):
            if count < loader_batch:
                raise UserError(f"plasticity.loader_batch {loader_batch} exceeds the {count} images of the {stream} "
                                "stream, so its loader (drop_last) yields no batch; lower plasticity.loader_batch")
        return k % (loader_batch * (n_reference // loader_batch)), k % (loader_batch * (n_downstream // loader_batch))
    reference_smaller = n_reference < n_downstream
    n_small, n_large = sorted((n_reference, n_downstream)) if reference_smaller else (n_downstream, n_reference)
    small = (k + k // n_small) % n_small
    large = k % n_large
    return (small, large) if reference_smaller else (large, small)


def distinct_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (first, second) index pairs without repeats, each kept where it first occurs. Two (m,) int64 arrays,
    m ≤ len(first)."""
    stacked = np.stack([np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)], axis=1)
    _, where = np.unique(stacked, axis=0, return_index=True)
    kept = np.sort(where)
    return stacked[kept, 0], stacked[kept, 1]


def _frobenius(x: torch.Tensor) -> torch.Tensor:
    """Per-sample Frobenius norm of a (B, N, D) token matrix, summed in float64. (B,) float64"""
    return x.double().flatten(1).norm(dim=1)


def _pair_difference_norms(x: torch.Tensor, half: int) -> torch.Tensor:
    """||x_a - x_b||_F per pair of a (2B, N, D) stack (stream a, then stream b), in float64. (B,)"""
    return _frobenius(x[:half].double() - x[half:].double())


_PLAIN_LAYER_NORMS = (torch.nn.LayerNorm, LayerNorm)
_CHANNEL_SCALES = (torch.nn.Identity, LayerScale)  # linear maps acting on the last axis


class _EmbeddingNumerators:
    """||f(E_a) - f(E_b)||_F per pair for every block component f of `model`, embedding mode.

    f(E_a) - f(E_b) needs no pass of f over both streams where f is affine or a LayerNorm:

    - FC1 and FC2: biases cancel, leaving a linear map of Δ = E_a - E_b, Δ M (M: W1ᵀ for FC1; for FC2
      the first d rows of W2ᵀ, as the rest meet zero padding, times LayerScale's gamma). Its square
      norm is <ΔᵀΔ, M Mᵀ>, so one token Gram matrix ΔᵀΔ per pair serves every map of every block,
      each then a dot product with the map's precomputed M Mᵀ (in float64: no cancellation to fear).
    - LayerNorm: the difference is γ ⊙ (n_a - n_b), n = E normalised per token, which every
      LayerNorm with the same eps shares; so the square norm is (Σ_tokens (n_a - n_b)²) · γ².

    MHA, and components of other types, are applied to both streams as `apply_component` does.
    """

    def __init__(self, model: torch.nn.Module, width: int, device: torch.device) -> None:
        self.model = model
        self.norms: dict[tuple[str, int], tuple[float, torch.Tensor]] = {}  # eps, γ² (D,)
        maps: dict[tuple[str, int], torch.Tensor] = {}  # M (D, D_out)
        for layer, block in enumerate(model.blocks):
            for component, norm in (("ln1", block.norm1), ("ln2", block.norm2)):
                if type(norm) in _PLAIN_LAYER_NORMS and tuple(norm.normalized_shape) == (width,):
                    gamma = norm.weight if norm.weight is not None else torch.ones(width, device=device)
                    self.norms[(component, layer)] = (norm.eps, gamma.double().square())
            fc1, fc2, scale = getattr(block.mlp, "fc1", None), block.mlp.fc2, block.ls2  # SwiGLU: fc1_g, fc1_x
            if type(fc1) is torch.nn.Linear:
                maps[("fc1", layer)] = fc1.weight.double().T
            if type(fc2) is torch.nn.Linear and fc2.in_features >= width and type(scale) in _CHANNEL_SCALES:
                maps[("fc2", layer)] = scale(fc2.weight[:, :width].double().T.clone())
        self.linear = list(maps)
        grams = [(m @ m.T).flatten() for m in maps.values()]  # M Mᵀ: (D·D,) each
        self.grams = torch.stack(grams, dim=1) if grams else None  # (D·D, maps)

    def __call__(self, emb: torch.Tensor, half: int) -> dict[tuple[str, int], torch.Tensor]:
        """`emb` (2B, N, D): stream a then stream b. Returns {(component, layer): (B,) float64}."""
        out = {}
        if self.grams is not None:
            delta = emb[:half].double() - emb[half:].double()  # (B, N, D)
            tokens_gram = (delta.transpose(1, 2) @ delta).flatten(1)  # (B, D, D) → (B, D·D)
            linear = (tokens_gram @ self.grams).clamp_(min=0).sqrt_()  # (B, maps), float64
            out.update(zip(self.linear, linear.T, strict=True))
        spread: dict[float, torch.Tensor] = {}  # eps → Σ_tokens (n_a - n_b)², (B, D)
        for eps in {eps for eps, _ in self.norms.values()}:
            normed = F.layer_norm(emb, emb.shape[-1:], eps=eps).double()
            spread[eps] = (normed[:half] - normed[half:]).square().sum(1)
        for (component, layer), (eps, gamma_sq) in self.norms.items():
            out[(component, layer)] = (spread[eps] @ gamma_sq.double()).sqrt()
        for layer, block in enumerate(self.model.blocks):
            for component in BLOCK_COMPONENTS:
                if (component, layer) not in out:
                    applied = apply_component(block, component, emb)
                    out[(component, layer)] = _pair_difference_norms(applied, half)
        return {(component, layer): out[(component, layer)]
                for layer in range(len(self.model.blocks)) for component in BLOCK_COMPONENTS}


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
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    loader_batch: int | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Plasticity per (mode, component, layer) and token-norm statistics of E per stream.

    `reference` and `downstream` hold uint8 (N, H, W, 3) images whose sizes may differ; each
    batch of each stream is resized and centre-cropped to `img_size` before the two are
    joined. `n_pairs` pairs are formed by `pair_indices` (a smaller stream is cycled; one
    line says so; `loader_batch` pairs as the authors' loaders do, see there), or given as `pairs`
    (reference rows, downstream rows; `n_pairs` each). A pair that repeats an earlier one is no new
    evidence: it is measured once (`distinct_pairs`; one line says how many repeats were dropped), so
    means, spreads and intervals are over distinct pairs. Pairs of identical images (zero
    denominator) are left out and counted.

    Returns the table (one row per mode, component and layer: mean, std, n kept pairs, 95% CI, the
    distinct pairs measured, the distinct images of each stream they use and the classes those
    images cover, by label) and the stats record (the same counts, `pairs_asked`, token-norm
    statistics). Raises UserError for an unknown mode or fewer than 2 distinct pairs.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise UserError(f"plasticity modes {unknown} unknown; allowed: {', '.join(MODES)}")
    if n_pairs < 2:
        raise UserError(f"plasticity needs at least 2 image pairs, got n_pairs = {n_pairs}; raise n_pairs")
    if pairs is None:
        pairs = pair_indices(len(reference.labels), len(downstream.labels), n_pairs, loader_batch)
    elif len(pairs[0]) != n_pairs or len(pairs[1]) != n_pairs:
        raise ValueError(f"pairs hold {len(pairs[0])} and {len(pairs[1])} rows, not n_pairs = {n_pairs}")
    asked = len(pairs[0])
    reference_rows, downstream_rows = distinct_pairs(*pairs)
    n_pairs = len(reference_rows)
    if n_pairs < asked:
        progress(f"plasticity: {asked - n_pairs} of the {asked} pairs repeat an earlier pair and are measured once: "
                 f"{n_pairs} distinct pairs")
    if n_pairs < 2:
        raise UserError(f"plasticity needs at least 2 distinct image pairs, got {n_pairs}; give more images")
    counts = {"reference": len(np.unique(reference_rows)), "downstream": len(np.unique(downstream_rows))}
    classes = {stream: len(np.unique(split.labels[rows])) for stream, split, rows in
               (("reference", reference, reference_rows), ("downstream", downstream, downstream_rows))}
    for stream, count in counts.items():
        if count < n_pairs:
            progress(f"plasticity: the {stream} stream has {count} images; it is cycled to make {n_pairs} pairs")
    model.eval().to(device)
    wants_numerators = "embedding" in modes or "scale_free" in modes
    numerators = _EmbeddingNumerators(model, model.embed_dim, device) if wants_numerators else None
    ratios, tokens, skipped = RunningStats(), RunningStats(), 0
    extremes = {"min_token_std": math.inf, "max_token_norm": 0.0}  # over every token of both streams
    for start in range(0, n_pairs, batch_size):
        stop = min(start + batch_size, n_pairs)
        # Each stream to the model's input first: their stored sizes may differ.
        inputs = [transforms.eval_batch(split.images[rows[start:stop]], img_size, device, mean, std)
                  for split, rows in ((reference, reference_rows), (downstream, downstream_rows))]
        emb = embed(model, torch.cat(inputs)).float()  # (2B, N, D)
        half = stop - start
        token_norms = emb.double().norm(dim=-1)  # (2B, N)
        for stream, part in (("reference", token_norms[:half]), ("downstream", token_norms[half:])):
            tokens.add((stream, "mean_token_norm"), part.mean(dim=1))
            tokens.add((stream, "rms_token_norm"), part.square().mean(dim=1).sqrt())
        batch_extremes = token_extremes(emb)
        extremes["max_token_norm"] = max(extremes["max_token_norm"], batch_extremes["max_token_norm"])
        extremes["min_token_std"] = min(extremes["min_token_std"], batch_extremes["min_token_std"])
        distance = _pair_difference_norms(emb, half)  # (B,): pairs at distance 0 have no ratio
        skipped += int((distance == 0).sum())
        for mode in ("embedding", "scale_free"):
            if mode not in modes:
                continue
            # scale_free: each image's E at unit token RMS (rms over its N x D entries)
            x = emb if mode == "embedding" else emb / emb.double().square().mean((1, 2), keepdim=True).sqrt().float()
            denominator = distance if mode == "embedding" else _pair_difference_norms(x, half)
            keep = denominator > 0
            found = numerators(x, half)
            keys = list(found)
            batch_ratios = (torch.stack([found[k] for k in keys]) / denominator)[:, keep].cpu()  # (keys, kept)
            for (component, layer), values in zip(keys, batch_ratios, strict=True):
                ratios.add((mode, component, layer), values)
        if "hidden" in modes:
            hidden = emb
            for layer, block in enumerate(model.blocks):
                inputs, hidden_next = hidden_inputs(block, hidden)
                for component in BLOCK_COMPONENTS:
                    x = inputs[component]
                    denominator = _pair_difference_norms(x, half)
                    keep = denominator > 0
                    numerator = _pair_difference_norms(apply_component(block, component, x), half)
                    ratios.add(("hidden", component, layer), (numerator / denominator)[keep])
                hidden = hidden_next
        progress(f"plasticity: {stop}/{n_pairs} pairs")
    if skipped == n_pairs:
        raise UserError(
            f"plasticity: all {n_pairs} image pairs have identical embeddings (zero input distance), so no rate "
            "of change is defined; choose a plasticity.reference_task whose images differ from the downstream task's"
        )
    rows = []
    depth = len(model.blocks)
    for mode, component, layer in ratios.count:
        value, spread, n = ratios.summary((mode, component, layer))
        rows.append({
            "mode": mode, "component": component, "label": LABELS[component], "layer": layer,
            "depth_pct": 100.0 * (layer + 1) / depth, "mean": value, "std": spread, "n": n,
            "ci95": 1.96 * spread / math.sqrt(n) if n else math.nan, "pairs": n_pairs,
            "reference_images": counts["reference"], "downstream_images": counts["downstream"],
            "reference_classes": classes["reference"], "downstream_classes": classes["downstream"],
        })
    stats = {"pairs": n_pairs, "pairs_asked": asked, "skipped_identical_pairs": skipped,
             "num_tokens": int(emb.shape[1]), "embed_dim": int(emb.shape[2]), "reference_images": counts["reference"],
             "downstream_images": counts["downstream"], "reference_classes": classes["reference"],
             "downstream_classes": classes["downstream"], **extremes}
    for key in tokens.count:
        stats[f"{key[0]}_{key[1]}"] = tokens.summary(key)[0]
    return pd.DataFrame(rows), stats

