"""Plasticity (study-spec §3): hand-checkable ratios, the mean of ratios, and a brute-force cross-check."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import random_split, tiny_vit
from timm.layers import RmsNorm

from vitplasticity import plasticity
from vitplasticity.bounds import theoretical_bounds
from vitplasticity.components import BLOCK_COMPONENTS
from vitplasticity.errors import UserError
from vitplasticity.prepared import Split
from vitplasticity.settings import build

CPU = torch.device("cpu")
SILENT = {"progress": lambda _: None}


def _measure(model, reference, downstream, n_pairs=8, batch_size=8, **kwargs):
    return plasticity.measure(model, reference, downstream, n_pairs=n_pairs, batch_size=batch_size, img_size=32,
                              device=CPU, **SILENT, **kwargs)


def _value(table, component, layer, mode="embedding", column="mean"):
    row = table[(table["mode"] == mode) & (table["component"] == component) & (table["layer"] == layer)]
    assert len(row) == 1
    return float(row[column].iloc[0])


@pytest.fixture()
def streams():
    return random_split(8, seed=1), random_split(8, seed=2)


def _orthonormal_columns(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q


# --- embeddings chosen by hand: the model's E is replaced by a lookup on the image's pixel value ---

def _indexed_images(indices):
    """8x8 images whose every pixel is the index; with mean 0 and std 1 the eval transform gives index/255."""
    return np.stack([np.full((8, 8, 3), i, dtype=np.uint8) for i in indices])


def _lookup_embed(table):
    def fake(model, images):
        index = torch.round(images[:, 0, 0, 0] * 255).long()
        return table[index]
    return fake


def _measure_table(monkeypatch, model, table, reference, downstream):
    monkeypatch.setattr(plasticity, "embed", _lookup_embed(table))
    ref = Split(_indexed_images(reference), np.zeros(len(reference), dtype=np.int64))
    down = Split(_indexed_images(downstream), np.zeros(len(downstream), dtype=np.int64))
    return plasticity.measure(model, ref, down, n_pairs=len(reference), batch_size=2, img_size=8, device=CPU,
                              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **SILENT)


def test_measure_returns_mean_of_ratios_not_ratio_of_means(monkeypatch):
    model = tiny_vit()
    with torch.no_grad():
        weight = torch.zeros(128, 32)
        weight[0, 0], weight[1, 1] = 1.0, 3.0  # singular values 3 and 1 on feature axes 1 and 0
        model.blocks[0].mlp.fc1.weight.copy_(weight)
    table = torch.zeros(5, 2, 32)  # E: 2 tokens of width 32
    table[3, 0, 0] = 1.0  # pair 0: a = 0, b = e0 → ||W d|| / ||d|| = 1 / 1
    table[4, 0, 1] = 10.0  # pair 1: a = 0, b = 10 e1 → 30 / 10 = 3
    # pair 2: a = b = 0 (identical embeddings) is skipped.
    result, stats = _measure_table(monkeypatch, model, table, reference=[0, 1, 2], downstream=[3, 4, 2])
    assert _value(result, "fc1", 0) == pytest.approx(2.0)  # (1 + 3) / 2; the ratio of means is 31 / 11
    assert _value(result, "fc1", 0, column="std") == pytest.approx(math.sqrt(2.0))
    assert _value(result, "fc1", 0, column="n") == 2
    assert _value(result, "fc1", 0, column="ci95") == pytest.approx(1.96 * math.sqrt(2.0) / math.sqrt(2.0))
    assert stats["pairs"] == 3 and stats["skipped_identical_pairs"] == 1
    # Downstream token norms: image 3 → tokens (1, 0), image 4 → (10, 0), image 2 → (0, 0).
    assert stats["downstream_mean_token_norm"] == pytest.approx((0.5 + 5.0 + 0.0) / 3)
    assert stats["downstream_rms_token_norm"] == pytest.approx((math.sqrt(0.5) + math.sqrt(50.0)) / 3)
    assert stats["reference_mean_token_norm"] == 0.0
    assert stats["num_tokens"] == 2 and stats["embed_dim"] == 32


def test_layernorm_ignores_a_constant_shift(monkeypatch):
    model = tiny_vit()
    base = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(0))
    table = torch.cat([base, base + 2.5])  # b = a + 2.5 in every feature of every token
    result, _ = _measure_table(monkeypatch, model, table, reference=[0, 1, 2], downstream=[3, 4, 5])
    for layer in (0, 1):
        assert _value(result, "ln1", layer) < 1e-5
        assert _value(result, "ln2", layer) < 1e-5
        assert _value(result, "fc1", layer) > 1e-3  # an affine map does see the shift
    # The pair difference itself is far from zero: ||2.5 * 1|| over 17 x 32 entries.
    assert _value(result, "ln1", 0, column="n") == 3


def test_orthonormal_fc_weights_have_plasticity_one(streams):
    model = tiny_vit()
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            block.mlp.fc1.weight.copy_(_orthonormal_columns(128, 32, seed=layer))  # (4d, d), W^T W = I
            block.mlp.fc1.bias.normal_()  # cancels in the difference
            # FC2 sees [E, 0, 0, 0]: only its first d input columns act, so the rest may be anything.
            block.mlp.fc2.weight[:, :32].copy_(_orthonormal_columns(32, 32, seed=10 + layer))
            block.mlp.fc2.weight[:, 32:].normal_(0, 5.0)
    table, _ = _measure(model, *streams)
    for layer in (0, 1):
        assert _value(table, "fc1", layer) == pytest.approx(1.0, abs=1e-5)
        assert _value(table, "fc1", layer, column="std") < 1e-5
        assert _value(table, "fc2", layer) == pytest.approx(1.0, abs=1e-5)


def test_scaling_a_linear_weight_scales_its_plasticity(streams):
    model = tiny_vit()
    before, _ = _measure(model, *streams)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.mul_(3.0)
        model.blocks[1].mlp.fc2.weight.mul_(0.5)
        model.blocks[1].attn.proj.weight.mul_(7.0)
    after, _ = _measure(model, *streams)
    assert _value(after, "fc1", 1) == pytest.approx(3.0 * _value(before, "fc1", 1), rel=1e-5)
    assert _value(after, "fc2", 1) == pytest.approx(0.5 * _value(before, "fc2", 1), rel=1e-5)
    assert _value(after, "mha", 1) == pytest.approx(7.0 * _value(before, "mha", 1), rel=1e-5)
    assert _value(after, "fc1", 0) == pytest.approx(_value(before, "fc1", 0), rel=1e-6)


def _pixels(images, size=None):
    """uint8 (B, H, W, 3) → ImageNet-normalised float (B, 3, size, size), resized bilinearly when `size` is given."""
    x = torch.from_numpy(np.asarray(images)).float().permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def _plain_embedding(model, pixels):
    """E: patches by a strided convolution, the class token prepended, the position embedding added. (B, N, D)"""
    patch = model.patch_embed.proj.stride[0]
    with torch.no_grad():
        patches = F.conv2d(pixels, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=patch)
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([model.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        return tokens + model.pos_embed


def _plain_component(block, component, x):
    """A block component applied to tokens (B, N, D) as study-spec §3 defines it, with the timm sub-modules:
    MHA with its LayerScale, FC2 fed [x, 0] padded to its input width and then its LayerScale."""
    gamma1 = block.ls1.gamma if hasattr(block.ls1, "gamma") else 1.0
    gamma2 = block.ls2.gamma if hasattr(block.ls2, "gamma") else 1.0
    if component == "ln1":
        return block.norm1(x)
    if component == "mha":
        return block.attn(x) * gamma1
    if component == "ln2":
        return block.norm2(x)
    if component == "fc1":
        return block.mlp.fc1(x)
    return block.mlp.fc2(F.pad(x, (0, block.mlp.fc2.in_features - x.shape[-1]))) * gamma2


def _brute_force(model, reference, downstream, n_pairs):
    """Per pair, each component written out with plain tensor algebra."""
    def embedding(image):
        return _plain_embedding(model, _pixels(image[None]))[0]

    def attention(attn, x):
        n, d = x.shape
        heads = attn.num_heads
        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).reshape(n, 3, heads, d // heads).permute(1, 2, 0, 3)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        return (weights @ v).transpose(0, 1).reshape(n, d) @ attn.proj.weight.T + attn.proj.bias

    def layer_norm(norm, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + 1e-6) * norm.weight + norm.bias

    functions = {
        "ln1": lambda b, x: layer_norm(b.norm1, x),
        "mha": lambda b, x: attention(b.attn, x),
        "ln2": lambda b, x: layer_norm(b.norm2, x),
        "fc1": lambda b, x: x @ b.mlp.fc1.weight.T + b.mlp.fc1.bias,
        "fc2": lambda b, x: x @ b.mlp.fc2.weight[:, : x.shape[1]].T + b.mlp.fc2.bias,
    }
    ratios = {}
    with torch.no_grad():
        for i in range(n_pairs):
            ea, eb = embedding(reference.images[i]), embedding(downstream.images[i])
            for layer, block in enumerate(model.blocks):
                for name, f in functions.items():
                    ratio = torch.linalg.norm(f(block, ea) - f(block, eb)) / torch.linalg.norm(ea - eb)
                    ratios.setdefault((name, layer), []).append(ratio.item())
    return ratios


def test_measure_matches_a_brute_force_per_pair_loop(streams):
    model = tiny_vit()
    with torch.no_grad():  # grow the weights a little so every component is far from trivial
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
            block.norm1.weight.uniform_(0.5, 2.0)
    table, stats = _measure(model, *streams, n_pairs=6, batch_size=4)
    expected = _brute_force(model, *streams, n_pairs=6)
    assert len(table) == 5 * 2
    for (name, layer), values in expected.items():
        assert _value(table, name, layer) == pytest.approx(np.mean(values), rel=1e-4), (name, layer)
        assert _value(table, name, layer, column="std") == pytest.approx(np.std(values, ddof=1), rel=1e-3, abs=1e-7)
        assert _value(table, name, layer, column="n") == 6
    assert stats["pairs"] == 6 and stats["num_tokens"] == 17


def _applied_to_both_streams(model, reference, downstream, n_pairs):
    """Mean over pairs of every component applied to E of both streams, as the definition reads."""
    images = np.concatenate([reference.images[:n_pairs], downstream.images[:n_pairs]])
    with torch.no_grad():
        emb = _plain_embedding(model, _pixels(images))
        denominator = (emb[:n_pairs] - emb[n_pairs:]).flatten(1).norm(dim=1)
        means = {}
        for layer, block in enumerate(model.blocks):
            for name in BLOCK_COMPONENTS:
                out = _plain_component(block, name, emb)
                means[(name, layer)] = ((out[:n_pairs] - out[n_pairs:]).flatten(1).norm(dim=1) / denominator).mean()
    return means


def test_measure_agrees_with_applying_each_component_across_block_variants(streams):
    """LayerScale, LayerNorms with their own eps or no affine, and a norm of another kind (applied as is)."""
    model = tiny_vit(init_values=0.5)
    with torch.no_grad():
        for block in model.blocks:
            block.ls2.gamma.uniform_(0.2, 3.0)
            block.norm1.weight.uniform_(0.5, 2.0)
    model.blocks[0].norm2.eps = 1e-2
    model.blocks[1].norm1 = torch.nn.LayerNorm(32, eps=1e-3, elementwise_affine=False)
    model.blocks[1].norm2 = RmsNorm(32)
    table, _ = _measure(model, *streams)
    for (name, layer), expected in _applied_to_both_streams(model, *streams, n_pairs=8).items():
        assert _value(table, name, layer) == pytest.approx(float(expected), rel=1e-5), (name, layer)


def test_batching_does_not_change_the_result(streams):
    model = tiny_vit()
    whole, _ = _measure(model, *streams, batch_size=8)
    pieces, _ = _measure(model, *streams, batch_size=3)
    np.testing.assert_allclose(pieces["mean"], whole["mean"], rtol=1e-5)
    np.testing.assert_allclose(pieces["std"], whole["std"], rtol=1e-3, atol=1e-7)
    assert list(pieces["n"]) == [8] * 10


def test_table_columns_and_depth(streams):
    table, _ = _measure(tiny_vit(), *streams)
    assert list(table.columns) == ["mode", "component", "label", "layer", "depth_pct", "mean", "std", "n", "ci95",
                                   "pairs", "reference_images", "downstream_images", "reference_classes",
                                   "downstream_classes"]
    assert set(table["component"]) == {"ln1", "mha", "ln2", "fc1", "fc2"}
    assert dict(zip(table["layer"], table["depth_pct"], strict=False)) == {0: 50.0, 1: 100.0}
    assert set(table[table["component"] == "mha"]["label"]) == {"MHA"}


def test_hidden_mode_layer_zero_ln1_equals_embedding_mode(streams):
    model = tiny_vit()
    with torch.no_grad():  # make block 0's residual update large enough to move the hidden state
        model.blocks[0].mlp.fc2.weight.mul_(50)
    table, _ = _measure(model, *streams, modes=("embedding", "hidden"))
    assert set(table["mode"]) == {"embedding", "hidden"}
    assert _value(table, "ln1", 0, mode="hidden") == pytest.approx(_value(table, "ln1", 0), rel=1e-6)
    # Deeper, or for MHA (fed LN1's output), the two modes see different inputs.
    assert _value(table, "ln1", 1, mode="hidden") != pytest.approx(_value(table, "ln1", 1), rel=1e-3)
    assert _value(table, "mha", 0, mode="hidden") != pytest.approx(_value(table, "mha", 0), rel=1e-3)


def test_spectral_bound_covers_measured_fc_plasticity(streams):
    model = tiny_vit()
    with torch.no_grad():  # weights grown as pretraining grows them
        for block in model.blocks:
            block.mlp.fc1.weight.mul_(25)
            block.mlp.fc2.weight.mul_(25)
    table, _ = _measure(model, *streams)
    bounds = theoretical_bounds(model, radius=1.0)
    for layer in (0, 1):
        for name in ("fc1", "fc2"):
            bound = float(bounds[(bounds["component"] == name) & (bounds["layer"] == layer)]["bound"].iloc[0])
            measured = _value(table, name, layer)
            assert 0 < measured <= bound * (1 + 1e-6)


def test_running_stats_mean_std_count():
    stats = plasticity.RunningStats()
    stats.add(("a",), torch.tensor([1.0, 2.0]))
    stats.add(("a",), torch.tensor([3.0, 6.0]))
    stats.add(("b",), torch.tensor([5.0]))
    mean, std, n = stats.summary(("a",))
    assert (mean, n) == (3.0, 4)
    assert std == pytest.approx(np.std([1, 2, 3, 6], ddof=1))
    assert stats.summary(("b",)) == (5.0, 0.0, 1)


def test_too_few_pairs_and_unknown_mode_raise_user_errors(streams):
    with pytest.raises(UserError, match="at least 2 image pairs, got n_pairs = 1"):
        _measure(tiny_vit(), *streams, n_pairs=1)
    with pytest.raises(UserError, match=r"plasticity modes \['deep'\] unknown; allowed: embedding, hidden"):
        _measure(tiny_vit(), *streams, modes=("deep",))


# --- mixed image sizes, pair cycling, float64 norms ---

def _solid(colours, size):
    """Solid-colour uint8 images of side `size`, one per (r, g, b) colour."""
    return np.stack([np.broadcast_to(np.array(c, dtype=np.uint8), (size, size, 3)) for c in colours])


def test_streams_stored_at_different_sizes_are_each_resized_before_joining():
    """ImageNet val is stored at 256 px, CIFAR at 32 px: a 256 px reference of solid colours must
    measure exactly as the same colours stored at 32 px (resizing a solid image keeps it solid)."""
    model = tiny_vit()
    colours = [(10 * i, 200 - 15 * i, 7 * i) for i in range(6)]
    labels = np.zeros(6, dtype=np.int64)
    downstream = random_split(6, size=32, seed=3)
    large, _ = _measure(model, Split(_solid(colours, 256), labels), downstream, n_pairs=6, batch_size=4,
                        modes=("embedding", "hidden"))
    small, _ = _measure(model, Split(_solid(colours, 32), labels), downstream, n_pairs=6, batch_size=4,
                        modes=("embedding", "hidden"))
    assert len(large) == 2 * 2 * len(BLOCK_COMPONENTS)
    np.testing.assert_allclose(large["mean"], small["mean"], rtol=1e-5)


def test_pair_indices_cycle_the_smaller_stream_with_a_shift_per_pass():
    reference, downstream = plasticity.pair_indices(3, 5, 7)
    assert reference.tolist() == [0, 1, 2, 1, 2, 0, 2]  # pass 1 starts one image on, pass 2 two
    assert downstream.tolist() == [0, 1, 2, 3, 4, 0, 1]
    reference, downstream = plasticity.pair_indices(5, 3, 4)
    assert (reference.tolist(), downstream.tolist()) == ([0, 1, 2, 3], [0, 1, 2, 1])
    # The authors' count: 12,800 pairs from the 10,000 CIFAR test images beside 50,000 ImageNet val.
    reference, downstream = plasticity.pair_indices(50_000, 10_000, 12_800)
    assert len(set(zip(reference.tolist(), downstream.tolist(), strict=True))) == 12_800
    assert np.bincount(downstream).tolist().count(2) == 2_800


def test_cycled_passes_never_pair_an_image_with_itself():
    reference, downstream = plasticity.pair_indices(4, 4, 16)
    pairs = list(zip(reference.tolist(), downstream.tolist(), strict=True))
    assert [a == b for a, b in pairs[4:]] == [False] * 12  # after the index-by-index pass 0
    assert len(set(pairs)) == 16  # and no pair repeats


def test_a_smaller_stream_is_cycled_to_n_pairs_and_says_so(streams):
    lines = []
    downstream = Split(streams[1].images[:3], streams[1].labels[:3])
    table, stats = plasticity.measure(tiny_vit(), streams[0], downstream, n_pairs=8, batch_size=3, img_size=32,
                                      device=CPU, progress=lines.append)
    assert lines[0] == "plasticity: the downstream stream has 3 images; it is cycled to make 8 pairs"
    assert [line for line in lines if "cycled" in line] == lines[:1]
    assert set(table["n"]) == {8} and set(table["pairs"]) == {8}
    assert set(table["reference_images"]) == {8} and set(table["downstream_images"]) == {3}
    assert (stats["pairs"], stats["reference_images"], stats["downstream_images"]) == (8, 8, 3)
    # labels are index mod 5: the 8 reference images cover all 5 classes, the 3 cycled ones 3
    assert set(table["reference_classes"]) == {5} and set(table["downstream_classes"]) == {3}
    assert (stats["reference_classes"], stats["downstream_classes"]) == (5, 3)


def test_the_same_images_in_both_streams_keep_only_the_cycled_pairs():
    images = random_split(4, seed=5)
    table, stats = _measure(tiny_vit(), images, images, n_pairs=12, batch_size=5)
    assert stats["skipped_identical_pairs"] == 4  # pass 0 pairs each image with itself
    assert set(table["n"]) == {8}


def test_no_pair_of_distinct_images_is_a_user_error():
    images = random_split(4, seed=5)
    with pytest.raises(UserError, match="all 4 image pairs have identical embeddings"):
        _measure(tiny_vit(), images, images, n_pairs=4, batch_size=4)


def _float64_reference(model, reference, downstream, n_pairs):
    """Per-pair ratios from float32 activations (E and each component's output), with only the Frobenius
    norms and the means over pairs in float64: {(mode, component, layer): mean}. The block is written out
    (x → x + MHA(LN1(x)) → + FC2(GELU(FC1(LN2(·))))), each component fed what it receives there."""
    sums = {}
    for i in range(n_pairs):
        pixels = torch.cat([_pixels(split.images[i:i + 1], 224) for split in (reference, downstream)])
        emb = _plain_embedding(model, pixels).float()  # (2, N, D) float32
        feeds = {("embedding", layer): {c: emb for c in BLOCK_COMPONENTS} for layer in range(len(model.blocks))}
        hidden = emb
        with torch.no_grad():
            for layer, block in enumerate(model.blocks):
                mid = hidden + block.attn(block.norm1(hidden))
                fc1_in = block.norm2(mid)
                fc2_in = block.mlp.act(block.mlp.fc1(fc1_in))
                feeds[("hidden", layer)] = {"ln1": hidden, "mha": block.norm1(hidden), "ln2": mid, "fc1": fc1_in,
                                            "fc2": fc2_in}
                hidden = mid + block.mlp.fc2(fc2_in)
        for (mode, layer), inputs in feeds.items():
            block = model.blocks[layer]
            for component in BLOCK_COMPONENTS:
                x = inputs[component]
                if mode == "embedding" and component == "fc2":
                    x = F.pad(emb, (0, block.mlp.fc2.in_features - emb.shape[-1]))  # [E, 0, 0, 0]
                with torch.no_grad():
                    out = _embedding_output(block, component, x)
                numerator = torch.linalg.vector_norm(out[0].double() - out[1].double())
                denominator = torch.linalg.vector_norm(x[0].double() - x[1].double())
                key = (mode, component, layer)
                sums[key] = sums.get(key, 0.0) + (numerator / denominator).item()
    return {key: total / n_pairs for key, total in sums.items()}


def _embedding_output(block, component, x):
    """The paper's component outputs (no LayerScale in ViT-B/16), applied to their inputs as written (float32)."""
    if component == "ln1":
        return block.norm1(x)
    if component == "ln2":
        return block.norm2(x)
    if component == "mha":
        return block.attn(x)
    if component == "fc1":
        return block.mlp.fc1(x)
    return block.mlp.fc2(x)


def test_vit_b_sized_plasticity_agrees_with_float64_norms_in_both_modes():
    """ViT-B/16 shapes (197 tokens, width 768, 12 heads, MLP 3072), one block: FC2's Frobenius norm sums
    600k squares per image, where float32 sums lost 2e-5 relative."""
    torch.manual_seed(0)
    import timm

    model = timm.create_model("vit_base_patch16_224", num_classes=0, depth=1).eval()
    reference, downstream = random_split(6, size=64, seed=7), random_split(6, size=32, seed=8)
    table, stats = plasticity.measure(model, reference, downstream, n_pairs=6, batch_size=4, img_size=224,
                                      device=CPU, modes=("embedding", "hidden"), **SILENT)
    assert (stats["num_tokens"], stats["embed_dim"]) == (197, 768)
    expected = _float64_reference(model, reference, downstream, 6)
    assert len(expected) == len(table) == 2 * len(BLOCK_COMPONENTS)
    for row in table.itertuples():
        assert row.mean == pytest.approx(expected[(row.mode, row.component, row.layer)], rel=1e-6, abs=0), row


def test_plasticity_figures_name_pair_counts_and_stream_sizes(monkeypatch, tmp_path):
    import pandas as pd

    from vitplasticity import figures

    rows = [{"mode": "embedding", "component": c, "layer": 0, "depth_pct": 100.0, "mean": 1.0, "ci95": 0.1,
             "pairs": 12_800, "reference_images": 50_000, "downstream_images": images}
            for images in (10_000, 2_000) for c in BLOCK_COMPONENTS]
    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, out_dir, name: drawn.update({name: fig}))
    figures.plasticity_vs_rank(pd.DataFrame(rows), tmp_path)
    figures.plasticity_vs_depth(pd.DataFrame(rows[:5]), tmp_path)
    rank_title = drawn["plasticity_vs_rank"].axes[0].get_title()
    assert rank_title.endswith("12,800 pairs; images: reference 50,000, downstream 2,000–10,000 (cycled)")
    assert drawn["plasticity_vs_depth"].axes[0].get_title() == (
        "embedding mode\n12,800 pairs; images: reference 50,000, downstream 10,000 (cycled)")


