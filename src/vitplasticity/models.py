"""Model construction, model sources, and checkpoint files (safetensors + a JSON sidecar).

A checkpoint is ``{name}.safetensors`` (the backbone's state dict, classifier included
as pretrained) and ``{name}.json``: architecture (timm name, keyword arguments, head),
normalisation, sha256 of the weights, and provenance (hub id and revision, the user's
weights file and its sha256, or the pretraining run's source accuracy). Every sidecar is
written by this module; nobody writes one by hand.

Model sources (`open_pretrained`): ``timm`` (a hub name and tag, taken from the local hub
cache or downloaded), ``local`` (a ``.safetensors`` file or a timm/PyTorch checkpoint plus
its timm architecture), and ``pretrain`` (trained by the workflow, `vitplasticity.jobs`).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitplasticity.components import check_vit, count_by_component, has_attention_pool, use_linear_head
from vitplasticity.errors import UserError
from vitplasticity.fileio import atomic_path, read_json, sha256_file, write_json


def architecture(timm_name: str, kwargs: dict, img_size: int) -> dict:
    """The architecture record {timm_name, kwargs} of a model run on `img_size`-pixel images.

    The size is passed to timm (it replaces any kwargs.img_size), so the model is built for the
    images it is given; timm resamples a pretrained position embedding to it on loading.
    """
    return {"timm_name": timm_name, "kwargs": {**kwargs, "img_size": img_size}}


HEADS = ("native", "linear")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def build(arch: dict, num_classes: int) -> torch.nn.Module:
    """A timm ViT from an architecture record {timm_name, kwargs, head} with a fresh head.

    ``head: linear`` replaces an attention-pool (MAP) head by mean pooling and a linear
    classifier (`components.use_linear_head`); ``native`` (the default) keeps timm's head.
    """
    try:
        model = timm.create_model(arch["timm_name"], pretrained=False, num_classes=num_classes,
                                  drop_rate=0.0, drop_path_rate=0.0, **arch.get("kwargs", {}))
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:  # timm asserts shapes
        raise UserError(
            f"cannot build timm model '{arch['timm_name']}' ({exc}); check the model's timm_name and kwargs"
        ) from exc
    model = check_vit(model, arch["timm_name"])
    if arch.get("head", "native") == "linear":
        use_linear_head(model)
    return model


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


def _load_backbone(model: torch.nn.Module, state: dict, where: str, fix: str) -> None:
    """Load every non-classifier tensor of `state` into `model`; one line naming the first misfit."""
    drop = ("head.", "attn_pool.") if getattr(model, "attn_pool", None) is None else ("head.",)
    backbone = {k: v for k, v in state.items() if not k.startswith(drop)}
    expected = model.state_dict()
    wrong = [(k, list(v.shape), list(expected[k].shape)) for k, v in backbone.items()
             if k in expected and v.shape != expected[k].shape]
    if wrong:
        name, have, want = wrong[0]
        raise UserError(f"{where}: {len(wrong)} tensor(s) of the wrong shape, e.g. {name} is {have} in the file "
                        f"but {want} in the model; {fix}")
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(f"{where}: missing {missing[:3]}, unexpected {unexpected[:3]}; {fix}")


def split_timm_name(name: str) -> tuple[str, str]:
    """'vit_base_patch16_224.augreg_in21k' → (architecture, tag); a bare name gets timm's default tag."""
    arch, tag = name.split(".", 1) if "." in name else (name, "")
    if not timm.is_model(arch):
        raise UserError(f"'{arch}' is not a timm model name; list them with timm.list_models('vit_*')")
    if not tag:
        cfg = timm.models.get_pretrained_cfg(arch)
        tag = getattr(cfg, "tag", None) or ""
    return arch, tag


def normalisation(timm_name: str, tag: str | None) -> tuple[list[float], list[float]]:
    """Mean and std (per RGB channel, on [0, 1] pixels) timm records for `name.tag`; ImageNet's if none."""
    from vitplasticity.transforms import IMAGENET_MEAN, IMAGENET_STD

    cfg = timm.models.get_pretrained_cfg(f"{timm_name}.{tag}" if tag else timm_name)
    if cfg is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return list(cfg.mean), list(cfg.std)


