"""Public pathology foundation models as named presets: architecture, normalisation, pooling, layouts.

    from pathray.models.presets import get_preset
    uni = get_preset("uni")   # torch-free: a config can read tile size, mpp and dim without building

A preset is plain data, so a YAML ``engine.preset: uni`` (with explicit overrides) can name it; the
builder (``pathray.models.foundation``) turns it into a timm backbone (it always adds ``num_classes=0``
and ``dynamic_img_size=preset.dynamic_size``). Every fact is cited, in the comment above each preset
and in its ``source``. The sources checked (public snapshots, read for this file):

- TRIDENT: mahmoodlab/TRIDENT@a91fa84 ``trident/patch_encoder_models/load.py`` (constructor kwargs,
  transforms, pooling) and ``README.md`` (the ``--patch_size``/``--mag`` each encoder is run at). The
  reference implementation: where sources disagree, or none states a fact, its value is used.
- LazySlide: rendeirolab/lazyslide-models@0127beb ``src/lazyslide_models/vision/`` (formerly
  rendeirolab/LazySlide@deeb0e2 ``src/lazyslide/models/vision/``): kwargs, pooling, licences and the
  parameter counts quoted in tests/models/test_presets.py.
- eva: kaiko-ai/eva@73b61a7 ``src/eva/vision/models/networks/backbones/pathology/``.
- kaiko hub: kaiko-ai/towards_large_pathology_fms@bfcde17 ``hubconf.py``, ``README.md``, ``LICENSE``.
- Midnight: kaiko-ai/Midnight@e48dce1 ``README.md`` (the model card's usage section).
- plismbench: owkin/plism-benchmark@b4f32b7 ``plismbench/models/`` (Owkin's own extractors).
- Phikon: owkin/HistoSSLscaling@73f1d19 ``README.md``; the owkin/phikon config.json history
  (https://huggingface.co/owkin/phikon/discussions/1, commit 1a3b784).
- Model cards on huggingface.co as quoted in the ``source`` of each preset.

Tile size and mpp are what the preset's sampler reads (``pathray.models.engines``): tiles of
``tile_size`` px at ``mpp`` µm/px go into the model without resizing. All presets use 0.5 µm/px (20x),
the magnification TRIDENT runs every one of them at; models trained on several magnifications say so
in ``notes``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pathray.registry import PRESETS

Pooling = Literal["cls", "cls+mean"]
Layout = Literal["timm", "vit_hf", "dinov2_hf"]
POOLINGS: tuple[str, ...] = ("cls", "cls+mean")
LAYOUTS: tuple[str, ...] = ("timm", "vit_hf", "dinov2_hf")

# RGB mean/std on [0, 1] images.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # kaiko.ai: kaiko hub README, Midnight README
# Bioptimus (H-optimus-0/1, H0-mini): TRIDENT HOptimus*InferenceEncoder, LazySlide h_optimus.py,
# plismbench bioptimus.py.
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
# Lunit DINO ViT-S: eva lunit.py (quoting lunit-io/benchmark-ssl-pathology), plismbench lunit.py.
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

TRIDENT = "mahmoodlab/TRIDENT@a91fa84 trident/patch_encoder_models/load.py"
TRIDENT_README = "mahmoodlab/TRIDENT@a91fa84 README.md"
LAZYSLIDE = "rendeirolab/lazyslide-models@0127beb src/lazyslide_models/vision"
EVA = "kaiko-ai/eva@73b61a7 src/eva/vision/models/networks/backbones/pathology"
KAIKO_HUB = "kaiko-ai/towards_large_pathology_fms@bfcde17"
PLISM = "owkin/plism-benchmark@b4f32b7 plismbench/models"


@dataclass(frozen=True)
class FoundationPreset:
    """One public foundation model, as its card and reference code define it.

    Attributes:
        name: registry key.
        arch: timm model name; ``model_kwargs`` are its constructor arguments. Layers are named
            by strings (``mlp_layer: swiglu_packed``, ``act_layer: silu``, ``norm_eps: 1e-12``) so
            a preset stays plain data; the builder resolves them.
        patch_size: ViT patch size in px.
        embed_dim: width of one token; the pooled embedding is ``dim``.
        tile_size: tile edge (px) the model was trained and evaluated at.
        mpp: microns per pixel of those tiles.
        mean: RGB mean on [0, 1] images. std: RGB std.
        pooling: ``cls`` (the class token after the final norm), or ``cls+mean`` (the class token
            concatenated with the mean of the patch tokens, register tokens left out).
        layouts: checkpoint key layouts accepted: ``timm``, ``vit_hf`` (transformers ViTModel),
            ``dinov2_hf`` (transformers Dinov2Model).
        dynamic_size: the model takes other tile sizes by resampling its position embedding; a
            checkpoint trained on another grid is resampled at load. Otherwise a grid mismatch is
            an error.
        hub_id: where the weights are published (``hf-hub:org/name`` or a URL), for online use.
        licence: the weights' licence, in brief.
        source: where each fact comes from (model card, reference code).
        notes: caveats, and facts marked "unverified".
    """

    name: str
    arch: str
    patch_size: int
    embed_dim: int
    tile_size: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: Pooling
    layouts: tuple[Layout, ...]
    licence: str
    source: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    dynamic_size: bool = True
    hub_id: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"preset {self.name!r}: pooling {self.pooling!r} is not one of {POOLINGS}")
        unknown = [layout for layout in self.layouts if layout not in LAYOUTS]
        if unknown or not self.layouts:
            raise ValueError(f"preset {self.name!r}: layouts {self.layouts} must be among {LAYOUTS}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"preset {self.name!r}: mean and std need 3 values, std > 0")

    @property
    def dim(self) -> int:
        """Size of the pooled embedding."""
        return self.embed_dim * (2 if self.pooling == "cls+mean" else 1)

    def replace(self, **overrides: Any) -> FoundationPreset:
        """A copy with ``overrides``; ``model_kwargs`` is merged over the preset's own."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"preset {self.name!r} has no field(s) {sorted(unknown)}")
        if "model_kwargs" in overrides:
            given = dict(overrides["model_kwargs"] or {})
            overrides["model_kwargs"] = {**self.model_kwargs, **given}
            for key in ("embed_dim", "patch_size"):  # the declared shape follows the architecture
                if key in given and key not in overrides:
                    overrides[key] = int(given[key])
        for key in ("mean", "std"):
            if key in overrides:
                overrides[key] = tuple(float(v) for v in overrides[key])
        return dataclasses.replace(self, **overrides)


