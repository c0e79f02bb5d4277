"""Which backbone parameters train: full, frozen, the last N blocks, or LoRA adapters (peft).

    engine = build_engine(EngineConfig(preset="uni", weights=..., finetune="lora"))
    merged = merge_lora(copy.deepcopy(task_model))   # a plain timm state dict again, for packages

LoRA goes on the attention and MLP projections of every block (``qkv``, ``proj``, ``fc1``,
``fc2``), injected in place (``peft.inject_adapter_in_model``), so the backbone keeps its timm
structure: FSDP still shards it block by block, and merging gives back the plain module.
"""

from __future__ import annotations

import re
from typing import Protocol

from torch import nn

LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
"""Modules that get adapters (a full-match regex over module names, as peft takes it)."""


class Finetunable(Protocol):
    """What fine-tuning needs of an engine (``pathray.models.engine.Engine``)."""

    backbone: nn.Module
    num_layers: int

    def layer_id(self, name: str) -> int: ...
    def freeze_backbone(self, frozen: bool = True) -> None: ...


def apply_finetune(engine: Finetunable, kind: str, count: int, rank: int = 8, alpha: float = 16.0) -> None:
    """Set which of ``engine``'s backbone parameters train; the decoder always does.

    Args:
        kind: ``full``, ``frozen``, ``last_blocks`` (the last ``count`` layers of the engine's LR
            decay depth: ViT blocks and the final norm) or ``lora``.
    """
    if kind == "frozen":
        engine.freeze_backbone(True)
    elif kind == "last_blocks":
        if count >= engine.num_layers:
            raise ValueError(f"finetune last_blocks:{count}: the backbone has {engine.num_layers - 1} blocks")
        first = engine.num_layers - count  # layer ids >= first train; the top (final norm) is num_layers
        for name, param in engine.backbone.named_parameters():
            param.requires_grad_(engine.layer_id(name) >= first)
    elif kind == "lora":
        inject_lora(engine.backbone, rank, alpha)
    elif kind != "full":
        raise ValueError(f"unknown finetune kind {kind!r}")


def inject_lora(backbone: nn.Module, rank: int, alpha: float) -> None:
    """Adapters on every block's qkv/proj/fc1/fc2; only they train in the backbone."""
    from peft import LoraConfig, inject_adapter_in_model

    if not any(_is_target(name) for name, _ in backbone.named_modules()):
        raise ValueError("finetune lora: the backbone has no blocks.N.attn.qkv/proj or mlp.fc1/fc2 (a ViT?)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    inject_adapter_in_model(config, backbone)
    for name, param in backbone.named_parameters():
        param.requires_grad_(".lora_" in name)


def _is_target(name: str) -> bool:
    return re.fullmatch(LORA_TARGETS, name) is not None


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters (then ``merge_lora`` before exporting it)."""
    return any(".lora_" in name for name, _ in model.named_parameters())


def merge_lora(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA layer merged into its base layer and replaced by it (in place):
    its state dict is a plain one again (``blocks.0.attn.qkv.weight``)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model
