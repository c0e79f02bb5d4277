"""Public pathology foundation models as named presets: architecture, normalisation, pooling, layouts.

    from pathray.models.presets import get_preset
    uni = get_preset("uni")   # torch-free: a config can read tile size, mpp and dim without building

A preset is plain data, so a YAML ``engine.preset: uni`` (with explicit overrides) can name it; the
builder (``pathray.models.foundation``) turns it into a timm backbone. Every fact is cited in
``source``: TRIDENT = mahmoodlab/TRIDENT@a91fa84 ``trident/patch_encoder_models/load.py``;
LazySlide = rendeirolab/LazySlide@deeb0e2 ``src/lazyslide/models/vision/``; eva =
kaiko-ai/eva@73b61a7 ``src/eva/vision/models/networks/backbones/pathology/``; kaiko hub =
kaiko-ai/towards_large_pathology_fms@bfcde17 ``hubconf.py``. Facts no source states are marked
"unverified" in ``notes``.
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

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

TRIDENT = "TRIDENT load.py"
LAZYSLIDE = "LazySlide models/vision"
EVA = "eva backbones/pathology"


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


def _add(name: str, arch: str, patch: int, width: int, norm: tuple, pooling: Pooling, **rest: Any) -> None:
    rest.setdefault("tile_size", 224)
    rest.setdefault("mpp", 0.5)
    mean, std = norm
    register_preset(FoundationPreset(name, arch, patch, width, mean=mean, std=std, pooling=pooling, **rest))


SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
CC_NC_ND = "CC-BY-NC-ND-4.0 (gated; non-commercial)"

_add(
    "uni",
    "vit_large_patch16_224",
    16,
    1024,
    IMAGENET,
    "cls",
    model_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
    layouts=("timm",),
    hub_id="hf-hub:MahmoodLab/uni",
    licence=CC_NC_ND,
    source=f"https://huggingface.co/MahmoodLab/UNI; {TRIDENT} UNIInferenceEncoder; {LAZYSLIDE}/uni.py",
    notes="LayerScale (init_values) is part of the checkpoint: ls1/ls2.gamma must load. 20x (0.5 mpp) "
    "per the UNI paper (unverified here).",
)
_add(
    "uni2_h",
    "vit_giant_patch14_224",
    14,
    1536,
    IMAGENET,
    "cls",
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
    source=f"https://huggingface.co/MahmoodLab/UNI2-h; {TRIDENT} UNIv2InferenceEncoder; {LAZYSLIDE}/uni.py; "
    f"{EVA}/mahmood.py",
    notes="8 register tokens; CLS output as in the reference code. mpp 0.5 unverified here.",
)
_add(
    "virchow",
    "vit_huge_patch14_224",
    14,
    1280,
    IMAGENET,
    "cls+mean",
    model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, **SWIGLU},
    layouts=("timm",),
    hub_id="hf-hub:paige-ai/Virchow",
    licence="Apache-2.0 (gated)",
    source=f"https://huggingface.co/paige-ai/Virchow; {TRIDENT} VirchowInferenceEncoder (cat(CLS, "
    f"mean(tokens[1:]))); {LAZYSLIDE}/virchow.py",
    notes="2560-d = CLS + mean of patch tokens. Trained at 20x (0.5 mpp), per the Virchow paper (unverified "
    "here).",
)
_add(
    "virchow2",
    "vit_huge_patch14_224",
    14,
    1280,
    IMAGENET,
    "cls+mean",
    model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4, **SWIGLU},
    layouts=("timm",),
    hub_id="hf-hub:paige-ai/Virchow2",
    licence=CC_NC_ND,
    source=f"https://huggingface.co/paige-ai/Virchow2; {TRIDENT} Virchow2InferenceEncoder (cat(CLS, "
    f"mean(tokens[5:]))); {LAZYSLIDE}/virchow.py; {EVA}/paige.py",
    notes="4 registers, left out of the mean. Trained on mixed magnifications (5x-40x, arXiv 2408.00738); "
    "0.5 mpp is a default, not the only training scale.",
)
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
        model_kwargs={"img_size": 224, "init_values": 1e-5},
        layouts=("timm",),
        hub_id=f"hf-hub:bioptimus/{_hub}",
        licence=_licence,
        source=f"https://huggingface.co/bioptimus/{_hub}; {TRIDENT} HOptimus*InferenceEncoder (own mean/std, "
        f"global_pool=token); {LAZYSLIDE}/h_optimus.py",
        notes="ViT-g/14, 4 registers, SwiGLU (timm arch defaults). 224 px at 0.5 mpp per the model card.",
    )
_add(
    "h0_mini",
    "vit_base_patch14_reg4_dinov2",
    14,
    768,
    BIOPTIMUS,
    "cls+mean",
    model_kwargs={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, **SWIGLU},
    layouts=("timm",),
    hub_id="hf-hub:bioptimus/H0-mini",
    licence=CC_NC_ND,
    source=f"https://huggingface.co/bioptimus/H0-mini (sample: output (1, 261, 768), cat(CLS, mean(tokens["
    f"num_prefix_tokens:])) -> 1536); {TRIDENT} H0MiniInferenceEncoder (SwiGLUPacked, SiLU); "
    f"{LAZYSLIDE}/h_optimus.py (85.7M params, 1536-d)",
    notes="Unverified here (config.json not readable offline): the timm arch name, mlp_ratio 5.33 and "
    "init_values are inferred from 261 tokens = CLS + 4 registers + 16x16 and 85.7M parameters. "
    "TRIDENT and eva default to CLS only; the card and LazySlide use CLS+mean.",
)
_add(
    "phikon",
    "vit_base_patch16_224",
    16,
    768,
    IMAGENET,
    "cls",
    model_kwargs={"img_size": 224, "norm_eps": 1e-12},
    layouts=("vit_hf",),
    hub_id="hf-hub:owkin/phikon",
    licence="Owkin non-commercial",
    source=f"https://huggingface.co/owkin/phikon; {TRIDENT} PhikonInferenceEncoder (ViTModel, "
    f"last_hidden_state[:, 0]); {LAZYSLIDE}/phikon.py",
    notes="iBOT ViT-B/16 in transformers ViTModel layout; the pooler is not used. layer_norm_eps 1e-12 "
    "is ViTConfig's default (phikon's config.json unverified here). 20x (0.5 mpp).",
)
_add(
    "phikon_v2",
    "vit_large_patch16_224",
    16,
    1024,
    IMAGENET,
    "cls",
    model_kwargs={"img_size": 224, "init_values": 1e-5},
    layouts=("dinov2_hf",),
    hub_id="hf-hub:owkin/phikon-v2",
    licence="Owkin non-commercial",
    source=f"https://huggingface.co/owkin/phikon-v2; {TRIDENT} Phikonv2InferenceEncoder (AutoModel, "
    f"last_hidden_state[:, 0]); {LAZYSLIDE}/phikon.py (303.4M params, 1024-d)",
    notes="DINOv2 ViT-L/16 in transformers Dinov2Model layout. mpp 0.5 unverified here.",
)
_add(
    "midnight",
    "vit_giant_patch14_dinov2",
    14,
    1536,
    HALF,
    "cls+mean",
    model_kwargs={"img_size": 224},
    layouts=("dinov2_hf",),
    hub_id="hf-hub:kaiko-ai/midnight",
    licence="MIT",
    source=f"https://huggingface.co/kaiko-ai/midnight; {TRIDENT} Midnight12kInferenceEncoder (KAIKO "
    f"mean/std 0.5, cls+mean option); {LAZYSLIDE}/midnight.py (cls+mean, 3072-d)",
    notes="transformers Dinov2Model ViT-g/14 with SwiGLU; the checkpoint's position embedding (518 px "
    "per LazySlide) is resampled to 224 at load as transformers does at run time. mpp unverified here.",
)
_add(
    "gigapath",
    "vit_giant_patch14_dinov2",
    16,
    1536,
    IMAGENET,
    "cls",
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
    licence="Apache-2.0 with conditions",
    source=f"https://huggingface.co/prov-gigapath/prov-gigapath; {TRIDENT} GigaPathInferenceEncoder "
    f"(patch_size=16 over the patch14 arch name); {LAZYSLIDE}/gigapath.py",
    notes="Tile encoder only: ViT-g with a 16 px patch, SwiGLU. Tiles of 256 px at 0.5 mpp centre-cropped "
    "to 224 (TRIDENT's transform).",
)
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
        model_kwargs={"img_size": 518} if _patch == 14 else {},
        layouts=("timm",),
        hub_id=f"https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/{_name[6:]}.pth",
        licence="Kaiko Non-Commercial Public License",
        source=f"https://github.com/kaiko-ai/towards_large_pathology_fms (hubconf.py, README: mean/std 0.5, "
        f"224 px); {TRIDENT} Kaiko*InferenceEncoder; {EVA}/kaiko.py",
        notes="Trained on several magnifications (arXiv 2404.15217); 0.5 mpp is a default, unverified."
        + (" Built at 518 px as in hubconf; 224 px tiles resample at run time." if _patch == 14 else ""),
    )
_add(
    "lunit_vits16",
    "vit_small_patch16_224",
    16,
    384,
    LUNIT,
    "cls",
    layouts=("timm",),
    hub_id="https://github.com/lunit-io/benchmark-ssl-pathology/releases/download/pretrained-weights/"
    "dino_vit_small_patch16_ep200.torch",
    licence="see lunit-io/benchmark-ssl-pathology (unverified here)",
    source=f"https://github.com/lunit-io/benchmark-ssl-pathology; {EVA}/lunit.py (mean/std, "
    "vit_small_patch16_224.dino + checkpoint)",
    notes="DINO ViT-S/16 (CVPR 2023 benchmark); 20x and 40x tiles in training, 0.5 mpp unverified here.",
)