def register_preset(preset: FoundationPreset) -> FoundationPreset:
    """Add ``preset`` to the registry under its name (twice is an error)."""
    PRESETS.add(preset.name, preset)
    return preset


def get_preset(name: str) -> FoundationPreset:
    """The preset ``name`` (unknown names list the known ones)."""
    return PRESETS.get(name)


def preset_names() -> list[str]:
    return PRESETS.names()


def _add(
    name: str,
    arch: str,
    patch: int,
    width: int,
    norm: tuple,
    pooling: Pooling,
    *,
    tile_size: int,
    mpp: float,
    **rest: Any,
) -> None:
    mean, std = norm
    register_preset(
        FoundationPreset(
            name, arch, patch, width, tile_size, mpp, mean=mean, std=std, pooling=pooling, **rest
        )
    )


# timm's SwiGLU as DINOv2 packs it: fc1 = [gate; up], hidden = act(gate) * up. The activation must be
# named: timm's VisionTransformer passes its own act_layer (GELU by default) to the MLP, so
# SwiGLUPacked without act_layer=SiLU builds a GELU-gated MLP -- same shapes, loads strictly, wrong.
SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
CC_NC_ND = "CC-BY-NC-ND-4.0 (gated; non-commercial, academic research only)"
OWKIN_NC = "Owkin non-commercial licence"
HF = "https://huggingface.co"

