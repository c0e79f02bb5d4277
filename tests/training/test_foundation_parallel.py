"""FSDP's wrap policy on foundation presets: every timm ``Block`` is a unit of its own, so a ViT-g shards
block by block (checked on the meta device: the giant is never allocated)."""

from __future__ import annotations

import pytest
import torch

from pathray.models.config import EngineConfig
from pathray.models.foundation import random_init_expected
from pathray.models.task_model import build_model
from pathray.models.tasks import SegmentationConfig
from pathray.models.timm_compat import import_timm
from pathray.training.parallel import shard_units


def meta_model(**engine: object) -> torch.nn.Module:
    config = EngineConfig(img_size=224, **engine)
    with torch.device("meta"), random_init_expected():
        return build_model(config, SegmentationConfig(classes=["a", "b"]))[0]


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset", ["gigapath", "uni2_h"])
def test_a_giant_preset_shards_block_by_block(preset: str):
    block = import_timm().models.vision_transformer.Block
    model = meta_model(preset=preset)
    depth = len(model.engine.backbone.blocks)
    units = shard_units(model)
    assert [type(u) for u in units[:-1]] == [block] * depth and units[-1] is model.engine.decoder
    total = numel(model)
    assert total > 6e8  # ViT-g: 1.1B (gigapath), 0.68B (uni2_h) parameters
    # one block is all a rank gathers at a time; what stays in the root unit (embeddings, norm,
    # head) is a sliver, so the shards are even
    assert max(numel(u) for u in units) / total < 1.5 / depth
    assert 1 - sum(numel(u) for u in units) / total < 0.01


def test_depth_reduced_giant_with_lora_still_wraps_its_blocks():
    block = import_timm().models.vision_transformer.Block
    model = meta_model(preset="uni2_h", model_kwargs={"depth": 2}, finetune="lora")
    units = shard_units(model)
    assert [type(u) for u in units] == [block, block, type(model.engine.decoder)]
    lora = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert len(lora) == 2 * 4 * 2  # 2 blocks x qkv/proj/fc1/fc2 x A/B
    assert all(
        any(p is q for u in units for q in u.parameters())
        for n, p in model.named_parameters()
        if ".lora_" in n
    )
