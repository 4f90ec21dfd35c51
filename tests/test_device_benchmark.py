"""The one-shot device benchmark, in its tiny CPU mode: it runs from a checkout without this project's
installed extras, writes its JSON stage by stage, and projects the study's runs from the config."""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The device machine has PyTorch, timm, numpy, pandas, pillow, PyYAML, safetensors, but none of these.
ABSENT_THERE = ("mlflow", "jsonschema", "snakemake")
RUNNER = f"""
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_THERE!r}:
            raise ImportError(f"{{name}} is not installed on the device machine")
sys.meta_path.insert(0, Absent())
sys.argv = ["benchmarks/device.py", *sys.argv[1:]]
runpy.run_path("benchmarks/device.py", run_name="__main__")
"""


def _run(tmp_path, *args):
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'benchmarks'}", "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-c", RUNNER, "--tiny", "--device", "cpu", "--out",
                           str(tmp_path / "device.json"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_tiny_mode_measures_every_stage_and_projects_the_study(tmp_path):
    done = _run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "device.json").read_text())
    assert result["errors"] == {} and result["skipped"] == []
    assert set(result["finetune"]) == {"all", "mha", "ln1"}
    for arm in ("all", "mha", "ln1"):
        assert result["finetune"][arm]["images_per_s"] > 0
        # Every timed step counted, under the CPU's peak (tiny windows are exempt from the minimum duration).
        assert result["finetune"][arm]["invalid"] is None
        assert result["finetune"][arm]["images"] == result["finetune"][arm]["planned_images"] == 4
    assert result["limits"]["peak_flops"] > 0 and result["limits"]["min_window_s"] == 0.0
    # Fewer trainable parameters, fewer executed FLOPs: no weight gradients outside the arm.
    flops = {arm: r["flops_per_image"] for arm, r in result["finetune"].items()}
    assert flops["all"] > flops["mha"] > flops["ln1"] > 0
    assert result["compile"]["arm"] == "mha" and result["baseline"]["images_per_s"] > 0
    assert {"resident", "streamed"} <= result["data_path"].keys()
    assert result["plasticity"]["embedding"]["pairs"] == 8 and result["plasticity"]["hidden"]["seconds"] > 0
    assert set(result["sizes"]) == {"vit_large_patch16_224", "vit_huge_patch14_224"}
    gather = result["host_gather"]
    assert gather["threads_1"]["ratio_to_consumer"] == pytest.approx(
        gather["threads_1"]["images_per_s"] / gather["consumer_images_per_s"])
    # The consumer rate is 40% of 989 TFLOP/s over ViT-B/16's forward + backward FLOPs at 224 px (≈105 GFLOP).
    assert 3000 < gather["consumer_images_per_s"] < 4500
    # Run counts of config/config.yaml, as the job table of docs/paper-study.md gives them.
    runs = {name: r["runs"] for name, r in result["projection"].items() if isinstance(r, dict)}
    # main: 5 controls; AdamW: rank-8 LoRA beside the 9 arms; mha_fc1: only its new arm (all, mha, fc1 are main's);
    # budget: 4 tasks x 4 lrs x 3 seeds x 2 budgets x 10 budget arms (its component arms are main's)
    assert runs == {"main": 1188 + 660, "adamw": 480, "budget": 960, "size_large": 108, "size_huge": 108,
                    "low_data": 288, "mha_fc1": 24}
    assert result["projection"]["total_gpu_hours"] > 0
    assert done.stdout.strip().splitlines()[-1].startswith("summary: device ")


def test_a_spent_budget_skips_stages_and_still_writes_the_json(tmp_path):
    done = _run(tmp_path, "--budget-s", "0", "--stages", "finetune,plasticity")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "device.json").read_text())
    assert result["skipped"] == ["finetune", "plasticity"] and "projection" not in result
    assert "finetune: skipped" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("summary: device ")


def test_unknown_stage_is_one_line(tmp_path):
    done = _run(tmp_path, "--stages", "finetune,warp")
    assert done.returncode == 2
    assert "unknown stages warp; choose from finetune, baseline" in done.stderr