# UNI (ViT-L/16, LayerScale, no registers). kwargs: TRIDENT UNIInferenceEncoder = LazySlide uni.py
# (img_size 224, patch_size 16, init_values 1e-5); eva mahmood_uni. CLS: TRIDENT returns model(x)
# with timm's default global_pool "token". Transform: mahmoodlab/UNI@42715ef README (Resize/CenterCrop
# 224, ImageNet mean/std). Licence: UNI README "License and Terms of Use" (CC-BY-NC-ND 4.0).
# mpp: TRIDENT README runs UNI on 256 px tiles at 20x and resizes them to 224 (an effective 0.57 µm/px);
# training tiles were 256 px (512 px in a last high-resolution phase) per the UNI paper as quoted in
# huggingface.co/MahmoodLab/UNI/discussions/21, the card suggesting 224 px input. 20x: TRIDENT only.
_add(
    "uni",
    "vit_large_patch16_224",
    16,
    1024,
    IMAGENET,
    "cls",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
    layouts=("timm",),
    hub_id="hf-hub:MahmoodLab/uni",
    licence=CC_NC_ND,
    source=f"{HF}/MahmoodLab/UNI; https://github.com/mahmoodlab/UNI (README); {TRIDENT} UNIInferenceEncoder; "
    f"{TRIDENT_README} (--patch_size 256 --mag 20); {LAZYSLIDE}/uni.py; {EVA}/mahmood.py",
    notes="LayerScale (init_values) is part of the checkpoint: ls1/ls2.gamma must load. TRIDENT tiles "
    "256 px at 20x and resizes to 224; 224 px at 0.5 mpp here (the card's input size at TRIDENT's 20x).",
)

# UNI2-h (ViT-H/14-reg8: 24 blocks, width 1536, 24 heads, SwiGLU, 8 registers, no_embed_class).
# kwargs identical in TRIDENT UNIv2InferenceEncoder, mahmoodlab/UNI@42715ef README, LazySlide uni.py,
# eva mahmood_uni2_h. CLS (timm "token" pooling, registers never pooled). Licence: UNI README.
# mpp: TRIDENT README 256 px at 20x resized to 224 (the UNI2-h card was not read; unverified beyond).
_add(
    "uni2_h",
    "vit_giant_patch14_224",
    14,
    1536,
    IMAGENET,
    "cls",
    tile_size=224,
    mpp=0.5,
    model_kwargs={
        "img_size": 224,
        "patch_size": 14,
        "depth": 24,
        "num_heads": 24,
        "init_values": 1e-5,
        "embed_dim": 1536,
        "mlp_ratio": 2.66667 * 2,
        "no_embed_class": True,
        "reg_tokens": 8,
        **SWIGLU,
    },
    layouts=("timm",),
    hub_id="hf-hub:MahmoodLab/UNI2-h",
    licence=CC_NC_ND,
    source=f"{HF}/MahmoodLab/UNI2-h; https://github.com/mahmoodlab/UNI (README timm_kwargs); {TRIDENT} "
    f"UNIv2InferenceEncoder; {TRIDENT_README} (--patch_size 256 --mag 20); {LAZYSLIDE}/uni.py; "
    f"{EVA}/mahmood.py",
    notes="8 register tokens; CLS output as in the reference code. Training mpp unverified: 0.5 is "
    "TRIDENT's 20x.",
)

# Virchow (ViT-H/14, SwiGLU mlp_ratio 5.3375, LayerScale, no registers). kwargs: TRIDENT
# VirchowInferenceEncoder (img_size 224, init_values 1e-5, mlp_ratio 5.3375, SwiGLUPacked, SiLU);
# LazySlide virchow.py. Pooling: cat(CLS, mean(tokens[1:])) = 2560-d in TRIDENT and LazySlide (the
# card's recipe). Licence: card (Apache 2.0 with additional terms, gated). 224 px at 20x: TRIDENT README.
_add(
    "virchow",
    "vit_huge_patch14_224",
    14,
    1280,
    IMAGENET,
    "cls+mean",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU},
    layouts=("timm",),
    hub_id="hf-hub:paige-ai/Virchow",
    licence="Apache-2.0 with additional terms (gated)",
    source=f"{HF}/paige-ai/Virchow; {TRIDENT} VirchowInferenceEncoder (cat(CLS, mean(tokens[1:]))); "
    f"{TRIDENT_README} (--patch_size 224 --mag 20); {LAZYSLIDE}/virchow.py",
    notes="2560-d = CLS + mean of the 256 patch tokens. 224 px at 20x per TRIDENT README (the Virchow "
    "paper, arXiv 2309.07778, was not read here).",
)

