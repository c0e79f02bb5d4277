"""Tile augmentations: flips and 90° turns (targets follow them), HED stain jitter, brightness/contrast.

Also self-supervised multi-crop as DINOv2 does it (a few large "global" and many small "local"
views of one tile, each flipped, colour-jittered, greyed, blurred, solarised with its own odds),
with Midnight's pathology options: HED stain jitter per view and an HSV filter that drops tiles
that are not stained tissue. Pure numpy and PIL, seeded by the caller's generator, so the same
stream augments the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter
from pydantic import Field

from pathray.models.tasks import Spatial
from pathray.section import Section

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB) as rows; RGB optical density = HED @ M.
_HED_FROM_RGB_INV = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_HED_FROM_RGB_INV /= np.linalg.norm(_HED_FROM_RGB_INV, axis=1, keepdims=True)
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB_INV).astype(np.float32)


Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class AugmentConfig(Section):
    """How strongly to augment; zeros switch a transform off.

    ``flips``, ``rot90``, ``hed_sigma``, ``brightness`` and ``contrast`` drive ``augment`` (supervised
    tiles, targets follow). The rest drive ``multicrop`` (self-supervised views) and default to
    DINOv2's ``DataAugmentationDINO`` (facebookresearch/dinov2, dinov2/data/augmentations.py);
    Midnight's recipe adds ``hed_p`` 0.5 and ``hsv_filter`` (OpenMidnight also halves the jitter
    strengths: brightness 0.2, contrast 0.2, saturation 0.1, hue 0.05).
    """

    flips: bool = Field(True, description="augment: flip left-right and top-bottom, each with p 0.5")
    rot90: bool = Field(True, description="augment: turn square tiles by a random multiple of 90°")
    hed_sigma: float = Field(
        0.05, description="stain jitter: each HED channel scaled by 1±σ and shifted by ±σ"
    )
    brightness: float = Field(0.1, description="augment: added brightness, fraction of full range")
    contrast: float = Field(0.1, description="augment: contrast factor 1±c around the tile mean")

    global_crops: int = Field(2, ge=0, description="multicrop: number of large views")
    global_size: int = Field(224, gt=0, description="multicrop: side of a global view, px")
    global_scale: tuple[float, float] = Field(
        (0.32, 1.0), description="multicrop: fraction of the tile's area a global view covers (DINOv2)"
    )
    local_crops: int = Field(6, ge=0, description="multicrop: number of small views (DINOv2 uses 8)")
    local_size: int = Field(
        96,
        gt=0,
        description="multicrop: side of a local view, px; a multiple of the ViT patch "
        "(local_size_for_patch: 96 for patch 16, 98 for patch 14)",
    )
    local_scale: tuple[float, float] = Field(
        (0.05, 0.32), description="multicrop: fraction of the tile's area a local view covers (DINOv2)"
    )
    crop_resample: Literal["bilinear", "bicubic"] = Field(
        "bicubic", description="multicrop: how a crop is resized to its view size (DINOv2: bicubic)"
    )
    hflip_p: Probability = Field(0.5, description="multicrop: chance a view is flipped left-right")
    vflip_p: Probability = Field(
        0.5,
        description="multicrop: chance a view is flipped top-bottom; tissue has no 'up' "
        "(pathology default; DINOv2 on natural images and OpenMidnight: 0)",
    )
    hed_p: Probability = Field(
        0.0,
        description="multicrop: chance of HED stain jitter (strength hed_sigma) on a view, "
        "before colour jitter (DINOv2: 0; Midnight: 0.5)",
    )
    jitter_p: Probability = Field(0.8, description="multicrop: chance of colour jitter on a view")
    jitter_brightness: float = Field(0.4, ge=0, description="colour jitter: brightness factor in 1±b")
    jitter_contrast: float = Field(0.4, ge=0, description="colour jitter: contrast factor in 1±c")
    jitter_saturation: float = Field(0.2, ge=0, description="colour jitter: saturation factor in 1±s")
    jitter_hue: float = Field(
        0.1, ge=0, le=0.5, description="colour jitter: hue shift in ±h of the colour circle"
    )
    grayscale_p: Probability = Field(0.2, description="multicrop: chance a view is turned to grey")
    global_blur_p: tuple[Probability, Probability] = Field(
        (1.0, 0.1),
        description="multicrop: chance of Gaussian blur on global view 1 and 2 (more "
        "global views take the second). dinov2's code inverts its GaussianBlur p (blurs with 1-p: "
        "never view 1, 0.9 view 2); set (0.0, 0.9) to copy what its checkpoints were trained with",
    )
    local_blur_p: Probability = Field(0.5, description="multicrop: chance of Gaussian blur on a local view")
    blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="multicrop: Gaussian blur sigma, px, drawn uniformly from this range"
    )
    global_solarize_p: tuple[Probability, Probability] = Field(
        (0.0, 0.2),
        description="multicrop: chance of solarisation on global view 1 and 2 (more "
        "global views take the second); local views are never solarised",
    )
    solarize_threshold: int = Field(
        128, ge=0, le=256, description="solarisation inverts channel values at or above this"
    )

    hsv_filter: bool = Field(
        False, description="hsv_tile_ok rejects tiles with too little stained tissue (Midnight)"
    )
    hsv_lower: tuple[int, int, int] = Field(
        (90, 8, 103), description="HSV filter: lowest tissue (H, S, V), OpenCV 8-bit units (H = degrees / 2)"
    )
    hsv_upper: tuple[int, int, int] = Field(
        (180, 255, 255), description="HSV filter: highest tissue (H, S, V), OpenCV 8-bit units"
    )
    hsv_min_fraction: float = Field(
        0.6, ge=0, le=1, description="HSV filter: a tile passes when more than this fraction is tissue"
    )


_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)  # optical density per grey level


def hed_draw(sigma: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The stain jitter's scale (alpha) and shift (beta) of the H, E and DAB channels."""
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3).astype(np.float32)
    beta = rng.uniform(-sigma, sigma, 3).astype(np.float32)
    return alpha, beta


