"""Which parameters each arm trains (study-spec §2) and how block components are applied."""

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import tiny_vit

from vitplasticity import components
from vitplasticity.errors import UserError

DEPTH = 2
HEAD = ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def _per_block(depth: int, suffixes: list[str]) -> list[str]:
    return [f"blocks.{i}.{s}" for i in range(depth) for s in suffixes]


# study-spec §2, spelled out by hand for a pre-norm timm ViT (no LayerScale).
SUFFIXES = {
    "ln1": ["norm1.weight", "norm1.bias"],
    "mha": ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"],
    "ln2": ["norm2.weight", "norm2.bias"],
    "fc1": ["mlp.fc1.weight", "mlp.fc1.bias"],
    "fc2": ["mlp.fc2.weight", "mlp.fc2.bias"],
}
EMB = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]


def _expected(arm: list[str], depth: int) -> set[str]:
    names = set(HEAD)
    for component in arm:
        names |= set(EMB) if component == "emb" else set(_per_block(depth, SUFFIXES[component]))
    return names


ARMS = {
    "emb": ["emb"], "ln1": ["ln1"], "mha": ["mha"], "ln2": ["ln2"], "fc1": ["fc1"], "fc2": ["fc2"],
    "smooth": ["ln1", "ln2"], "non_smooth": ["mha", "fc1", "fc2"], "mha_fc1": ["mha", "fc1"],
    "all": ["emb", "ln1", "mha", "ln2", "fc1", "fc2"],
}
# Parameter names per arm on the tiny model: head (4) + per block (x2 blocks).
TINY_COUNTS = {"emb": 8, "ln1": 8, "mha": 12, "ln2": 8, "fc1": 8, "fc2": 8, "smooth": 12, "non_smooth": 20,
               "mha_fc1": 16, "all": 32}


@pytest.fixture(scope="module")
def vit_b():
    """ViT-B/16 shaped, on the meta device: names and shapes without allocating or initialising weights."""
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_tiny_arm_trains_exactly_its_components(arm):
    model = tiny_vit()
    names = components.set_trainable(model, ARMS[arm])
    assert set(names) == _expected(ARMS[arm], DEPTH)
    assert len(names) == TINY_COUNTS[arm]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)


@pytest.mark.parametrize("arm", ["mha", "ln1", "fc2", "smooth", "non_smooth", "mha_fc1", "emb"])
def test_vit_b_arm_trains_exactly_its_components(vit_b, arm):
    names = components.set_trainable(vit_b, ARMS[arm])
    assert set(names) == _expected(ARMS[arm], 12)
    per_block = sum(len(SUFFIXES[c]) for c in ARMS[arm] if c != "emb")
    assert len(names) == 4 + 12 * per_block + (4 if arm == "emb" else 0)


def test_vit_b_mha_arm_is_12_blocks_of_qkv_and_proj_plus_head(vit_b):
    names = components.set_trainable(vit_b, ["mha"])
    assert len(names) == 12 * 4 + 4 == 52
    assert "blocks.11.attn.qkv.weight" in names and "blocks.11.attn.proj.bias" in names
    assert "blocks.0.norm1.weight" not in names
    assert names[-4:] == HEAD


def test_vit_b_mha_fc1_arm_trains_attention_and_the_first_mlp_layer_of_every_block(vit_b):
    """The authors' later MHA + FC1 arm: 12 blocks × (qkv, proj, fc1: weight and bias) + head = 76 tensors;
    12 × (4d² + 4d + 4d² + 4d) = 56,696,832 parameters at d = 768, plus the final norm (2d) and the head
    (1,000 classes: 769,000)."""
    names = components.set_trainable(vit_b, ["mha", "fc1"])
    assert len(names) == 12 * 6 + 4 == 76
    assert {"blocks.0.attn.qkv.weight", "blocks.11.mlp.fc1.bias"} <= set(names)
    assert not any(".mlp.fc2." in name or ".norm1." in name or ".norm2." in name for name in names)
    trained = sum(p.numel() for n, p in vit_b.named_parameters() if n in names)
    assert trained == 12 * (8 * 768**2 + 8 * 768) + (768 * 1000 + 1000) + 2 * 768