def test_projection_leaves_out_an_experiment_whose_arms_were_not_validly_measured():
    import device

    step = {"invalid": None, "step_s": 1.0}
    results = {"finetune": {"all": {"invalid": "the window lasted 0.0001 s", "step_s": 1e-4}, "mha": step,
                            "ln1": step}}
    out = device.projection(results, ROOT / "config" / "config.yaml", forward_rate=1000.0)
    assert out["main"] == {"skipped": "no valid step time measured for vit_base_patch16_224, arms all"}
    # The budget experiment's own runs are its budget arms (costed as mha's); its component arms are main's runs.
    assert out["budget"]["runs"] == 960
    assert out["total_gpu_hours"] == out["budget"]["gpu_hours"]
    assert out["total_leaves_out"] == ["main", "adamw", "size_large", "size_huge", "low_data", "mha_fc1"]
    assert device.summary_line({"machine": {"name": "test"}, "projection": out}).endswith(
        "projected 1953 GPU-hours without main, adamw, size_large, size_huge, low_data, mha_fc1 (no valid step time)")


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_baseline_stage_times_the_preparation_of_its_batches(monkeypatch):
    """4 workers keep 8 batches in flight; the 3 timed batches of 4 images, each image 0.5 s of a worker's time,
    must not have been prepared before the clock started: at most 4 workers / 0.5 s = 8 images/s (20% allowed
    for scheduling), whatever the model step adds."""
    import bench
    import device
    import torch

    def sleeping(size):
        def transform(image):
            time.sleep(0.5)
            return torch.zeros(3, size, size)
        return transform
    monkeypatch.setattr(bench, "train_transform", sleeping)
    # ViT-Ti/16 with one block at 32 px: a step of milliseconds beside the 2 s a worker takes per batch.
    cfg = replace(device.DeviceConfig.tiny(), arch="vit_tiny_patch16_224", img_size=32, baseline_workers=4,
                  baseline_steps=3)
    cpu = torch.device("cpu")
    limits = bench.Limits(peak_flops=1e15, peak_source="test", matmul_flops=1e12, min_window_s=0.0)
    result = device.stage_baseline(cfg, cpu, limits, device.random_split(cfg, cfg.num_images, cfg.store_size, 0))
    assert result["invalid"] is None and result["images"] == 12
    assert result["images_per_s"] <= 1.2 * 4 / 0.5, result


def test_projection_leaves_out_what_an_invalid_measurement_would_have_scaled():
    """ViT-B's arm `all` invalid: no ratio for ViT-L/H; no valid forward rate: no evaluation passes."""
    import device

    step = {"invalid": None, "step_s": 1.0}
    results = {"finetune": {"all": {"invalid": "the window lasted 0.0001 s", "step_s": 1e-4}, "mha": step,
                            "ln1": step},
               "sizes": {"vit_large_patch16_224": {"invalid": None, "step_s": 3.0}}}
    out = device.projection(results, ROOT / "config" / "config.yaml", forward_rate=None)
    assert out["sizes_left_out"] == ("vit_large_patch16_224: no valid ViT-B arm `all` step time to scale ViT-B's "
                                     "arms by")
    assert out["size_large"] == {"skipped": "no valid step time measured for vit_large_patch16_224, arms all, ln1, mha"}
    assert "evaluation passes LEFT OUT (no valid forward rate measured)" in out["assumptions"]


def test_projection_costs_the_later_ablations_and_a_shared_run_once():
    """At 1 s a step for every arm: low data 288 runs × 2,500 steps = 200 h; MHA+FC1 only its 24 new runs (12 on
    CIFAR-100 at 10,000 steps, 12 on clipart at 20,000) = 100 h, its arms all, mha and fc1 being main's runs."""
    import device

    step = {"invalid": None, "step_s": 1.0}
    out = device.projection({"finetune": {"all": step, "mha": step, "ln1": step}}, ROOT / "config" / "config.yaml",
                            forward_rate=None)
    assert out["low_data"] == {"runs": 288, "gpu_hours": pytest.approx(200.0)}
    assert out["mha_fc1"] == {"runs": 24, "gpu_hours": pytest.approx(100.0)}
    assert out["adamw"]["runs"] == 4 * 4 * 3 * 10
