"""Foundation presets: every registered architecture builds with the shape its sources publish (blocks,
heads, MLP width, SwiGLU + SiLU, LayerScale, registers, LayerNorm eps, parameter count), and each
preset's normalisation, pooling, tile size, mpp, layouts and licence are the values its sources state.
The sources are cited in src/pathray/models/presets.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathray.models.foundation import build_backbone, load_foundation
from pathray.models.presets import FoundationPreset, get_preset, preset_names
from pathray.models.timm_compat import ensure_torchvision_ops
from pathray.registry import RegistryError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# H-optimus-0/1 and H0-mini: TRIDENT's transform, LazySlide, plismbench.
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
# lunit-io/benchmark-ssl-pathology, as quoted in eva's lunit.py and used by plismbench.
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
TIMM, VIT_HF, DINOV2_HF = ("timm",), ("vit_hf",), ("dinov2_hf",)

# name: (mean/std, pooled dim, pooling, patch, tile px, mpp, prefix tokens = class + registers, layouts)
EXPECTED = {
    "uni": (IMAGENET, 1024, "cls", 16, 224, 0.5, 1, TIMM),
    "uni2_h": (IMAGENET, 1536, "cls", 14, 224, 0.5, 9, TIMM),
    "virchow": (IMAGENET, 2560, "cls+mean", 14, 224, 0.5, 1, TIMM),
    "virchow2": (IMAGENET, 2560, "cls+mean", 14, 224, 0.5, 5, TIMM),
    "h_optimus_0": (BIOPTIMUS, 1536, "cls", 14, 224, 0.5, 5, TIMM),
    "h_optimus_1": (BIOPTIMUS, 1536, "cls", 14, 224, 0.5, 5, TIMM),
    "h0_mini": (BIOPTIMUS, 1536, "cls+mean", 14, 224, 0.5, 5, TIMM),
    "phikon": (IMAGENET, 768, "cls", 16, 224, 0.5, 1, VIT_HF),
    "phikon_v2": (IMAGENET, 1024, "cls", 16, 224, 0.5, 1, DINOV2_HF),
    "midnight": (HALF, 3072, "cls+mean", 14, 224, 0.5, 1, DINOV2_HF),
    "gigapath": (IMAGENET, 1536, "cls", 16, 224, 0.5, 1, TIMM),
    "kaiko_vits16": (HALF, 384, "cls", 16, 224, 0.5, 1, TIMM),
    "kaiko_vits8": (HALF, 384, "cls", 8, 224, 0.5, 1, TIMM),
    "kaiko_vitb16": (HALF, 768, "cls", 16, 224, 0.5, 1, TIMM),
    "kaiko_vitb8": (HALF, 768, "cls", 8, 224, 0.5, 1, TIMM),
    "kaiko_vitl14": (HALF, 1024, "cls", 14, 224, 0.5, 5, TIMM),
    "lunit_vits16": (LUNIT, 384, "cls", 16, 224, 0.5, 1, TIMM),
}

# name: (blocks, heads, fc1 width, SwiGLU (packed fc1 = [gate; up], SiLU), LayerScale, no_embed_class).
# ViT-S/B/L/H/g shapes: UNI README, bioptimus/releases H-optimus v0 README (g/14: 40 blocks, 24 heads,
# 1536), TRIDENT kwargs; SwiGLU hidden = 2/3 of 4x width rounded to 8, packed twice (4096 * 2 for g).
ARCH = {
    "uni": (24, 16, 4096, False, True, False),
    "uni2_h": (24, 24, 8192, True, True, True),
    "virchow": (32, 16, 6832, True, True, False),
    "virchow2": (32, 16, 6832, True, True, False),
    "h_optimus_0": (40, 24, 8192, True, True, True),
    "h_optimus_1": (40, 24, 8192, True, True, True),
    "h0_mini": (12, 12, 4096, True, True, True),
    "phikon": (12, 12, 3072, False, False, False),
    "phikon_v2": (24, 16, 4096, False, True, False),
    "midnight": (40, 24, 8192, True, True, False),
    "gigapath": (40, 24, 8192, True, True, False),
    "kaiko_vits16": (12, 6, 1536, False, False, False),
    "kaiko_vits8": (12, 6, 1536, False, False, False),
    "kaiko_vitb16": (12, 12, 3072, False, False, False),
    "kaiko_vitb8": (12, 12, 3072, False, False, False),
    "kaiko_vitl14": (24, 16, 4096, False, True, True),
    "lunit_vits16": (12, 6, 1536, False, False, False),
}

# Published parameter counts, in millions, matched within 1 %: LazySlide's registry
# (rendeirolab/lazyslide-models vision/*.py param_size) unless noted. kaiko has no published count in
# the sources read; Lunit's 21.1M (1aurent card, LazySlide) disagrees with the architecture its own
# README loads strictly (timm ViT-S/16, 21.67M), so neither is checked here.
PARAMS_M = {
    "uni": 303.4,
    "uni2_h": 681.4,
    "virchow": 631.2,
    "virchow2": 631.2,  # and "a 632M parameter vision transformer" (arXiv 2408.00738)
    "h_optimus_0": 1130.0,  # "1.13B" (also the 1aurent timm port's card)
    "h_optimus_1": 1130.0,
    "h0_mini": 85.7,
    "phikon": 85.8,  # owkin/phikon card: "Params (M): 85.8"
    "phikon_v2": 303.4,
    "midnight": 1140.0,  # "1.14B"
    "gigapath": 1130.0,  # "1.13B"
}

# name: words the licence note must carry (model cards, repository LICENSE files, LazySlide).
LICENCES = {
    "uni": "CC-BY-NC-ND-4.0",
    "uni2_h": "CC-BY-NC-ND-4.0",
    "virchow": "Apache-2.0",
    "virchow2": "CC-BY-NC-ND-4.0",
    "h_optimus_0": "Apache-2.0",
    "h_optimus_1": "CC-BY-NC-ND-4.0",
    "h0_mini": "CC-BY-NC-ND-4.0",
    "phikon": "Owkin non-commercial",
    "phikon_v2": "Owkin non-commercial",
    "midnight": "MIT",
    "gigapath": "Apache-2.0 with conditions",
    **{name: "Kaiko Non-Commercial" for name in EXPECTED if name.startswith("kaiko_")},
    "lunit_vits16": "Lunit Inc. Public License (non-commercial",
}
META_ABOVE = 300e6


def test_every_model_of_the_issue_has_a_preset():
    assert sorted(EXPECTED) == preset_names() == sorted(ARCH) == sorted(LICENCES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_normalisation_pooling_size_and_layouts_follow_the_sources(name: str):
    (mean, std), dim, pooling, patch, tile, mpp, _, layouts = EXPECTED[name]
    preset = get_preset(name)
    assert (preset.mean, preset.std) == (mean, std)
    assert (preset.dim, preset.pooling, preset.patch_size, preset.tile_size) == (dim, pooling, patch, tile)
    assert preset.mpp == mpp and preset.layouts == layouts and preset.dynamic_size
    assert LICENCES[name] in preset.licence
    assert preset.source.count("http") >= 1 and "TRIDENT" in preset.source


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_builds_with_the_published_shape(name: str):
    preset = get_preset(name)
    meta = build_backbone(preset, device="meta")
    params = sum(p.numel() for p in meta.parameters())
    depth, heads, hidden, swiglu, layerscale, no_embed_class = ARCH[name]
    block = meta.blocks[0]
    assert meta.num_features == preset.embed_dim == meta.embed_dim
    assert tuple(meta.patch_embed.patch_size) == (preset.patch_size, preset.patch_size)
    assert meta.num_prefix_tokens == EXPECTED[name][6]
    assert (len(meta.blocks), block.attn.num_heads, block.mlp.fc1.out_features) == (depth, heads, hidden)
    assert block.mlp.fc2.in_features == (hidden // 2 if swiglu else hidden)
    assert isinstance(block.mlp.act, nn.SiLU if swiglu else nn.GELU)  # a GELU gate would load too
    assert isinstance(block.ls1, nn.Identity) is not layerscale
    assert bool(meta.no_embed_class) is no_embed_class
    # LayerNorm eps 1e-6 everywhere: timm's and DINOv2's; Phikon's corrected config.json (not 1e-12)
    assert {m.eps for m in meta.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert meta.global_pool == "token"  # the backbone's own pooling is the CLS token
    if name in PARAMS_M:
        assert params / 1e6 == pytest.approx(PARAMS_M[name], rel=0.01)
    if params <= META_ABOVE and preset.patch_size >= 14:  # small enough to run for real on CPU
        torch.manual_seed(0)
        model = load_foundation(name)
        size = (1, preset.tile_size, preset.tile_size, 3)
        tiles = np.random.default_rng(0).integers(0, 256, size, np.uint8)
        out = model.embed(tiles)
        assert out.shape == (1, preset.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert model.info.params == params and model.info.dim == preset.dim


def test_h0_mini_mlp_ratio_is_the_one_the_parameter_count_allows():
    """H0-mini's config.json was not readable: with the SwiGLUPacked MLP every reference passes, only
    mlp_ratio 5.33 (hidden 2 x 2048) gives LazySlide's 85.7M; the DINOv2 default of 4 gives 71.6M."""
    preset = get_preset("h0_mini")
    default_ratio = preset.replace(model_kwargs={"mlp_ratio": 4.0})
    params = sum(p.numel() for p in build_backbone(default_ratio, device="meta").parameters())
    assert params / 1e6 == pytest.approx(71.6, abs=0.1)
    assert abs(params / 1e6 - PARAMS_M["h0_mini"]) / PARAMS_M["h0_mini"] > 0.1


