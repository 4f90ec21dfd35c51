"""The CPU benchmark (benchmarks/bench.py): it runs end to end, its two sides compute the same things, each
timed window runs once, and a window that measured nothing is reported invalid instead of as a ratio."""

from __future__ import annotations

import json
import math
import re
import time

import bench
import numpy as np
import pytest
import torch

from vitplasticity import plasticity, transforms
from vitplasticity.components import BLOCK_COMPONENTS

CPU = torch.device("cpu")
FINAL_LINE = re.compile(r"data speedup \d+\.\d\d, finetune speedup \d+\.\d\d, plasticity speedup \d+\.\d\d")
# Every stage at toy sizes, DataLoader workers included (a few seconds); toy windows are too short for the
# duration check, which the tests below exercise on their own.
TINY = dict(source_size=16, img_size=32, num_images=16, workers=1, plasticity_workers=1, data_batch=4, data_steps=1,
            depth=1, train_batch=4, micro_batch=2, train_steps=1, pair_batch=2, pairs=3, window_s=0.01,
            min_window_s=0.0)


def limits() -> bench.Limits:
    """A machine of 0.2 TFLOP/s whose windows must last 0.25 s."""
    return bench.Limits(peak_flops=0.2e12, peak_source="test", matmul_flops=0.1e12, min_window_s=0.25)


