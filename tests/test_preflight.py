"""The preflight: a few real training steps and a plasticity batch of each model of a study on this machine, the
micro-batch that would fit where the batch does not, and the device-hours the study's plan costs at those times."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, planned_jobs, snakemake

from vitplasticity import preflight
from vitplasticity.config import check_config
from vitplasticity.errors import UserError
from vitplasticity.machine import MACHINE_ENV, Runtime

QUICK = ROOT / "config" / "quick.yaml"
GIB = 2**30


def quick_settings(**finetune) -> dict:
    config = yaml.safe_load(QUICK.read_text())
    config["finetune"].update(finetune)
    check_config(config)
    return config


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The preflight of the quick study on this CPU at batch 16 (a tiny model: seconds)."""
    out = tmp_path_factory.mktemp("preflight") / "preflight.json"
    results = preflight.run(quick_settings(batch_size=16), Runtime(device="cpu", plasticity_batch=8), out)
    return results, json.loads(out.read_text())


def test_writes_each_measurement_with_cpu_figures(measured):
    results, written = measured
    assert written["device"]["type"] == "cpu" and written["device"]["peak_tflops"] is None
    runs = written["models"]["vit_quick"]["sgd"]
    assert set(runs) == {"all", "mha"}  # arm `all` and one single component
    for r in runs.values():
        # Every timed step was a real step of the whole batch, at the automatic micro-batch (a CPU: the batch).
        assert r["images"] == r["planned_images"] == 16 * preflight.TIMED_STEPS and r["micro_batch"] == 16
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
        assert r["mfu"] is None and 0 < r["peak_memory_gib"] <= written["memory_limit_gib"] and r["fits"] is True
    # Fewer trainable weights: fewer executed FLOPs and less memory saved for the backward pass.
    assert runs["all"]["flops_per_image"] > runs["mha"]["flops_per_image"] > 0
    assert runs["all"]["activation_mib_per_image"] > runs["mha"]["activation_mib_per_image"] > 0
    assert written["plasticity"]["vit_quick"]["pairs"] == 8 and written["plasticity"]["vit_quick"]["batch_s"] > 0
    assert written["projection"]["main"]["runs"] == 3 * 11 * 1 * 3  # tasks x (arms + controls) x lrs x seeds
    text = preflight.summary(results)
    assert text.startswith("preflight on CPU, ") and ": CPU figures, batch 16, memory limit " in text
    assert "vit_quick sgd arm all: micro-batch 16 (automatic), peak " in text and "MFU none" in text
    assert "projected CPU-hours: main " in text and "does not fit" not in text


def test_a_limit_under_the_measured_peak_names_the_micro_batch_that_fits(measured):
    results, _ = measured
    r = results["models"]["vit_quick"]["sgd"]["all"]
    peak, per_image = r["peak_memory_gib"] * GIB, r["activation_mib_per_image"] * 2**20
    # 10 images' activations short: micro-batch 8 saves 8 of them (not enough), 4 saves 12.
    assessed = preflight.assess(json.loads(json.dumps(results)), (peak - 10 * per_image) / GIB)
    all_arm = assessed["models"]["vit_quick"]["sgd"]["all"]
    assert all_arm["fits"] is False and all_arm["fitting_micro_batch"] == 4
    assert ("  vit_quick (sgd, arm all) does not fit: set runtime.micro_batch: 4 (computed from the measured "
            "activation memory per image)") in preflight.summary(assessed).splitlines()


