"""Study configs: the shipped ones pass; a malformed one fails with one line naming the key and the fix."""

import copy
from pathlib import Path

import pytest
import yaml

from vitplasticity.config import check_config
from vitplasticity.errors import UserError
from vitplasticity.machine import MACHINE_ENV, Machine, Runtime, Tracking, machine, machine_from_env
from vitplasticity.settings import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
QUICK = yaml.safe_load((ROOT / "config" / "quick.yaml").read_text())
PAPER = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("name", ["config/quick.yaml", "config/config.yaml", "tests/data/smoke.yaml"])
def test_shipped_configs_pass(name):
    config = yaml.safe_load((ROOT / name).read_text())
    check_config(config, SCHEMA)
    assert config["experiments"]["main"]["tasks"]


def _set(config, path, value):
    *parents, last = path.split("/")
    node = config
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return config


DELETE = object()

# (base config, path to change, new value, snippets the one-line message must contain)
MALFORMED = {
    "unknown top-level key": (QUICK, "optimiser", "sgd", [
        "config key '<top level>': unknown key(s) 'optimiser'",
        "allowed keys: arms, controls, criteria, experiments, finetune"]),
    "unknown task key": (QUICK, "tasks/shapes_novel/step", 100, [
        "config key 'tasks.shapes_novel': unknown key(s) 'step'", "allowed keys: data, eval_every, lrs, steps"]),
    "wrong type": (QUICK, "tasks/shapes_novel/steps", "many", [
        "config key 'tasks.shapes_novel.steps'", "'many' is not of type 'integer'"]),
    "lrs not a list": (QUICK, "tasks/shapes_noise/lrs", 0.01, [
        "config key 'tasks.shapes_noise.lrs'", "is not of type 'array'"]),
    "empty lrs": (QUICK, "tasks/shapes_novel/lrs", [], ["config key 'tasks.shapes_novel.lrs': must not be empty"]),
    "unknown arm component": (QUICK, "arms/mha", ["attn"], [
        "config key 'arms.mha.0': 'attn' is not allowed; allowed values: emb, ln1, mha, ln2, fc1, fc2"]),
    "experiment with unknown model": (QUICK, "experiments/main/model", "vit_huge", [
        "config key 'experiments.main.model': unknown model 'vit_huge'; allowed: vit_quick"]),
    "experiment with unknown task": (QUICK, "experiments/main/tasks", ["shapes_novel", "cifar10"], [
        "config key 'experiments.main.tasks': unknown task 'cifar10'",
        "allowed: shapes, shapes_novel, shapes_noise, shapes_sketch"]),
    "experiment with unknown arm": (QUICK, "experiments/main/arms", ["mha", "attention"], [
        "config key 'experiments.main.arms': unknown arm 'attention'", "allowed: all, emb, ln1, mha"]),
    "experiment task without a protocol": (QUICK, "experiments/main/tasks", ["shapes"], [
        "config key 'tasks.shapes.steps': required because experiment 'main' finetunes on it"]),
    "eval_every > steps": (QUICK, "tasks/shapes_sketch/eval_every", 200, [
        "config key 'tasks.shapes_sketch.eval_every': 200 exceeds steps (100); set it to at most steps"]),
    "pretrain eval_every > steps": (QUICK, "models/vit_quick/pretrain/eval_every", 5000, [
        "config key 'models.vit_quick.pretrain.eval_every': must not exceed steps (1200); set it to at most steps"]),
    "kept steps off the evaluation grid": (QUICK, "models/vit_quick/pretrain/keep_steps", [100, 150, 1300], [
        "config key 'models.vit_quick.pretrain.keep_steps': steps [150, 1300] are not evaluated by the pretraining "
        "run, which keeps the weights of its evaluations only; choose multiples of eval_every (100) up to steps "
        "(1200)"]),
    "kept steps twice": (QUICK, "models/vit_quick/pretrain/keep_steps", [100, 100], [
        "config key 'models.vit_quick.pretrain.keep_steps'", "non-unique elements"]),
    "pretrain on unknown task": (QUICK, "models/vit_quick/pretrain/task", "imagenet", [
        "config key 'models.vit_quick.pretrain.task': unknown task 'imagenet'; allowed: shapes"]),
    "img_size not divisible by patch": (QUICK, "models/vit_quick/img_size", 36, [
        "config key 'models.vit_quick.img_size': 36 is not divisible by the patch size 8; choose a multiple of 8"]),
    "unknown data source": (QUICK, "tasks/shapes/data/source", "mnist", [
        "config key 'tasks.shapes.data.source': 'mnist' is not allowed; allowed values: synthetic, cifar10, cifar100, "
        "cifar10c, domainnet, flowers102, oxford_pets, imagenet_val, imagefolder, vtab1k"]),
    "unknown synthetic kind": (QUICK, "tasks/shapes/data/kind", "photo", [
        "config key 'tasks.shapes.data.kind': 'photo' is not allowed; allowed values: source, novel, corrupt, sketch"]),
    "synthetic task missing a size": (QUICK, "tasks/shapes/data/n_train", DELETE, [
        "config key 'tasks.shapes.data.n_train': required for synthetic tasks"]),
    "synthetic corrupt without corruption": (QUICK, "tasks/shapes_noise/data/corruption", DELETE, [
        "config key 'tasks.shapes_noise.data.corruption': None is not allowed",
        "allowed values: gaussian_noise, motion_blur, contrast"]),
    "synthetic corrupt with unknown corruption": (QUICK, "tasks/shapes_noise/data/corruption", "fog", [
        "config key 'tasks.shapes_noise.data.corruption': 'fog' is not allowed"]),
    "patch size not a number": (QUICK, "models/vit_quick/kwargs/patch_size", "8", [
        "config key 'models.vit_quick.kwargs.patch_size': must be a positive integer, got '8'"]),
    "patch size zero": (QUICK, "models/vit_quick/kwargs/patch_size", 0, [
        "config key 'models.vit_quick.kwargs.patch_size': must be a positive integer, got 0"]),
    "unknown reference task": (QUICK, "plasticity/reference_task", "imagenet_val", [
        "config key 'plasticity.reference_task': unknown task 'imagenet_val'; allowed: shapes, shapes_novel"]),
    "unknown plasticity mode": (QUICK, "plasticity/modes", ["embedding", "deep"], [
        "config key 'plasticity.modes.1': 'deep' is not allowed; allowed values: embedding, hidden"]),
    "pretrained_tag missing": (PAPER, "models/vit_b16/pretrained_tag", DELETE, [
        "config key 'models.vit_b16.pretrained_tag': required when source is timm (e.g. orig_in21k)"]),
    "pretrained_tag null": (PAPER, "models/vit_l16/pretrained_tag", None, [
        "config key 'models.vit_l16.pretrained_tag': required when source is timm"]),
    "negative steps": (QUICK, "tasks/shapes_novel/steps", -5, [
        "config key 'tasks.shapes_novel.steps': -5 is less than the minimum of 1"]),
    "zero lr": (QUICK, "tasks/shapes_novel/lrs", [0.01, 0], [
        "config key 'tasks.shapes_novel.lrs.1': 0 is less than or equal to the minimum of 0"]),
    "unknown model source": (QUICK, "models/vit_quick/source", "hub", [
        "config key 'models.vit_quick.source': 'hub' is not allowed; allowed values: timm, local, pretrain"]),
    "missing required section": (QUICK, "finetune", DELETE, [
        "config key '<top level>': 'finetune' is a required property"]),
    "unknown optimizer": (PAPER, "experiments/adamw/optimizer", "adam", [
        "config key 'experiments.adamw.optimizer': 'adam' is not allowed; allowed values: sgd, adamw"]),
    "duplicate seeds": (QUICK, "finetune/seeds", [0, 0], ["config key 'finetune.seeds'", "non-unique elements"]),
    "severity out of range": (QUICK, "tasks/shapes_noise/data/severity", 6, [
        "config key 'tasks.shapes_noise.data.severity': 6 is greater than the maximum of 5"]),
    "machine setting out of range": (QUICK, "runtime/eval_batch", 0, [
        "config key 'runtime.eval_batch': 0 is less than the minimum of 1; set it to at least 1"]),
    "subset without a size": (PAPER, "tasks/cifar100_low/data/subset", {"seed": 1}, [
        "config key 'tasks.cifar100_low.data.subset': {'seed': 1} is not valid under any of the given schemas"]),
    "subset of no images": (PAPER, "tasks/cifar100_low/data/subset", {"images": 0}, [
        "config key 'tasks.cifar100_low.data.subset.images': 0 is less than the minimum of 1"]),
    "subset with an unknown key": (PAPER, "tasks/cifar100_low/data/subset", {"images": 1000, "per_image": 10}, [
        "config key 'tasks.cifar100_low.data.subset': unknown key(s) 'per_image'; allowed keys: images, per_class, "
        "seed"]),
    "subset of a source without one training pool": (PAPER, "tasks/flowers102/data/subset", {"images": 1000}, [
        "config key 'tasks.flowers102.data.subset': source flowers102 has no single training pool to draw a subset "
        "from; remove subset or use a source of synthetic, cifar10, cifar100, cifar10c, domainnet, oxford_pets"]),
    "a learning rate twice": (QUICK, "tasks/shapes_novel/lrs", [0.03, 0.01, 0.03], [
        "config key 'tasks.shapes_novel.lrs': lr 0.03 (experiment 'main', lr_scale 1) and lr 0.03 (experiment 'main', "
        "lr_scale 1) both name the run folder lr0.03 (6 significant digits); remove the repeat or make them differ "
        "within 6 digits"]),
    # Two rates that differ in their 8th significant digit: one folder name, one run.
    "two learning rates one folder": (PAPER, "tasks/cifar100/lrs", [0.1, 0.10000001], [
        "config key 'tasks.cifar100.lrs': lr 0.1 (experiment 'main', lr_scale 1) and lr 0.10000001 (experiment "
        "'main', lr_scale 1) both name the run folder lr0.1"]),
    # Across experiments: a rate shared is one run (the shipped configs share many), two rates in one folder are not.
    "two experiments' rates one folder": (QUICK, "experiments/scaled", {
        "model": "vit_quick", "tasks": ["shapes_novel"], "arms": ["mha"], "lr_scale": 1.0000001}, [
        "config key 'tasks.shapes_novel.lrs': lr 0.03 (experiment 'main', lr_scale 1) and lr 0.03 (experiment "
        "'scaled', lr_scale 1.0000001) both name the run folder lr0.03"]),
    "two budgets one arm name": (PAPER, "selection/budgets", [0.028, 0.02800000001], [
        "config key 'selection.budgets': budgets 0.028 and 0.02800000001 both name the arms <selector>_2.8pct (a "
        "budget's percent to 6 significant digits); make them differ within 6 digits"]),
    "unknown machine setting": (QUICK, "runtime/batch", 8, [
        "config key 'runtime': unknown key(s) 'batch'",
        "allowed keys: compile, device, eval_batch, fork_server, micro_batch, plasticity_batch, prefetch"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_config_fails_with_one_line_naming_the_key(case):
    base, path, value, snippets = MALFORMED[case]
    config = _set(copy.deepcopy(base), path, value)
    with pytest.raises(UserError) as error:
        check_config(config, SCHEMA)
    message = str(error.value)
    assert "\n" not in message
    for snippet in snippets:
        assert snippet in message, message


def test_patch_size_from_kwargs_wins_over_the_top_level_one():
    config = copy.deepcopy(QUICK)
    config["models"]["vit_quick"]["patch_size"] = 16  # kwargs say 8 and 32 % 8 == 0
    check_config(config, SCHEMA)
    config["models"]["vit_quick"]["kwargs"]["patch_size"] = 6
    with pytest.raises(UserError, match="not divisible by the patch size 6"):
        check_config(config, SCHEMA)


def test_empty_config_names_the_top_level():
    with pytest.raises(UserError, match="config key '<top level>': None is not of type 'object'"):
        check_config(yaml.safe_load(""), SCHEMA)


def test_the_last_step_of_a_pretraining_run_is_evaluated_and_can_be_kept():
    config = copy.deepcopy(QUICK)
    config["models"]["vit_quick"]["pretrain"].update(steps=1250, keep_steps=[100, 1250])
    check_config(config, SCHEMA)
    config = _set(copy.deepcopy(QUICK), "models/vit_quick/pretrain/steps", 1250)
    config["models"]["vit_quick"]["pretrain"]["keep_steps"] = [1300]
    with pytest.raises(UserError) as error:
        check_config(config, SCHEMA)
    assert str(error.value).endswith("choose multiples of eval_every (100) up to steps (1250), or 1250 itself")


def test_quick_config_content_matches_the_study_design():
    assert QUICK["arms"]["smooth"] == ["ln1", "ln2"]
    assert QUICK["arms"]["non_smooth"] == ["mha", "fc1", "fc2"]
    assert PAPER["finetune"]["seeds"] == [0, 42, 3407]
    assert PAPER["tasks"]["clipart"]["lrs"] == [0.003, 0.01, 0.03, 0.06]
    assert PAPER["experiments"]["adamw"]["lr_scale"] == 0.01


def test_the_loader_fills_schema_defaults_once_and_splits_off_the_machine(tmp_path):
    config = yaml.safe_load((ROOT / "tests" / "data" / "smoke.yaml").read_text())
    del config["probe"], config["experiments"]["main"]["optimizer"]
    config["runtime"] = {"micro_batch": 8}
    config["tracking"] = {}
    check_config(config, SCHEMA)
    assert config["probe"] == {"max_iter": 5000}
    assert config["experiments"]["main"] | {"tasks": None} == {
        "model": "vit_smoke", "tasks": None, "optimizer": "sgd", "lr_scale": 1.0, "probe": True,
        "compare_to_paper": False, "selection": False}
    assert config["selection"] == {"budgets": [], "criteria": [], "random_draws": 3}
    assert config["finetune"]["betas"] == [0.9, 0.999] and config["finetune"]["crop_scale"] == [0.08, 1.0]
    assert config["tasks"]["novel"]["data"]["severity"] == 5
    assert config["models"]["vit_smoke"]["pretrain"]["betas"] == [0.9, 0.999]
    settings = machine(config)
    assert settings == Machine(Runtime(device="auto", micro_batch=8, eval_batch=256, compile=False,
                                       plasticity_batch=64, prefetch=2),
                               Tracking(enabled=True, uri=None, experiment="smoke"))
    assert machine_from_env({MACHINE_ENV: settings.to_env()}) == settings
    assert machine_from_env({}) == Machine(Runtime(), Tracking(enabled=False, uri=None, experiment=""))
    with pytest.raises(UserError, match=f"^{MACHINE_ENV} is not the JSON of the machine settings"):
        machine_from_env({MACHINE_ENV: '{"runtime": {"gpu": 1}, "tracking": {}}'})


def test_the_paper_config_has_the_authors_later_ablations():
    """Low data (a 1,000-image subset, seed 42, 2,500 steps, evaluated every 125, the paper's arms but emb, the
    main lr grids), MHA + FC1 on CIFAR-100 and clipart, and rank-8 LoRA on MHA in the AdamW ablation."""
    config = copy.deepcopy(PAPER)
    check_config(config, SCHEMA)
    tasks, experiments = config["tasks"], config["experiments"]
    low = experiments["low_data"]
    assert low["tasks"] == ["cifar100_low", "motion_blur_low", "clipart_low", "oxford_pets_low"]
    assert low["arms"] == ["all", "ln1", "mha", "ln2", "fc1", "fc2"] and low["optimizer"] == "sgd"
    for name in low["tasks"]:
        full = name.removesuffix("_low")
        assert tasks[name]["data"]["subset"] == ({"per_class": 10, "seed": 42} if name == "clipart_low"
                                                 else {"images": 1000, "seed": 42})
        assert (tasks[name]["steps"], tasks[name]["eval_every"]) == (2500, 125)
        assert tasks[name]["lrs"] == tasks[full]["lrs"]
        assert {k: v for k, v in tasks[name]["data"].items() if k != "subset"} == tasks[full]["data"]
    assert config["finetune"]["batch_size"] == 512 and len(config["finetune"]["seeds"]) == 3
    assert config["arms"]["mha_fc1"] == ["mha", "fc1"]
    assert experiments["mha_fc1"]["tasks"] == ["cifar100", "clipart"] and "mha_fc1" in experiments["mha_fc1"]["arms"]
    assert PAPER["controls"]["mha_lora8"] == {"component": "mha", "lora_rank": 8}
    assert "mha_lora8" in experiments["adamw"]["arms"] and "mha_lora8" not in experiments["main"]["arms"]


def test_the_data_sources_allowed_are_the_registry_s_and_the_schema_names_each():
    """`sources.SOURCES` is the one list of data sources: the config check allows exactly those (adding a source
    touches its module and that list), and the schema's description of `source` names every one."""
    from vitplasticity.datasets.sources import SOURCES
    from vitplasticity.settings import node

    described = node("tasks.*.data.source")["description"]
    assert [name for name in SOURCES if f" {name}," not in described and f" {name})" not in described] == []
    config = yaml.safe_load((ROOT / "tests" / "data" / "smoke.yaml").read_text())
    config["tasks"]["novel"]["data"] = {"source": "imagefolder", "path": "images", "store_size": 16}
    check_config(config, SCHEMA)
    config["tasks"]["novel"]["data"]["source"] = "imagefolders"
    with pytest.raises(UserError, match=f"allowed values: {', '.join(SOURCES)}$"):
        check_config(config, SCHEMA)
