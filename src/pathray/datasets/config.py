"""Typed config of the tile stream (Ray-free, so loading a config never starts Ray)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pathray.datasets.augment import AugmentConfig
from pathray.wsi.samplers import SamplerConfig
from pathray.wsi.targets import TargetConfig


class StreamConfig(BaseModel):
    """Everything about how tiles are cut and delivered."""

    model_config = ConfigDict(extra="forbid")

    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    augmentation: bool = Field(True, description="off for validation and preview of raw tiles")
    seed: int = 0
    read_batch: int = Field(128, description="coordinates per reader call, all from one slide")
    readers: int = Field(2, description="most reader actors")
    reader_cpus: float = Field(0.5, description="CPUs reserved per reader actor")
    read_retries: int = Field(2, description="retries of a failed read before tiles are skipped")
    tile_cache: int = Field(16, description="decoded tiles kept per open slide")


class DataConfig(BaseModel):
    """Which slides to stream and how: the ``data:`` section of a project config."""

    model_config = ConfigDict(extra="forbid")

    manifest: str | None = Field(None, description="Parquet/CSV manifest: a path or any storage URI")
    split: str | None = Field("train", description="which split to stream; null: every slide")
    fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="nested, stratified share of the training slides (0.1 ⊂ 0.25 ⊂ …)"
    )
    check_uris: bool = Field(True, description="stat every slide before streaming (reports all at once)")
    stream: StreamConfig = Field(default_factory=StreamConfig)