def test_scale_free_mode_is_invariant_to_the_scale_of_e_while_layernorm_values_scale_by_one_over_c():
    def measured(c):
        model = tiny_vit(seed=4)
        with torch.no_grad():  # E = patch embedding + class token + position embedding, all times c
            for tensor in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token,
                           model.pos_embed):
                tensor.mul_(c)
        table, stats = plasticity.measure(model, random_split(12, seed=1), random_split(12, seed=2), 12, 6, 32,
                                          torch.device("cpu"), modes=("embedding", "scale_free"),
                                          progress=lambda _: None)
        return table.set_index(["mode", "component", "layer"])["mean"], stats

    base, base_stats = measured(1.0)
    scaled, scaled_stats = measured(8.0)
    for key in base["scale_free"].index:
        assert scaled["scale_free"][key] == pytest.approx(base["scale_free"][key], rel=1e-5), key
    assert scaled["embedding"][("ln1", 0)] == pytest.approx(base["embedding"][("ln1", 0)] / 8, rel=1e-3)
    assert scaled["embedding"][("fc1", 1)] == pytest.approx(base["embedding"][("fc1", 1)], rel=1e-5)
    assert scaled_stats["max_token_norm"] == pytest.approx(8 * base_stats["max_token_norm"], rel=1e-5)
    assert scaled_stats["min_token_std"] == pytest.approx(8 * base_stats["min_token_std"], rel=1e-5)