def test_set_trainable_freezes_everything_else():
    model = tiny_vit()
    for p in model.parameters():
        p.requires_grad_(True)
    components.set_trainable(model, ["ln2"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "blocks.0.attn.qkv.weight" in frozen and "cls_token" in frozen and "blocks.1.norm1.bias" in frozen
    assert len(frozen) == 32 - 8
    # Switching arms re-freezes what the previous arm trained.
    components.set_trainable(model, ["fc1"])
    assert not model.blocks[0].norm2.weight.requires_grad
    assert model.blocks[0].mlp.fc1.weight.requires_grad


def test_head_and_final_norm_always_trainable_even_for_empty_arm():
    model = tiny_vit()
    assert set(components.set_trainable(model, [])) == set(HEAD)


def test_parameter_counts_per_component_by_hand():
    # d = 32, 16 patches + cls, 2 blocks, MLP 128 wide, 5 classes.
    counts = components.count_by_component(tiny_vit())
    assert counts == {
        "emb": 32 * 3 * 8 * 8 + 32 + 32 + 17 * 32,
        "ln1": 2 * 64,
        "mha": 2 * (32 * 96 + 96 + 32 * 32 + 32),
        "ln2": 2 * 64,
        "fc1": 2 * (128 * 32 + 128),
        "fc2": 2 * (32 * 128 + 32),
        "head": 64 + 32 * 5 + 5,
    }
    assert sum(counts.values()) == sum(p.numel() for p in tiny_vit().parameters())


def test_layerscale_goes_with_its_sublayer():
    model = tiny_vit(init_values=1e-5)
    assert components.component_of("blocks.0.ls1.gamma") == "mha"
    assert components.component_of("blocks.1.ls2.gamma") == "fc2"
    mha = components.set_trainable(model, ["mha"])
    assert {"blocks.0.ls1.gamma", "blocks.1.ls1.gamma"} <= set(mha)
    assert not any("ls2" in n for n in mha)
    fc2 = components.set_trainable(model, ["fc2"])
    assert {"blocks.0.ls2.gamma", "blocks.1.ls2.gamma"} <= set(fc2)
    assert len(fc2) == 4 + 2 * 3


def test_avg_pool_without_class_token_uses_fc_norm_as_head():
    model = tiny_vit(class_token=False, global_pool="avg")
    names = [n for n, _ in model.named_parameters()]
    assert "cls_token" not in names and "fc_norm.weight" in names
    assert set(components.set_trainable(model, [])) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert set(components.set_trainable(model, ["emb"])) >= {"pos_embed", "patch_embed.proj.weight"}


def test_register_tokens_belong_to_embedding():
    model = tiny_vit(reg_tokens=2)
    assert components.component_of("reg_token") == "emb"
    assert "reg_token" in components.set_trainable(model, ["emb"])
    assert "reg_token" not in components.set_trainable(model, ["mha"])
    # E has the class token, 2 registers and 16 patches.
    assert components.embed(model, torch.zeros(1, 3, 32, 32)).shape == (1, 19, 32)


def test_unknown_parameter_name_raises_user_error():
    with pytest.raises(UserError, match="'blocks.0.adapter.weight' belongs to no component"):
        components.component_of("blocks.0.adapter.weight")
    model = tiny_vit()
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="extra.weight"):
        components.set_trainable(model, ["mha"])


def test_unknown_arm_component_names_the_allowed_ones():
    with pytest.raises(UserError, match=r"arm: unknown component\(s\) \['attn'\]; allowed: emb, ln1, mha"):
        components.set_trainable(tiny_vit(), ["mha", "attn"])


def test_apply_component_fc2_zero_pads_to_4d():
    block = tiny_vit().blocks[0]
    tokens = torch.randn(3, 17, 32)
    padded = torch.cat([tokens, torch.zeros(3, 17, 96)], dim=-1)
    expected = block.mlp.fc2(padded)
    out = components.apply_component(block, "fc2", tokens)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # Equivalently, only the first d input columns of W act.
    manual = tokens @ block.mlp.fc2.weight[:, :32].T + block.mlp.fc2.bias
    torch.testing.assert_close(out, manual, rtol=1e-5, atol=1e-6)


def test_apply_component_includes_layerscale():
    block = tiny_vit(init_values=1e-5).blocks[0]
    tokens = torch.randn(2, 17, 32)
    padded = torch.cat([tokens, torch.zeros(2, 17, 96)], dim=-1)
    torch.testing.assert_close(components.apply_component(block, "fc2", tokens), 1e-5 * block.mlp.fc2(padded))
    torch.testing.assert_close(components.apply_component(block, "mha", tokens), 1e-5 * block.attn(tokens))


def test_apply_component_ln_and_fc1_match_torch():
    block = tiny_vit().blocks[1]
    with torch.no_grad():
        block.norm1.weight.uniform_(0.5, 2.0)
        block.norm2.bias.uniform_(-1, 1)
    tokens = torch.randn(2, 17, 32)
    ln1 = F.layer_norm(tokens, (32,), block.norm1.weight, block.norm1.bias, eps=1e-6)
    torch.testing.assert_close(components.apply_component(block, "ln1", tokens), ln1)
    ln2 = F.layer_norm(tokens, (32,), block.norm2.weight, block.norm2.bias, eps=1e-6)
    torch.testing.assert_close(components.apply_component(block, "ln2", tokens), ln2)
    fc1 = tokens @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
    torch.testing.assert_close(components.apply_component(block, "fc1", tokens), fc1)


def test_apply_component_rejects_non_block_component():
    with pytest.raises(UserError, match="'head' is not a block component"):
        components.apply_component(tiny_vit().blocks[0], "head", torch.zeros(1, 17, 32))


def test_embed_is_patches_plus_class_token_plus_positions():
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    patches = model.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (2, 16, 32)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1) + model.pos_embed
    torch.testing.assert_close(components.embed(model, images), expected)


