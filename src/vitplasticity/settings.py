"""What each job gets: typed settings, built once from its ``--settings`` JSON.

The workflow validates the study config once (`vitplasticity.config`) and hands each job the
sections it reads plus the keys that name it (model, task, arm...) as one JSON object, its rerun
trigger. `build` turns that object into the job's frozen dataclass below; it checks only that the
keys are the dataclass's (one line for an unknown or a missing key) and fills the schema's
defaults, so a job run by hand gets what the workflow would give it. The schema is the one home of
defaults: no field below has one, but ``None`` for a key that may be absent.

A field's config key is ``<SECTION>.<field>``, or the schema path (``*``: any entry of a mapping) or,
for a key the workflow adds, the description that `_key` gives it; `help_text` documents every field
from the schema (type, default, description).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import ClassVar

import yaml

from vitplasticity.errors import UserError

# The study config's JSON schema, shipped with the package: the workflow validates against it, jobs read it.
SCHEMA = Path(__file__).resolve().parent / "data" / "config.schema.yaml"


def _key(source: str, *, optional: bool = False) -> dataclasses.Field:
    """A field whose config key is the schema path `source`, or, when `source` has a space, one the
    workflow adds, described by it; `optional`: the key may be absent (None)."""
    return dataclasses.field(default=None, metadata={"from": source}) if optional else (
        dataclasses.field(metadata={"from": source}))


_MODEL = "the model's name (a key of models)"
_TASK = "the task's name (a key of tasks)"


@dataclass(frozen=True, kw_only=True)
class Prepare:
    """`vitplasticity prepare`: one task's data."""

    name: str = _key(_TASK)
    data: dict = _key("tasks.*.data")


@dataclass(frozen=True, kw_only=True)
class Pretrain:
    """`vitplasticity pretrain`: a model's pretraining (its trajectory's keep_steps are the trajectory job's)."""

    SECTION: ClassVar[str] = "models.*.pretrain"
    DROPPED: ClassVar[tuple[str, ...]] = ("keep_steps",)
    model: str = _key(_MODEL)
    task: str
    steps: int
    eval_every: int
    batch_size: int
    lr: float
    optimizer: str
    weight_decay: float
    warmup_steps: int
    betas: list[float]
    seed: int
    crop_scale: list[float]
    timm_name: str = _key("models.*.timm_name")
    kwargs: dict = _key("models.*.kwargs")
    img_size: int = _key("models.*.img_size")
    clip_norm: float = _key("finetune.clip_norm")


@dataclass(frozen=True, kw_only=True)
class Fetch:
    """`vitplasticity fetch`: a timm or local model's entry."""

    SECTION: ClassVar[str] = "models.*"
    model: str = _key(_MODEL)
    source: str
    timm_name: str
    pretrained_tag: str | None
    path: str | None = None
    head: str
    revision: str
    kwargs: dict
    img_size: int
    patch_size: int | None = None
    pretrain: dict | None = None


@dataclass(frozen=True, kw_only=True)
class Plasticity:
    """`vitplasticity plasticity`: one model on one task."""

    SECTION: ClassVar[str] = "plasticity"
    model: str = _key(_MODEL)
    task: str = _key(_TASK)
    reference_task: str
    n_pairs: int
    loader_batch: int | None = None
    modes: list[str]


@dataclass(frozen=True, kw_only=True)
class Finetune:
    """`vitplasticity finetune`: one run (one arm, lr and seed); one job is one seed."""

    SECTION: ClassVar[str] = "finetune"
    DROPPED: ClassVar[tuple[str, ...]] = ("seeds",)
    model: str = _key(_MODEL)
    task: str = _key(_TASK)
    arm: str = _key("the arm's name (a key of arms)")
    components: list[str] = _key("arms.*")
    control: dict | None = _key("controls.*", optional=True)
    selection: dict | None = _key("a budget arm's {selector, budget[, draw]} (vitplasticity.budget.arms, from "
                                 "selection)", optional=True)
    lr: float = _key("the learning rate (one of the task's lrs, times lr_scale)")
    seed: int = _key("the replicate seed (one of finetune.seeds)")
    optimizer: str = _key("experiments.*.optimizer")
    steps: int = _key("tasks.*.steps")
    eval_every: int = _key("tasks.*.eval_every")
    batch_size: int
    warmup_steps: int
    clip_norm: float
    crop_scale: list[float]
    momentum: float
    weight_decay: float
    betas: list[float]