def test_repeated_pairs_are_measured_once_and_counted_as_such():
    """2 images a stream, 10 pairs asked: pass 0 pairs (0,0) (1,1), pass 1 (0,1) (1,0), then pass 2 repeats pass 0.
    Only 4 distinct pairs exist; a repeated pair is no new evidence, so n, the spread and the counts are over 4."""
    reference, downstream = random_split(2, seed=1), random_split(2, seed=2)
    lines = []
    table, stats = plasticity.measure(tiny_vit(), reference, downstream, n_pairs=10, batch_size=3, img_size=32,
                                      device=CPU, progress=lines.append)
    assert lines[0] == "plasticity: 6 of the 10 pairs repeat an earlier pair and are measured once: 4 distinct pairs"
    assert (stats["pairs"], stats["pairs_asked"]) == (4, 10)
    assert set(table["n"]) == {4} and set(table["pairs"]) == {4}
    assert (stats["reference_images"], stats["downstream_images"]) == (2, 2)
    alone, _ = _measure(tiny_vit(), reference, downstream, n_pairs=4, batch_size=3,
                        pairs=(np.array([0, 1, 0, 1]), np.array([0, 1, 1, 0])))
    np.testing.assert_allclose(table["mean"], alone["mean"], rtol=1e-6)
    np.testing.assert_allclose(table["std"], alone["std"], rtol=1e-6)


