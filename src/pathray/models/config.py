"""Typed configs of engines and tasks, free of torch so loading a project config stays cheap."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pathray.wsi.classes import GLEASON_CLASSES, NUCLEUS_CLASSES


class TaskConfig(BaseModel):
    """What to learn and how to score it; class order is the output channel order."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "segmentation", description="registry key: segmentation, classification, detection, ..."
    )
    classes: list[str] = Field(default_factory=lambda: [c.name for c in GLEASON_CLASSES])
    point_classes: list[str] = Field(default_factory=lambda: [c.name for c in NUCLEUS_CLASSES])
    dice_weight: float = Field(1.0, description="segmentation: loss = CE + dice_weight * soft Dice")
    detection_sigma_um: float = Field(2.0, gt=0, description="detection: gaussian heatmap sigma, µm")
    match_radius_um: float = Field(4.0, gt=0, description="detection: true/predicted points match within")
    peak_threshold: float = Field(0.3, description="detection: least heatmap value of a predicted point")
    # ssl / DINO
    out_dim: int = 4096
    head_hidden: int = 512
    head_bottleneck: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_epochs_frac: float = Field(0.3, ge=0, le=1, description="fraction of training")
    center_momentum: float = 0.9
    ema_momentum: float = Field(0.996, description="teacher EMA momentum at the start (cosine to 1)")


class EngineConfig(BaseModel):
    """Which backbone, which weights, and how wide the dense map is."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("foundation", description="registry key: foundation, cnn, debug_vit, debug_cnn")
    model: str | None = Field(None, description="timm model name; None: the engine's default")
    weights: str | None = Field(
        None, description="None: random init; a local .pt/.pth/.safetensors file; 'timm:<hub-id>'"
    )
    img_size: int = Field(224, description="input size: the ViT img_size, and data_config input_size")
    dense_channels: int = Field(64, description="channels of the stride-4 dense map")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate of the backbone")
    freeze_backbone: bool = Field(False, description="train the decoder (and heads) only")
