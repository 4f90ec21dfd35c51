"""Fetch pretrained timm weights from the Hugging Face hub into a checkpoint file.

The weights are downloaded (or taken from the local hub cache) at a pinned revision,
loaded through timm (which applies its checkpoint conversions) and saved as
safetensors with a sidecar recording hub id, revision and sha256.
"""

from __future__ import annotations

from pathlib import Path

import timm
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from vitplasticity import models
from vitplasticity.components import check_vit
from vitplasticity.errors import UserError
from vitplasticity.transforms import IMAGENET_MEAN, IMAGENET_STD


def hub_id(timm_name: str, tag: str) -> str:
    """The hub repository timm publishes `name.tag` under."""
    return f"timm/{timm_name}.{tag}"


def fetch_pretrained(settings: dict, weights: Path) -> dict:
    """Download `settings` (timm_name, pretrained_tag, revision) and write the checkpoint."""
    name, tag = settings["timm_name"], settings["pretrained_tag"]
    repo, revision = hub_id(name, tag), settings.get("revision", "main")
    try:
        local = hf_hub_download(repo, "model.safetensors", revision=revision)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise UserError(
            f"cannot get weights of {name}.{tag} from {repo}@{revision} (no network and no cached copy: "
            f"{type(exc).__name__}); on a machine with network run `hf download {repo} model.safetensors "
            f"--revision {revision}` and copy the hub cache (HF_HOME) here"
        ) from exc
    arch = models.architecture(name, settings.get("kwargs", {}), settings["img_size"])
    try:
        model = timm.create_model(f"{name}.{tag}", pretrained=True, pretrained_cfg_overlay={"file": local},
                                  **arch["kwargs"])
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:  # timm asserts shapes
        raise UserError(
            f"cannot build timm model {name}.{tag} with {arch['kwargs']} from its pretrained weights ({exc}); "
            "check the model's img_size and kwargs"
        ) from exc
    check_vit(model)
    record = {
        # The study normalises with ImageNet mean/std for every checkpoint (study-spec §3, §5).
        "arch": arch, "img_size": settings["img_size"], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "provenance": {"kind": "hub", "hub_id": repo, "revision": revision, "timm_tag": tag,
                       "pretrained_num_classes": model.num_classes},
    }
    return models.save_checkpoint(weights, model, record)