def test_given_pairs_count_only_the_images_they_use():
    reference, downstream = random_split(6, seed=1), random_split(6, seed=2)
    table, stats = _measure(tiny_vit(), reference, downstream, n_pairs=3, batch_size=3,
                            pairs=(np.array([0, 0, 5]), np.array([1, 2, 1])))
    assert (stats["pairs"], stats["reference_images"], stats["downstream_images"]) == (3, 2, 2)
    with pytest.raises(UserError, match="at least 2 distinct image pairs, got 1; give more images"):
        _measure(tiny_vit(), reference, downstream, n_pairs=3, pairs=(np.array([0, 0, 0]), np.array([1, 1, 1])))


def test_a_job_records_the_reference_order_and_the_classes_its_pairs_cover(kit, tmp_path):
    """An ImageNet reference in the authors' order: 6 pairs take the first 2 classes' images (12,800 take 256)."""
    import io
    import json
    import tarfile

    from dataset_archives import jpeg, tar_bytes
    from jobkit import CKPT, RUNTIME, TASK

    from vitplasticity import jobs
    from vitplasticity.datasets.sources import prepare_task

    wnids = ["n01440764", "n01443537", "n01484850", "n01491361"]
    files = {f"{wnids[k % 4]}/ILSVRC2012_val_{k:08d}.JPEG": jpeg((20 * k, 9 * k, 0), (24, 20)) for k in range(1, 13)}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes(files, mode="w"))) as tar:
        tar.extractall(tmp_path / "val", filter="data")
    reference = tmp_path / "prepared" / "imagenet_val"
    prepare_task("imagenet_val", {"source": "imagenet_val", "path": str(tmp_path / "val"), "store_size": 16,
                                  "split_seed": 42}, reference, None)
    settings = {"model": "vit", "task": "novel", "reference_task": "imagenet_val", "n_pairs": 6,
                "modes": ["embedding"]}
    table = jobs.measure_plasticity(build("plasticity", settings), RUNTIME, kit / CKPT, reference, kit / TASK,
                                    tmp_path / "p.csv", tmp_path / "p.json")
    stats = json.loads((tmp_path / "p.json").read_text())
    assert stats["reference_order"] == "imagefolder" and stats["reference_classes_paired"] == wnids[:2]
    assert stats["reference_classes"] == 2
    assert set(table["reference_order"]) == {"imagefolder"} and set(table["reference_classes"]) == {2}
    jobs.measure_plasticity(build("plasticity", settings | {"loader_batch": 5}), RUNTIME, kit / CKPT, reference,
                            kit / TASK, tmp_path / "p.csv", tmp_path / "p.json")
    stats = json.loads((tmp_path / "p.json").read_text())  # 6 pairs use 6 images of each stream
    assert (stats["reference_images"], stats["downstream_images"]) == (6, 6)


