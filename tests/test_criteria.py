"""Selection criteria: parameter counts by hand; relative gradient norm, Fisher and FPS against a direct
computation; KappaTune through peft; the criteria job's rows; costs."""

import math
import mmap

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import random_split, tiny_vit
from jobkit import CKPT, RUNTIME, TASK

from vitplasticity import criteria, jobs, registry, selection, transforms
from vitplasticity.datasets.sources import prepare_task
from vitplasticity.settings import build
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


def test_relative_gradient_norm_and_fisher_match_a_direct_computation():
    model, train = tiny_vit(), random_split(24, num_classes=3)
    model.requires_grad_(False)
    tables = criteria.gradient_criteria(model, train, num_classes=3, batch_size=8, batches=2, img_size=32,
                                        device=CPU, seed=1)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("head."))
    # Direct: the same head, batches and transform; blocks.1.attn (qkv and proj together).
    reference = tiny_vit()
    torch.manual_seed(1)
    reference.reset_classifier(3)
    params = [p for n, p in reference.named_parameters() if n.startswith("blocks.1.attn.")]
    ratios, squares = [], []
    for step in range(2):
        index = batch_indices(24, 8, step, seed=1)
        images = transforms.eval_batch(train.images[index], 32, CPU)
        reference.zero_grad()
        F.cross_entropy(reference(images), torch.as_tensor(train.labels[index])).backward()
        square = float(sum(p.grad.double().square().sum() for p in params))
        squares.append(square)
        ratios.append(math.sqrt(square) / float(torch.sqrt(sum(p.detach().double().square().sum() for p in params))))
    rgn = tables["relative_gradient_norm"].set_index(["component", "layer"])["value"]
    fisher = tables["fisher"].set_index(["component", "layer"])["value"]
    assert rgn[("mha", 1)] == pytest.approx(np.mean(ratios), rel=1e-6)
    # Fisher: squared gradients summed over the batches, then the mean over the unit's 4D² + 4D parameters.
    assert fisher[("mha", 1)] == pytest.approx(sum(squares) / (4 * D * D + 4 * D), rel=1e-6)
    assert (rgn > 0).all() and (fisher > 0).all() and len(rgn) == len(fisher) == 10


def test_fps_matches_a_direct_computation():
    model, train = tiny_vit(num_classes=0), random_split(12)
    with torch.no_grad():
        model.blocks[0].norm1.weight.copy_(torch.linspace(-2.0, 2.0, D))
    table = criteria.fps(model, train, batch_size=4, batches=2, img_size=32, device=CPU, seed=3)
    got = table.set_index(["component", "layer"])["value"]
    # Direct: block 0's inputs from timm's own pieces, over every token of the same 8 images.
    index = np.concatenate([batch_indices(12, 4, step, seed=3) for step in range(2)])
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(transforms.eval_batch(train.images[index], 32,
                                                                                         CPU))))
        block = model.blocks[0]
        normalised = F.layer_norm(tokens, (D,), eps=block.norm1.eps)  # LN1's x̂: what γ scales
        mid = tokens + block.attn(block.norm1(tokens))
        fc1_in = block.norm2(mid)
        ln1 = (block.norm1.weight.abs() * normalised.abs().mean(dim=(0, 1))).sum() / D
        fc1 = (block.mlp.fc1.weight.abs() * fc1_in.abs().mean(dim=(0, 1))).sum() / block.mlp.fc1.weight.numel()
    assert got[("ln1", 0)] == pytest.approx(float(ln1), rel=1e-5)
    assert got[("fc1", 0)] == pytest.approx(float(fc1), rel=1e-5)
    assert len(got) == 10 and (got > 0).all()


