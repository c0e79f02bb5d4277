"""The foundation engine on presets: config merge and overrides, strict weights, pooling recipes, fine-tuning
modes (frozen, last blocks, LoRA merged on export), intermediate blocks for the decoder, packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathray.models.config import EngineConfig
from pathray.models.engines import build_engine
from pathray.models.foundation import build_backbone, load_foundation
from pathray.models.presets import get_preset
from pathray.models.task_model import build_model
from pathray.models.tasks import SegmentationConfig
from pathray.models.weights import WeightsError

# ViT-S/16 presets cut to a few blocks, so every test runs the real architecture in a second or two.
SMALL = {"depth": 3}
TINY_H0 = {"embed_dim": 64, "num_heads": 2, "depth": 2, "mlp_ratio": 4}  # h0_mini's shape: 4 registers


def tiles(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def engine(preset: str = "kaiko_vits16", **fields: object):
    torch.manual_seed(0)
    config = {"preset": preset, "img_size": 64, "dense_channels": 16, "model_kwargs": SMALL, **fields}
    return build_engine(EngineConfig(**config)).eval()


def checkpoint(
    tmp_path: Path, preset: str = "kaiko_vits16", kwargs: dict | None = None, seed: int = 1
) -> Path:
    """A checkpoint of the preset's architecture in the timm layout, with non-trivial values."""
    torch.manual_seed(seed)
    state = build_backbone(get_preset(preset).replace(model_kwargs=kwargs or SMALL)).state_dict()
    path = tmp_path / f"{preset}-{seed}.pth"
    torch.save(state, path)
    return path


def test_a_project_takes_the_presets_tiles_and_explicit_fields_win():
    from pathray.config import load_config

    cfg = load_config(None, ["engine.preset=kaiko_vitl14"])
    assert cfg.data.stream.sampler.size == 224 and cfg.data.stream.sampler.mpps == [0.5]
    assert cfg.engine.img_size == 224 and cfg.optim.layer_decay == 0.75  # the foundation engine's defaults
    own = load_config(None, ["engine.preset=kaiko_vitl14", "data.stream.sampler.size=112"])
    assert own.data.stream.sampler.size == 112 and own.engine.img_size == 112
    with pytest.raises(
        Exception, match="engine 'cnn' takes no preset; engines that do: debug_vit, foundation"
    ):
        load_config(None, ["engine.name=cnn", "engine.preset=uni"])
    with pytest.raises(Exception, match="set engine.model: null"):
        load_config(None, ["engine.preset=uni", "engine.model=vit_small_patch16_224"])
    with pytest.raises(Exception, match="unknown foundation preset 'uni3'.*uni2_h"):
        load_config(None, ["engine.preset=uni3"])
    with pytest.raises(Exception, match="finetune 'last_blocks:0'"):
        EngineConfig(finetune="last_blocks:0")

    # the engine carries the preset's normalisation and pooling; explicit fields override them
    lunit = engine("lunit_vits16")
    assert lunit.data_config["mean"] == pytest.approx(get_preset("lunit_vits16").mean)
    assert lunit.embed_dim == 384 and lunit.pooling == "cls" and len(lunit.backbone.blocks) == 3
    mine = engine("lunit_vits16", mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), pooling="cls+mean")
    assert mine.data_config["mean"] == (0.1, 0.2, 0.3) and mine.data_config["std"] == (0.3, 0.2, 0.1)
    pooled, dense = mine(mine.normalize(tiles()))
    assert mine.embed_dim == 768 and pooled.shape == (2, 768) and dense.shape == (2, 16, 16, 16)


