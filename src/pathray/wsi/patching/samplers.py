"""Where tiles come from: random in tissue, class-balanced in annotations, or a tissue grid.

Samplers are pure: a slide's geometry (size, mpp, tissue mask, annotated regions) and a seeded
generator in, coordinate rows out. ``rng_for(seed, epoch, worker, slide_id)`` gives every
(epoch, worker, slide) its own stream, so runs are reproducible and never repeat themselves.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import Field, model_validator

from pathray.registry import SAMPLERS
from pathray.section import Section
from pathray.wsi.annotations.geometry import Polygon
from pathray.wsi.patching.tissue import TissueMask


class SamplerConfig(Section):
    """Which tiles to cut: their size, resolution(s) and where they may lie."""

    kind: str = Field("random_tissue", description="registry key: random_tissue, class_balanced, grid")
    size: int = Field(224, description="tile side in output pixels")
    mpps: list[float] = Field(default_factory=lambda: [0.5], description="resolutions to cut at, µm/px")
    mpp_weights: list[float] | None = Field(None, description="relative frequency of each mpp")
    min_tissue: float = Field(0.5, description="least tissue fraction of a tile")
    tiles_per_slide: int = Field(64, description="tiles per slide and epoch (random samplers)")
    overlap: float = Field(
        0.0, ge=0.0, lt=1.0, description="grid: fraction of a tile shared with a neighbour"
    )
    background_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="class_balanced: unannotated tissue share"
    )
    max_tries: int = Field(20, description="rounds of candidates before giving up on a slide")

    @model_validator(mode="after")
    def _weights_match(self) -> SamplerConfig:
        if self.mpp_weights is not None and len(self.mpp_weights) != len(self.mpps):
            raise ValueError(f"mpp_weights has {len(self.mpp_weights)} entries for {len(self.mpps)} mpps")
        if not self.mpps or min(self.mpps) <= 0:
            raise ValueError("mpps must be positive")
        return self


@dataclass(frozen=True)
class TileCoord:
    """One tile to cut: level-0 top-left ``(x, y)``, ``size`` output px at ``mpp`` µm/px."""

    slide_id: str
    x: int
    y: int
    mpp: float
    size: int
    label: str = ""

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SlideRegions:
    """What a sampler knows about one slide."""

    slide_id: str
    width: int
    height: int
    mpp: float
    mask: TissueMask
    regions: list[tuple[Polygon, str]] = field(default_factory=list)

    def extent(self, size: int, mpp: float) -> int:
        """Level-0 pixels covered by ``size`` output pixels at ``mpp``."""
        return max(1, round(size * mpp / self.mpp))


def rng_for(seed: int, epoch: int = 0, worker: int = 0, slide_id: str = "") -> np.random.Generator:
    """A generator of its own for each (seed, epoch, worker, slide): reproducible, never shared."""
    return np.random.default_rng([seed, epoch, worker, zlib.crc32(slide_id.encode("utf-8"))])


class Sampler(Protocol):
    """``exhaustive`` samplers (the grid) return every tile at once; the others draw ``n`` (default:
    ``tiles_per_slide``) per call, so a stream can draw a slide's tiles in several interleaved chunks."""

    exhaustive: bool

    def sample(
        self, slide: SlideRegions, rng: np.random.Generator, n: int | None = None
    ) -> list[TileCoord]: ...


def build_sampler(config: SamplerConfig) -> Sampler:
    """The sampler ``config.kind`` names, built from its config."""
    return SAMPLERS.get(config.kind)(config)


