"""What each command's ``--settings`` JSON holds, read from the study-config schema.

The workflow builds a job's settings from sections of the study config plus the keys that
name the job (model, task, arm...). `KEYS` says, per command, where each key comes from:
a dotted schema path (``*`` = any entry of a mapping; an empty key merges the properties
of that section), or, for a key the workflow adds, its description. `help_text` documents
every key with its type and default; `check` fills the schema's defaults and refuses an
unknown key in one line, before any work (values are checked by the command itself);
`missing` turns the KeyError of a key a command reads but was not given into one line.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml

from vitplasticity.errors import UserError

# The study config's JSON schema, shipped with the package: the workflow validates against it, jobs read it.
SCHEMA = Path(__file__).resolve().parent / "data" / "config.schema.yaml"

_MODEL = "the model's name (a key of models)"
_TASK = "the task's name (a key of tasks)"
KEYS: dict[str, dict[str, str]] = {
    "prepare": {"name": _TASK, "data": "tasks.*.data"},
    "pretrain": {"model": _MODEL, "": "models.*.pretrain", "timm_name": "models.*.timm_name",
                 "kwargs": "models.*.kwargs", "img_size": "models.*.img_size", "clip_norm": "finetune.clip_norm"},
    "fetch": {"model": _MODEL, "": "models.*"},
    "plasticity": {"model": _MODEL, "task": _TASK, "": "plasticity"},
    "finetune": {"model": _MODEL, "task": _TASK, "arm": "the arm's name (a key of arms)",
                 "components": "arms.*", "control": "controls.*",
                 "selection": "a budget arm's {selector, budget[, draw]} (vitplasticity.budget.arms, from selection)",
                 "lr": "the learning rate (one of the task's lrs, times lr_scale)",
                 "seed": "the replicate seed (one of finetune.seeds)", "optimizer": "experiments.*.optimizer",
                 "steps": "tasks.*.steps", "eval_every": "tasks.*.eval_every", "": "finetune"},
    "probe": {"model": _MODEL, "task": _TASK, "": "probe"},
    "criteria": {"model": _MODEL, "task": _TASK, "": "criteria"},
    "trajectory": {"model": _MODEL, "tasks": "the tasks measured: those of the experiments that use the model",
                   "keep_steps": "models.*.pretrain.keep_steps", "n_pairs": "plasticity.n_pairs"},
    "aggregate": {"experiment": "the experiment's name (a key of experiments)", "": "experiments.*",
                  "arms": "the experiment's arms: {arm name: its components} (from arms)",
                  "arm_order": "the experiment's arm names in the config's order (its tables' column order)",
                  "vtab_tasks": "the experiment's VTAB-1k tasks: {task: its vtab_task} (the vtab table)"},
}
# Config keys the workflow keeps out of a job's settings: one job = one seed; the trajectory's steps are
# no pretraining setting (the run keeps the weights of every evaluation), so changing them reruns only the
# trajectory.
_DROPPED = {"finetune": ("seeds",), "pretrain": ("keep_steps",)}
# Keys only some jobs get (a control arm's or a budget arm's finetuning runs; the aggregation of an experiment
# with VTAB-1k tasks).
_OPTIONAL = {"finetune": ("control", "selection"), "aggregate": ("vtab_tasks",)}


@cache
def _schema() -> dict:
    # Read by every command's --help text, so by every job: libyaml's safe parser where PyYAML has it.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SCHEMA.read_text(), Loader=loader)  # noqa: S506


def _node(path: str) -> dict:
    node = _schema()
    for part in path.split("."):
        node = node["additionalProperties"] if part == "*" else node["properties"][part]
    return node


def _is_path(source: str) -> bool:
    return " " not in source


def fields(command: str) -> dict[str, tuple[dict, bool]]:
    """{key: (schema node, required)} of a command's settings; a job key gets a node of its description."""
    out: dict[str, tuple[dict, bool]] = {}
    for key, source in KEYS[command].items():
        if not _is_path(source):
            out[key] = ({"description": source}, key not in _OPTIONAL.get(command, ()))
        elif key:
            node = _node(source)
            out[key] = (node, "default" not in node and key not in _OPTIONAL.get(command, ()))
        else:
            section = _node(source)
            required = set(section.get("required", ()))
            for name, node in section.get("properties", {}).items():
                if name not in _DROPPED.get(command, ()):
                    out[name] = (node, name in required and "default" not in node)
    return out


def _type(node: dict) -> str:
    if "enum" in node:
        return " | ".join(map(str, node["enum"]))
    kind = node.get("type", "any")
    return " or ".join(kind) if isinstance(kind, list) else kind


def _line(key: str, node: dict, required: bool) -> str:
    default = "required" if required else f"default {node['default']!r}" if "default" in node else "optional"
    kind = "" if node.get("description") and "type" not in node and "enum" not in node else f"{_type(node)}, "
    return f"  {key} ({kind}{default}): {' '.join(str(node.get('description', '')).split())}"


def help_text(command: str) -> str:
    """The settings keys of `command`, one a line, with type, default and description."""
    if command not in KEYS:
        return ""
    lines = [f"--settings keys (JSON object; the workflow builds it from the study config, schema {SCHEMA.name}):"]
    for key, (node, required) in fields(command).items():
        lines.append(_line(key, node, required))
        if node.get("type") == "object" and "properties" in node:
            required = set(node.get("required", ()))
            for name, sub in node["properties"].items():
                lines.append("  " + _line(f"{key}.{name}", sub, name in required))
    return "\n".join(lines)


def check(command: str, settings: dict) -> dict:
    """`settings` with the schema's defaults filled in; one-line `UserError` for an unknown key
    (a missing one is named by `missing` when the command reads it)."""
    if command not in KEYS:
        return settings
    known = fields(command)
    where = f"--settings of `vitplasticity {command}`"
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(known)}")
    filled = dict(settings)
    for key, (node, _) in known.items():
        if key not in filled and "default" in node:
            filled[key] = node["default"]
        if isinstance(filled.get(key), dict) and "properties" in node:
            defaults = {k: sub["default"] for k, sub in node["properties"].items() if "default" in sub}
            filled[key] = defaults | filled[key]
    return filled


def missing(command: str, settings: dict, error: KeyError) -> UserError | None:
    """The one-line error for a settings key `command` read but was not given; None if `error` is another."""
    key = error.args[0] if error.args else None
    if command not in KEYS or key in settings or key not in fields(command):
        return None
    node, _ = fields(command)[key]
    about = " ".join(str(node.get("description", "")).split()).rstrip(".")
    return UserError(f"--settings of `vitplasticity {command}` lacks '{key}' ({about}); "
                     f"add it (see vitplasticity {command} --help)")