# Virchow2 (as Virchow, plus 4 registers; no_embed_class stays False: the position embedding covers
# CLS + registers, as TRIDENT's strict load of pytorch_model.bin with these kwargs implies). kwargs:
# TRIDENT Virchow2InferenceEncoder, eva paige.py, LazySlide virchow.py. Pooling: cat(CLS,
# mean(tokens[5:])) in TRIDENT (registers left out); kaiko-ai/Midnight@e48dce1 eval/backbones.py
# Virchow2 (asserts num_prefix_tokens == 5, means the tokens after them).
# Licence: card (CC-BY-NC-ND 4.0). Mixed-magnification training: arXiv 2408.00738 (title).
_add(
    "virchow2",
    "vit_huge_patch14_224",
    14,
    1280,
    IMAGENET,
    "cls+mean",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **SWIGLU},
    layouts=("timm",),
    hub_id="hf-hub:paige-ai/Virchow2",
    licence=CC_NC_ND,
    source=f"{HF}/paige-ai/Virchow2; {TRIDENT} Virchow2InferenceEncoder (cat(CLS, mean(tokens[5:]))); "
    f"{TRIDENT_README} (--patch_size 224 --mag 20); {LAZYSLIDE}/virchow.py; {EVA}/paige.py",
    notes="4 registers, left out of the mean. Trained on mixed magnifications (arXiv 2408.00738, "
    '"mixed magnification models"; the exact set was not read here): 0.5 mpp is TRIDENT\'s 20x, '
    "not the only training scale.",
)

# H-optimus-0 / H-optimus-1 (ViT-g/14 reg4: 40 blocks, width 1536, 24 heads, SwiGLU, LayerScale,
# no_embed_class; all timm arch defaults of vit_giant_patch14_reg4_dinov2). kwargs: TRIDENT
# HOptimus0/1InferenceEncoder (init_values 1e-5, global_pool "token" = CLS), LazySlide h_optimus.py,
# plismbench bioptimus.py, bioptimus/releases@218eb7e models/h-optimus/v0/README.md (g/14, 4 registers,
# 40 blocks, 24 heads, width 1536). Tiles: the H-optimus-0 card "expects images of size 224x224 that
# were extracted at 0.5 microns per pixel" (quoted); H-optimus-1: 224 px at 20x per TRIDENT README.
# Licences: H-optimus-0 card Apache-2.0; H-optimus-1 CC-BY-NC-ND-4.0 per LazySlide (card not read).
for _name, _hub, _licence in (
    ("h_optimus_0", "H-optimus-0", "Apache-2.0"),
    ("h_optimus_1", "H-optimus-1", CC_NC_ND),
):
    _add(
        _name,
        "vit_giant_patch14_reg4_dinov2",
        14,
        1536,
        BIOPTIMUS,
        "cls",
        tile_size=224,
        mpp=0.5,
        model_kwargs={"img_size": 224, "init_values": 1e-5},
        layouts=("timm",),
        hub_id=f"hf-hub:bioptimus/{_hub}",
        licence=_licence,
        source=f"{HF}/bioptimus/{_hub}; {TRIDENT} HOptimus*InferenceEncoder (own mean/std, global_pool="
        f"token); {TRIDENT_README} (--patch_size 224 --mag 20); {LAZYSLIDE}/h_optimus.py; "
        f"{PLISM}/bioptimus.py; https://github.com/bioptimus/releases (models/h-optimus/v0)",
        notes="ViT-g/14, 4 registers, SwiGLU + SiLU, LayerScale (timm arch defaults). 224 px at 0.5 mpp.",
    )

