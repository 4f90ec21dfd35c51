"""Pretrained timm weights from the Hugging Face hub: the local cache first, then a download.

The weights are taken at a pinned revision; `models.open_pretrained` loads them (timm's
checkpoint conversions included) and the `fetch` job saves them as a checkpoint whose sidecar
records hub id, revision and sha256.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from vitplasticity.errors import UserError


def hub_id(timm_name: str, tag: str) -> str:
    """The hub repository timm publishes `name.tag` under."""
    return f"timm/{timm_name}.{tag}"


def cached_weights(timm_name: str, tag: str | None, revision: str = "main") -> tuple[Path, dict]:
    """The local file of `timm_name.tag`'s weights (hub cache, else a download) and its provenance."""
    if not tag:
        raise UserError(f"timm model {timm_name} needs a pretrained tag (e.g. {timm_name}.augreg_in21k); "
                        f"list them with timm.list_pretrained('{timm_name}*')")
    repo = hub_id(timm_name, tag)
    try:
        local = hf_hub_download(repo, "model.safetensors", revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        try:
            local = hf_hub_download(repo, "model.safetensors", revision=revision)
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
            raise UserError(
                f"cannot get weights of {timm_name}.{tag} from {repo}@{revision} (no network and no cached copy: "
                f"{type(exc).__name__}); on a machine with network run `hf download {repo} model.safetensors "
                f"--revision {revision}` and copy the hub cache (HF_HOME) here"
            ) from exc
    return Path(local), {"kind": "hub", "hub_id": repo, "revision": revision, "timm_tag": tag}
