"""The study config: one loader that validates it, fills its defaults and splits off the machine.

The JSON schema is checked once, filling every default it declares (the schema is the one home
of defaults), then the cross-references it cannot express. Every failure is one line naming the
key and the allowed values, raised before any job.

A study config holds science (what the results mean) and machine settings (`runtime`,
`tracking`, `study`; see `vitplasticity.machine`).
"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import yaml

from vitplasticity.datasets import vtab1k
from vitplasticity.datasets.imagefolder import class_folders
from vitplasticity.datasets.sources import SOURCES, SUBSET_SOURCES
from vitplasticity.datasets.synthetic import CORRUPTIONS
from vitplasticity.errors import UserError
from vitplasticity.registry import lr_label
from vitplasticity.settings import SCHEMA, fill_defaults


def _schema_message(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(part) for part in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"config key '{key}': unknown key(s) {', '.join(map(repr, unknown))}{hint}"
    if error.validator == "enum":
        return (f"config key '{key}': {error.instance!r} is not allowed; allowed values: "
                f"{', '.join(map(str, error.validator_value))}")
    if error.validator == "minItems" and error.validator_value == 1:
        return f"config key '{key}': must not be empty; list at least one value"
    fix = _SCHEMA_FIXES.get(error.validator)
    return f"config key '{key}': {error.message}" + (f"; {fix(error.validator_value)}" if fix else "")


def _type_names(value) -> str:
    names = {"array": "list", "object": "mapping (key: value)", "boolean": "true/false"}
    return " or ".join(names.get(v, v) for v in (value if isinstance(value, list) else [value]))


# How to fix a value that breaks one schema keyword (the message itself names the cause).
_SCHEMA_FIXES = {
    "type": lambda v: f"write a value of type {_type_names(v)}",
    "minimum": lambda v: f"set it to at least {v}",
    "exclusiveMinimum": lambda v: f"set it to more than {v}",
    "maximum": lambda v: f"set it to at most {v}",
    "exclusiveMaximum": lambda v: f"set it to less than {v}",
    "required": lambda v: "add it",
    "uniqueItems": lambda v: "remove the repeated values",
    "minItems": lambda v: f"list at least {v} values",
    "maxItems": lambda v: f"list at most {v} values",
    "minProperties": lambda v: f"define at least {v} entry",
    "pattern": lambda v: "change it to match that pattern",
}


def validate_schema(config: dict, schema_path: str | Path) -> None:
    """Fill in every default the schema declares (in place, `settings.fill_defaults`), then check `config`
    against it. A task's data source must be one of `sources.SOURCES`, the one list of them."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    data = schema["properties"]["tasks"]["additionalProperties"]["properties"]["data"]
    data["properties"]["source"]["enum"] = list(SOURCES)
    fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [len(e.absolute_path), *map(str, e.absolute_path)])
    if errors:
        raise UserError(_schema_message(errors[0]))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_references(config: dict) -> None:
    """Names used in one section must exist in another; protocol values must be coherent."""
    models, tasks = config["models"], config["tasks"]
    controls = config.get("controls", {})
    clash = sorted(set(controls) & set(config["arms"]))
    _require(not clash, f"config key 'controls.{clash[0] if clash else ''}': a control may not reuse an arm's name; "
             "rename it")
    for name, control in controls.items():
        _require("match" not in control or config["finetune"].get("weight_decay", 0.0) == 0.0,
                 f"config key 'controls.{name}.match': a gradient mask keeps entries frozen only with "
                 "finetune.weight_decay 0; set it to 0 or use lora_rank")
    arms = {**config["arms"], **controls}
    for name, model in models.items():
        check_model_shape(name, model)
        if model["source"] == "pretrain":
            _require("pretrain" in model, f"config key 'models.{name}.pretrain': required when source is pretrain")
            task = model["pretrain"]["task"]
            _require(task in tasks, f"config key 'models.{name}.pretrain.task': unknown task '{task}'; "
                     f"allowed: {', '.join(tasks)}")
            _require(model["pretrain"]["eval_every"] <= model["pretrain"]["steps"],
                     f"config key 'models.{name}.pretrain.eval_every': must not exceed steps "
                     f"({model['pretrain']['steps']}); set it to at most steps")
            check_keep_steps(name, model["pretrain"])
        elif model["source"] == "local":
            _require(bool(model.get("path")),
                     f"config key 'models.{name}.path': required when source is local (the weights file)")
        else:
            _require(bool(model.get("pretrained_tag")),
                     f"config key 'models.{name}.pretrained_tag': required when source is timm (e.g. orig_in21k)")
    reference = config["plasticity"]["reference_task"]
    _require(reference in tasks, f"config key 'plasticity.reference_task': unknown task '{reference}'; "
             f"allowed: {', '.join(tasks)}")
    for name, task in tasks.items():
        if "steps" in task and "eval_every" in task:
            _require(task["eval_every"] <= task["steps"],
                     f"config key 'tasks.{name}.eval_every': {task['eval_every']} exceeds steps ({task['steps']}); "
                     "set it to at most steps")
        data = task["data"]
        _require("subset" not in data or data["source"] in SUBSET_SOURCES,
                 f"config key 'tasks.{name}.data.subset': source {data['source']} has no single training pool to "
                 f"draw a subset from; remove subset or use a source of {', '.join(SUBSET_SOURCES)}")
        if data["source"] == "imagefolder":
            for key in ("path", "store_size"):
                _require(data.get(key) is not None,
                         f"config key 'tasks.{name}.data.{key}': required for imagefolder tasks; add it")
        if data["source"] == "vtab1k":
            vtab1k.check_task(name, data)
        if data["source"] == "synthetic":
            for key in ("kind", "image_size", "n_train", "n_val", "n_test"):
                _require(key in data, f"config key 'tasks.{name}.data.{key}': required for synthetic tasks; add it")
            if data["kind"] == "corrupt":
                _require(data.get("corruption") in CORRUPTIONS,
                         f"config key 'tasks.{name}.data.corruption': {data.get('corruption')!r} is not allowed for "
                         f"a synthetic corrupt task; allowed values: {', '.join(CORRUPTIONS)}")
    for name, experiment in config["experiments"].items():
        where = f"experiments.{name}"
        _require(experiment["model"] in models, f"config key '{where}.model': unknown model "
                 f"'{experiment['model']}'; allowed: {', '.join(models)}")
        for task in experiment["tasks"]:
            _require(task in tasks, f"config key '{where}.tasks': unknown task '{task}'; allowed: {', '.join(tasks)}")
            for key in ("steps", "eval_every", "lrs"):
                _require(key in tasks[task], f"config key 'tasks.{task}.{key}': required because experiment "
                         f"'{name}' finetunes on it")
            check_classes(task, tasks[task]["data"], name)
        for arm in experiment.get("arms", list(arms)):
            _require(arm in arms, f"config key '{where}.arms': unknown arm '{arm}'; allowed: {', '.join(arms)}")
    check_run_folders(config)
    check_reference_stream(config)
    check_selection(config, arms)


