"""Fetching pretrained weights: from a hub cache the test builds, and the offline error."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitplasticity.models import load_checkpoint

NAME, TAG = "vit_tiny_patch16_224", "augreg_in21k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run_fetch(tmp_path, cache, out):
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    settings = {"model": "vit", "source": "timm", "timm_name": NAME, "pretrained_tag": TAG, "revision": "main",
                "img_size": 224}
    return subprocess.run([sys.executable, "-m", "vitplasticity.cli", "fetch", "--settings", json.dumps(settings),
                           "--out", str(out)], env=env, capture_output=True, text=True, cwd=tmp_path)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache laid out as huggingface_hub writes it, holding known weights."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--timm--{NAME}.{TAG}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    torch.manual_seed(0)
    model = timm.create_model(NAME, num_classes=21843)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(snapshot / "model.safetensors"))
    return cache, state


def test_fetch_from_cache_writes_checkpoint_that_loads(tmp_path, hub_cache):
    cache, state = hub_cache
    out = tmp_path / "vit.safetensors"
    result = _run_fetch(tmp_path, cache, out)
    assert result.returncode == 0, result.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["provenance"]["hub_id"] == f"timm/{NAME}.{TAG}"
    assert len(sidecar["sha256"]) == 64
    model, _ = load_checkpoint(out, num_classes=7)
    assert torch.equal(model.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert model.head.out_features == 7


def test_fetch_without_network_or_cache_is_one_clear_line(tmp_path):
    out = tmp_path / "vit.safetensors"
    result = _run_fetch(tmp_path, tmp_path / "empty-cache", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{NAME}.{TAG}" in lines[0] and "hf download" in lines[0]
    assert not out.exists()