def test_the_engine_loads_strictly_and_pools_like_load_foundation(tmp_path: Path):
    path = checkpoint(tmp_path, "h0_mini", TINY_H0)
    eng = engine("h0_mini", model_kwargs=TINY_H0, weights=str(path), img_size=56)
    frozen = load_foundation("h0_mini", weights=str(path), model_kwargs={**TINY_H0, "img_size": 56})
    x = tiles(size=56)  # 14 px patches; the 224 px checkpoint's position grid is resampled alike
    with torch.no_grad():
        pooled, _ = eng(eng.normalize(x))
    assert eng.num_prefix_tokens == 5 and pooled.shape == (2, 128)  # CLS + mean of patches, registers out
    torch.testing.assert_close(pooled, frozen.embed(x), rtol=0, atol=0)

    state = torch.load(path, weights_only=True)
    del state["blocks.1.ls2.gamma"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing 1 \['blocks.1.ls2.gamma'\]"):
        engine("h0_mini", model_kwargs=TINY_H0, weights=str(tmp_path / "missing.pth"))
    state = torch.load(path, weights_only=True) | {"head.weight": torch.zeros(2, 64)}
    torch.save(state, tmp_path / "head.pth")
    with pytest.raises(WeightsError, match=r"unexpected 1 \['head.weight'\]"):
        engine("h0_mini", model_kwargs=TINY_H0, weights=str(tmp_path / "head.pth"))
    engine("h0_mini", model_kwargs=TINY_H0, weights=str(tmp_path / "head.pth"), allow_partial=["head.*"])


def test_our_dino_checkpoint_loads_into_a_preset_engine(tmp_path: Path):
    source = engine()
    backbone = {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    # what DinoLearner.state() writes: the full student, the teacher model, and the teacher backbone
    saved = {
        "model": {f"engine.{k}": torch.zeros_like(v) for k, v in backbone.items()}
        | {"head.w": torch.ones(1)},
        "teacher_model": {f"engine.{k}": v for k, v in backbone.items()} | {"head.w": torch.ones(1)},
        "teacher": backbone,
        "step": 3,
    }
    torch.save(saved, tmp_path / "checkpoint.pt")
    loaded = engine(weights=str(tmp_path / "checkpoint.pt"), dense_channels=16)
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[key], value), key
    fresh = engine()
    fresh.load_backbone_weights(str(tmp_path / "checkpoint.pt"))  # evaluate_ssl's path
    assert torch.equal(fresh.backbone.blocks[2].mlp.fc2.weight, source.backbone.blocks[2].mlp.fc2.weight)


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def backbone_parts(names: set[str]) -> set[str]:
    """``engine.backbone.blocks.2.attn.qkv.weight`` -> ``blocks.2``; ``...backbone.norm.bias`` -> ``norm``."""
    parts = set()
    for name in names:
        if name.startswith("engine.backbone."):
            bits = name.removeprefix("engine.backbone.").split(".")
            parts.add(".".join(bits[:2]) if bits[0] == "blocks" else bits[0])
    return parts


def model(**fields: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = EngineConfig(preset="kaiko_vits16", img_size=64, dense_channels=16, model_kwargs=SMALL, **fields)
    return build_model(config, SegmentationConfig(classes=["a", "b", "c"]))[0]


def test_finetune_modes_choose_what_trains():
    full = model()
    decoder_and_head = {n for n in trainable(full) if not n.startswith("engine.backbone.")}
    assert decoder_and_head and all(n.startswith(("engine.decoder.", "head.")) for n in decoder_and_head)
    assert trainable(full) == {n for n, _ in full.named_parameters()}

    frozen = model(finetune="frozen")
    assert trainable(frozen) == decoder_and_head
    assert model(freeze_backbone=True).engine._frozen

    last = model(finetune="last_blocks:2")
    assert backbone_parts(trainable(last)) == {"blocks.1", "blocks.2", "norm"}
    assert trainable(last) - decoder_and_head == {
        n
        for n, _ in last.named_parameters()
        if n.startswith(("engine.backbone.blocks.1.", "engine.backbone.blocks.2.", "engine.backbone.norm."))
    }

    lora = model(finetune="lora", lora_rank=4)
    adapters = trainable(lora) - decoder_and_head
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    modules = {n.rsplit(".lora_", 1)[0].removeprefix("engine.backbone.") for n in adapters}
    assert modules == {
        f"blocks.{b}.{m}" for b in range(3) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert lora.engine.backbone.blocks[0].attn.qkv.lora_A["default"].weight.shape == (4, 384)
    out = lora(tiles())
    out.float().pow(2).mean().backward()
    assert {n for n, p in lora.named_parameters() if p.grad is not None} == trainable(lora)
    groups = lora.engine.param_groups(1e-3, 0.05, 0.75)
    assert sum(len(g["params"]) for g in groups) == len(
        [n for n in trainable(lora) if n.startswith("engine.")]
    )
    with pytest.raises(ValueError, match="last_blocks:4: the backbone has 3 blocks"):
        model(finetune="last_blocks:4")


def test_lora_is_merged_into_a_plain_timm_package(tmp_path: Path):
    from pathray.models.package import package_model, read_model_package, save_model_package

    lora = model(finetune="lora", lora_rank=4, weights=str(checkpoint(tmp_path))).eval()
    with torch.no_grad():  # as if trained: adapters that change the output
        for name, param in lora.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.05)
    config = EngineConfig(
        preset="kaiko_vits16",
        img_size=64,
        dense_channels=16,
        model_kwargs=SMALL,
        finetune="lora",
        lora_rank=4,
        weights="/nowhere/original.pth",
    )
    package = package_model(lora, config, SegmentationConfig(classes=["a", "b", "c"]), 64, 2.0)
    assert not [k for k in package.state if "lora" in k or "base_layer" in k]
    assert package.config.engine.finetune == "full" and package.config.meta["finetune"] == "lora"
    assert (
        package.config.meta["init_weights"] == "/nowhere/original.pth"
        and package.config.engine.weights is None
    )
    assert any(".lora_" in n for n, _ in lora.named_parameters())  # the trained model keeps its adapters

    # the backbone part is a plain timm state dict of the preset's architecture
    plain = build_backbone(get_preset("kaiko_vits16").replace(model_kwargs={**SMALL, "img_size": 64}))
    backbone = {
        k.removeprefix("engine.backbone."): v
        for k, v in package.state.items()
        if k.startswith("engine.backbone.")
    }
    plain.load_state_dict(backbone, strict=True)

    uri = save_model_package(str(tmp_path / "pkg"), package)
    rebuilt, _ = read_model_package(uri).build()  # without the original weights file
    x = tiles(3)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), lora(x), rtol=1e-4, atol=1e-5)