@dataclass(frozen=True, kw_only=True)
class Probe:
    """`vitplasticity probe`: one model on one task."""

    SECTION: ClassVar[str] = "probe"
    model: str = _key(_MODEL)
    task: str = _key(_TASK)
    max_iter: int


@dataclass(frozen=True, kw_only=True)
class Criteria:
    """`vitplasticity criteria`: one model on one task (the job runs only when the criteria are enabled)."""

    SECTION: ClassVar[str] = "criteria"
    DROPPED: ClassVar[tuple[str, ...]] = ("enabled",)
    model: str = _key(_MODEL)
    task: str = _key(_TASK)
    n_pairs: int
    gradient_batches: int
    gradient_batch_size: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class Trajectory:
    """`vitplasticity trajectory`: one pretrained model's kept steps, on the tasks of its experiments."""

    model: str = _key(_MODEL)
    tasks: list[str] = _key("the tasks measured: those of the experiments that use the model")
    keep_steps: list[int] = _key("models.*.pretrain.keep_steps")
    n_pairs: int = _key("plasticity.n_pairs")


@dataclass(frozen=True, kw_only=True)
class Aggregate:
    """`vitplasticity aggregate`: one experiment's tables."""

    SECTION: ClassVar[str] = "experiments.*"
    experiment: str = _key("the experiment's name (a key of experiments)")
    model: str
    tasks: list[str]
    optimizer: str
    lr_scale: float
    arms: dict[str, list[str]] = _key("the experiment's arms: {arm name: its components} (from arms; a change of an "
                                      "arm's components reruns the tables)")
    probe: bool
    selection: bool
    compare_to_paper: bool
    arm_order: list[str] = _key("the experiment's arm names in the config's order (its tables' column order)")
    vtab_tasks: dict[str, str] | None = _key("the experiment's VTAB-1k tasks: {task: its vtab_task} (the vtab table)",
                                            optional=True)


# The jobs whose --settings are typed, by command.
COMMANDS: dict[str, type] = {"prepare": Prepare, "pretrain": Pretrain, "fetch": Fetch, "plasticity": Plasticity,
                             "finetune": Finetune, "probe": Probe, "criteria": Criteria, "trajectory": Trajectory,
                             "aggregate": Aggregate}


@cache
def _schema() -> dict:
    # Read by every command's --help text, so by every job: libyaml's safe parser where PyYAML has it.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SCHEMA.read_text(), Loader=loader)  # noqa: S506


def node(path: str) -> dict:
    """The schema node of a dotted config path (``*``: any entry of a mapping); KeyError if there is none."""
    found = _schema()
    for part in path.split("."):
        found = found["additionalProperties"] if part == "*" else found["properties"][part]
    return found


def source(cls: type, field: dataclasses.Field) -> str:
    """The config key (schema path) a field comes from, or the description of a key the workflow adds."""
    return field.metadata.get("from", f"{getattr(cls, 'SECTION', '')}.{field.name}")


@cache
def fields(command: str) -> dict[str, tuple[dict, bool]]:
    """{key: (schema node, required)} of a command's settings; a key the workflow adds gets a node of its
    description. Required: neither optional (None) nor given a default by the schema."""
    cls = COMMANDS[command]
    out = {}
    for field in dataclasses.fields(cls):
        path = source(cls, field)
        found = {"description": path} if " " in path else node(path)
        out[field.name] = (found, field.default is dataclasses.MISSING and "default" not in found)
    return out


def _type(found: dict) -> str:
    if "enum" in found:
        return " | ".join(map(str, found["enum"]))
    kind = found.get("type", "any")
    return " or ".join(kind) if isinstance(kind, list) else kind


def _line(name: str, found: dict, required: bool) -> str:
    default = "required" if required else f"default {found['default']!r}" if "default" in found else "optional"
    kind = "" if found.get("description") and "type" not in found and "enum" not in found else f"{_type(found)}, "
    return f"  {name} ({kind}{default}): {' '.join(str(found.get('description', '')).split())}"


