"""Model construction and checkpoint files (safetensors + a JSON sidecar).

A checkpoint is ``{name}.safetensors`` (the backbone's state dict, classifier included
as pretrained) and ``{name}.json``: architecture (timm name and keyword arguments),
normalisation, sha256 of the weights, and provenance (hub id and revision, or the
pretraining run's source accuracy).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitplasticity.components import check_vit
from vitplasticity.errors import UserError
from vitplasticity.fileio import atomic_path, read_json, sha256_file, write_json


def architecture(timm_name: str, kwargs: dict, img_size: int) -> dict:
    """The architecture record {timm_name, kwargs} of a model run on `img_size`-pixel images.

    The size is passed to timm (it replaces any kwargs.img_size), so the model is built for the
    images it is given; timm resamples a pretrained position embedding to it on loading.
    """
    return {"timm_name": timm_name, "kwargs": {**kwargs, "img_size": img_size}}


def build(arch: dict, num_classes: int) -> torch.nn.Module:
    """A timm ViT from an architecture record {timm_name, kwargs} with a fresh head."""
    try:
        model = timm.create_model(arch["timm_name"], pretrained=False, num_classes=num_classes,
                                  drop_rate=0.0, drop_path_rate=0.0, **arch.get("kwargs", {}))
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:  # timm asserts shapes
        raise UserError(
            f"cannot build timm model '{arch['timm_name']}' ({exc}); check the model's timm_name and kwargs"
        ) from exc
    return check_vit(model)


def sidecar_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(weights: str | Path, model: torch.nn.Module, record: dict) -> dict:
    """Write weights then the sidecar (with their sha256), each atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    record = dict(record, sha256=sha256_file(weights), num_params=sum(v.numel() for v in state.values()))
    write_json(sidecar_path(weights), record)
    return record


def _record_problem(record: object) -> str | None:
    """What a sidecar lacks to describe a checkpoint, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    absent = [key for key in ("arch", "img_size", "mean", "std", "sha256") if key not in record]
    if not absent and not (isinstance(record["arch"], dict) and "timm_name" in record["arch"]):
        absent = ["arch.timm_name"]
    return f"lacks {', '.join(absent)}" if absent else None


def load_checkpoint(weights: str | Path, num_classes: int, verify: bool = True) -> tuple[torch.nn.Module, dict]:
    """Build the checkpoint's architecture with a new `num_classes` head and load the backbone."""
    weights = Path(weights)
    if not weights.exists() or not sidecar_path(weights).exists():
        raise UserError(f"checkpoint {weights} (or its .json sidecar) is missing; run its fetch/pretrain rule")
    try:
        record = read_json(sidecar_path(weights))
        problem = _record_problem(record)
    except ValueError as exc:
        problem = f"not valid JSON: {exc}"
    if problem:
        raise UserError(
            f"checkpoint sidecar {sidecar_path(weights)} is not a checkpoint record ({problem}); "
            f"delete {weights} and its sidecar and fetch/pretrain it again"
        )
    if verify and sha256_file(weights) != record.get("sha256"):
        raise UserError(
            f"checkpoint {weights} does not match the sha256 in its sidecar; delete both files and fetch it again"
        )
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"checkpoint {weights} is not a readable safetensors file ({exc}); delete it and fetch it again"
        ) from exc
    arch = architecture(record["arch"]["timm_name"], record["arch"].get("kwargs", {}), record["img_size"])
    model = build(arch, num_classes)
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = model.state_dict()
    wrong = [(k, list(v.shape), list(expected[k].shape)) for k, v in backbone.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        name, have, want = wrong[0]
        raise UserError(
            f"checkpoint {weights} does not fit the architecture in its sidecar ({arch['timm_name']} "
            f"{dict(sorted(arch['kwargs'].items()))}): {len(wrong)} tensor(s) of the wrong shape, e.g. {name} is "
            f"{have} in the file but {want} in the model; delete both files and fetch or pretrain it again"
        )
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {weights} does not fit architecture {record['arch']['timm_name']} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); fetch it again"
        )
    return model, record
