"""Tile augmentations: flips and 90° turns (targets follow them), HED stain jitter, brightness/contrast.

Also DINO multi-crop: a few large "global" and many small "local" views of one tile. Pure numpy
and PIL, seeded by the caller's generator, so the same stream augments the same way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import Field

from pathray.models.tasks import Spatial
from pathray.section import Section

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB) as rows; RGB optical density = HED @ M.
_HED_FROM_RGB_INV = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_HED_FROM_RGB_INV /= np.linalg.norm(_HED_FROM_RGB_INV, axis=1, keepdims=True)
_RGB_FROM_HED = np.linalg.inv(_HED_FROM_RGB_INV).astype(np.float32)


class AugmentConfig(Section):
    """How strongly to augment; zeros switch a transform off."""

    flips: bool = True
    rot90: bool = True
    hed_sigma: float = Field(
        0.05, description="stain jitter: each HED channel scaled by 1±σ and shifted by ±σ"
    )
    brightness: float = Field(0.1, description="added brightness, fraction of full range")
    contrast: float = Field(0.1, description="contrast factor 1±c around the tile mean")
    global_crops: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 6
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)


_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / 255.0)  # optical density per grey level


def hed_jitter(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Perturb haematoxylin, eosin and DAB concentrations: the colour variation between labs."""
    if sigma <= 0:
        return image
    od = _OD_LUT[image].reshape(-1, 3)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3).astype(np.float32)
    beta = rng.uniform(-sigma, sigma, 3).astype(np.float32)
    # scale and shift in stain space, folded into one 3x3 map and an offset in OD space
    transform = (_RGB_FROM_HED * alpha[None, :]) @ _HED_FROM_RGB_INV
    offset = beta @ _HED_FROM_RGB_INV
    out = np.exp(-(od @ transform + offset)) * 255.0
    return np.clip(out, 0, 255).astype(np.uint8).reshape(image.shape)


def brightness_contrast(
    image: np.ndarray, brightness: float, contrast: float, rng: np.random.Generator
) -> np.ndarray:
    if brightness <= 0 and contrast <= 0:
        return image
    arr = image.astype(np.float32)
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    b = rng.uniform(-brightness, brightness) * 255.0 if brightness > 0 else 0.0
    mean = arr.mean()
    return np.clip((arr - mean) * c + mean + b, 0, 255).astype(np.uint8)


def augment(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> tuple[np.ndarray, Spatial]:
    """One augmented tile and the flips and turns it got (targets follow them: ``TaskSpec.follow``)."""
    size = image.shape[0]
    flip_x = bool(config.flips and rng.random() < 0.5)
    flip_y = bool(config.flips and rng.random() < 0.5)
    turns = int(rng.integers(0, 4)) if config.rot90 and image.shape[0] == image.shape[1] else 0
    spatial = Spatial(size, flip_x, flip_y, turns)
    image = spatial.pixels(image)
    image = hed_jitter(image, config.hed_sigma, rng)
    image = brightness_contrast(image, config.brightness, config.contrast, rng)
    return image, spatial


def random_resized_crop(
    image: np.ndarray, out_size: int, scale: tuple[float, float], rng: np.random.Generator
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
    return np.asarray(crop.resize((out_size, out_size), Image.Resampling.BILINEAR))


def multicrop(image: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """DINO views: ``global_0..`` and ``local_0..``, each cropped, flipped and colour-jittered."""
    views: dict[str, np.ndarray] = {}
    specs = [("global", config.global_crops, config.global_size, config.global_scale)]
    specs.append(("local", config.local_crops, config.local_size, config.local_scale))
    for name, count, size, scale in specs:
        for i in range(count):
            view = random_resized_crop(image, size, scale, rng)
            view, _ = augment(view, config, rng)
            views[f"{name}_{i}"] = view
    return views
