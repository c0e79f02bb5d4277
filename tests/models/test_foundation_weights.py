"""Foundation weights: published key layouts load strictly, embeddings equal the reference
implementations, and a checkpoint that does not fit fails naming its keys."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pathray.models.foundation import build_backbone, load_foundation, timm_kwargs, to_preset_layout
from pathray.models.layouts import detect_layout
from pathray.models.presets import get_preset, preset_names
from pathray.models.timm_compat import ensure_torchvision_ops, import_timm
from pathray.models.weights import WeightsError, load_strict, read_checkpoint, resolve_weights

ensure_torchvision_ops()  # transformers imports torchvision
transformers = pytest.importorskip("transformers")

GIANT = 300e6  # above this, synthesised checkpoints use two blocks
TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def tiles(n: int = 2, size: int = 224, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def normalised(x: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial values everywhere (LayerScale's 1e-5 init would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


def hf_checkpoint(name: str, **config: object) -> dict[str, torch.Tensor]:
    """A state dict in the published transformers layout (what ``save_pretrained`` writes)."""
    cls = transformers.ViTModel if get_preset(name).layouts == ("vit_hf",) else transformers.Dinov2Model
    cfg = (transformers.ViTConfig if cls is transformers.ViTModel else transformers.Dinov2Config)(**config)
    return _saved(cls(cfg))


def _saved(model: torch.nn.Module, folder: Path | None = None) -> dict[str, torch.Tensor]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(folder or tmp)
        return read_checkpoint(resolve_weights(folder or tmp))


HF_CONFIGS = {  # the published architectures, two blocks deep
    "phikon": dict(
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,  # Phikon's published config (iBOT's eps), not transformers' 1e-12 default
    ),
    "phikon_v2": dict(
        hidden_size=1024,
        num_hidden_layers=2,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layerscale_value=1e-5,
    ),
    "midnight": dict(
        hidden_size=1536,
        num_hidden_layers=2,
        num_attention_heads=24,
        image_size=518,
        patch_size=14,
        use_swiglu_ffn=True,
    ),
}


@pytest.mark.parametrize("name", preset_names())
def test_checkpoint_in_the_published_layout_loads_strictly(name: str):
    preset = get_preset(name)
    meta = build_backbone(preset, device="meta")
    if sum(p.numel() for p in meta.parameters()) > GIANT or preset.layouts != ("timm",):
        preset = preset.replace(model_kwargs={"depth": 2})  # HF_CONFIGS are two blocks deep too
    if preset.layouts == ("timm",):
        timm = import_timm()
        state = timm.create_model(preset.arch, **timm_kwargs(preset)).state_dict()
    else:
        state = hf_checkpoint(name, **HF_CONFIGS[name])
    assert detect_layout(state) == preset.layouts[0]
    model = build_backbone(preset)
    load_strict(model, to_preset_layout(preset, model, state), source=name)
    if preset.layouts == ("timm",):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_embed_equals_timm_reference(tmp_path: Path):
    """kaiko ViT-S/16 as its hubconf builds it: CLS of forward_features, mean/std 0.5; the checkpoint
    wrapped in ``model`` with ``module.`` prefixes, as training scripts save it."""
    preset = get_preset("kaiko_vits16").replace(model_kwargs={"depth": 2})
    timm = import_timm()
    reference = timm.create_model("vit_small_patch16_224", depth=2, num_classes=0, dynamic_img_size=True)
    reference.eval()
    randomise(reference)
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "w.pth")
    model = load_foundation(preset, weights=str(tmp_path / "w.pth"))
    x = tiles()
    with torch.no_grad():
        expected = reference(normalised(x, preset.mean, preset.std))  # timm's own pooled output
    torch.testing.assert_close(model.embed(x), expected, rtol=1e-5, atol=1e-5)


def test_cls_mean_pooling_leaves_registers_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Virchow2's recipe (TRIDENT): cat(CLS, mean(tokens[5:])), from an HF-cache snapshot."""
    preset = get_preset("virchow2").replace(model_kwargs={**TINY, "mlp_ratio": 4.0})
    timm = import_timm()
    reference = timm.create_model(preset.arch, **timm_kwargs(preset)).eval()
    randomise(reference)
    snapshot = tmp_path / "models--paige-ai--Virchow2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file(reference.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--paige-ai--Virchow2" / "refs").mkdir()
    (tmp_path / "models--paige-ai--Virchow2" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    model = load_foundation(preset, weights="hf-cache:paige-ai/Virchow2")
    x = tiles()
    with torch.no_grad():
        out = reference.forward_features(normalised(x, preset.mean, preset.std))
    expected = torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
    torch.testing.assert_close(model.embed(x), expected, rtol=1e-5, atol=1e-5)
    assert model.info.dim == 128 and model.info.num_prefix_tokens == 5


def test_embed_equals_transformers_vit(tmp_path: Path):
    """Phikon's recipe: ViTModel(...).last_hidden_state[:, 0], from a saved HF model folder."""
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
    )
    reference = transformers.ViTModel(cfg).eval()
    randomise(reference)
    reference.save_pretrained(tmp_path)
    model = load_foundation("phikon", weights=str(tmp_path), model_kwargs=TINY)
    x = tiles()
    with torch.no_grad():
        expected = reference(pixel_values=normalised(x, *IMAGENET)).last_hidden_state[:, 0]
    torch.testing.assert_close(model.embed(x), expected, rtol=1e-5, atol=1e-5)
    assert_in_memory_layout_loads(model, reference.state_dict(), x, expected)


