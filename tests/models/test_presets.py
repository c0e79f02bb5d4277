"""Foundation presets: every registered architecture builds with its declared shape, and each preset's
normalisation, pooling and size are the values its sources publish."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pathray.models.foundation import build_backbone, load_foundation
from pathray.models.presets import FoundationPreset, get_preset, preset_names
from pathray.registry import RegistryError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# H-optimus-0/1 and H0-mini: model cards and TRIDENT's transform.
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
# lunit-io/benchmark-ssl-pathology, as quoted in eva's lunit.py.
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

# name: (mean/std, pooled dim, pooling, patch, tile, prefix tokens = class + registers), from the sources.
EXPECTED = {
    "uni": (IMAGENET, 1024, "cls", 16, 224, 1),
    "uni2_h": (IMAGENET, 1536, "cls", 14, 224, 9),
    "virchow": (IMAGENET, 2560, "cls+mean", 14, 224, 1),
    "virchow2": (IMAGENET, 2560, "cls+mean", 14, 224, 5),
    "h_optimus_0": (BIOPTIMUS, 1536, "cls", 14, 224, 5),
    "h_optimus_1": (BIOPTIMUS, 1536, "cls", 14, 224, 5),
    "h0_mini": (BIOPTIMUS, 1536, "cls+mean", 14, 224, 5),
    "phikon": (IMAGENET, 768, "cls", 16, 224, 1),
    "phikon_v2": (IMAGENET, 1024, "cls", 16, 224, 1),
    "midnight": (HALF, 3072, "cls+mean", 14, 224, 1),
    "gigapath": (IMAGENET, 1536, "cls", 16, 224, 1),
    "kaiko_vits16": (HALF, 384, "cls", 16, 224, 1),
    "kaiko_vits8": (HALF, 384, "cls", 8, 224, 1),
    "kaiko_vitb16": (HALF, 768, "cls", 16, 224, 1),
    "kaiko_vitb8": (HALF, 768, "cls", 8, 224, 1),
    "kaiko_vitl14": (HALF, 1024, "cls", 14, 224, 5),
    "lunit_vits16": (LUNIT, 384, "cls", 16, 224, 1),
}
# Parameter counts the reference code reports (LazySlide's registry), in millions.
PARAMS_M = {
    "uni": 303.4,
    "uni2_h": 681.4,
    "virchow": 631.2,
    "virchow2": 631.2,
    "phikon": 85.8,
    "phikon_v2": 303.4,
    "h0_mini": 85.7,
    "midnight": 1134.8,
    "h_optimus_0": 1134.8,
}
META_ABOVE = 300e6


def test_every_model_of_the_issue_has_a_preset():
    assert sorted(EXPECTED) == preset_names()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_normalisation_pooling_and_size_follow_the_sources(name: str):
    (mean, std), dim, pooling, patch, tile, _ = EXPECTED[name]
    preset = get_preset(name)
    assert (preset.mean, preset.std) == (mean, std)
    assert (preset.dim, preset.pooling, preset.patch_size, preset.tile_size) == (dim, pooling, patch, tile)
    assert preset.source.count("http") >= 1 and preset.licence and preset.layouts


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_architecture_builds_with_the_declared_shape(name: str):
    preset = get_preset(name)
    meta = build_backbone(preset, device="meta")
    params = sum(p.numel() for p in meta.parameters())
    assert meta.num_features == preset.embed_dim
    assert tuple(meta.patch_embed.patch_size) == (preset.patch_size, preset.patch_size)
    assert meta.num_prefix_tokens == EXPECTED[name][5]
    if name in PARAMS_M:
        assert params / 1e6 == pytest.approx(PARAMS_M[name], abs=0.1)
    if params <= META_ABOVE and preset.patch_size >= 14:  # small enough to run for real on CPU
        torch.manual_seed(0)
        model = load_foundation(name)
        size = (1, preset.tile_size, preset.tile_size, 3)
        tiles = np.random.default_rng(0).integers(0, 256, size, np.uint8)
        out = model.embed(tiles)
        assert out.shape == (1, preset.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert model.info.params == params and model.info.dim == preset.dim


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