# H0-mini: ViT-B/14 with 4 registers, distilled from H-optimus-0 (eva bioptimus.py docstring;
# LazySlide "A distilled version of H-optimus-0"; arXiv 2501.16239) -- not from H-optimus-1.
# Architecture: every reference (TRIDENT H0MiniInferenceEncoder, LazySlide, eva, plismbench, the card)
# builds hf-hub:bioptimus/H0-mini with mlp_layer=SwiGLUPacked, act_layer=SiLU. The card's sample output
# (1, 261, 768) = CLS + 4 registers + 16x16 patches. The config.json itself (arch name, mlp_ratio,
# init_values) could not be read here: mlp_ratio 5.33 is inferred -- with SwiGLUPacked, a ratio of 4
# gives 71.6M parameters, 5.33 gives 85.74M, and LazySlide registers 85.7M; a wrong
# ratio, missing LayerScale or registers would fail strict loading loudly, not silently.
# Pooling: the card's sample (and LazySlide) concatenate CLS with the mean of the patch tokens after
# num_prefix_tokens (1536-d); TRIDENT defaults to CLS but offers return_type="cls+mean" and lists the
# model as 768/1536-d in its README; eva and plismbench use CLS. The card (the publisher) is followed.
_add(
    "h0_mini",
    "vit_base_patch14_reg4_dinov2",
    14,
    768,
    BIOPTIMUS,
    "cls+mean",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, **SWIGLU},
    layouts=("timm",),
    hub_id="hf-hub:bioptimus/H0-mini",
    licence=CC_NC_ND,
    source=f"{HF}/bioptimus/H0-mini (sample: output (1, 261, 768), cat(CLS, mean(tokens["
    f"num_prefix_tokens:])) -> 1536); {TRIDENT} H0MiniInferenceEncoder (SwiGLUPacked, SiLU); "
    f"{TRIDENT_README} (--patch_size 224 --mag 20, 768/1536-d); {LAZYSLIDE}/h_optimus.py (85.7M params, "
    f"1536-d); {EVA}/bioptimus.py; {PLISM}/bioptimus.py",
    notes="Distilled from H-optimus-0 on TCGA tiles (arXiv 2501.16239). mlp_ratio 5.33 inferred from "
    "85.7M parameters (config.json unread). Pooling follows the card; TRIDENT, eva and plismbench "
    "default to CLS only (pooling='cls' gives their 768-d embedding).",
)

# Phikon (iBOT ViT-B/16; transformers ViTModel layout). LayerNorm eps: 1e-6. The original config.json
# said 1e-12 (ViTConfig's default); Owkin merged "Update layer_norm_eps to match timm" (owkin/phikon
# discussion #1, commit 1a3b784: "I confirm its layer_norm_eps=1e-6 following iBOT official
# implementation"), and owkin/HistoSSLscaling's ViT uses partial(nn.LayerNorm, eps=1e-6). Pooling:
# last_hidden_state[:, 0] without the pooler (TRIDENT PhikonInferenceEncoder add_pooling_layer=False;
# LazySlide; plismbench). ImageNet mean/std: HistoSSLscaling ibot_vit.py, TRIDENT. Tiles: 224 px at
# 0.5 µm/px (HistoSSLscaling README: "All tiles were extracted at 0.5 micrometers / pixel (20x)").
_add(
    "phikon",
    "vit_base_patch16_224",
    16,
    768,
    IMAGENET,
    "cls",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224, "norm_eps": 1e-6},
    layouts=("vit_hf",),
    hub_id="hf-hub:owkin/phikon",
    licence=OWKIN_NC,
    source=f"{HF}/owkin/phikon; {HF}/owkin/phikon/discussions/1 (layer_norm_eps 1e-6); "
    f"https://github.com/owkin/HistoSSLscaling (README, 0.5 mpp); {TRIDENT} PhikonInferenceEncoder "
    f"(ViTModel, last_hidden_state[:, 0]); {LAZYSLIDE}/phikon.py; {PLISM}/owkin.py",
    notes="iBOT ViT-B/16 in transformers ViTModel layout; the pooler is not used. LayerNorm eps 1e-6 as "
    "the corrected config.json and iBOT have it (not ViTConfig's default 1e-12).",
)

# Phikon-v2 (DINOv2 ViT-L/16, plain GELU MLP, LayerScale; transformers Dinov2Model layout). Card:
# "ViT-L/16 via DINOv2", "450M 20x magnification histology images", CLS token features, Owkin
# non-commercial licence. TRIDENT Phikonv2InferenceEncoder: AutoModel, last_hidden_state[:, 0],
# Resize/CenterCrop 224, ImageNet mean/std. LayerNorm eps: Dinov2Config's default 1e-6 = timm's;
# phikon-v2's config.json could not be read here (unverified). 303.4M parameters: LazySlide.
_add(
    "phikon_v2",
    "vit_large_patch16_224",
    16,
    1024,
    IMAGENET,
    "cls",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224, "init_values": 1e-5},
    layouts=("dinov2_hf",),
    hub_id="hf-hub:owkin/phikon-v2",
    licence=OWKIN_NC,
    source=f"{HF}/owkin/phikon-v2 (ViT-L/16, 20x, CLS); {TRIDENT} Phikonv2InferenceEncoder (AutoModel, "
    f"last_hidden_state[:, 0]); {TRIDENT_README} (--patch_size 224 --mag 20); {LAZYSLIDE}/phikon.py "
    f"(303.4M params, 1024-d); {PLISM}/owkin.py",
    notes="DINOv2 ViT-L/16 in transformers Dinov2Model layout. LayerNorm eps 1e-6 (Dinov2Config default; "
    "config.json unread).",
)

