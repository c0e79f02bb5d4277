"""Engines: the forward contract, normalisation, weights loading, LR groups, freezing, no Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from pathray.models.config import EngineConfig
from pathray.models.engine import Engine
from pathray.models.engines import build_engine, engine_entry
from pathray.models.timm_compat import import_timm
from pathray.registry import ENGINES, RegistryError

# Small stand-ins for the full-size defaults (covered by the slow test) so the suite stays fast.
FAST_MODEL = {"foundation": "vit_tiny_patch16_224", "cnn": "resnet18"}


def make(name: str, seed: int = 0, **overrides: object) -> Engine:
    torch.manual_seed(seed)
    settings: dict[str, object] = {"model": FAST_MODEL.get(name), "img_size": 64, "dense_channels": 16}
    config = EngineConfig(name=name, **{**settings, **overrides})
    return build_engine(config).eval()


def test_builtin_engines_are_registered():
    assert {"foundation", "cnn", "debug_vit", "debug_cnn"} <= set(ENGINES.names())


@pytest.mark.parametrize("name", ENGINES.names())
def test_forward_contract_at_64px(name: str):
    engine = make(name)
    with torch.no_grad():
        pooled, dense = engine(torch.randn(2, 3, 64, 64))
    assert pooled.shape == (2, engine.embed_dim)
    assert dense.shape == (2, engine.dense_channels, 64 // engine.dense_stride, 64 // engine.dense_stride)
    assert engine.dense_stride == 4 and engine.dense_channels == 16
    assert engine.data_config["input_size"] == (3, 64, 64)
    assert torch.isfinite(pooled).all() and torch.isfinite(dense).all()


def test_debug_vit_at_224px_and_odd_sizes():
    engine = build_engine(EngineConfig(name="debug_vit")).eval()
    with torch.no_grad():
        pooled, dense = engine(torch.randn(1, 3, 224, 224))
        _, odd = engine(torch.randn(1, 3, 72, 40))  # not a multiple of the 16 px patch: padded
    assert pooled.shape == (1, 192) and dense.shape == (1, 64, 56, 56)
    assert odd.shape == (1, 64, 18, 10)


@pytest.mark.parametrize(
    ("model", "prefix"), [("vit_small_patch14_dinov2", 1), ("vit_small_patch14_reg4_dinov2", 5)]
)
def test_dinov2_patch14_and_register_tokens(model: str, prefix: int):
    engine = make("foundation", model=model, img_size=56)
    assert engine.num_prefix_tokens == prefix and engine.data_config["input_size"] == (3, 56, 56)
    with torch.no_grad():
        pooled, dense = engine(torch.randn(1, 3, 56, 56))
        _, padded = engine(torch.randn(1, 3, 64, 64))  # 64 is no multiple of 14: padded to 70, cropped
    assert pooled.shape == (1, 384) and dense.shape == (1, 16, 14, 14) and padded.shape == (1, 16, 16, 16)


@pytest.mark.parametrize("name", ["debug_vit", "debug_cnn"])
def test_normalize_uses_the_models_mean_and_std(name: str):
    engine = make(name)
    resolved = import_timm().data.resolve_data_config(model=engine.backbone)
    images = torch.randint(0, 256, (2, 8, 6, 3), dtype=torch.uint8)
    mean = torch.tensor(resolved["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(resolved["std"]).view(1, 3, 1, 1)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    assert engine.data_config["mean"] == pytest.approx(resolved["mean"])
    assert engine.data_config["std"] == pytest.approx(resolved["std"])
    torch.testing.assert_close(engine.normalize(images), expected)
    with pytest.raises(ValueError, match="uint8"):
        engine.normalize(images.float())


def _wrap(state: dict[str, torch.Tensor], form: str) -> object:
    if form == "plain":
        return state
    if form == "dino":  # our SSL run: teacher and student, projection heads beside the backbone
        head = {"head.mlp.0.weight": torch.zeros(4, 4)}
        teacher = {**{f"backbone.{k}": v for k, v in state.items()}, **head}
        student = {f"backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
        return {"teacher": teacher, "student": student, "epoch": 3}
    if form == "dino_model":  # a DinoModel(engine, head) state dict: the engine nested one level
        extra = {"engine.decoder.out.0.weight": torch.zeros(2), "head.last.weight": torch.zeros(2)}
        return {"teacher": {**{f"engine.backbone.{k}": v for k, v in state.items()}, **extra}}
    if form == "ddp_model":
        return {"model": {f"module.backbone.{k}": v for k, v in state.items()}, "step": 10}
    raise AssertionError(form)


@pytest.mark.parametrize(
    ("name", "form", "suffix"),
    [
        ("debug_vit", "plain", ".pt"),
        ("debug_vit", "dino", ".pth"),
        ("debug_cnn", "ddp_model", ".pt"),
        ("debug_cnn", "dino_model", ".pt"),
        ("debug_cnn", "plain", ".safetensors"),
        ("foundation", "dino", ".pt"),
    ],
)
def test_weights_round_trip(tmp_path: Path, name: str, form: str, suffix: str):
    source = make(name, seed=0)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(path))
    else:
        torch.save(_wrap(source.backbone.state_dict(), form), path)
    loaded = make(name, seed=1, weights=str(path))
    loaded.decoder.load_state_dict(source.decoder.state_dict())  # the checkpoint holds the backbone only
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got, fresh = source(x), loaded(x), make(name, seed=1)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(fresh[0], expected[0])


def test_weights_from_another_image_size_resample_pos_embed(tmp_path: Path):
    source = build_engine(EngineConfig(name="debug_vit", img_size=224))
    torch.save(source.backbone.state_dict(), tmp_path / "w.pt")
    loaded = make("debug_vit", weights=str(tmp_path / "w.pt"))
    assert loaded.backbone.pos_embed.shape == (1, 1 + 16, 192)
    torch.testing.assert_close(
        loaded.backbone.blocks[1].mlp.fc2.weight, source.backbone.blocks[1].mlp.fc2.weight
    )


def test_bad_weights_name_the_problem(tmp_path: Path):
    state = make("debug_vit").backbone.state_dict()
    wrong = {**state, "blocks.0.attn.qkv.weight": torch.zeros(3, 3)}
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight.*\(3, 3\)"):
        make("debug_vit", weights=str(tmp_path / "wrong.pt"))
    partial = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing 12 \[.blocks\.1\."):
        make("debug_vit", weights=str(tmp_path / "partial.pt"))
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="no tensors"):
        make("debug_vit", weights=str(tmp_path / "empty.pt"))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        make("debug_vit", weights=str(tmp_path / "nowhere.pt"))


def _lr_and_wd(engine: Engine, layer_decay: float) -> dict[str, tuple[float, float]]:
    groups = engine.param_groups(lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(by_id)  # each parameter in one group
    return {name: by_id[id(p)] for name, p in engine.named_parameters() if id(p) in by_id}


def test_vit_layer_decay_and_no_weight_decay_on_norms():
    engine = make("debug_vit")
    lr = _lr_and_wd(engine, layer_decay=0.5)
    assert len(lr) == len(list(engine.parameters()))
    first, last = lr["backbone.blocks.0.attn.qkv.weight"], lr["backbone.blocks.1.attn.qkv.weight"]
    decoder = lr["decoder.proj.0.weight"]
    assert lr["backbone.patch_embed.proj.weight"][0] < first[0] < last[0] < decoder[0] == 1e-3
    assert first[0] == pytest.approx(1e-3 * 0.5**2) and first[1] == decoder[1] == 0.05
    for name in ("backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias", "backbone.norm.weight"):
        assert lr[name][1] == 0.0
    assert lr["backbone.pos_embed"][1] == lr["backbone.cls_token"][1] == lr["decoder.proj.1.weight"][1] == 0.0


def test_cnn_layer_decay_counts_encoder_stages():
    engine = make("debug_cnn")
    lr = _lr_and_wd(engine, layer_decay=0.5)
    stem, deepest = lr["backbone.conv1.weight"], lr["backbone.layer4.0.conv1.weight"]
    assert stem[0] < lr["backbone.layer1.0.conv1.weight"][0] < deepest[0] < lr["decoder.out.0.weight"][0]
    assert deepest[0] == pytest.approx(1e-3 * 0.5) and lr["backbone.bn1.weight"][1] == 0.0
    assert {v[0] for v in _lr_and_wd(engine, layer_decay=1.0).values()} == {1e-3}


@pytest.mark.parametrize("name", ["debug_vit", "debug_cnn"])
def test_freeze_backbone_stops_its_gradients(name: str):
    engine = make(name, freeze_backbone=True).train()
    assert not engine.backbone.training and engine.decoder.training
    buffers = {k: v.clone() for k, v in engine.backbone.state_dict().items()}
    pooled, dense = engine(torch.randn(2, 3, 64, 64))
    (pooled.sum() + dense.sum()).backward()
    assert all(p.grad is None for p in engine.backbone.parameters())
    assert all(p.grad is not None for p in engine.decoder.parameters())
    assert all(torch.equal(v, engine.backbone.state_dict()[k]) for k, v in buffers.items())  # no BN updates
    assert sum(len(g["params"]) for g in engine.param_groups(1e-3, 0.05)) == len(
        list(engine.decoder.parameters())
    )
    engine.freeze_backbone(False)
    assert engine.backbone.training and all(p.requires_grad for p in engine.parameters())


def test_config_errors_are_clear():
    with pytest.raises(ValidationError):
        EngineConfig(name="debug_vit", backbone="x")
    with pytest.raises(RegistryError, match="known: cnn, debug_cnn, debug_vit, foundation"):
        build_engine(EngineConfig(name="vit"))


def test_engine_registrations_import_neither_ray_nor_torch():
    code = (
        "import sys, pathray.models.engines\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'timm', 'torch'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", "registering engines must not import ray, torch or timm (until built)"


def test_engine_defaults_live_on_the_registration():
    assert engine_entry("cnn").defaults["data"]["stream"]["sampler"] == {"size": 256, "mpps": [1.0]}
    assert engine_entry("foundation").defaults["optim"]["layer_decay"] == 0.75
    with pytest.raises(RegistryError, match="unknown engine 'vit'"):
        engine_entry("vit")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "embed_dim"), [("foundation", 384), ("cnn", 2048)])
def test_full_size_defaults_at_224px(name: str, embed_dim: int):
    engine = build_engine(EngineConfig(name=name)).eval()
    with torch.no_grad():
        pooled, dense = engine(torch.randn(1, 3, 224, 224))
    assert pooled.shape == (1, embed_dim) and dense.shape == (1, 64, 56, 56)
