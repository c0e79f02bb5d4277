"""FSDP's wrap policy on foundation presets: every timm ``Block`` is a unit of its own, so a ViT-g shards
block by block (checked on the meta device: the giant is never allocated), also over 2 real gloo ranks."""

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


def _shard(full: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``Shard(0)`` slice of ``full`` over 2 ranks (empty where dim 0 is 1)."""
    chunks = full.chunk(2)
    return chunks[rank] if rank < len(chunks) else full[:0]


def _shard_on_two_ranks(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: shard the whole ViT-g on meta, then a 2-block ViT-g's backward pass."""
    import copy
    import json
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Shard

    from pathray.training.parallel import local_share, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # h_optimus_0 (ViT-g/14, 40 blocks, 1.1B parameters), sharded on the meta device
        giant = meta_model(preset="h_optimus_0")
        total = numel(giant)
        shard_model(giant)
        params = list(giant.parameters())
        report = {
            "total": total,
            "units": [isinstance(b, FSDPModule) for b in giant.engine.backbone.blocks]
            + [isinstance(giant.engine.decoder, FSDPModule), isinstance(giant, FSDPModule)],
            "sharded": all(
                isinstance(p, DTensor) and p.placements == (Shard(0),) and p.is_meta for p in params
            ),
            "local_share": local_share(giant),
            "block_local": sum(p.to_local().numel() for p in giant.engine.backbone.blocks[7].parameters()),
            "block_full": sum(p.numel() for p in giant.engine.backbone.blocks[7].parameters()),
        }
        del giant, params

        # the same ViT-g blocks two deep, for real: the sharded gradients of each rank's half batch
        # are those of one unsharded model on the whole batch
        config = EngineConfig(preset="h_optimus_0", img_size=28, model_kwargs={"depth": 2})
        task = SegmentationConfig(classes=["a", "b"], dice_weight=0.0)  # a mean over pixels: halves add up
        torch.manual_seed(0)  # as the training loop does: the same initial weights on every rank
        with random_init_expected():
            model, spec = build_model(config, task)
        plain = copy.deepcopy(model)
        halves = []
        for seed in (1, 2):
            gen = torch.Generator().manual_seed(seed)
            image = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8, generator=gen)
            halves.append({"image": image, "target": torch.randint(0, 2, (2, 28, 28), generator=gen)})
        whole = {k: torch.cat([h[k] for h in halves]) for k in ("image", "target")}
        shard_model(model)
        model.engine.backbone.blocks[0].unshard()  # one unit gathers its block, the others stay sharded
        report["unsharded"] = [
            isinstance(next(b.parameters()), DTensor) for b in model.engine.backbone.blocks
        ]
        model.engine.backbone.blocks[0].reshard()
        spec.loss(model(halves[rank]["image"]), halves[rank]).backward()
        spec.loss(plain(whole["image"]), whole).backward()
        # compared shard by shard (``Shard(0)`` is ``torch.chunk`` along dim 0): no gathering needed
        reference = {n: (p, p.grad) for n, p in plain.named_parameters()}
        mine = {n: (p.to_local(), p.grad.to_local()) for n, p in model.named_parameters()}
        report["weights_equal"] = mine.keys() == reference.keys() and all(
            torch.equal(mine[n][0], _shard(reference[n][0], rank)) for n in mine
        )
        report["max_grad_error"] = max(
            float((mine[n][1] - _shard(grad, rank)).abs().max() / grad.abs().max())
            for n, (_, grad) in reference.items()
            if mine[n][1].numel() and grad.abs().max() > 0
        )
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(report, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_vit_g_shards_block_by_block_over_two_gloo_ranks_and_its_gradients_are_exact(tmp_path):
    """FSDP2 (``shard_model``, what training and benchmarks/fsdp_step.py call) on 2 real gloo ranks:
    the 40 blocks of h_optimus_0 are units of their own and every parameter is split in half (on the
    meta device: nothing allocated); two of its blocks, sharded, get the gradients of an unsharded
    model on the whole batch from each rank's half."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shard_on_two_ranks, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in ranks:
        assert report["total"] > 1.1e9 and report["units"] == [True] * 42, report["units"]
        assert report["sharded"]
        assert 0.499 < report["local_share"] < 0.501, report["local_share"]
        assert report["block_local"] * 2 == report["block_full"]  # every dim 0 of a ViT-g block is even
        assert report["unsharded"] == [False, True]
        assert report["max_grad_error"] < 1e-4, report["max_grad_error"]
        assert report["weights_equal"]