def check_run_folders(config: dict) -> None:
    """No two learning rates name one run folder. Folders name a rate (a task's lr times its experiment's
    lr_scale) by `registry.lr_label`, 6 significant digits: an lr listed twice, or two rates of one model,
    optimizer and task equal to 6 digits, would train once and be read as two. One rate in two experiments is
    one run, shared."""
    named: dict[tuple, tuple[str, float, float]] = {}
    for name, experiment in config["experiments"].items():
        scale = experiment["lr_scale"]
        for task in experiment["tasks"]:
            for lr in config["tasks"][task]["lrs"]:
                key = (experiment["model"], experiment["optimizer"], task, lr_label(lr * scale))
                first = named.get(key)
                if first is None:
                    named[key] = (name, lr, scale)
                elif first[0] == name or first[1] * first[2] != lr * scale:
                    raise UserError(
                        f"config key 'tasks.{task}.lrs': lr {first[1]:.12g} (experiment '{first[0]}', lr_scale "
                        f"{first[2]:.12g}) and lr {lr:.12g} (experiment '{name}', lr_scale {scale:.12g}) both name "
                        f"the run folder lr{key[-1]} (6 significant digits); remove the repeat or make them differ "
                        "within 6 digits")


def check_selection(config: dict, arms: dict) -> None:
    """The selection section names known selectors, its arms do not reuse an arm's name, and an experiment that
    trains them has budgets and selectors to train (and the criteria job, for a criterion's scores)."""
    from vitplasticity import budget

    selection = config["selection"]
    budget.check_selectors(selection["criteria"], "selection.criteria")
    named: dict[str, float] = {}
    for fraction in selection["budgets"]:
        first = named.setdefault(budget.arm_name("<selector>", fraction), fraction)
        _require(first == fraction, f"config key 'selection.budgets': budgets {first:.12g} and {fraction:.12g} both "
                 f"name the arms {budget.arm_name('<selector>', fraction)} (a budget's percent to 6 significant "
                 "digits); make them differ within 6 digits")
    clash = sorted(set(budget.arms(selection)) & set(arms))
    _require(not clash, f"config key 'arms.{clash[0] if clash else ''}': the name of a selection arm; rename the arm")
    users = [name for name, experiment in config["experiments"].items() if experiment["selection"]]
    if not users:
        return
    for key in ("budgets", "criteria"):
        _require(bool(selection[key]), f"config key 'selection.{key}': must not be empty, since experiment "
                 f"'{users[0]}' sets selection: true; list at least one value")
    scored = [name for name in selection["criteria"] if budget.needs_scores(name)]
    _require(not scored or config["criteria"]["enabled"],
             f"config key 'criteria.enabled': selection criterion '{scored[0] if scored else ''}' ranks by the "
             "criteria job's scores; set criteria.enabled to true")