# Midnight-12k (DINOv2 ViT-g/14 with SwiGLU, no registers; transformers Dinov2Model layout; base_model
# facebook/dinov2-giant, whose config has image_size 518 and layer_norm_eps 1e-6). Card (= kaiko-ai/
# Midnight@e48dce1 README): "trained on 224x224 images normalized with a mean of (0.5, 0.5, 0.5) and a
# standard deviation of (0.5, 0.5, 0.5)"; classification embedding cat(CLS, mean(tokens[1:])) = 3072-d;
# licence MIT. TRIDENT Midnight12kInferenceEncoder defaults to CLS but implements "cls+mean" and its
# README lists Midnight-12k as 3072-d; LazySlide midnight.py uses cls+mean ("Trained in 518, 518" for
# the checkpoint's position grid). Tile size: 224 (not 392, which is Midnight-92k/392's post-training,
# nor 518, the checkpoint's grid). Training tiles were sampled at several magnifications (online
# patching at 0.25-2 µm/px, per a summary of arXiv 2504.05186 / 2404.15217 -- the papers were not
# read here); 0.5 is TRIDENT's --mag 20.
_add(
    "midnight",
    "vit_giant_patch14_dinov2",
    14,
    1536,
    HALF,
    "cls+mean",
    tile_size=224,
    mpp=0.5,
    model_kwargs={"img_size": 224},
    layouts=("dinov2_hf",),
    hub_id="hf-hub:kaiko-ai/midnight",
    licence="MIT",
    source=f"{HF}/kaiko-ai/midnight; https://github.com/kaiko-ai/Midnight (README: 224 px, mean/std 0.5, "
    f"cat(CLS, mean(patch tokens))); {TRIDENT} Midnight12kInferenceEncoder; {TRIDENT_README} "
    f"(--patch_size 224 --mag 20, 3072-d); {LAZYSLIDE}/midnight.py (cls+mean, 3072-d)",
    notes="transformers Dinov2Model ViT-g/14 with SwiGLU; the checkpoint's position embedding (518 px "
    "grid) is resampled to 224 at load, as transformers does at run time. Multi-magnification training; "
    "0.5 mpp is TRIDENT's default.",
)

# Prov-GigaPath tile encoder (ViT-g with a 16 px patch: 40 blocks, width 1536, 24 heads, SwiGLU
# mlp_ratio 5.33334, LayerScale 1e-5 -- init_values and SwiGLU + SiLU are defaults of the
# vit_giant_patch14_dinov2 arch that TRIDENT overrides with patch_size=16). CLS (timm "token").
# Tiles: TRIDENT README 256 px at 20x; transform Resize(256) + CenterCrop(224), i.e. a 224 px centre
# crop at 0.5 µm/px. Licence: LazySlide gigapath.py ("Apache 2.0 with conditions", commercial=False).
_add(
    "gigapath",
    "vit_giant_patch14_dinov2",
    16,
    1536,
    IMAGENET,
    "cls",
    tile_size=224,
    mpp=0.5,
    model_kwargs={
        "img_size": 224,
        "patch_size": 16,
        "embed_dim": 1536,
        "depth": 40,
        "num_heads": 24,
        "mlp_ratio": 5.33334,
        "init_values": 1e-5,
    },
    layouts=("timm",),
    hub_id="hf-hub:prov-gigapath/prov-gigapath",
    licence="Apache-2.0 with conditions (gated)",
    source=f"{HF}/prov-gigapath/prov-gigapath; {TRIDENT} GigaPathInferenceEncoder (patch_size=16 over the "
    f"patch14 arch name); {TRIDENT_README} (--patch_size 256 --mag 20); {LAZYSLIDE}/gigapath.py; "
    f"{EVA}/gigapath.py",
    notes="Tile encoder only: ViT-g with a 16 px patch, SwiGLU. Tiles of 256 px at 0.5 mpp centre-cropped "
    "to 224 (TRIDENT's transform), so 224 px at 0.5 mpp.",
)

