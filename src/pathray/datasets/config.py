"""Typed config of the tile stream (Ray-free, so loading a config never starts Ray)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pathray.datasets.augment import AugmentConfig
from pathray.section import Section
from pathray.wsi.patching.samplers import SamplerConfig


class StreamConfig(Section):
    """How tiles are cut and delivered; what each tile's target is comes from the project's task."""

    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    augmentation: bool = Field(True, description="off for validation and preview of raw tiles")
    seed: int = 0
    read_batch: int = Field(
        256,
        description="coordinates per reader call, all from one slide: one output block of tiles "
        "(256 of 224 px: 38 MB); larger calls spread each call's fixed cost (sampling, a Ray task, "
        "a block) over more tiles",
    )
    readers: int = Field(2, description="most reader actors")
    reader_cpus: float = Field(0.5, description="CPUs reserved per reader actor")
    reader_keeps_memory: bool = Field(
        True,
        description="each reader actor keeps the memory a batch frees for the next batch (glibc: "
        "no mmap, no trim) instead of returning it and faulting it back in (150k against 685k page "
        "faults an actor's 10k tiles); its memory stays at its largest batch's",
    )
    read_retries: int = Field(2, description="retries of a failed read before tiles are skipped")
    tile_cache: int = Field(16, description="decoded tiles kept per open slide")
    decode: Literal["auto", "cpu", "device"] = Field(
        "auto",
        description="where training tiles are decoded. cpu: the reader actors cut, augment and ship "
        "pixels. device: the readers fetch each tile's compressed bytes by range and draw its "
        "augmentation; the train worker decodes them where its model runs (nvJPEG on a GPU), then "
        "cuts, resamples and augments there. auto: device when the workers have GPUs and the task "
        "has no multi-crop views, else cpu",
    )

    @model_validator(mode="after")
    def _device_needs_no_pixels(self) -> StreamConfig:
        if self.decode == "device" and self.augment.hsv_filter:
            raise ValueError(
                "data.stream.decode: device ships tiles undecoded, and augment.hsv_filter needs "
                "their pixels on the reader: use decode: cpu (or auto) with the HSV filter"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and "target" in data:
            raise ValueError(
                "data.stream.target is gone: the task section names the task and its classes once "
                "(task.name, task.classes; detection: task.max_points; instance: task.source)"
            )
        return data


class DataConfig(Section):
    """Which slides to stream and how: the ``data:`` section of a project config."""

    manifest: str | None = Field(None, description="Parquet/CSV manifest: a path or any storage URI")
    split: str | None = Field("train", description="which split to stream; null: every slide")
    fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="nested, stratified share of the training slides (0.1 ⊂ 0.25 ⊂ …)"
    )
    check_uris: bool = Field(True, description="stat every slide before streaming (reports all at once)")
    stream: StreamConfig = Field(default_factory=StreamConfig)