def test_a_preset_package_rebuilds_exactly_without_its_weights_file(tmp_path: Path):
    import yaml

    from pathray.models.package import package_model, read_model_package, save_model_package

    path = checkpoint(tmp_path, "h0_mini", TINY_H0)
    config = EngineConfig(
        preset="h0_mini",
        img_size=64,
        dense_channels=16,
        model_kwargs=TINY_H0,
        weights=str(path),
        pooling="cls",
        mean=(0.6, 0.5, 0.4),
    )
    torch.manual_seed(0)
    trained, _ = build_model(config, SegmentationConfig(classes=["a", "b"]))
    uri = save_model_package(
        str(tmp_path / "pkg"), package_model(trained, config, SegmentationConfig(classes=["a", "b"]), 64, 0.5)
    )
    path.unlink()
    doc = yaml.safe_load((tmp_path / "pkg" / "model.yaml").read_text())
    assert doc["engine"]["preset"] == "h0_mini" and doc["engine"]["model_kwargs"] == TINY_H0
    assert doc["engine"]["pooling"] == "cls" and doc["normalisation"]["mean"] == pytest.approx(
        [0.6, 0.5, 0.4]
    )
    rebuilt, _ = read_model_package(uri).build()
    assert rebuilt.engine.embed_dim == 64 and rebuilt.engine.num_prefix_tokens == 5
    x = tiles()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.eval()(x))


def test_decoder_blocks_choose_what_feeds_the_decoder():
    first = engine(decoder_blocks=[0])
    last_two = engine(decoder_blocks=[-2, -1])
    assert first.decoder_blocks == [0] and last_two.decoder_blocks == [1, 2]
    assert first.decoder.proj[0].in_channels == 384 and last_two.decoder.proj[0].in_channels == 768
    x = first.normalize(tiles())
    with torch.no_grad():
        pooled, dense = first(x)
        last_two_dense = last_two(x)[1]
        for eng in (first, last_two):
            eng.backbone.blocks[2].mlp.fc2.weight.mul_(3.0)  # change the last block only
        pooled_after, dense_after = first(x)
        last_two_after = last_two(x)[1]
    assert torch.equal(dense, dense_after), "block 0 alone feeds the decoder"
    assert not torch.allclose(pooled, pooled_after), "the pooled embedding still reads the last block"
    assert not torch.allclose(last_two_dense, last_two_after)
    with pytest.raises(ValueError, match=r"decoder_blocks \[3\]"):
        engine(decoder_blocks=[3])


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        eng = engine(grad_checkpointing=checkpointing, decoder_blocks=[1, 2]).train()
        assert eng.backbone.grad_checkpointing is checkpointing
        pooled, dense = eng(eng.normalize(tiles()))
        (pooled.sum() + dense.sum()).backward()
        grads.append(eng.backbone.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    # LoRA under checkpointing: the frozen base passes no grad-requiring input into the blocks, and the
    # adapters still get their gradients
    lora = engine(grad_checkpointing=True, finetune="lora").train()
    pooled, dense = lora(lora.normalize(tiles()))
    (pooled.sum() + dense.sum()).backward()
    adapters = [p for n, p in lora.named_parameters() if ".lora_B." in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