def test_kaiko_vitl14_is_built_on_the_checkpoint_grid_and_runs_on_224_tiles():
    """TRIDENT builds the kaiko ViT-L/14 at 518 px (a 37 x 37 grid) and feeds it 224 px tiles."""
    meta = build_backbone("kaiko_vitl14", device="meta")
    assert tuple(meta.patch_embed.grid_size) == (37, 37) and meta.dynamic_img_size
    assert get_preset("kaiko_vitl14").tile_size == 224


def _tiny_vit_checkpoint(folder: Path, layer_norm_eps: float) -> object:
    """A two-block transformers ViTModel whose residual stream starts tiny, so LayerNorm's eps shows."""
    ensure_torchvision_ops()  # transformers imports torchvision
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        image_size=224,
        patch_size=16,
        layer_norm_eps=layer_norm_eps,
    )
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1e-5 if name.startswith("embeddings.") else 0.2
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
    model.save_pretrained(folder)
    return model


def test_phikon_layernorm_eps_is_the_corrected_1e_6(tmp_path: Path):
    """owkin/phikon's config.json now says layer_norm_eps 1e-6 (iBOT's value; discussion #1): with a
    residual stream small enough for eps to matter, the preset's embedding equals transformers' at
    1e-6 and differs from transformers' at the old 1e-12."""
    tiny = {"embed_dim": 64, "depth": 2, "num_heads": 2}
    reference = _tiny_vit_checkpoint(tmp_path / "hf", layer_norm_eps=1e-6)
    model = load_foundation("phikon", weights=str(tmp_path / "hf"), model_kwargs=tiny)
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    pixels = model.normalize(x)
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state[:, 0]
        reference.config.layer_norm_eps = 1e-12
        old = type(reference)(reference.config, add_pooling_layer=False).eval()
        old.load_state_dict(reference.state_dict())
        old_out = old(pixel_values=pixels).last_hidden_state[:, 0]
    got = model.embed(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, old_out, rtol=1e-2, atol=1e-2)


def test_overrides_merge_model_kwargs_and_check_fields():
    uni = get_preset("uni")
    small = uni.replace(model_kwargs={"depth": 2}, mean=[0.1, 0.2, 0.3])
    assert small.model_kwargs == {**uni.model_kwargs, "depth": 2} and small.mean == (0.1, 0.2, 0.3)
    assert uni.model_kwargs.get("depth") is None  # the registered preset is untouched
    with pytest.raises(TypeError, match="colour"):
        uni.replace(colour="red")
    with pytest.raises(ValueError, match="pooling"):
        uni.replace(pooling="gem")
    with pytest.raises(ValueError, match="layouts"):
        FoundationPreset("x", "vit_small_patch16_224", 16, 384, 224, 0.5, *HALF, "cls", ("onnx",), "", "")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(RegistryError, match="uni2_h"):
        get_preset("uni3")


def test_presets_import_without_torch():
    code = (
        "import sys, pathray.models, pathray.models.presets as p\n"
        "assert p.get_preset('virchow2').dim == 2560\n"
        "print(any(m in sys.modules for m in ('torch', 'timm', 'ray')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