def open_pretrained(source: str, timm_name: str, *, path: str | Path | None = None, pretrained_tag: str | None = None,
                    revision: str = "main", kwargs: dict | None = None, img_size: int | None = None,
                    head: str = "native", mean_std: str = "imagenet") -> tuple[torch.nn.Module, dict]:
    """The pretrained model of a `timm` or `local` source, and its checkpoint record.

    - ``timm``: ``timm_name.pretrained_tag`` from the local hub cache (downloaded at
      `revision` when absent and the hub is reachable);
    - ``local``: `path`, a ``.safetensors`` file or a torch checkpoint (a state dict, or a
      dict holding one under ``state_dict``/``model``), with architecture `timm_name`.

    `img_size` (pixels), when given, builds the model for that input size (`architecture`).
    The model keeps the file's classifier when it has one (``num_classes`` = its rows) and
    is in eval mode. The record's provenance holds the weights file's sha256. `mean_std`:
    ``imagenet`` (the study's protocol, study-spec §3) or ``timm`` (the normalisation timm
    records for the pretrained tag, which is what the model saw in pretraining).
    Errors: `UserError` naming the file or name and the fix.
    """
    from vitplasticity.fileio import sha256_file
    from vitplasticity.transforms import IMAGENET_MEAN, IMAGENET_STD

    kwargs = architecture(timm_name, kwargs or {}, img_size)["kwargs"] if img_size else dict(kwargs or {})
    if head not in HEADS:
        raise UserError(f"head '{head}' unknown; allowed: {', '.join(HEADS)}")
    if source == "timm":
        from vitplasticity.hub import cached_weights

        file, provenance = cached_weights(timm_name, pretrained_tag, revision)
    elif source == "local":
        file = Path(path or "").expanduser()
        if not file.is_file():
            raise UserError(f"weights file {file} does not exist; give the path of a .safetensors or .pth file")
        if not file.name.endswith(WEIGHT_SUFFIXES):
            raise UserError(f"weights file {file} is not one of {', '.join(WEIGHT_SUFFIXES)}; "
                            "save the state dict with safetensors or torch.save")
        provenance = {"kind": "local", "path": str(file)}
    else:
        raise UserError(f"model source '{source}' cannot be opened here; allowed: timm, local")
    try:
        state = timm.models.load_state_dict(str(file), use_ema=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle and zip readers raise unrelated types
        raise UserError(f"cannot read weights {file} ({type(exc).__name__}: {exc}); "
                        "give a .safetensors file or a torch.save'd state dict") from exc
    classes = int(state["head.weight"].shape[0]) if "head.weight" in state else 0
    arch = {"timm_name": timm_name, "kwargs": kwargs}
    model = build(arch, num_classes=classes)
    from timm.models.vision_transformer import checkpoint_filter_fn

    where = f"weights {file} do not fit timm architecture {timm_name} {kwargs}"
    _load_backbone(model, checkpoint_filter_fn(state, model), where,
                   "name the architecture they were trained with (--arch / timm_name) and its kwargs")
    # The linear head differs from the native one only for attention-pool models; the record says
    # `head: linear` only then (absent: native).
    if head == "linear" and has_attention_pool(model):
        provenance = provenance | {"native_head_params": count_by_component(model)["head"]}
        use_linear_head(model)
        arch["head"] = "linear"
    mean, std = ((list(IMAGENET_MEAN), list(IMAGENET_STD)) if mean_std == "imagenet"
                 else normalisation(timm_name, pretrained_tag))
    record = {"arch": arch, "img_size": int(model.patch_embed.img_size[0]), "mean": mean, "std": std,
              "provenance": provenance | {"sha256": sha256_file(file), "pretrained_num_classes": classes}}
    return model.eval(), record


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
    model = build(arch | {"head": record["arch"].get("head", "native")}, num_classes)
    _load_backbone(model, state, f"checkpoint {weights} does not fit the architecture in its sidecar "
                   f"({arch['timm_name']} {dict(sorted(arch['kwargs'].items()))})",
                   "delete both files and fetch or pretrain it again")
    return model, record