@pytest.mark.parametrize("swiglu", [True, False], ids=["midnight-swiglu", "phikon_v2-mlp"])
def test_embed_equals_transformers_dinov2(tmp_path: Path, swiglu: bool):
    """Midnight's recipe: cat(CLS, mean(patch tokens)) of Dinov2Model trained at 518 px, run on
    224 px tiles (transformers resamples the position embedding, we resample it once at load);
    Phikon-v2's: the CLS token of a plain-MLP Dinov2Model."""
    cfg = transformers.Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=518 if swiglu else 224,
        patch_size=14 if swiglu else 16,
        use_swiglu_ffn=swiglu,
    )
    reference = transformers.Dinov2Model(cfg).eval()
    randomise(reference)
    reference.save_pretrained(tmp_path)
    name = "midnight" if swiglu else "phikon_v2"
    # SwiGLU hidden size: (int(64 * 4 * 2 / 3) + 7) // 8 * 8 = 176 per branch -> packed 352 = 64 * 5.5
    kwargs = {**TINY, "mlp_ratio": 5.5} if swiglu else TINY
    model = load_foundation(name, weights=str(tmp_path), model_kwargs=kwargs)
    preset = model.preset
    x = tiles()
    with torch.no_grad():
        out = reference(pixel_values=normalised(x, preset.mean, preset.std)).last_hidden_state
    expected = torch.cat([out[:, 0], out[:, 1:].mean(1)], dim=-1) if swiglu else out[:, 0]
    torch.testing.assert_close(model.embed(x), expected, rtol=1e-4, atol=1e-4)
    assert_in_memory_layout_loads(model, reference.state_dict(), x, expected)