# kaiko.ai ViT-S/16, S/8, B/16, B/8 (plain timm ViTs) and L/14 (DINOv2 ViT-L/14 with 4 registers).
# Architectures and weights: kaiko hub hubconf.py (vit_small_patch16_224, vit_small_patch8_224,
# vit_base_patch16_224, vit_base_patch8_224, vit_large_patch14_reg4_dinov2; num_classes 0;
# dynamic_img_size True); TRIDENT Kaiko*InferenceEncoder (same arch names; L/14 built at img_size 518
# and run on 224 px tiles, hubconf builds at timm's default 224 and resamples the checkpoint grid at
# load -- the same bicubic resampling, so the same model); eva kaiko.py loads hubconf. Pooling: CLS
# (timm "token"; kaiko README asserts a 384-d output for ViT-S/16). Preprocessing: kaiko README
# Resize(224) + CenterCrop(224), mean/std 0.5. Licence: kaiko hub LICENSE (Kaiko Non-Commercial Public
# License v1). Tiles: TRIDENT README 256 px at 20x resized to 224; trained on several magnifications
# (online patching, arXiv 2404.15217), so 0.5 mpp is a default.
for _name, _arch, _patch, _width in (
    ("kaiko_vits16", "vit_small_patch16_224", 16, 384),
    ("kaiko_vits8", "vit_small_patch8_224", 8, 384),
    ("kaiko_vitb16", "vit_base_patch16_224", 16, 768),
    ("kaiko_vitb8", "vit_base_patch8_224", 8, 768),
    ("kaiko_vitl14", "vit_large_patch14_reg4_dinov2", 14, 1024),
):
    _add(
        _name,
        _arch,
        _patch,
        _width,
        HALF,
        "cls",
        tile_size=224,
        mpp=0.5,
        model_kwargs={"img_size": 518} if _patch == 14 else {},
        layouts=("timm",),
        hub_id=f"https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/{_name[6:]}.pth",
        licence="Kaiko Non-Commercial Public License v1",
        source=f"https://github.com/kaiko-ai/towards_large_pathology_fms ({KAIKO_HUB} hubconf.py, README: "
        f"mean/std 0.5, 224 px); {TRIDENT} Kaiko*InferenceEncoder; {TRIDENT_README} (--patch_size 256 "
        f"--mag 20); {EVA}/kaiko.py",
        notes="Trained on several magnifications (arXiv 2404.15217); 0.5 mpp is TRIDENT's default."
        + (
            " Built at 518 px as in TRIDENT (the checkpoint's grid); 224 px tiles resample at run time."
            if _patch == 14
            else ""
        ),
    )

# Lunit DINO ViT-S/16 (Kang et al., CVPR 2023). Architecture: lunit-io/benchmark-ssl-pathology@d0288de
# README builds timm VisionTransformer(img_size=224, patch_size=16, embed_dim=384, num_heads=6,
# num_classes=0) and loads dino_vit_small_patch16_ep200.torch = vit_small_patch16_224; eva lunit.py
# (vit_small_patch16_224.dino + that checkpoint). CLS (timm "token"). mean/std: eva lunit.py docstring,
# plismbench lunit.py. Licence: the repo's LICENSE ("Lunit Inc. Public License": non-commercial, no
# patent use), as LazySlide lunit.py ("lunit-non-commercial"). Tile size 224 (the README's img_size).
# mpp: not stated in the sources read (unverified); 0.5 as TRIDENT runs the Lunit ViT-S/8 (224 px, 20x).
_add(
    "lunit_vits16",
    "vit_small_patch16_224",
    16,
    384,
    LUNIT,
    "cls",
    tile_size=224,
    mpp=0.5,
    layouts=("timm",),
    hub_id="https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
    "dino_vit_small_patch16_ep200.torch",
    licence="Lunit Inc. Public License (non-commercial, research only)",
    source="https://github.com/lunit-io/benchmark-ssl-pathology (README, LICENSE); "
    f"{EVA}/lunit.py (mean/std, vit_small_patch16_224.dino + checkpoint); {PLISM}/lunit.py; "
    f"{LAZYSLIDE}/lunit.py (licence); {TRIDENT_README} (lunit-vits8: --patch_size 224 --mag 20)",
    notes="DINO ViT-S/16 (CVPR 2023 benchmark). Training mpp unverified: 0.5 is TRIDENT's 20x for the "
    "sibling ViT-S/8.",
)
