"""Online patching: tissue masks, and samplers that turn them (and annotations) into tile coordinates."""

from pathray.wsi.patching.samplers import (
    ClassBalancedSampler,
    RandomTissueSampler,
    SamplerConfig,
    SlideRegions,
    TileCoord,
    TissueGridSampler,
    build_sampler,
    rng_for,
)
from pathray.wsi.patching.tissue import TissueConfig, TissueMask, compute_tissue_mask, tissue_mask

__all__ = [
    "ClassBalancedSampler",
    "RandomTissueSampler",
    "SamplerConfig",
    "SlideRegions",
    "TileCoord",
    "TissueConfig",
    "TissueGridSampler",
    "TissueMask",
    "build_sampler",
    "compute_tissue_mask",
    "rng_for",
    "tissue_mask",
]
