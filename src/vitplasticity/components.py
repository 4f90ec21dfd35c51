"""The single map between component names and a timm VisionTransformer.

Components (study-spec §2): ``emb ln1 mha ln2 fc1 fc2 head``. This module decides which
parameters belong to each (for freezing and counting) and how each block component is
applied to a token matrix (for plasticity). Nothing else spells parameter-name patterns.

Families covered (timm classes `VisionTransformer` and `VisionTransformerDistilled` with
pre-norm `Block`s): the paper's ViTs and AugReg; DeiT (distillation token and head) and
DeiT3 (LayerScale ``ls1``/``ls2``, which go with MHA and FC2); DINOv2 (register tokens,
LayerScale, patch 14); CLIP ViTs, whose ``norm_pre`` LayerNorm is applied to E before
block 0 and so belongs to ``emb`` (it sets the token scale every LayerNorm sees); SigLIP
and other class-token-free models with an attention-pool (MAP) head, ``attn_pool``, which
belongs to ``head`` (`describe` says what ``head`` holds for a given model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, SwiGLU
from timm.models.vision_transformer import Block, VisionTransformer

from vitplasticity.errors import UserError

COMPONENTS = ("emb", "ln1", "mha", "ln2", "fc1", "fc2", "head")
BLOCK_COMPONENTS = ("ln1", "mha", "ln2", "fc1", "fc2")
# Paper labels and theoretical plasticity rank (1 = most plastic), study-spec §1.
LABELS = {
    "emb": "Embedding",
    "ln1": "LN1",
    "mha": "MHA",
    "ln2": "LN2",
    "fc1": "FC1",
    "fc2": "FC2",
    "head": "Head",
}
THEORETICAL_RANK = {"mha": 1, "fc1": 2, "fc2": 3, "ln2": 4, "ln1": 5}
ALWAYS_TRAINED = ("head",)


def arm_label(name: str) -> str:
    """How tables and figures name an arm or component: the paper's label, else the config's name."""
    return LABELS.get(name, name)

# LayerScale and optional in-module norms go with the sub-layer they scale or normalise.
_PATTERNS = (
    ("emb", r"(patch_embed\..*|cls_token|reg_token|dist_token|pos_embed|norm_pre\..*)"),
    ("ln1", r"blocks\.\d+\.norm1\..*"),
    ("mha", r"blocks\.\d+\.(attn\..*|ls1\..*)"),
    ("ln2", r"blocks\.\d+\.norm2\..*"),
    ("fc1", r"blocks\.\d+\.mlp\.(fc1|fc1_g|fc1_x)\..*"),
    ("fc2", r"blocks\.\d+\.(mlp\.fc2\..*|mlp\.norm\..*|ls2\..*)"),
    ("head", r"(norm\..*|fc_norm\..*|head\..*|head_dist\..*|attn_pool\..*)"),
)
_COMPILED = tuple((name, re.compile(pattern)) for name, pattern in _PATTERNS)
# The block MLPs whose FC1 and FC2 are known: plain (fc1 → act → fc2) and gated, with fc1 packing
# value and gate (GluMlp, also timm's SwiGLUPacked as in DINOv2-giant) or split (SwiGLU: fc1_g, fc1_x).
MLPS = (Mlp, GluMlp, SwiGLU)


def component_of(parameter_name: str) -> str:
    """Return the component that owns a parameter of a timm VisionTransformer."""
    for name, pattern in _COMPILED:
        if pattern.fullmatch(parameter_name):
            return name
    raise UserError(
        f"parameter '{parameter_name}' belongs to no component; teach "
        "vitplasticity.components about this ViT variant"
    )


def check_components(names: Iterable[str], where: str) -> list[str]:
    """Validate component names, naming the allowed ones on error."""
    names = list(names)
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise UserError(
            f"{where}: unknown component(s) {unknown}; allowed: {', '.join(COMPONENTS)}"
        )
    return names


def count_by_component(model: torch.nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        counts[component_of(name)] += param.numel()
    return counts


def unit_of(parameter_name: str) -> tuple[str, int | None]:
    """(component, layer) of a parameter; layer None outside the blocks (``emb``, ``head``)."""
    block = re.match(r"blocks\.(\d+)\.", parameter_name)
    return component_of(parameter_name), int(block.group(1)) if block else None


def set_trainable(model: torch.nn.Module, arm_components: Iterable[str],
                  units: Iterable[tuple[str, int]] = ()) -> list[str]:
    """Freeze everything but the arm's components (in every block), its `units` ((component, layer): one block
    component in one block) and the always-trained head.

    Returns the trainable parameter names. Raises UserError for an unknown component or a unit the model lacks.
    """
    trainable = set(check_components(arm_components, "arm")) | set(ALWAYS_TRAINED)
    units = set(units)
    missing = sorted(units - set(block_parameters(model))) if units else []
    if missing:
        raise UserError(f"unit(s) {', '.join(f'{c}.{layer}' for c, layer in missing)} are not block components of "
                        f"this model ({len(model.blocks)} blocks of {', '.join(BLOCK_COMPONENTS)}); check the arm")
    names = []
    for name, param in model.named_parameters():
        component, layer = unit_of(name)
        param.requires_grad_(component in trainable or (component, layer) in units)
        if param.requires_grad:
            names.append(name)
    return names


def check_vit(model: torch.nn.Module, name: str | None = None) -> VisionTransformer:
    """The model must be a timm VisionTransformer of pre-norm Blocks whose parameters all map to a component.

    Errors: one `UserError` line naming what the map does not cover.
    """
    name = name or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UserError(
            f"{name} is a {type(model).__name__}, not a timm VisionTransformer; the component map covers "
            "timm 'vit_*' and 'deit*' models (ViT, AugReg, DeiT/DeiT3, DINOv2, CLIP, SigLIP); choose one of those"
        )
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(block.mlp) not in MLPS:
            raise UserError(
                f"block {i} is a {type(block).__name__} ({type(block.mlp).__name__} MLP); only "
                f"pre-norm timm Blocks with a {', '.join(m.__name__ for m in MLPS)} MLP are supported"
            )
    unmapped = [n for n, _ in model.named_parameters() if not any(p.fullmatch(n) for _, p in _COMPILED)]
    if unmapped:
        raise UserError(
            f"{name}: {len(unmapped)} parameter(s) belong to no component (e.g. {', '.join(unmapped[:3])}); "
            "the component map (vitplasticity.components) does not cover this ViT variant"
        )
    return model


def has_attention_pool(model: torch.nn.Module) -> bool:
    """Whether the model pools tokens with an attention-pool (MAP) head, as SigLIP does."""
    return getattr(model, "attn_pool", None) is not None


def use_linear_head(model: VisionTransformer) -> VisionTransformer:
    """Replace an attention-pool (MAP) head by mean pooling + the final norm + a linear classifier.

    The head then has the paper's size (a LayerNorm and a d × classes matrix) instead of a
    whole attention block (7 M parameters in SigLIP-B/16). No change for other models.
    """
    if has_attention_pool(model):
        model.reset_classifier(model.num_classes, global_pool="avg")
    return model


def describe(model: VisionTransformer) -> dict[str, str]:
    """What `emb` and `head` hold in `model` (built with the head it will be trained with) and their parameter
    counts, and its LayerScale, in words (for reports): keys ``emb``, ``head``, ``layer_scale`` ("" when the
    blocks have none)."""
    counts = count_by_component(model)
    extra = [f"{model.num_reg_tokens} register tokens" if getattr(model, "num_reg_tokens", 0) else "",
             "distillation token" if hasattr(model, "dist_token") else ""]
    tokens = "class token" if model.cls_token is not None else "no class token"
    emb = f"patch embedding ({model.patch_embed.patch_size[0]} px patches), {tokens}"
    emb += "".join(f", {e}" for e in extra if e) + ", position embedding"
    if not isinstance(model.norm_pre, torch.nn.Identity):
        emb += (" and norm_pre, a LayerNorm applied to E before block 0 (CLIP): it is part of E, so it "
                "sets the token scale every LayerNorm's plasticity depends on")
    emb += f": {counts['emb']:,} parameters"
    final = "final LayerNorm `norm`" if not isinstance(model.norm, torch.nn.Identity) else ""
    if not isinstance(model.fc_norm, torch.nn.Identity):
        final = "LayerNorm `fc_norm` after pooling"
    if has_attention_pool(model):
        pooled = "an attention-pool (MAP) block `attn_pool` over all tokens"
    elif model.global_pool == "token":
        pooled = "the class token's final state (the token itself is a parameter of emb)"
    else:
        pooled = f"{model.global_pool or 'no'}-pooled patch tokens"
    head = f"{pooled}, {final + ', ' if final else ''}linear classifier `head`"
    if hasattr(model, "head_dist"):
        head += " (and the distillation head `head_dist`)"
    head += f": {counts['head']:,} parameters"
    if has_attention_pool(model):
        head += (f", against {counts['ln1']:,} in the LN1 arm: the attention pool dwarfs the small arms; "
                 "the linear head (mean-pooled tokens + linear) restores the paper's comparison")
    scale = getattr(model.blocks[0], "ls1", None)
    layer_scale = ""
    if scale is not None and not isinstance(scale, torch.nn.Identity):
        per_block = sum(p.numel() for module in (scale, model.blocks[0].ls2) for p in module.parameters())
        layer_scale = (f"LayerScale in every block: `ls1` scales MHA's output and belongs to MHA, `ls2` scales FC2's "
                       f"and belongs to FC2 ({per_block:,} parameters a block); it multiplies those components' "
                       "plasticity by its gains")
    return {"emb": emb, "head": head, "layer_scale": layer_scale}


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """E(x): patch embedding + class/register tokens + position embedding. (B, N, D)"""
    tokens = model.patch_embed(images)
    tokens = model._pos_embed(tokens)
    tokens = model.patch_drop(tokens)
    return model.norm_pre(tokens)


def apply_component(block: Block, component: str, tokens: torch.Tensor) -> torch.Tensor:
    """Apply one block component to a token matrix (B, N, D) as plasticity defines it.

    MHA includes its output projection and LayerScale; FC1 is the MLP's input projection
    (value and gate of a gated MLP together); FC2 takes its hidden-width inputs, so a d-wide
    input is zero-padded on the feature axis (study-spec §3).
    """
    if component == "ln1":
        return block.norm1(tokens)
    if component == "mha":
        return block.ls1(block.attn(tokens))
    if component == "ln2":
        return block.norm2(tokens)
    if component == "fc1":
        if isinstance(block.mlp, SwiGLU):
            return torch.cat([block.mlp.fc1_x(tokens), block.mlp.fc1_g(tokens)], dim=-1)
        return block.mlp.fc1(tokens)
    if component == "fc2":
        width = block.mlp.fc2.in_features
        if tokens.shape[-1] < width:
            tokens = F.pad(tokens, (0, width - tokens.shape[-1]))
        return block.ls2(block.mlp.fc2(tokens))
    raise UserError(f"'{component}' is not a block component; allowed: {BLOCK_COMPONENTS}")


def fc1_weight(mlp: torch.nn.Module) -> torch.Tensor:
    """FC1's weight as one matrix (hidden outputs, d): a gated MLP's value and gate rows stacked."""
    if isinstance(mlp, SwiGLU):
        return torch.cat([mlp.fc1_x.weight, mlp.fc1_g.weight])
    return mlp.fc1.weight


def hidden_inputs(block: Block, hidden: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The input each component receives at this depth, and the block's output. (B, N, ·) each

    The block runs its own forward; the inputs are read on the way by forward pre-hooks, so
    every MLP variant (gate included) is applied exactly as the block applies it.
    """
    inputs = {"ln1": hidden}
    watched = {"mha": block.attn, "ln2": block.norm2, "fc1": block.mlp, "fc2": block.mlp.fc2}
    handles = [module.register_forward_pre_hook(lambda _, args, component=component: inputs.update(
        {component: args[0]})) for component, module in watched.items()]
    try:
        out = block(hidden)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, out


def block_parameters(model: torch.nn.Module) -> dict[tuple[str, int], list[tuple[str, torch.nn.Parameter]]]:
    """(component, layer) → the (name, parameter) pairs of that block component, for the block components."""
    groups: dict[tuple[str, int], list[tuple[str, torch.nn.Parameter]]] = {}
    for layer, block in enumerate(model.blocks):
        for name, param in block.named_parameters():
            full = f"blocks.{layer}.{name}"
            component = component_of(full)
            if component in BLOCK_COMPONENTS:
                groups.setdefault((component, layer), []).append((full, param))
    return groups
