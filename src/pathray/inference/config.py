"""Typed config of whole-slide inference (torch-free, so the Serve ingress and the CLI load it cheaply)."""

from __future__ import annotations

from pydantic import Field

from pathray.section import Section


class InferenceConfig(Section):
    """How a slide is cut, predicted and stitched; one section shared by the CLI, batch jobs and Serve."""

    batch_size: int = Field(32, ge=1, description="tiles per forward pass")
    overlap: float = Field(0.125, ge=0.0, lt=1.0, description="grid overlap fraction between neighbours")
    min_tissue: float = Field(0.05, ge=0.0, le=1.0, description="least tissue fraction of a grid tile")
    out_mpp: float = Field(4.0, gt=0, description="µm/px of the stitched class map")
    chunk_tiles: int = Field(128, ge=1, description="tiles per chunk: the unit of work of a replica / task")
    read_threads: int = Field(4, ge=1, description="threads reading tiles inside one predictor call")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$", description="auto | cpu | cuda")
    decode: str = Field(
        "auto",
        pattern="^(auto|cpu|device)$",
        description="where tiles are decoded: device (compressed tiles fetched by byte range, decoded "
        "where the model runs: nvJPEG on cuda), cpu (the slide's reader, on CPU threads), auto (device "
        "on cuda when the level's tiles are JPEG, else cpu); levels without raw tiles are always cpu",
    )
    precision: str = Field(
        "auto", pattern="^(auto|fp32|bf16)$", description="auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16"
    )
    min_region_um2: float = Field(2500, ge=0, description="smaller polygons are dropped from the GeoJSON")
    clip_to_tissue: bool = Field(
        True, description="class-map pixels outside the tissue mask are 255 (not analysed), not Background"
    )
    compute_threads: int = Field(
        1, ge=1, description="model threads, each on its own chunk (CPU: one per core, with torch_threads=1)"
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="CPU: torch intra-op threads, set process-wide when the predictor is built; 0: as is",
    )
    read_batch: int = Field(16, ge=1, description="tiles per read_batch call of one reader thread")
    keep_freed_memory: bool = Field(
        True,
        description="processes that exist to analyse slides (Serve model replicas, batch-analysis "
        "actors) keep the memory each batch frees for the next (glibc: no mmap, no trim) instead of "
        "faulting it back in from several threads at once; their memory stays at its peak. A "
        "process of your own that calls analyze_slide is left as it is",
    )
    max_failed_share: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="share of a slide's tiles that may be undecodable (counted, marked, left out) "
        "before its analysis fails",
    )