def help_text(command: str) -> str:
    """The settings keys of `command`, one a line, with type, default and description ("" if untyped)."""
    if command not in COMMANDS:
        return ""
    lines = [f"--settings keys (JSON object; the workflow builds it from the study config, schema {SCHEMA.name}):"]
    for name, (found, required) in fields(command).items():
        lines.append(_line(name, found, required))
        if found.get("type") == "object" and "properties" in found:
            inner = set(found.get("required", ()))
            for sub, sub_node in found["properties"].items():
                lines.append("  " + _line(f"{name}.{sub}", sub_node, sub in inner))
    return "\n".join(lines)


def build(command: str, values: dict):
    """The typed settings of `command` from its --settings object: the schema's defaults filled in, at every
    depth of a mapping-valued key such as a task's data (`fill_defaults`); `values` itself unchanged.

    Raises UserError (one line) for an unknown key or a required one missing. Values are not checked
    again: the workflow validated them against the schema.
    """
    known = fields(command)
    where = f"--settings of `vitplasticity {command}`"
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(known)}")
    filled = dict(values)
    for name, (found, required) in known.items():
        if name not in filled and "default" in found:
            filled[name] = copy.deepcopy(found["default"])
        if isinstance(filled.get(name), dict):
            filled[name] = fill_defaults(copy.deepcopy(filled[name]), found)
        if required and name not in filled:
            about = " ".join(str(found.get("description", "")).split()).rstrip(".")
            raise UserError(f"{where} lacks '{name}' ({about}); add it (see vitplasticity {command} --help)")
    return COMMANDS[command](**filled)


_ABSENT = object()
# The entry of a config mapping that a job's settings read, named by the job: models.<model>, ...
_ENTRY_OF = {"models": "model", "tasks": "task", "experiments": "experiment", "arms": "arm", "controls": "arm"}


def for_job(command: str, config: dict, names: dict, **given) -> dict:
    """The --settings object of one job of `command`, from the validated study `config` (defaults filled).

    A field of the job's dataclass takes its value from `given`, else from the job's `names` (model, task,
    arm, experiment), else from the config key it names, ``*`` read as the entry the names give
    (models.* → names["model"], tasks.* → names["task"], experiments.* → names["experiment"], arms.* and
    controls.* → names["arm"]). A value given as None, or a key the config lacks, is left out.
    """
    cls = COMMANDS[command]
    out = {}
    for field in dataclasses.fields(cls):
        if field.name in given or field.name in names:
            value = given[field.name] if field.name in given else names[field.name]
            if value is not None:
                out[field.name] = value
            continue
        value, path = config, source(cls, field)
        if " " in path:
            raise ValueError(f"{command} settings: {field.name} is the workflow's to give")
        parts = path.split(".")
        for mapping, part in zip(["", *parts], parts, strict=False):
            value = value.get(names[_ENTRY_OF[mapping]] if part == "*" else part, _ABSENT)
            if value is _ABSENT:
                break
        else:
            out[field.name] = value
    return out


def params(settings) -> dict:
    """A job's settings as a JSON object, defaults filled, keys sorted as in the workflow's JSON, None values
    left out: what its config.yaml and its record hold."""
    return {name: value for name, value in sorted(dataclasses.asdict(settings).items()) if value is not None}


def fill_defaults(config: dict, schema: dict | None = None) -> dict:
    """Fill in every default `schema` (default: the package's) declares, in place, and return `config`: a
    mapping's missing key gets its ``default`` (a copy), then each mapping value is filled by its own schema node
    (``properties`` or, for the entries of a mapping such as ``tasks``, ``additionalProperties``). Values are not
    checked (`config.validate_schema` checks them); a value that is not a mapping is left as it is."""

    def fill(value: object, found: dict) -> None:
        if not isinstance(value, dict):
            return
        properties = found.get("properties", {})
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            sub = properties.get(key, found.get("additionalProperties"))
            if isinstance(sub, dict):
                fill(item, sub)

    fill(config, _schema() if schema is None else schema)
    return config
