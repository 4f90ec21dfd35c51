"""Theoretical upper bounds (study-spec §4), against values worked out by hand."""

import math

import pytest
import torch
from helpers import tiny_vit

from vitplasticity.bounds import mha_bound, spectral_norm, theoretical_bounds

N = 17  # 16 patches + class token at 32 px, patch 8


def _bound(table, component, layer):
    row = table[(table["component"] == component) & (table["layer"] == layer)]
    assert len(row) == 1
    return float(row["bound"].iloc[0])


def test_layernorm_bound_is_max_gain():
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].norm1.weight.fill_(0.5)
        model.blocks[0].norm1.weight[7] = 2.75
        model.blocks[0].norm1.weight[8] = -9.0  # the authors take max(γ), not max |γ|
        model.blocks[1].norm2.weight.copy_(torch.linspace(-1.0, 1.25, 32))
    table = theoretical_bounds(model, radius=1.0)
    assert _bound(table, "ln1", 0) == 2.75
    assert _bound(table, "ln2", 1) == 1.25
    assert _bound(table, "ln2", 0) == 1.0  # timm initialises γ to ones


def test_fc_bound_is_largest_singular_value_of_a_diagonal_weight():
    model = tiny_vit()
    with torch.no_grad():
        fc1 = torch.zeros(128, 32)
        fc1[torch.arange(32), torch.arange(32)] = torch.linspace(0.1, 3.0, 32)
        fc1[5, 5] = -7.0  # a singular value is |entry|
        model.blocks[0].mlp.fc1.weight.copy_(fc1)
        fc2 = torch.zeros(32, 128)
        fc2[torch.arange(32), torch.arange(32) + 96] = 0.25
        fc2[3, 99] = 4.5
        model.blocks[1].mlp.fc2.weight.copy_(fc2)
    table = theoretical_bounds(model, radius=1.0)
    assert _bound(table, "fc1", 0) == pytest.approx(7.0, rel=1e-12)
    assert _bound(table, "fc2", 1) == pytest.approx(4.5, rel=1e-12)


def test_spectral_norm_of_a_rank_one_matrix():
    u, v = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0, 0.0])
    assert spectral_norm(torch.outer(u, v)) == pytest.approx(5.0)  # ||u|| ||v||; Frobenius would agree, max entry not


def test_mha_bound_single_head_identity_like_weights():
    """d = 4, one head: W_Q = 2I, W_K = 3I, W_V = 0.5I, W_O = 1.5I.

    ||W_Q W_K^T / sqrt(d_h)|| = 6 / 2 = 3, so the bound is 1.5 * 0.5 * sqrt(3n + (12n + 3) r^4 * 9).
    """
    model = tiny_vit(embed_dim=4, num_heads=1)
    eye = torch.eye(4)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(torch.cat([2 * eye, 3 * eye, 0.5 * eye]))
        model.blocks[0].attn.proj.weight.copy_(1.5 * eye)
    r = 1.2
    expected = 1.5 * 0.5 * math.sqrt(3 * N + (12 * N + 3) * r**4 * 9)
    table = theoretical_bounds(model, radius=r)
    assert _bound(table, "mha", 0) == pytest.approx(expected, rel=1e-12)
    row = table[(table["component"] == "mha") & (table["layer"] == 0)].iloc[0]
    assert (row["n"], row["r"]) == (N, r)


def test_mha_bound_sums_heads_that_own_rows_of_q_k_v():
    """d = 4, two heads of d_h = 2. Head h owns rows 2h..2h+1 of W_Q, W_K, W_V and those columns of W_O.

    W_Q = diag(1, 1, 3, 3), W_K = I, W_O = I and W_V has one entry, at row 0 (head 0), column 2.
    Head 0: ||A|| = 1/sqrt2, ||W_V^0|| = 5; head 1: ||W_V^1|| = 0. Slicing by columns would pair the 5 with head 1.
    """
    qkv = torch.zeros(12, 4)
    qkv[0:4] = torch.diag(torch.tensor([1.0, 1.0, 3.0, 3.0]))
    qkv[4:8] = torch.eye(4)
    qkv[8, 2] = 5.0
    n, r = 10, 0.8
    expected = 1.0 * 5.0 * math.sqrt(3 * n + (12 * n + 3) * r**4 * 0.5)
    assert mha_bound(qkv, torch.eye(4), num_heads=2, n=n, r=r) == pytest.approx(expected, rel=1e-12)
    # W_V = 2I: both heads count, head 1 with ||A|| = 3/sqrt2.
    qkv[8:12] = 2 * torch.eye(4)
    head0 = 1.0 * 2.0 * math.sqrt(3 * n + (12 * n + 3) * r**4 * 0.5)
    head1 = 1.0 * 2.0 * math.sqrt(3 * n + (12 * n + 3) * r**4 * 4.5)
    assert mha_bound(qkv, torch.eye(4), num_heads=2, n=n, r=r) == pytest.approx(head0 + head1, rel=1e-12)