def test_out_of_memory_halves_the_micro_batch_until_a_step_fits(monkeypatch):
    """A device that runs out of memory above 4 images at once (as CUDA raises it): the measured micro-batch is 4."""
    real = preflight.time_steps
    tried = []

    def small_device(model, images, labels, cfg, *args):
        tried.append(cfg.micro_batch)
        if (cfg.micro_batch or cfg.batch_size) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, images, labels, cfg, *args)

    monkeypatch.setattr(preflight, "time_steps", small_device)
    settings = quick_settings(batch_size=16)
    settings["models"]["vit_quick"]["kwargs"]["depth"] = 1
    results = preflight.measure(settings, Runtime(device="cpu", plasticity_batch=8), torch.device("cpu"))
    preflight.assess(results, limit_gib=1e6)
    r = results["models"]["vit_quick"]["sgd"]["all"]
    assert tried[:3] == [None, 8, 4] and r["out_of_memory_at"] == [16, 8] and r["micro_batch"] == 4
    assert r["images"] == 16 * preflight.TIMED_STEPS and r["fits"] is False and r["fitting_micro_batch"] == 4
    results["projection"] = preflight.project(settings, {"vit_quick": {"sgd": {"all": 1.0, "mha": 1.0}}},
                                              {"vit_quick": 1.0}, 8)
    assert ("  vit_quick (sgd, arm all) does not fit: set runtime.micro_batch: 4 (measured: micro-batch 16, 8 ran "
            "out of memory)") in preflight.summary(results).splitlines()


@pytest.mark.parametrize(("micro", "limit_gib", "expected"), [
    (512, 40.0, 128),  # 256 would need 80 - 256 x 0.125 = 48 GiB, 128 needs 32 GiB
    (512, 80.0, 512),  # the measured peak fits
    (512, 16.2, 1),  # 80 - 511 x 0.125 = 16.125 GiB: one image at once
    (128, 70.0, 32),  # measured at runtime.micro_batch 128: 64 needs 80 - 64 x 0.125 = 72 GiB, 32 needs 68
    (512, 16.0, None),  # not even one image at once
])
def test_micro_batch_that_fits_by_hand(micro, limit_gib, expected):
    assert preflight.micro_batch_that_fits(512, micro, 80 * GIB, 0.125 * GIB, limit_gib * GIB) == expected


def test_projection_by_hand():
    settings = {
        "arms": {"all": ["emb", "ln1", "mha", "ln2", "fc1", "fc2"], "emb": ["emb"], "mha": ["mha"], "ln1": ["ln1"],
                 "smooth": ["ln1", "ln2"]},
        "controls": {"mha_lora1": {"component": "mha", "lora_rank": 1}},
        "finetune": {"seeds": [0, 1, 2]},
        "tasks": {"a": {"steps": 100, "lrs": [0.1, 0.01]}, "b": {"steps": 50, "lrs": [0.1]}},
        "plasticity": {"n_pairs": 1000},
        "selection": {},
        "experiments": {"e1": {"model": "m", "optimizer": "sgd", "tasks": ["a", "b"], "lr_scale": 1.0,
                               "selection": False},
                        "e2": {"model": "m", "optimizer": "sgd", "tasks": ["a", "b"], "arms": ["mha"], "lr_scale": 0.5,
                               "selection": False},
                        "e3": {"model": "m", "optimizer": "sgd", "tasks": ["b"], "arms": ["mha", "ln1"],
                               "lr_scale": 0.5, "selection": False}},
    }
    out = preflight.project(settings, {"m": {"sgd": {"all": 2.0, "mha": 1.0}}}, {"m": 0.5}, 250)
    # e1, per step over its 6 arms: all 2 + emb 2 + mha 1 + ln1 1 (as mha) + smooth 2 (as all) + mha_lora1 1 = 9 s;
    # task a: 2 lrs x 3 seeds x 100 steps x 9 s = 5400 s, task b: 1 x 3 x 50 x 9 = 1350 s.
    assert out["e1"] == {"runs": 6 * 9, "steps": 6 * (600 + 150), "gpu_hours": pytest.approx(6750 / 3600)}
    assert out["e2"] == {"runs": 9, "steps": 750, "gpu_hours": pytest.approx(750 / 3600)}
    # e3's mha runs on b are e2's (same lrs): only its ln1 runs on b are new, 3 x 50 steps x 1 s.
    assert out["e3"] == {"runs": 3, "steps": 150, "gpu_hours": pytest.approx(150 / 3600)}
    # Two plasticity jobs (m, a) and (m, b): ceil(1000 / 250) = 4 batches x 0.5 s each.
    assert out["plasticity"] == {"jobs": 2, "gpu_hours": pytest.approx(4 / 3600)}
    assert out["total_gpu_hours"] == pytest.approx((6750 + 750 + 150 + 4) / 3600)


