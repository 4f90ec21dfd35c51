"""Parameter-matched control arms: the entries that train, and only those, for masks and LoRA."""

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_vit

from vitplasticity import components, controls
from vitplasticity.errors import UserError

D = 32  # tiny_vit's width, 2 blocks


def _sgd_steps(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


def _changed(before, model, prefix):
    return {name: int((p.detach() != before[name]).sum()) for name, p in model.named_parameters()
            if name.startswith(prefix) and name in before}


def test_mask_trains_exactly_the_matched_count_of_entries_per_block():
    model = tiny_vit()
    components.set_trainable(model, ["mha"])
    assert controls.mask_to_count(model, "mha", "ln1") == 2 * 2 * D  # LN1 holds 2d entries per block
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _sgd_steps(model)
    for layer in (0, 1):
        changed = _changed(before, model, f"blocks.{layer}.attn.")
        assert sum(changed.values()) == 2 * D, changed
    assert _changed(before, model, "blocks.0.mlp.")["blocks.0.mlp.fc1.weight"] == 0


def test_mask_is_the_same_subset_for_every_training_seed():
    def trained_positions(seed):
        torch.manual_seed(seed)
        model = tiny_vit()
        components.set_trainable(model, ["fc1"])
        controls.mask_to_count(model, "fc1", "ln2", mask_seed=0)
        before = model.blocks[0].mlp.fc1.weight.detach().clone()
        _sgd_steps(model)
        return (model.blocks[0].mlp.fc1.weight.detach() != before).nonzero().tolist()

    assert trained_positions(0) == trained_positions(1)


def test_mask_refuses_a_budget_larger_than_the_component():
    model = tiny_vit()
    components.set_trainable(model, ["ln1"])
    with pytest.raises(UserError, match="cannot restrict ln1 to mha's count in block 0: mha has 4224 entries, "
                                        "ln1 only 64; match a smaller component"):
        controls.mask_to_count(model, "ln1", "mha")


def test_lora_trains_only_its_factors_and_starts_as_the_base_model():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    reference = model(images).detach()
    components.set_trainable(model, ["mha"])
    rank = 4
    # qkv: r (d + 3d); proj: r (d + d); two blocks.
    assert controls.add_lora(model, "mha", rank) == 2 * (rank * 4 * D + rank * 2 * D)
    assert torch.allclose(model(images), reference, atol=1e-6)  # B = 0 at the start
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.attn.{layer}.lora_{f}" for i in (0, 1) for layer in ("qkv", "proj")
                         for f in "ab"} | {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    assert {components.component_of(n) for n in trainable} == {"mha", "head"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _sgd_steps(model)
    assert _changed(before, model, "blocks.0.attn.qkv.base.")["blocks.0.attn.qkv.base.weight"] == 0
    assert not torch.allclose(model(images), reference, atol=1e-4)


def test_lora_on_a_layernorm_is_one_line():
    with pytest.raises(UserError, match="LoRA applies to mha, fc1, fc2, not 'ln1'"):
        controls.add_lora(tiny_vit(), "ln1", 2)


def test_a_finetuning_job_counts_what_its_control_trains():
    from vitplasticity.jobs import _apply_control

    head = 2 * D + 5 * D + 5  # final norm (γ, β) and the 5-class linear head
    masked = tiny_vit()
    components.set_trainable(masked, ["mha"])
    assert _apply_control(masked, {"component": "mha", "match": "ln1", "mask_seed": 0}, 0.0) == (
        2 * 2 * D + head)  # LN1's 2d entries in each of the 2 blocks
    lora = tiny_vit()
    components.set_trainable(lora, ["mha"])
    assert _apply_control(lora, {"component": "mha", "lora_rank": 1}, 0.05) == 2 * (4 * D + 2 * D) + head
    plain = tiny_vit()
    components.set_trainable(plain, ["ln2"])
    assert _apply_control(plain, None, 0.05) == 2 * 2 * D + head
    with pytest.raises(UserError, match="^control of mha: a gradient mask keeps entries frozen only with "
                                        "weight_decay 0, got 0.05; set finetune.weight_decay to 0 or use lora_rank$"):
        _apply_control(tiny_vit(), {"component": "mha", "match": "ln1", "mask_seed": 0}, 0.05)


def test_lora_factors_live_on_the_device_of_the_layer_they_wrap():
    """A LoRA update is made on its base layer's device (here PyTorch's meta device, which allocates
    nothing), not on the default device: a model already moved to a GPU gets its factors there."""
    layer = controls.LoRALinear(torch.nn.Linear(6, 4, device="meta"), rank=2)
    assert (layer.lora_a.device.type, layer.lora_b.device.type) == ("meta", "meta")
    assert (tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)) == ((2, 6), (4, 2))