def test_bounds_table_shape_and_depth():
    table = theoretical_bounds(tiny_vit(), radius=2.0)
    assert len(table) == 2 * 5
    assert set(table["component"]) == {"ln1", "ln2", "fc1", "fc2", "mha"}
    assert sorted(set(table["depth_pct"])) == [50.0, 100.0]
    assert set(table["n"]) == {N}
    assert (table["bound"] > 0).all()


def _pair_ratios(model, images_a, images_b):
    """Per pair and (component, layer): ||f(E_a) - f(E_b)||_F / ||E_a - E_b||_F, written plainly."""
    from vitplasticity.components import BLOCK_COMPONENTS, apply_component, embed

    with torch.no_grad():
        e_a, e_b = embed(model, images_a), embed(model, images_b)
        denominator = (e_a - e_b).flatten(1).norm(dim=1)
        ratios = {}
        for layer, block in enumerate(model.blocks):
            for component in BLOCK_COMPONENTS:
                diff = apply_component(block, component, e_a) - apply_component(block, component, e_b)
                ratios[(component, layer)] = diff.flatten(1).norm(dim=1) / denominator
    return ratios, torch.cat([e_a, e_b])


def _trained_vit():
    from helpers import random_split

    from vitplasticity.prepared import Split
    from vitplasticity.training import TrainConfig, train

    model = tiny_vit()
    split = random_split(64, num_classes=5)
    splits = {"train": split, "val": Split(split.images[:16], split.labels[:16]),
              "test": Split(split.images[:16], split.labels[:16])}
    train(model, splits, TrainConfig(steps=20, eval_every=20, batch_size=16, lr=0.3, seed=0, img_size=32,
                                     eval_batch=16), torch.device("cpu"), progress=lambda _: None)
    return model.eval()


def _large_token_vit():
    model = tiny_vit(seed=3)
    with torch.no_grad():
        model.patch_embed.proj.weight.mul_(40.0)
        model.pos_embed.mul_(40.0)
        for block in model.blocks:  # biases that matter: the query and key biases shift the attention logits
            block.attn.qkv.bias.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("make", [tiny_vit, _trained_vit, _large_token_vit], ids=["random", "trained", "large_tokens"])
def test_measured_rates_never_exceed_the_holding_bound(make):
    from vitplasticity.bounds import token_extremes

    model = make()
    torch.manual_seed(11)
    images_a, images_b = torch.randn(24, 3, 32, 32), torch.randn(24, 3, 32, 32) * 0.5 + 0.3
    ratios, streams = _pair_ratios(model, images_a, images_b)
    table = theoretical_bounds(model, radius=1.0, extremes=token_extremes(streams)).set_index(["component", "layer"])
    for key, values in ratios.items():
        assert values.max().item() <= table.loc[key, "holding_bound"] * (1 + 1e-6), key


def test_paper_layernorm_bound_is_exceeded_by_small_tokens_and_the_holding_one_is_not():
    from vitplasticity.bounds import token_extremes

    model = tiny_vit()  # timm's initialisation: tokens of E have standard deviation well below 1
    torch.manual_seed(11)
    ratios, streams = _pair_ratios(model, torch.randn(24, 3, 32, 32), torch.randn(24, 3, 32, 32))
    extremes = token_extremes(streams)
    assert extremes["min_token_std"] < 1
    table = theoretical_bounds(model, radius=1.0, extremes=extremes).set_index(["component", "layer"])
    worst = ratios[("ln1", 0)].max().item()
    assert worst > table.loc[("ln1", 0), "bound"] == 1.0  # max(γ) = 1 at timm's initialisation
    assert worst <= table.loc[("ln1", 0), "holding_bound"]
    expected = 1.0 / math.sqrt(extremes["min_token_std"] ** 2 + model.blocks[0].norm1.eps)
    assert table.loc[("ln1", 0), "holding_bound"] == pytest.approx(expected)