def test_tiny_benchmark_runs_and_ends_with_the_summary_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(quick=True, device="cpu", out=out, **TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    assert FINAL_LINE.fullmatch(lines[-1]), lines[-1]
    for stage in ("data", "finetune", "plasticity"):
        assert result[stage]["invalid"] == [], stage
        for key in ("baseline_images_per_s", "project_images_per_s", "speedup"):
            assert math.isfinite(result[stage][key]) and result[stage][key] > 0, (stage, key)
    # The same model on both sides; FlopCounterMode has no count for the backward of the CPU's fused attention,
    # so the project's count is at most the baseline's.
    base, proj = (result["finetune"][f"{side}_flops_per_image"] for side in ("baseline", "project"))
    assert 0.8 * base < proj <= base
    assert result["data"]["baseline_flops_per_image"] == 0  # PIL in DataLoader workers: no torch FLOPs here
    assert result["finetune"]["project_mfu"] is None  # CPU, no rated peak given
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
    assert bench.rated_peak_flops(CPU, 2.5) == 2.5e12
    assert bench.rated_peak_flops(CPU, None) is None


@pytest.mark.parametrize(("elapsed", "expected"), [(0.02, 10), (0.05, 4), (1.0, 2), (0.0, 20_000)])
def test_short_windows_are_lengthened_to_the_minimum_duration(monkeypatch, elapsed, expected):
    """2 batches took `elapsed` s; a window of at least 0.1 s needs ceil(2 * 0.1 / elapsed) of them, never fewer,
    and never more than 10,000 times 2 (an instant window stays a no-op, which `check` reports)."""
    calls = []

    def window(units):
        return lambda: (lambda: calls.append(units) or units, units)
    monkeypatch.setattr(bench, "time_once", lambda window, device: bench.Timed(window()[0](), 2, elapsed))
    assert bench.lengthened(0.1, 2, window, CPU) == expected
    assert calls == [2, 2]  # the first run untimed for calibration, the second calibrates


def _one_shot_window(batches: int = 4, batch: int = 2, consumed_before: bool = False) -> bench.Window:
    """A window over a one-shot iterator of `batches` batches; `consumed_before`: its set-up drains it first, as
    a statement run for warm-up before the timed run would."""
    def set_up():
        iterator = iter([torch.zeros(batch, 3)] * batches)
        if consumed_before:
            list(iterator)
        return lambda: sum(len(b) for b in iterator), batches * batch
    return set_up


def test_a_timed_window_runs_exactly_once_and_counts_its_own_images():
    runs = []

    def set_up():
        iterator = iter(range(5))
        return lambda: runs.append(1) or sum(1 for _ in iterator), 5
    timed = bench.time_once(set_up, CPU)
    assert runs == [1] and timed.images == timed.planned == 5 and timed.seconds >= 0
    assert bench.time_once(_one_shot_window(), CPU).images == 8  # nothing consumed it before the clock


def test_an_iterator_consumed_before_timing_is_invalid():
    timed = bench.time_once(_one_shot_window(consumed_before=True), CPU)
    assert bench.check(timed, 0.0, limits()) == ("the timed call processed 0 images, not the 8 its window was set up "
                                               "for (consumed before the clock started?)")


def test_a_window_shorter_than_the_minimum_is_invalid():
    assert bench.check(bench.Timed(images=8, planned=8, seconds=0.1), 0.0, limits()) == (
        "the window lasted 0.1000 s, under the 0.25 s minimum (a no-op?)")
    assert bench.check(bench.Timed(images=8, planned=8, seconds=0.25), 0.0, limits()) is None


def test_a_rate_over_the_machine_peak_is_invalid():
    # 100 images of 1 GFLOP in 0.5 s: 0.2 TFLOP/s, exactly the peak; in 0.4 s: 0.25 TFLOP/s, over it.
    assert bench.check(bench.Timed(images=100, planned=100, seconds=0.5), 1e9, limits()) is None
    assert bench.check(bench.Timed(images=100, planned=100, seconds=0.4), 1e9, limits()) == (
        "0.25 TFLOP/s achieved, over this machine's peak of 0.2 TFLOP/s (test)")


def test_output_written_faster_than_twice_a_memory_copy_is_invalid():
    copying = bench.Limits(peak_flops=0.2e12, peak_source="test", matmul_flops=0.1e12, min_window_s=0.25,
                           copy_bytes_per_s=1e9)
    # 100 images of 20 MB in 1 s: 2 GB/s, twice the copy rate (a copy reads and writes); 25 MB: 2.5 GB/s.
    assert bench.check(bench.Timed(images=100, planned=100, seconds=1.0), 0.0, copying, bytes_per_image=2e7) is None
    assert bench.check(bench.Timed(images=100, planned=100, seconds=1.0), 0.0, copying, bytes_per_image=2.5e7) == (
        "2.5 GB/s of output written, over 2.0 x the 1 GB/s a memory copy wrote at start")


SLEEP_S = 0.25  # per image, in each DataLoader worker


def _sleeping_transform(size: int):
    """A per-sample transform costing `SLEEP_S` of a worker's time: W workers prepare at most W / SLEEP_S images/s."""
    def transform(image):
        time.sleep(SLEEP_S)
        return torch.zeros(3, size, size)
    return transform


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_baseline_data_path_times_the_preparation_of_its_batches(monkeypatch):
    """4 workers keep 8 batches in flight; the 3 timed batches of 4 images must not have been prepared before the
    clock started: their rate is at most 4 workers / 0.25 s = 16 images/s (20% allowed for scheduling). Timing
    after only the first batch (the workers started) gave the 3 others, prepared alongside it, almost free."""
    monkeypatch.setattr(bench, "train_transform", _sleeping_transform)
    cfg = bench.BenchConfig(source_size=8, img_size=8, num_images=16, workers=4, data_batch=4, data_steps=3, rounds=1,
                            window_s=0.01)
    result = bench.bench_data(cfg, CPU, bench.replace(limits(), min_window_s=0.0))
    assert result["invalid"] == []
    assert result["baseline_images_per_s"] <= 1.2 * 4 / SLEEP_S, result["baseline_windows"]


def test_data_path_counts_only_float_batches_of_the_model_input_shape(monkeypatch):
    monkeypatch.setattr(bench, "train_transform", lambda size: lambda image: torch.zeros(3, size, size + 1))
    cfg = bench.BenchConfig(source_size=8, img_size=8, num_images=16, workers=0, data_batch=2, data_steps=2, rounds=1,
                            window_s=0.01)
    result = bench.bench_data(cfg, CPU, bench.replace(limits(), min_window_s=0.0))
    assert result["speedup"] is None
    assert result["invalid"][0] == ("baseline warm-up: the timed call processed 0 images, not the 2 its window was "
                                    "set up for (consumed before the clock started?)")


def test_a_comparison_with_a_broken_window_gives_no_ratio(capsys):
    """The baseline's iterator is drained before the clock starts; the project's timed part does nothing."""
    def no_op():
        return lambda: 8, 8

    def sleeper():
        return lambda: time.sleep(0.3) or 8, 8
    drained = bench.Side(lambda units: _one_shot_window(consumed_before=True), 4)
    result = bench.compare("broken", drained, bench.Side(lambda units: no_op, 1), 1, CPU, limits(), window_s=0.3)
    assert result["speedup"] is None and result["baseline_images_per_s"] is None
    assert result["invalid"] == [
        "baseline warm-up: the timed call processed 0 images, not the 8 its window was set up for (consumed before "
        "the clock started?)",
        "baseline round 1: the timed call processed 0 images, not the 8 its window was set up for (consumed before "
        "the clock started?)",
        result["invalid"][2]]
    assert result["invalid"][2].startswith("project round 1: the window lasted 0.0")
    assert "broken round 1/1 baseline: 0 images in " in capsys.readouterr().out
    fine = bench.compare("fine", bench.Side(lambda units: sleeper, 1), bench.Side(lambda units: sleeper, 1), 1, CPU,
                         limits(), window_s=0.25)
    assert fine["invalid"] == [] and fine["speedup"] == pytest.approx(1.0, rel=0.2)


def _sleeping_units(per_unit_s: float):
    """A window of n units that takes n x `per_unit_s` and counts one image per unit."""
    return lambda units: lambda: (lambda: time.sleep(per_unit_s * units) or units, units)


def test_both_sides_are_lengthened_whatever_the_machine_speed():
    """2 units of 10 ms (baseline) and 20 ms (project) are far under the 0.25 s minimum; both sides are lengthened
    toward 0.5 s (about 50 and 25 units; fewer when a loaded machine stretches the calibrating sleeps), so the
    comparison is valid, and the ratio stays the true 0.5. A fixed-size baseline window, as before, was invalid on
    any machine fast enough."""
    result = bench.compare("short", bench.Side(_sleeping_units(0.01), 2), bench.Side(_sleeping_units(0.02), 2), 1,
                           CPU, limits(), window_s=0.5)
    assert result["invalid"] == []
    assert result["baseline_windows"][0]["images"] > 25 and result["project_windows"][0]["images"] > 12
    assert result["speedup"] == pytest.approx(0.5, rel=0.15)


def test_cpu_peak_is_cores_times_clock_times_vector_flops(monkeypatch):
    import cpuinfo

    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: {"hz_advertised": [2_000_000_000, 0],
                                                          "hz_actual": [1_500_000_000, 0], "flags": ["avx2", "fma"]})
    # 2 cores x 2 GHz x 1.5 boost x 32 FLOP/cycle (two 8-lane FMA pipes) = 192 GFLOP/s
    assert bench.cpu_peak_flops(2) == (192e9, "2 cores x 2.00 GHz x 1.5 boost x 32 FLOP/cycle (avx2)")
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: {"hz_advertised": [0, 0], "flags": []})
    assert bench.cpu_peak_flops(2) is None


