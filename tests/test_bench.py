"""The CPU benchmark (benchmarks/bench.py): it runs end to end, and its two sides compute the same things."""

from __future__ import annotations

import json
import math
import re

import bench
import numpy as np
import pytest
import torch

from vitplasticity import plasticity, transforms
from vitplasticity.components import BLOCK_COMPONENTS

CPU = torch.device("cpu")
FINAL_LINE = re.compile(r"data speedup \d+\.\d\d, finetune speedup \d+\.\d\d, plasticity speedup \d+\.\d\d")
# Every stage at toy sizes, DataLoader workers included (a few seconds).
TINY = dict(source_size=16, img_size=32, num_images=16, workers=1, plasticity_workers=1, data_batch=4, data_steps=1,
            depth=1, train_batch=4, micro_batch=2, train_steps=1, pair_batch=2, pairs=3, min_window_s=0.01)


def test_tiny_benchmark_runs_and_ends_with_the_summary_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(quick=True, device="cpu", out=out, **TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    assert FINAL_LINE.fullmatch(lines[-1]), lines[-1]
    for stage in ("data", "finetune", "plasticity"):
        for key in ("baseline_images_per_s", "project_images_per_s", "speedup"):
            assert math.isfinite(result[stage][key]) and result[stage][key] > 0, (stage, key)
    assert result["finetune"]["flops_per_image"] > 0
    assert result["finetune"]["project_mfu"] is None  # CPU, no peak given
    assert result["plasticity"]["measurements"] == len(BLOCK_COMPONENTS)  # depth 1
    assert result["peak_rss_mib"] > 0
    assert json.loads(out.read_text())["config"]["pairs"] == TINY["pairs"]


def test_data_paths_give_the_same_shape_and_statistics():
    split = bench.random_split(64, 32, 10, seed=0)
    torch.manual_seed(0)
    baseline = torch.stack([bench.train_transform(64)(bench.Image.fromarray(image)) for image in split.images])
    project = transforms.train_batch(split.images, 64, CPU, torch.Generator().manual_seed(0))
    assert baseline.shape == project.shape == (64, 3, 64, 64)
    assert baseline.dtype == project.dtype == torch.float32
    # Uniform uint8 input: each channel's mean is (0.5 - mean) / std after normalisation.
    expected = (0.5 - torch.tensor(transforms.IMAGENET_MEAN)) / torch.tensor(transforms.IMAGENET_STD)
    for batch in (baseline, project):
        assert torch.allclose(batch.mean(dim=(0, 2, 3)), expected, atol=0.05)
    spread_ratio = project.std(dim=(0, 2, 3)) / baseline.std(dim=(0, 2, 3))
    assert torch.all((spread_ratio > 0.8) & (spread_ratio < 1.2)), spread_ratio


def test_reference_plasticity_equals_plasticity_measure_on_the_same_pairs():
    cfg = bench.BenchConfig(img_size=32, depth=2)
    baseline, project = bench.build_models("vit_tiny_patch16_224", cfg, CPU)
    reference = bench.random_split(7, 24, 10, seed=1)
    downstream = bench.random_split(9, 24, 10, seed=2)
    pairs, batch = 7, 3  # a short last batch
    table, _ = plasticity.measure(project, reference, downstream, pairs, batch, 32, CPU, progress=lambda _: None)

    def eval_images(split, start):
        return transforms.eval_batch(split.images[start : min(start + batch, pairs)], 32, CPU)

    batches = [(eval_images(reference, s), eval_images(downstream, s)) for s in range(0, pairs, batch)]
    means = bench.reference_plasticity(baseline, batches, CPU)
    assert set(means) == {(c, layer) for c in BLOCK_COMPONENTS for layer in range(2)}
    assert (table["n"] == pairs).all()
    for row in table.itertuples():
        assert row.mean == pytest.approx(means[(row.component, row.layer)], rel=1e-4), (row.component, row.layer)


def test_peak_flops_uses_the_override_and_knows_no_cpu_peak():
    assert bench.peak_flops(CPU, 2.5) == 2.5e12
    assert bench.peak_flops(CPU, None) is None


@pytest.mark.parametrize(("elapsed", "expected"), [(0.02, 10), (0.05, 4), (1.0, 2)])
def test_short_windows_are_lengthened_to_the_minimum_duration(monkeypatch, elapsed, expected):
    """2 batches took `elapsed` s; a window of at least 0.1 s needs ceil(2 * 0.1 / elapsed) of them, never fewer."""
    calls = []
    monkeypatch.setattr(bench, "_timed", lambda window, device: (window()(), elapsed))
    assert bench._batches_for(0.1, 2, lambda n: calls.append(n) or n, CPU) == expected
    assert calls == [2]


def test_random_split_is_prepared_format():
    split = bench.random_split(5, 8, 3, seed=0)
    assert split.images.dtype == np.uint8 and split.images.shape == (5, 8, 8, 3)
    assert split.labels.dtype == np.int64 and split.labels.max() < 3