@pytest.mark.parametrize(("n_reference", "n_downstream", "batch"), [(50, 20, 8), (33, 100, 8), (64, 10, 5)])
def test_loader_batch_pairs_as_unshuffled_drop_last_dataloaders_repeated(n_reference, n_downstream, batch):
    """The authors' pairing: two DataLoaders (batch B, no shuffle, drop_last) each repeated, zipped."""
    import itertools

    from torch.utils.data import DataLoader

    def stream(count: int):
        loader = DataLoader(torch.arange(count), batch_size=batch, shuffle=False, drop_last=True)
        return itertools.chain.from_iterable(itertools.repeat(loader))

    n_pairs = 12 * batch
    zipped = list(itertools.islice(zip(stream(n_reference), stream(n_downstream), strict=False), 12))
    reference, downstream = (torch.cat(part).numpy() for part in zip(*zipped, strict=True))
    ours = plasticity.pair_indices(n_reference, n_downstream, n_pairs, loader_batch=batch)
    assert ours[0].tolist() == reference.tolist() and ours[1].tolist() == downstream.tolist()


def test_loader_batch_by_hand_and_its_image_counts(streams):
    reference, downstream = plasticity.pair_indices(10, 7, 12, loader_batch=3)
    assert reference.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2]  # 9 of 10 images: 3 batches of 3
    assert downstream.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]  # 6 of 7
    lines = []
    table, stats = plasticity.measure(tiny_vit(), streams[0], streams[1], n_pairs=8, batch_size=4, img_size=32,
                                      device=CPU, progress=lines.append, loader_batch=3)
    assert (stats["reference_images"], stats["downstream_images"]) == (6, 6)
    # Both loaders yield 6 images and cycle in step: pairs 7 and 8 repeat pairs 1 and 2, measured once.
    assert lines[0] == "plasticity: 2 of the 8 pairs repeat an earlier pair and are measured once: 6 distinct pairs"
    assert (stats["pairs"], stats["pairs_asked"]) == (6, 8)
    with pytest.raises(UserError) as caught:
        plasticity.pair_indices(10, 7, 12, loader_batch=8)
    assert str(caught.value) == ("plasticity.loader_batch 8 exceeds the 7 images of the downstream stream, so its "
                                 "loader (drop_last) yields no batch; lower plasticity.loader_batch")