# The quick benchmark at lean sizes (one torch thread, 96 px, ViT-Ti/16 with 3 blocks; every window still at least
# 0.25 s): about 15 s on 2 CPU cores under a load average of 4.
LEAN = dict(threads=1, img_size=96, num_images=128, data_batch=16, data_steps=24, depth=3, train_batch=8,
            train_steps=6, pair_batch=8, pairs=64, rounds=2, window_s=0.6)
# What the ratios may be on a CPU, idle or shared. Data path: per-sample PIL transforms in worker processes
# against a few batched kernels (about 8 at these sizes with one thread; near 1 with two threads on a loaded
# machine). Finetuning: the same float32 model work on both sides, attention and data a few percent of a step.
# Plasticity: the baseline applies every component to both streams, the project only MHA. The broken timing of
# old gave 0.00 for all three.
PLAUSIBLE = {"data": (0.5, 50.0), "finetune": (0.5, 2.0), "plasticity": (1.0, 10.0)}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_quick_run_gives_real_ratios_in_plausible_ranges():
    result = bench.main(quick=True, device="cpu", out=None, **LEAN)
    for stage, (low, high) in PLAUSIBLE.items():
        assert result[stage]["invalid"] == [], (stage, result[stage]["invalid"])
        speedup = result[stage]["speedup"]
        assert math.isfinite(speedup) and low <= speedup <= high, (stage, speedup)


def test_random_split_is_prepared_format():
    split = bench.random_split(5, 8, 3, seed=0)
    assert split.images.dtype == np.uint8 and split.images.shape == (5, 8, 8, 3)
    assert split.labels.dtype == np.int64 and split.labels.max() < 3


def test_criteria_cost_has_every_criterion_and_its_cost_per_unit(capsys):
    from vitplasticity.registry import CRITERIA

    rows = bench.bench_criteria("vit_tiny_patch16_224", pairs=2, pair_batch=2, gradient_batches=1, gradient_batch=3,
                                device=CPU)
    assert [row["criterion"] for row in rows] == list(CRITERIA)
    by_name = {row["criterion"]: row for row in rows}
    assert by_name["plasticity_hidden"]["per_unit_s"] == by_name["plasticity_hidden"]["wall_s"] / 2  # per pair
    for name in ("relative_gradient_norm", "fisher", "fps"):  # per image
        assert by_name[name]["per_unit_s"] == by_name[name]["wall_s"] / 3
    assert by_name["fisher"]["wall_s"] == by_name["relative_gradient_norm"]["wall_s"]  # one set of passes
    assert by_name["kappatune"]["per_unit_s"] == by_name["kappatune"]["wall_s"]
    assert all(row["wall_s"] > 0 for row in rows)
    assert "criterion plasticity_embedding: " in capsys.readouterr().out