def kappa_vit() -> torch.nn.Module:
    """The brief's tiny timm ViT (random init) with two weights of known condition number."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              num_classes=0)
    width = model.embed_dim
    with torch.no_grad():
        model.blocks[1].attn.proj.weight.copy_(torch.eye(width))  # κ = 1: the best-conditioned linear map
        model.blocks[0].mlp.fc1.weight[0] *= 1e4  # one row 10⁴ larger: by far the worst
    return model


def test_kappatune_ranks_units_by_peft_order_and_leaves_layernorms_unscored():
    model = kappa_vit()
    got = criteria.kappatune(model).set_index(["component", "layer"])["value"]
    # MHA of block 1 first through its proj (κ = 1) although its qkv is worse conditioned; FC1 of block 0 last.
    assert got[("mha", 1)] == 1 and got[("fc1", 0)] == 6
    assert sorted(got.dropna()) == [1, 2, 3, 4, 5, 6]  # mha, fc1, fc2 in two blocks, each unit once
    assert got[[("ln1", 0), ("ln2", 0), ("ln1", 1), ("ln2", 1)]].isna().all()


def test_layernorm_units_come_last_and_are_never_chosen_by_kappatune():
    units = criteria.kappatune(kappa_vit())
    scores = criteria.component_scores(units.assign(criterion="kappatune")).set_index("component")["score"]
    mean_rank = units.groupby("component")["value"].mean()
    assert scores.to_dict() == pytest.approx(mean_rank.to_dict(), nan_ok=True)
    turned = selection.oriented(scores, "kappatune")
    assert turned.to_dict() == {"ln1": -math.inf, "mha": -mean_rank["mha"], "ln2": -math.inf,
                                "fc1": -mean_rank["fc1"], "fc2": -mean_rank["fc2"]}
    assert turned.idxmax() == mean_rank.idxmin()  # the lowest mean κ rank is chosen first


def test_the_criteria_job_writes_every_criterion_in_order(kit, tmp_path):
    settings = {"model": "vit", "task": "novel", "n_pairs": 4, "gradient_batches": 1, "gradient_batch_size": 8,
                "seed": 0}
    reference = tmp_path / "reference"  # other images of the same kind: the pairs differ
    prepare_task("shapes", {"source": "synthetic", "kind": "novel", "image_size": 16, "n_train": 8, "n_val": 8,
                            "n_test": 8, "seed": 1}, reference, tmp_path / "raw")
    out = tmp_path / "criteria" / "criteria.csv"
    jobs.measure_criteria(build("criteria", settings), RUNTIME, kit / CKPT, reference, kit / TASK, out)
    scores, costs = pd.read_csv(out), pd.read_csv(out.parent / "cost.csv")
    assert list(dict.fromkeys(scores["criterion"])) == list(costs["criterion"]) == list(registry.CRITERIA)
    assert (scores.groupby("criterion").size() == 10).all()  # 5 components x 2 blocks each
    kappa = scores[scores["criterion"] == "kappatune"]
    assert kappa.loc[kappa["component"].str.startswith("ln"), "value"].isna().all()
    assert sorted(kappa["value"].dropna()) == [1, 2, 3, 4, 5, 6]
    assert scores.loc[scores["criterion"].isin(["fisher", "fps"]), "value"].gt(0).all()
    shared = costs.set_index("criterion")
    assert shared.loc["fisher", "measured_with"] == shared.loc["relative_gradient_norm", "measured_with"] == \
        "relative_gradient_norm+fisher"
    assert shared.loc["fisher", "wall_s"] == shared.loc["relative_gradient_norm", "wall_s"]
    assert shared.loc["fps", "measured_with"] == "fps" and shared.loc["kappatune", "wall_s"] > 0


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
    assert list(costs["measured_with"]) == ["made_up"]
    means = criteria.component_scores(scores).set_index("component")["score"]
    assert means.to_dict() == {"mha": 2.0, "ln1": 0.5}


def test_a_shared_computation_gives_each_criterion_its_rows_and_the_shared_cost():
    rows = pd.DataFrame({"component": ["mha"], "layer": [0], "value": [1.0]})
    scores, costs = criteria.measure({("first", "second"): lambda: {"first": rows, "second": rows * 1}}, CPU,
                                     progress=lambda _: None)
    assert list(scores["criterion"]) == ["first", "second"]
    assert list(costs["measured_with"]) == ["first+second", "first+second"]
    assert costs["wall_s"].nunique() == 1