def test_a_rate_two_experiments_share_is_one_run_of_the_first():
    """e2 halves e1's rates 0.1 and 0.05: its 0.05 is e1's run folder lr0.05, only its 0.025 is new."""
    settings = {"arms": {"mha": ["mha"]}, "controls": {}, "selection": {}, "finetune": {"seeds": [0, 1]},
                "tasks": {"a": {"steps": 10, "lrs": [0.1, 0.05]}},
                "experiments": {name: {"model": "m", "optimizer": "sgd", "tasks": ["a"], "arms": ["mha"],
                                       "lr_scale": scale, "selection": False}
                                for name, scale in (("e1", 1.0), ("e2", 0.5), ("e3", 0.5))}}
    assert [(row["experiment"], row["runs"]) for row in preflight.planned_runs(settings)] == [("e1", 4), ("e2", 2)]


def test_a_config_without_a_single_component_arm_is_one_line():
    with pytest.raises(UserError, match=r"^the preflight measures the arms `all` and one single block component; "
                                        r"the config's arms define all, smooth; add e\.g\."):
        preflight.single_arm({"arms": {"all": ["emb", "ln1"], "smooth": ["ln1", "ln2"]}})


def test_the_command_checks_a_limit_and_prints_the_summary(tmp_path):
    settings = quick_settings(batch_size=8)
    settings["models"]["vit_quick"]["kwargs"]["depth"] = 1
    env = {key: value for key, value in os.environ.items() if key != MACHINE_ENV}
    done = subprocess.run([sys.executable, "-m", "vitplasticity", "preflight", "--settings", json.dumps(settings),
                           "--memory-gib", "0.01", "--out", str(tmp_path / "preflight.json")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((tmp_path / "preflight.json").read_text())
    assert written["memory_limit_gib"] == 0.01 and written["models"]["vit_quick"]["sgd"]["all"]["fits"] is False
    assert ("  vit_quick (sgd, arm all) does not fit: not even at runtime.micro_batch: 1; use a device with more "
            "memory") in done.stdout.splitlines()


def test_the_workflow_plans_the_preflight_only_when_asked(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    asked = planned_jobs(snakemake(tmp_path, "-n", "preflight", config=QUICK).stdout)
    assert asked == {"preflight": 1}
    study = planned_jobs(snakemake(tmp_path, "-n", config=QUICK).stdout)
    assert "preflight" not in study
    # The projection counts the runs and plasticity jobs the workflow plans.
    projected = preflight.project(quick_settings(), {"vit_quick": {"sgd": {"all": 1.0, "mha": 1.0}}},
                                  {"vit_quick": 1.0}, 250)
    assert projected["main"]["runs"] + projected["budget"]["runs"] == study["finetune"]
    assert projected["plasticity"]["jobs"] == study["measure_plasticity"]


def test_the_paper_projection_counts_the_runs_the_paper_dag_plans():
    """The counts `test_workflow.test_paper_dag_plans_every_job` asserts of the paper config's dry run."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    check_config(config)
    steps = {opt: {"all": 1.0, "mha": 1.0} for opt in ("sgd", "adamw")}
    projected = preflight.project(config, {model: steps for model in config["models"]},
                                  {model: 1.0 for model in config["models"]}, 64)
    runs = {name: p["runs"] for name, p in projected.items() if isinstance(p, dict) and "runs" in p}
    # mha_fc1 shares its all, mha and fc1 runs with main: only its 2 tasks x 4 lrs x 3 seeds of mha_fc1 are new.
    # budget: 4 tasks x 4 lrs x 3 seeds x 2 budgets x 10 budget arms (its component arms are main's runs).
    assert runs == {"main": 1188 + 660, "adamw": 480, "size_large": 108, "size_huge": 108, "low_data": 288,
                    "mha_fc1": 24, "budget": 960}
    assert sum(runs.values()) == 3816  # the finetuning jobs of the paper config's dry run
    assert projected["plasticity"]["jobs"] == 17