def hed_transform(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and shift in stain space, folded into one 3x3 map and an offset in optical density."""
    transform = (_RGB_FROM_HED * alpha[None, :]) @ _HED_FROM_RGB_INV
    return transform, beta @ _HED_FROM_RGB_INV


def hed_apply(image: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    transform, offset = hed_transform(alpha, beta)
    od = _OD_LUT[image].reshape(-1, 3)
    out = np.exp(-(od @ transform + offset)) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8).reshape(image.shape)


def hed_jitter(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Perturb haematoxylin, eosin and DAB concentrations: the colour variation between labs."""
    if sigma <= 0:
        return image
    return hed_apply(image, *hed_draw(sigma, rng))


def bc_draw(brightness: float, contrast: float, rng: np.random.Generator) -> tuple[float, float]:
    """A contrast factor and an added brightness (grey levels), in that order of draws."""
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    b = rng.uniform(-brightness, brightness) * 255.0 if brightness > 0 else 0.0
    return float(np.float32(c)), float(np.float32(b))


def bc_apply(image: np.ndarray, c: float, b: float) -> np.ndarray:
    arr = image.astype(np.float32)
    mean = arr.mean()
    return np.clip((arr - mean) * np.float32(c) + mean + np.float32(b), 0, 255).astype(np.uint8)


def brightness_contrast(
    image: np.ndarray, brightness: float, contrast: float, rng: np.random.Generator
) -> np.ndarray:
    if brightness <= 0 and contrast <= 0:
        return image
    return bc_apply(image, *bc_draw(brightness, contrast, rng))


AUGMENT_FIELDS = 13  # flip_x, flip_y, turns, hed on, alpha (3), beta (3), bc on, contrast, brightness


@dataclass(frozen=True)
class TileAugment:
    """What ``augment`` does to one tile, drawn once: applied here (numpy) or on the device that
    decodes the tile (``augment_tiles``), with the same numbers either way."""

    spatial: Spatial
    hed: tuple[np.ndarray, np.ndarray] | None = None
    bc: tuple[float, float] | None = None

    def vector(self) -> np.ndarray:
        """The draw as ``AUGMENT_FIELDS`` float32 values (a column of the training stream)."""
        sp = self.spatial
        alpha, beta = self.hed if self.hed is not None else (np.ones(3), np.zeros(3))
        c, b = self.bc if self.bc is not None else (1.0, 0.0)
        head = [sp.flip_x, sp.flip_y, sp.turns, self.hed is not None]
        return np.asarray([*head, *alpha, *beta, self.bc is not None, c, b], np.float32)

    @classmethod
    def from_vector(cls, v: np.ndarray, size: int) -> TileAugment:
        v = np.asarray(v, np.float32)
        spatial = Spatial(size, bool(v[0]), bool(v[1]), int(v[2]))
        hed = (v[4:7].copy(), v[7:10].copy()) if v[3] else None
        return cls(spatial, hed, (float(v[11]), float(v[12])) if v[10] else None)


def draw_augment(
    config: AugmentConfig, rng: np.random.Generator, size: int, square: bool = True
) -> TileAugment:
    """``augment``'s draws for a ``size`` px tile (its turns only when ``square``)."""
    flip_x = bool(config.flips and rng.random() < 0.5)
    flip_y = bool(config.flips and rng.random() < 0.5)
    turns = int(rng.integers(0, 4)) if config.rot90 and square else 0
    hed = hed_draw(config.hed_sigma, rng) if config.hed_sigma > 0 else None
    bc = None
    if config.brightness > 0 or config.contrast > 0:
        bc = bc_draw(config.brightness, config.contrast, rng)
    return TileAugment(Spatial(size, flip_x, flip_y, turns), hed, bc)


def apply_augment(image: np.ndarray, draw: TileAugment) -> np.ndarray:
    image = draw.spatial.pixels(image)
    if draw.hed is not None:
        image = hed_apply(image, *draw.hed)
    if draw.bc is not None:
        image = bc_apply(image, *draw.bc)
    return image


def augment(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, Spatial]:
    """One augmented tile and the flips and turns it got (targets follow them: ``TaskSpec.follow``)."""
    draw = draw_augment(config, rng, image.shape[0], image.shape[0] == image.shape[1])
    return apply_augment(image, draw), draw.spatial


def augment_tiles(images: Any, vectors: Any) -> Any:
    """``apply_augment`` for a batch where it lies (a GPU): ``(N, 3, H, W)`` uint8 and ``(N, 13)`` draws.

    The same arithmetic in float32 as the numpy path; a value may differ by one grey level where
    the two round a product differently.
    """
    import torch

    if not len(images):
        return images
    device = images.device
    draws = [TileAugment.from_vector(v, int(images.shape[-1])) for v in np.asarray(vectors, np.float32)]
    out = []
    for image, draw in zip(images, draws, strict=True):
        sp = draw.spatial
        if sp.flip_x:
            image = image.flip(-1)
        if sp.flip_y:
            image = image.flip(-2)
        if sp.turns:
            image = torch.rot90(image, sp.turns, dims=(-2, -1))
        out.append(image)
    batch = torch.stack(out)
    hed = [i for i, d in enumerate(draws) if d.hed is not None]
    if hed:
        maps = [hed_transform(*draws[i].hed) for i in hed]  # type: ignore[misc]
        transform = torch.from_numpy(np.stack([m for m, _ in maps])).to(device)
        offset = torch.from_numpy(np.stack([o for _, o in maps])).to(device)
        od = torch.from_numpy(_OD_LUT).to(device)[batch[hed].long()]
        mixed = torch.einsum("nchw,ncd->ndhw", od, transform) + offset[:, :, None, None]
        batch[hed] = (torch.exp(-mixed) * 255.0).clamp_(0, 255).to(torch.uint8)
    bc = [i for i, d in enumerate(draws) if d.bc is not None]
    if bc:
        factors = torch.tensor([draws[i].bc for i in bc], dtype=torch.float32, device=device)  # type: ignore[misc]
        arr = batch[bc].float()
        mean = arr.mean(dim=(1, 2, 3), keepdim=True)
        c, b = factors[:, 0, None, None, None], factors[:, 1, None, None, None]
        batch[bc] = ((arr - mean) * c + mean + b).clamp_(0, 255).to(torch.uint8)
    return batch


def random_resized_crop(
    image: np.ndarray,
    out_size: int,
    scale: tuple[float, float],
    rng: np.random.Generator,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """A random square-ish crop covering ``scale`` of the area, resized to ``out_size``."""
    h, w = image.shape[:2]
    area = h * w * rng.uniform(*scale)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(round(min(w, max(1, np.sqrt(area * ratio)))))
    ch = int(round(min(h, max(1, np.sqrt(area / ratio)))))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    crop = Image.fromarray(image[y : y + ch, x : x + cw])
    return np.asarray(crop.resize((out_size, out_size), resample))


def local_size_for_patch(patch: int, target: int = 96) -> int:
    """The local view size for a ViT patch: the smallest multiple of ``patch`` at or above ``target``.

    A view must tile into whole patches; DINOv2 keeps 96 for patch 16 and uses 98 for patch 14.
    """
    if patch <= 0:
        raise ValueError(f"patch size must be positive, got {patch}")
    return -(-target // patch) * patch


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}


def _happens(p: float, rng: np.random.Generator) -> bool:
    """A coin with odds ``p``; certain outcomes draw nothing, so switching a transform off or
    always on leaves the rest of the stream's draws as they were."""
    return p >= 1.0 or (p > 0.0 and rng.random() < p)


def _shift_hue(image: Image.Image, shift: float) -> Image.Image:
    # as torchvision's PIL adjust_hue: rotate the 8-bit hue channel, wrapping around
    h, s, v = image.convert("HSV").split()
    hue = (np.asarray(h, np.int16) + int(round(shift * 255))) % 256
    return Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")


def color_jitter(
    image: np.ndarray,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """torchvision's ColorJitter on PIL images: factors in ``1±x`` (hue ``±h``), applied in a random order."""
    ops: list[tuple[str, float]] = []
    for name, strength in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if strength > 0:
            ops.append((name, rng.uniform(max(0.0, 1 - strength), 1 + strength)))
    if hue > 0:
        ops.append(("hue", rng.uniform(-hue, hue)))
    if not ops:
        return image
    pil = Image.fromarray(image)
    for k in rng.permutation(len(ops)):
        name, factor = ops[k]
        pil = _shift_hue(pil, factor) if name == "hue" else _ENHANCERS[name](pil).enhance(factor)
    return np.asarray(pil)


def _grayscale(image: np.ndarray) -> np.ndarray:
    grey = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(grey[..., None], 3, axis=2)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def _solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _ssl_view(
    image: np.ndarray,
    size: int,
    scale: tuple[float, float],
    blur_p: float,
    solarize_p: float,
    config: AugmentConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    view = random_resized_crop(image, size, scale, rng, _RESAMPLE[config.crop_resample])
    if _happens(config.hflip_p, rng):
        view = view[:, ::-1]
    if _happens(config.vflip_p, rng):
        view = view[::-1]
    view = np.ascontiguousarray(view)
    if _happens(config.hed_p, rng):
        view = hed_jitter(view, config.hed_sigma, rng)
    if _happens(config.jitter_p, rng):
        c = config
        view = color_jitter(
            view, c.jitter_brightness, c.jitter_contrast, c.jitter_saturation, c.jitter_hue, rng
        )
    if _happens(config.grayscale_p, rng):
        view = _grayscale(view)
    if _happens(blur_p, rng):
        view = _blur(view, float(rng.uniform(*config.blur_sigma)))
    if _happens(solarize_p, rng):
        view = _solarize(view, config.solarize_threshold)
    return np.ascontiguousarray(view)


def multicrop(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Self-supervised views of one tile: ``global_0..`` and ``local_0..``, uint8 HWC.

    As DINOv2's ``DataAugmentationDINO``: each view is a random resized crop, flipped, then (each
    with its own odds) HED-jittered (Midnight), colour-jittered, greyed, blurred and, on global
    views, solarised; global view 1 is always blurred, global view 2 rarely and sometimes
    solarised, so the two teacher views differ. All odds and strengths live in ``config``.
    """
    views: dict[str, np.ndarray] = {}
    for i in range(config.global_crops):
        k = min(i, 1)
        blur_p, solarize_p = config.global_blur_p[k], config.global_solarize_p[k]
        size, scale = config.global_size, config.global_scale
        views[f"global_{i}"] = _ssl_view(image, size, scale, blur_p, solarize_p, config, rng)
    for i in range(config.local_crops):
        size, scale = config.local_size, config.local_scale
        views[f"local_{i}"] = _ssl_view(image, size, scale, config.local_blur_p, 0.0, config, rng)
    return views


# OpenCV's 8-bit RGB -> HSV (cv2.cvtColor COLOR_RGB2HSV, imgproc color_hsv RGB2HSV_b): fixed-point
# reciprocal tables with a 12-bit shift, H in 0..179 (degrees / 2), S and V in 0..255.
_HSV_SHIFT = 12
_SDIV = np.zeros(256, np.int32)
_SDIV[1:] = np.rint((255 << _HSV_SHIFT) / np.arange(1, 256))
_HDIV = np.zeros(256, np.int32)
_HDIV[1:] = np.rint((180 << _HSV_SHIFT) / (6.0 * np.arange(1, 256)))


def opencv_hsv(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 image in OpenCV's 8-bit HSV, bit for bit, so OpenCV-tuned thresholds carry over."""
    rgb = image[..., :3].astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_tile_ok(image: np.ndarray, config: AugmentConfig) -> bool:
    """Whether a tile holds enough stained tissue to train on (always, when ``hsv_filter`` is off).

    Midnight's filter, as OpenMidnight samples its tiles: a pixel is tissue when its OpenCV HSV
    lies within [hsv_lower, hsv_upper] (defaults H 90..180, S 8..255, V 103..255: hues from blue
    through purple to pink, not grey, not dark), and a tile passes when more than
    ``hsv_min_fraction`` (0.6) of it is. So glass (S < 8), black and dark marks (V < 103) and green
    or yellow ink (H < 90) fail; blue ink (H about 110..125) passes.

    Source: MedARC-AI/OpenMidnight, ``hsv`` in prepatching_scripts/create_sample_dataset_txt.py at
    commit 1c0c5b23e222f016e3c853109488a587b54ae4e9 (the same thresholds in
    dinov2/data/datasets/slide_dataset.py at 84823ada720f8b6725b29d672e1870a5d24abc20).
    """
    if not config.hsv_filter:
        return True
    hsv = opencv_hsv(image)
    inside = ((hsv >= np.array(config.hsv_lower)) & (hsv <= np.array(config.hsv_upper))).all(axis=-1)
    return bool(inside.mean() > config.hsv_min_fraction)