def test_hidden_inputs_reproduce_the_block():
    block = tiny_vit(init_values=0.5).blocks[0]
    hidden = torch.randn(2, 17, 32)
    inputs, out = components.hidden_inputs(block, hidden)
    torch.testing.assert_close(out, block(hidden))
    assert inputs["ln1"] is hidden
    torch.testing.assert_close(inputs["mha"], block.norm1(hidden))
    assert inputs["fc2"].shape == (2, 17, 128)


def test_check_vit_rejects_other_models():
    with pytest.raises(UserError, match="not a timm VisionTransformer"):
        components.check_vit(torch.nn.Linear(2, 2))
    assert components.check_vit(tiny_vit()) is not None


def test_describe_counts_emb_and_head_of_the_model_as_trained():
    """d = 32, 8 px patches on 32 px images (16 patches), 3 classes: emb = patch conv 3·8·8·32 + 32, class
    token 32, position embedding 17·32 = 6,752; head = final LayerNorm 2·32 + linear 32·3 + 3 = 163."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2)
    words = components.describe(model)
    assert words["emb"].endswith(": 6,752 parameters")
    assert words["head"] == ("the class token's final state (the token itself is a parameter of emb), final "
                             "LayerNorm `norm`, linear classifier `head`: 163 parameters")
    assert words["layer_scale"] == ""
    scaled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                               embed_dim=32, depth=1, num_heads=2, init_values=1e-5)
    assert components.describe(scaled)["layer_scale"].startswith(
        "LayerScale in every block: `ls1` scales MHA's output and belongs to MHA, `ls2` scales FC2's and belongs to "
        "FC2 (64 parameters a block)")
