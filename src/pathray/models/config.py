"""Typed configs of engines and tasks, free of torch so loading a project config stays cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, WrapValidator, model_validator

from pathray.models.presets import FoundationPreset, get_preset
from pathray.models.tasks import TaskConfigBase, task_config
from pathray.registry import RegistryError
from pathray.section import Section


class EngineConfig(Section):
    """Which backbone, which weights, and how it is fine-tuned.

    ``preset`` names a public foundation model (``pathray models list``): its architecture, constructor
    arguments, normalisation and pooling, and (in a project) the default tile size and mpp. The
    explicit fields ``model_kwargs``, ``mean``, ``std`` and ``pooling`` override the preset's.
    """

    name: str = Field("foundation", description="registry key: foundation, cnn, debug_vit, debug_cnn")
    preset: str | None = Field(
        None, description="a foundation preset (uni, virchow2, kaiko_vits16, ...): pathray models list"
    )
    model: str | None = Field(
        None, description="timm model name; None: the preset's architecture, else the engine's default"
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="timm constructor arguments, merged over the preset's (layers by name: "
        "mlp_layer: swiglu_packed, act_layer: silu, norm_eps: 1e-6)",
    )
    weights: str | None = Field(
        None,
        description="None: random init; a .bin/.pth/.safetensors file, an HF model folder or cache snapshot, "
        "'hf-cache:org/name', our own run's checkpoint.pt; 'timm:<hub-id>' (online)",
    )
    allow_partial: list[str] = Field(
        default_factory=list,
        description="fnmatch patterns of keys that may be missing or unused (e.g. 'head.*')",
    )
    mean: tuple[float, float, float] | None = Field(None, description="RGB mean on 0-1; None: preset/timm's")
    std: tuple[float, float, float] | None = Field(None, description="RGB std on 0-1; None: preset/timm's")
    pooling: Literal["cls", "cls+mean"] | None = Field(
        None,
        description="pooled embedding: cls, or cls+mean (patch-token mean, registers left out); "
        "None: the preset's, else the model's own pooled output",
    )
    img_size: int | None = Field(
        None,
        ge=8,
        description="the ViT's input size; None: the tile size the model sees (the project fills it in)",
    )
    dense_channels: int = Field(64, ge=1, description="channels of the stride-4 dense map")
    decoder_blocks: list[int] | None = Field(
        None,
        description="ViT blocks whose (normed) patch tokens feed the dense decoder, e.g. [-4, -3, -2, -1] "
        "as DINOv2's segmentation heads; None: the last block",
    )
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate of the backbone")
    finetune: str = Field(
        "full",
        description="full | frozen (decoder and head only) | last_blocks:N (and the final norm) | "
        "lora (adapters on qkv/proj/fc1/fc2, merged into the weights of an exported package)",
    )
    lora_rank: int = Field(8, ge=1, description="finetune=lora: rank of the adapters")
    lora_alpha: float = Field(16.0, gt=0, description="finetune=lora: scale (alpha / rank) of the adapters")
    grad_checkpointing: bool = Field(False, description="recompute activations in backward: less memory")
    freeze_backbone: bool = Field(False, description="the same as finetune: frozen")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        parse_finetune(self.finetune)
        if self.freeze_backbone and self.finetune not in ("full", "frozen"):
            raise ValueError(f"freeze_backbone contradicts finetune: {self.finetune}")
        if self.preset is not None:
            try:
                preset = get_preset(self.preset)
            except RegistryError as exc:
                raise ValueError(str(exc)) from None
            if self.model is not None and self.model != preset.arch:
                raise ValueError(
                    f"model {self.model!r} contradicts preset {self.preset!r} (architecture "
                    f"{preset.arch!r}): set engine.model: null, the preset names its architecture"
                )
        return self

    def with_local_weights(self) -> EngineConfig:
        """This section with a local ``weights`` path made absolute (a Ray worker runs in another
        folder); ``hf-cache:``, ``hf-hub:``, ``timm:`` and URLs are left as they are.

        Raises:
            ValueError: a local path that does not exist (named, with the folder it was taken from).
        """
        source = self.weights
        if not source or "://" in source or source.split(":", 1)[0] in WEIGHT_SCHEMES:
            return self
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"engine.weights {source!r}: no such file or folder (from {Path.cwd()})")
        return self.model_copy(update={"weights": str(path.resolve())})

    @property
    def finetune_mode(self) -> tuple[str, int]:
        """(``full`` | ``frozen`` | ``last_blocks`` | ``lora``, N of ``last_blocks:N``)."""
        return ("frozen", 0) if self.freeze_backbone else parse_finetune(self.finetune)

    def resolved_preset(self) -> FoundationPreset | None:
        """The named preset with this section's overrides applied (None without a preset)."""
        if self.preset is None:
            return None
        overrides: dict[str, Any] = {"model_kwargs": self.model_kwargs} if self.model_kwargs else {}
        overrides.update({k: getattr(self, k) for k in ("mean", "std", "pooling") if getattr(self, k)})
        preset = get_preset(self.preset)
        return preset.replace(**overrides) if overrides else preset


WEIGHT_SCHEMES = ("hf-cache", "hf-hub", "hf_hub", "timm")

FINETUNE_MODES = ("full", "frozen", "last_blocks:N", "lora")


def parse_finetune(mode: str) -> tuple[str, int]:
    """``"last_blocks:2"`` -> ``("last_blocks", 2)``; ``"lora"`` -> ``("lora", 0)``."""
    kind, _, count = mode.partition(":")
    if kind in ("full", "frozen", "lora") and not count:
        return kind, 0
    if kind == "last_blocks" and count.isdigit() and int(count) >= 1:
        return kind, int(count)
    raise ValueError(f"finetune {mode!r} is not one of {', '.join(FINETUNE_MODES)} (N >= 1)")


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