def evaluated_steps(pretrain: dict) -> list[int]:
    """The steps at which a pretraining run evaluates, and so keeps its weights: every multiple of
    eval_every, and the last step."""
    steps, every = pretrain["steps"], pretrain["eval_every"]
    return sorted({*range(every, steps + 1, every), steps})


def check_keep_steps(name: str, pretrain: dict) -> None:
    """Each step of the pretraining trajectory is one whose weights the run keeps (`evaluated_steps`)."""
    evaluated = evaluated_steps(pretrain)
    off = [step for step in pretrain.get("keep_steps", []) if step not in evaluated]
    every, steps = pretrain["eval_every"], pretrain["steps"]
    last = f", or {steps} itself" if steps % every else ""
    _require(not off,
             f"config key 'models.{name}.pretrain.keep_steps': steps {off} are not evaluated by the pretraining run, "
             f"which keeps the weights of its evaluations only; choose multiples of eval_every ({every}) up to steps "
             f"({steps}){last}")


def check_model_shape(name: str, model: dict) -> None:
    """The shape timm builds for `model` fits its images: whole patches, whole heads.

    The patch side is kwargs.patch_size, else the one the timm name states (``..._patch14_...``),
    which a `patch_size` key, when given, must agree with (timm never reads that key). The model is
    built at `img_size` (timm resamples a pretrained position embedding), so any size that
    patches evenly is accepted.
    """
    kwargs = model.get("kwargs", {})
    stated = re.search(r"_patch(\d+)", model["timm_name"])
    patch = kwargs.get("patch_size", int(stated.group(1)) if stated else model.get("patch_size", 16))
    _require(type(patch) is int and patch > 0,
             f"config key 'models.{name}.kwargs.patch_size': must be a positive integer, got {patch!r}")
    declared = model.get("patch_size", patch)
    _require("patch_size" in kwargs or declared == patch,
             f"config key 'models.{name}.patch_size': {declared} differs from the patch size {patch} timm builds "
             f"{model['timm_name']} with; set patch_size to {patch}, or kwargs.patch_size to {declared} to build "
             f"{declared}-pixel patches")
    _require(model["img_size"] % patch == 0,
             f"config key 'models.{name}.img_size': {model['img_size']} is not divisible by the patch size "
             f"{patch}; choose a multiple of {patch}")
    width, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    _require(not (type(width) is int and type(heads) is int and heads > 0 and width % heads),
             f"config key 'models.{name}.kwargs.num_heads': embed_dim {width} is not divisible by {heads} heads; "
             "choose a number of heads that divides embed_dim")


def check_classes(name: str, data: dict, experiment: str) -> None:
    """An image folder that an experiment finetunes on must hold at least two classes (class sub-folders):
    a classifier of one class has nothing to learn (and the linear probe cannot be fitted)."""
    if data["source"] != "imagefolder" or not data.get("path"):
        return
    classes = class_folders(data["path"])
    _require(classes is None or len(classes) >= 2,
             f"config key 'tasks.{name}.data.path': {data['path']} holds "
             + (f"one class ({classes[0]})" if classes else "no class sub-folders, so one class")
             + f", and experiment '{experiment}' finetunes a classifier on it; put the images in at least two "
             "class sub-folders")


def check_reference_stream(config: dict) -> None:
    """The plasticity reference task must not be a downstream task: pairing a task's test
    images with themselves gives zero input distance for every pair (study-spec §3). Only it may
    set ``reference_stream`` (every image in test, no train split)."""
    reference = config["plasticity"]["reference_task"]
    users = [name for name, experiment in config["experiments"].items() if reference in experiment["tasks"]]
    _require(not users,
             f"config key 'plasticity.reference_task': '{reference}' is also a downstream task of experiment "
             f"'{users[0] if users else ''}', so plasticity would pair its test images with themselves; choose a "
             "reference task no experiment finetunes on")
    other = [name for name, task in config["tasks"].items()
             if task["data"].get("reference_stream") and task["data"]["source"] != "imagefolder"]
    _require(not other, f"config key 'tasks.{other[0] if other else ''}.data.reference_stream': only an imagefolder "
             "source can put every image in its test split; remove it")
    streams = [name for name, task in config["tasks"].items()
               if task["data"].get("reference_stream") and name != reference]
    _require(not streams,
             f"config key 'tasks.{streams[0] if streams else ''}.data.reference_stream': only the plasticity "
             f"reference task ('{reference}') can put every image in its test split (nothing is left to train on); "
             "remove reference_stream or name the task in plasticity.reference_task")


def check_config(config: dict, schema_path: str | Path = SCHEMA) -> None:
    """Validate `config` once against the package's schema (`settings.SCHEMA`), filling its defaults in place,
    then check its cross-references."""
    validate_schema(config, schema_path)
    check_references(config)

