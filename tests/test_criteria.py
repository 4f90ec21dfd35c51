"""Selection criteria: parameter counts by hand, relative gradient norms against a direct computation, costs."""

import mmap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers import random_split, tiny_vit

from vitplasticity import criteria, transforms
from vitplasticity.training import batch_indices

CPU = torch.device("cpu")
D = 32  # tiny_vit's width; its MLP is 4D wide


def test_trainable_params_per_component_by_hand():
    table = criteria.trainable_params(tiny_vit()).set_index(["component", "layer"])["value"]
    assert table[("mha", 0)] == 4 * D * D + 4 * D  # qkv (3D x D + 3D) and proj (D x D + D)
    assert table[("fc1", 1)] == 4 * D * D + 4 * D  # equal to MHA: they tie
    assert table[("fc2", 0)] == 4 * D * D + D
    assert table[("ln1", 0)] == table[("ln2", 1)] == 2 * D
    assert len(table) == 5 * 2


def test_relative_gradient_norm_matches_a_direct_computation():
    model, train = tiny_vit(), random_split(24, num_classes=3)
    model.requires_grad_(False)
    table = criteria.relative_gradient_norms(model, train, num_classes=3, batch_size=8, batches=2, img_size=32,
                                             device=CPU, seed=1)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))
    # Direct: the same head, batches and transform; ‖∇‖ / ‖θ‖ of blocks.1.attn (qkv and proj together).
    reference = tiny_vit()
    torch.manual_seed(1)
    reference.reset_classifier(3)
    params = [p for n, p in reference.named_parameters() if n.startswith("blocks.1.attn.")]
    ratios = []
    for step in range(2):
        index = batch_indices(24, 8, step, seed=1)
        images = transforms.eval_batch(train.images[index], 32, CPU)
        reference.zero_grad()
        F.cross_entropy(reference(images), torch.as_tensor(train.labels[index])).backward()
        grad = torch.sqrt(sum(p.grad.double().square().sum() for p in params))
        ratios.append(float(grad / torch.sqrt(sum(p.detach().double().square().sum() for p in params))))
    got = table.set_index(["component", "layer"]).loc[("mha", 1), "value"]
    assert got == pytest.approx(np.mean(ratios), rel=1e-6)
    assert (table["value"] > 0).all() and len(table) == 10


def test_cost_reports_the_memory_a_criterion_adds():
    size = 300 * 2**20
    with criteria.cost(CPU) as spent, mmap.mmap(-1, size) as block:  # fresh pages, not the allocator's free ones
        block.write(b"x" * size)  # touched: resident
    assert spent.wall_s > 0
    assert 280 <= spent.peak_mib <= 900


def test_measure_collects_scores_and_costs_and_component_means():
    rows = pd.DataFrame({"component": ["mha", "mha", "ln1", "ln1"], "layer": [0, 1, 0, 1],
                         "value": [1.0, 3.0, 0.5, 0.5]})
    scores, costs = criteria.measure({"made_up": lambda: rows}, CPU, progress=lambda _: None)
    assert list(costs["criterion"]) == ["made_up"] and costs["wall_s"].iloc[0] >= 0
    means = criteria.component_scores(scores).set_index("component")["score"]
    assert means.to_dict() == {"mha": 2.0, "ln1": 0.5}
