"""Typed configs of engines and tasks, free of torch so loading a project config stays cheap."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, SerializeAsAny, ValidationError, WrapValidator

from pathray.models.tasks import TaskConfigBase, task_config
from pathray.registry import RegistryError
from pathray.section import Section


class EngineConfig(Section):
    """Which backbone, which weights, and how wide the dense map is."""

    name: str = Field("foundation", description="registry key: foundation, cnn, debug_vit, debug_cnn")
    model: str | None = Field(None, description="timm model name; None: the engine's default")
    weights: str | None = Field(
        None, description="None: random init; a local .pt/.pth/.safetensors file; 'timm:<hub-id>'"
    )
    img_size: int | None = Field(
        None,
        ge=8,
        description="the ViT's input size; None: the tile size the model sees (the project fills it in)",
    )
    dense_channels: int = Field(64, ge=1, description="channels of the stride-4 dense map")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate of the backbone")
    freeze_backbone: bool = Field(False, description="train the decoder (and heads) only")


def _by_name(value: Any, handler: Any) -> TaskConfigBase:
    """Validate a task section with the config type of the task it names (a discriminated union whose
    members are the registered task specs)."""
    try:
        return task_config(value)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    except ValidationError as exc:  # the task's own fields: name each one, as nested sections do
        raise ValueError(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None


TaskConfig = Annotated[SerializeAsAny[TaskConfigBase], WrapValidator(_by_name)]
"""A task section: ``name`` picks the task spec, whose own config type validates the rest."""
