"""The tissue grid of one slide at the model's resolution, cut into chunks: the plan every worker shares."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pathray.inference.config import InferenceConfig
from pathray.inference.spec import ModelSpec
from pathray.wsi.backends.errors import SlideReadError
from pathray.wsi.backends.slide import Slide
from pathray.wsi.patching.samplers import SamplerConfig, SlideRegions, TissueGridSampler
from pathray.wsi.patching.tissue import TissueConfig, TissueMask, tissue_mask


@dataclass
class Chunk:
    """``index``-th run of consecutive grid tiles (level-0 top-left corners): one unit of work."""

    index: int
    xs: np.ndarray
    ys: np.ndarray

    def __len__(self) -> int:
        return len(self.xs)


@dataclass
class GridPlan:
    """Everything needed to cut a slide's work and stitch it back: small and picklable.

    ``extent`` and ``stride`` are level-0 px; grid tiles sit at multiples of ``stride``. The class
    map has ``map_shape`` (rows, cols) pixels of ``out_mpp`` µm. ``tissue_bits`` (packed booleans
    of ``tissue_shape``, ``tissue_downsample`` level-0 px per pixel) is the tissue mask the map is
    clipped to; None: no clipping.
    """

    slide_uri: str
    width: int
    height: int
    slide_mpp: float
    tile_size: int
    tile_mpp: float
    extent: int
    stride: int
    xs: np.ndarray
    ys: np.ndarray
    out_mpp: float
    map_shape: tuple[int, int]
    min_region_um2: float = 2500.0
    tissue_bits: np.ndarray | None = None
    tissue_shape: tuple[int, int] = (0, 0)
    tissue_downsample: float = 1.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def n_tiles(self) -> int:
        return len(self.xs)

    @property
    def downsample(self) -> float:
        """Level-0 px per class-map pixel."""
        return self.out_mpp / self.slide_mpp

    def chunks(self, chunk_tiles: int) -> list[Chunk]:
        """Consecutive runs of at most ``chunk_tiles`` tiles, numbered from 0 (the Stitcher's key)."""
        step = max(1, int(chunk_tiles))
        return [
            Chunk(i, self.xs[s : s + step], self.ys[s : s + step])
            for i, s in enumerate(range(0, self.n_tiles, step))
        ]

    def tissue_map(self) -> np.ndarray | None:
        """The tissue mask sampled at the class map's pixel centres (nearest), or None."""
        if self.tissue_bits is None:
            return None
        th, tw = self.tissue_shape
        mask = np.unpackbits(self.tissue_bits, count=th * tw).reshape(th, tw).astype(bool)
        rows, cols = self.map_shape
        d = self.downsample / self.tissue_downsample
        ri = np.minimum(((np.arange(rows) + 0.5) * d).astype(np.int64), th - 1)
        ci = np.minimum(((np.arange(cols) + 0.5) * d).astype(np.int64), tw - 1)
        return mask.take(ri, axis=0).take(ci, axis=1)  # rows then columns: 4x faster than mask[ri, ci]


def plan_grid(
    slide: Slide,
    spec: ModelSpec,
    config: InferenceConfig,
    tissue: TissueConfig | None = None,
    mask: TissueMask | None = None,
) -> GridPlan:
    """The tissue grid at the model's tile size and mpp with ``config.overlap``, in row-major order.

    Tiles keep at least ``config.min_tissue`` of tissue (the cached tissue mask of the slide, or
    ``mask``: an evaluation adds the annotated regions to it).

    Raises:
        SlideReadError: the slide has no usable mpp (a grid in µm needs one).
    """
    if slide.mpp is None:
        raise SlideReadError(
            slide.uri,
            "the slide has no usable mpp (µm/px) in its metadata; pass one: `pathray analyze --mpp 0.25`, "
            '"mpp": 0.25 in the request body, or an mpp column in the manifest',
        )
    mask = mask or tissue_mask(slide, tissue)
    width, height = slide.dimensions
    sampler = TissueGridSampler(
        SamplerConfig(
            kind="grid",
            size=spec.tile_size,
            mpps=[spec.tile_mpp],
            min_tissue=config.min_tissue,
            overlap=config.overlap,
        )
    )
    regions = SlideRegions(slide.uri, width, height, slide.mpp, mask)
    xs, ys = sampler.positions(regions)
    extent = regions.extent(spec.tile_size, spec.tile_mpp)
    stride = max(1, int(round(extent * (1.0 - config.overlap))))
    d = config.out_mpp / slide.mpp
    bits = np.packbits(mask.mask.ravel()) if config.clip_to_tissue else None
    return GridPlan(
        slide_uri=slide.uri,
        width=width,
        height=height,
        slide_mpp=float(slide.mpp),
        tile_size=spec.tile_size,
        tile_mpp=spec.tile_mpp,
        extent=extent,
        stride=stride,
        xs=np.asarray(xs, np.int64),
        ys=np.asarray(ys, np.int64),
        out_mpp=config.out_mpp,
        map_shape=(math.ceil(height / d), math.ceil(width / d)),
        min_region_um2=config.min_region_um2,
        tissue_bits=bits,
        tissue_shape=tuple(mask.mask.shape) if bits is not None else (0, 0),  # type: ignore[arg-type]
        tissue_downsample=mask.downsample,
    )


def map_windows(plan: GridPlan, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per tile, the class-map rows and cols whose pixel centres lie inside the tile.

    Returns ``(row0, col0)`` first pixel per tile and ``k``, the most pixels any window spans;
    pixel ``j`` of a window (``row0 + j``) belongs to the tile when ``j < count``, which
    ``window_counts`` gives.
    """
    d = plan.downsample
    col0 = np.ceil(xs / d - 0.5).astype(np.int64)
    row0 = np.ceil(ys / d - 0.5).astype(np.int64)
    k = int(math.ceil(plan.extent / d)) + 1
    return row0, col0, k


def window_counts(plan: GridPlan, starts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """How many map pixels (from ``first``) have their centre inside ``[start, start + extent)``."""
    d = plan.downsample
    last = np.ceil((starts + plan.extent) / d - 0.5).astype(np.int64)
    return np.maximum(last - first, 0)
