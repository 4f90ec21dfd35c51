"""Linear-probing baseline (study-spec §5): pooled, normalised features and a logistic-regression score."""

import numpy as np
import pytest
import torch
from helpers import random_split, tiny_vit

from vitplasticity import probe
from vitplasticity.components import embed

CPU = torch.device("cpu")
QUIET = {"progress": lambda _: None}


def test_features_are_l2_normalised_mean_pooled_last_block_tokens():
    model = tiny_vit()
    split = random_split(7)
    feats = probe.features(model, split, img_size=32, batch_size=3, device=CPU)
    assert feats.shape == (7, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
    # By hand for one image: the blocks' output (no final norm), averaged over all 17 tokens, unit length.
    with torch.no_grad():
        x = (torch.from_numpy(split.images[4:5]).permute(0, 3, 1, 2).float() / 255
             - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
                 1, 3, 1, 1)
        hidden = embed(model, x)
        for block in model.blocks:
            hidden = block(hidden)
        pooled = hidden.mean(1)[0]
    np.testing.assert_allclose(feats[4], (pooled / pooled.norm()).numpy(), atol=1e-5)


def test_features_ignore_the_final_norm_and_head():
    model = tiny_vit()
    split = random_split(4)
    before = probe.features(model, split, 32, 4, CPU)
    with torch.no_grad():
        model.norm.weight.uniform_(-3, 3)
        model.norm.bias.uniform_(-3, 3)
        model.head.weight.zero_()
    np.testing.assert_array_equal(probe.features(model, split, 32, 4, CPU), before)
    with torch.no_grad():
        model.blocks[-1].mlp.fc2.bias.add_(1.0)
    assert not np.allclose(probe.features(model, split, 32, 4, CPU), before)


def test_features_do_not_depend_on_batch_size():
    model, split = tiny_vit(), random_split(6)
    np.testing.assert_allclose(probe.features(model, split, 32, 6, CPU), probe.features(model, split, 32, 4, CPU),
                               atol=1e-6)


def _separable(count, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    centres = np.eye(3, 16) * 10
    return centres[labels] + rng.normal(0, 0.5, (count, 16)), labels


def test_fit_and_score_separable_features():
    train_x, train_y = _separable(60, 0)
    test_x, test_y = _separable(30, 1)
    result = probe.fit_and_score(train_x, train_y, test_x, test_y, **QUIET)
    assert result == {"train_acc": 1.0, "test_acc": 1.0, "n_train": 60, "n_test": 30, "feature_dim": 16}


def test_fit_and_score_counts_mistakes():
    train_x, train_y = _separable(60, 0)
    test_x, test_y = _separable(30, 1)
    wrong = test_y.copy()
    wrong[:6] = (wrong[:6] + 1) % 3  # 6 of 30 test labels contradict their features
    assert probe.fit_and_score(train_x, train_y, test_x, wrong, **QUIET)["test_acc"] == pytest.approx(0.8)


def test_fit_and_score_is_deterministic():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 8)), np.arange(40) % 2
    first = probe.fit_and_score(x, y, x[:10], y[:10], seed=0, **QUIET)
    assert first == probe.fit_and_score(x, y, x[:10], y[:10], seed=0, **QUIET)