def assert_in_memory_layout_loads(model, state: dict, x: np.ndarray, expected: torch.Tensor) -> None:
    """transformers 5 names modules differently in memory (q_proj, gate_proj/up_proj, layers.N) than
    in the files it writes; a state dict taken from a live model loads to the same embedding."""
    backbone = build_backbone(model.preset)
    load_strict(backbone, to_preset_layout(model.preset, backbone, state))
    model.backbone.load_state_dict(backbone.state_dict())
    torch.testing.assert_close(model.embed(x), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def uni_small() -> tuple:
    """UNI two blocks deep and its checkpoint (LayerScale included)."""
    preset = get_preset("uni").replace(model_kwargs={"depth": 2})
    return preset, build_backbone(preset).state_dict()


def test_missing_key_is_named(uni_small: tuple):
    preset, state = uni_small
    del state["blocks.1.ls2.gamma"]  # a checkpoint without LayerScale must not load silently
    with pytest.raises(WeightsError, match=r"missing 1 \['blocks.1.ls2.gamma'\]"):
        load_strict(build_backbone(preset), state, source="uni.bin")


def test_unexpected_key_is_named_and_allow_partial_lets_it_through(uni_small: tuple):
    preset, state = uni_small
    state["head.weight"] = torch.zeros(2, 1024)
    model = build_backbone(preset)
    with pytest.raises(WeightsError, match=r"unexpected 1 \['head.weight'\]"):
        load_strict(model, state)
    load_strict(model, state, allow_partial=["head.*"])
    assert torch.equal(model.state_dict()["blocks.0.ls1.gamma"], state["blocks.0.ls1.gamma"])


def test_many_bad_keys_are_counted(uni_small: tuple):
    preset, state = uni_small
    no_layerscale = build_backbone(preset.replace(model_kwargs={"init_values": None}))
    with pytest.raises(WeightsError, match=r"unexpected 4 \['blocks.0.ls1.gamma'"):
        load_strict(no_layerscale, state)  # UNI's LayerScale into a ViT-L without it
    one_block = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    with pytest.raises(WeightsError, match=r"missing 14 \['blocks.1.attn.proj.bias', .*\] and 9 more"):
        load_strict(build_backbone(preset), one_block)


def test_position_grid_is_resampled_only_for_dynamic_presets(uni_small: tuple):
    preset, state = uni_small
    other = build_backbone(preset.replace(model_kwargs={"img_size": 256})).state_dict()
    model = build_backbone(preset)
    load_strict(model, to_preset_layout(preset, model, other))  # 16x16 grid -> 14x14
    fixed = preset.replace(dynamic_size=False)
    model = build_backbone(fixed)
    with pytest.raises(WeightsError, match=r"shape mismatch 1 \['pos_embed: checkpoint \(1, 257, 1024\)"):
        load_strict(model, to_preset_layout(fixed, model, other))


def test_layout_the_preset_does_not_accept(uni_small: tuple):
    preset, _ = uni_small
    state = hf_checkpoint("phikon_v2", hidden_size=64, num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(WeightsError, match="'dinov2_hf' layout; preset 'uni' accepts \\['timm'\\]"):
        to_preset_layout(preset, build_backbone(preset), state)


def test_weight_sources(tmp_path: Path):
    state = {"cls_token": torch.ones(1, 1, 4), "pos_embed": torch.zeros(1, 2, 4)}
    torch.save(state, tmp_path / "a.bin")
    save_file(state, str(tmp_path / "b.safetensors"))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, tmp_path / "c.pth")
    for name in ("a.bin", "b.safetensors", "c.pth"):
        assert set(read_checkpoint(resolve_weights(tmp_path / name))) == set(state)
    # a folder with several candidates is ambiguous; a HF folder names its own file
    with pytest.raises(WeightsError, match="exactly one"):
        resolve_weights(tmp_path)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(state, str(hf / "model.safetensors"))
    (hf / "config.json").write_text("{}")
    assert resolve_weights(hf) == hf / "model.safetensors"
    # sharded safetensors with an index
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"cls_token": state["cls_token"]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"pos_embed": state["pos_embed"]}, str(shards / "model-00002-of-00002.safetensors"))
    index = {
        "weight_map": {
            "cls_token": "model-00001-of-00002.safetensors",
            "pos_embed": "model-00002-of-00002.safetensors",
        }
    }
    (shards / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    assert set(read_checkpoint(resolve_weights(shards))) == set(state)
    # HF cache: a cache root plus a repo id resolves to the newest snapshot when refs/main is absent
    repo = tmp_path / "cache" / "models--org--name" / "snapshots"
    for rev in ("old", "new"):
        (repo / rev).mkdir(parents=True)
        save_file(state, str(repo / rev / "model.safetensors"))
    import os

    os.utime(repo / "old", (1, 1))
    assert resolve_weights(tmp_path / "cache", repo_id="org/name") == repo / "new" / "model.safetensors"
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights(tmp_path / "nope.bin")


def test_pickled_objects_are_refused(tmp_path: Path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": Path("x")}, tmp_path / "unsafe.pth")
    with pytest.raises(WeightsError, match="not a loadable state dict"):
        read_checkpoint(tmp_path / "unsafe.pth")


def test_random_init_warns_and_inputs_are_checked(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        model = load_foundation("kaiko_vits16", model_kwargs={"depth": 1})
    assert "no weights given" in caplog.text
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    with pytest.raises(ValueError, match="uint8"):
        model.embed(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="multiple of the 16 px patch"):
        model.embed(tiles(1, 200))
    assert model.embed(tiles(3, 96)).shape == (3, 384)  # dynamic size: other tile sizes work
    info = model.info
    assert (info.dim, info.mean, info.patch_size, info.mpp, info.pooling) == (384, (0.5,) * 3, 16, 0.5, "cls")