def _choose_mpps(config: SamplerConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    weights = np.asarray(config.mpp_weights or [1.0] * len(config.mpps), dtype=np.float64)
    return rng.choice(np.asarray(config.mpps), size=n, p=weights / weights.sum())


def _centred(slide: SlideRegions, cx: float, cy: float, extent: int) -> tuple[int, int]:
    """Top-left of a tile centred at ``(cx, cy)``, kept inside the slide where it fits."""
    x = int(round(cx - extent / 2))
    y = int(round(cy - extent / 2))
    x = min(max(x, 0), max(0, slide.width - extent))
    y = min(max(y, 0), max(0, slide.height - extent))
    return x, y


@SAMPLERS.register("random_tissue")
class RandomTissueSampler:
    """Uniform over tissue: centres drawn from tissue mask pixels, kept if the tile has enough tissue."""

    exhaustive = False

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config

    def sample(self, slide: SlideRegions, rng: np.random.Generator, n: int | None = None) -> list[TileCoord]:
        n = self.config.tiles_per_slide if n is None else n
        mask = slide.mask
        tissue = np.flatnonzero(mask.mask)
        if n <= 0 or tissue.size == 0:
            return []
        mpps = _choose_mpps(self.config, n, rng)
        out: list[TileCoord] = []
        for _ in range(self.config.max_tries):
            need = n - len(out)
            if need <= 0:
                break
            picks = rng.choice(tissue, size=need * 2)
            jitter = rng.random((need * 2, 2))
            my, mx = np.divmod(picks, mask.mask.shape[1])
            for i in range(need * 2):
                mpp = float(mpps[len(out)])
                extent = slide.extent(self.config.size, mpp)
                cx, cy = (mx[i] + jitter[i, 0]) * mask.downsample, (my[i] + jitter[i, 1]) * mask.downsample
                x, y = _centred(slide, cx, cy, extent)
                if mask.fraction(x, y, extent, extent) >= self.config.min_tissue:
                    out.append(TileCoord(slide.slide_id, x, y, mpp, self.config.size))
                    if len(out) == n:
                        break
        return out


@SAMPLERS.register("class_balanced")
class ClassBalancedSampler:
    """Equal shares per annotated class (polygons picked by area, points uniform inside them).

    ``background_fraction`` of the tiles come from tissue outside every annotation, labelled
    "Background", so a segmentation model sees what is not annotated too.
    """

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config
        self._random = RandomTissueSampler(config)

    exhaustive = False

    def sample(self, slide: SlideRegions, rng: np.random.Generator, n: int | None = None) -> list[TileCoord]:
        n = self.config.tiles_per_slide if n is None else n
        by_class: dict[str, list[Polygon]] = {}
        for polygon, name in slide.regions:
            if polygon.area > 0:
                by_class.setdefault(name, []).append(polygon)
        n_background = n if not by_class else int(round(n * self.config.background_fraction))
        classes = sorted(by_class)
        picks = rng.choice(len(classes), size=n - n_background) if classes else np.zeros(0, int)
        mpps = _choose_mpps(self.config, n, rng)
        out: list[TileCoord] = []
        for i, k in enumerate(picks):
            polys = by_class[classes[k]]
            areas = np.array([p.area for p in polys])
            polygon = polys[int(rng.choice(len(polys), p=areas / areas.sum()))]
            point = self._point_in(polygon, rng)
            if point is None:
                continue
            extent = slide.extent(self.config.size, float(mpps[i]))
            x, y = _centred(slide, point[0], point[1], extent)
            out.append(TileCoord(slide.slide_id, x, y, float(mpps[i]), self.config.size, classes[k]))
        if n_background:
            out.extend(self._background(slide, rng, n_background))
        return out

    def _point_in(self, polygon: Polygon, rng: np.random.Generator) -> tuple[float, float] | None:
        x0, y0, x1, y1 = polygon.bbox
        for _ in range(self.config.max_tries):
            pts = np.column_stack([rng.uniform(x0, x1, 64), rng.uniform(y0, y1, 64)])
            inside = np.flatnonzero(polygon.contains(pts))
            if inside.size:
                return float(pts[inside[0], 0]), float(pts[inside[0], 1])
        return None

    def _background(self, slide: SlideRegions, rng: np.random.Generator, n: int) -> list[TileCoord]:
        out: list[TileCoord] = []
        for _ in range(self.config.max_tries):
            for tile in self._random.sample(slide, rng, n=n - len(out)):
                half = slide.extent(tile.size, tile.mpp) / 2
                centre = np.array([[tile.x + half, tile.y + half]])
                if not any(p.contains(centre)[0] for p, _ in slide.regions):
                    out.append(TileCoord(tile.slide_id, tile.x, tile.y, tile.mpp, tile.size, "Background"))
            if len(out) >= n:
                break
        return out[:n]


@SAMPLERS.register("grid")
class TissueGridSampler:
    """A regular grid over the slide, with overlap, keeping tiles with enough tissue (for inference)."""

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config

    exhaustive = True

    def sample(
        self, slide: SlideRegions, rng: np.random.Generator | None = None, n: int | None = None
    ) -> list[TileCoord]:
        mpp = self.config.mpps[0]
        xs, ys = self.positions(slide)
        return [TileCoord(slide.slide_id, x, y, mpp, self.config.size) for x, y in zip(xs, ys, strict=True)]

    def positions(self, slide: SlideRegions) -> tuple[list[int], list[int]]:
        """Level-0 top-left corners of the kept grid tiles, in row-major order."""
        extent = slide.extent(self.config.size, self.config.mpps[0])
        stride = max(1, int(round(extent * (1.0 - self.config.overlap))))
        gy, gx = np.meshgrid(
            np.arange(0, max(1, slide.height - extent + stride), stride),
            np.arange(0, max(1, slide.width - extent + stride), stride),
            indexing="ij",
        )
        gx, gy = gx.ravel(), gy.ravel()
        keep = slide.mask.fractions(gx, gy, extent, extent) >= self.config.min_tissue
        return gx[keep].tolist(), gy[keep].tolist()
