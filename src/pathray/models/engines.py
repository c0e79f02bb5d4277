"""Engines by name: each registration carries its builder and the defaults a project switches with it.

    engine = build_engine(EngineConfig(name="debug_vit"))
    pooled, dense = engine(engine.normalize(tiles_uint8_bhwc))  # (B, D), (B, C, H/4, W/4)

Registering imports no torch (a project config reads the defaults without building anything);
the builder imports the engine's module when a model is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pathray.models.config import EngineConfig
from pathray.models.presets import get_preset
from pathray.registry import ENGINES
from pathray.section import deep_merge

if TYPE_CHECKING:
    from pathray.models.engine import Engine


@dataclass(frozen=True)
class EngineEntry:
    """One registered engine.

    Attributes:
        build: the engine from its config (imports torch and timm).
        defaults: project settings that come with the engine (tile size and mpp, lr, batch,
            steps), as a partial config tree; what a project sets itself always wins.
        summary: one line for people.
        takes_preset: the engine builds a ViT that ``engine.preset`` (a foundation preset) can name.
    """

    build: Callable[[EngineConfig], Engine]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""
    takes_preset: bool = False


def vit(default_model: str, **model_kwargs: Any) -> Callable[[EngineConfig], Engine]:
    """A builder of ViT engines (``pathray.models.vit``) whose backbone defaults to ``default_model``."""

    def build(config: EngineConfig) -> Engine:
        from pathray.models.vit import ViTEngine

        return ViTEngine(config, default_model, **model_kwargs)

    return build


def cnn(default_model: str, **model_kwargs: Any) -> Callable[[EngineConfig], Engine]:
    """A builder of CNN + U-Net engines (``pathray.models.unet``) defaulting to ``default_model``."""

    def build(config: EngineConfig) -> Engine:
        from pathray.models.unet import CNNEngine

        return CNNEngine(config, default_model, **model_kwargs)

    return build


def _defaults(
    size: int, mpp: float, lr: float, layer_decay: float, warmup: int, batch: int, steps: int
) -> dict:
    return {
        "data": {"stream": {"sampler": {"size": size, "mpps": [mpp]}}},
        "optim": {"lr": lr, "layer_decay": layer_decay, "warmup_steps": warmup},
        "train": {"batch_size": batch, "steps": steps},
    }


ENGINES.add(
    "foundation",
    EngineEntry(
        vit("vit_small_patch16_224"),
        _defaults(224, 0.5, lr=1e-4, layer_decay=0.75, warmup=100, batch=32, steps=3000),
        "a timm ViT (ViT-S/16, or engine.preset) with a light decoder to a stride-4 dense map",
        takes_preset=True,
    ),
)
ENGINES.add(
    "cnn",
    EngineEntry(
        cnn("resnet50"),
        _defaults(256, 1.0, lr=1e-3, layer_decay=1.0, warmup=500, batch=16, steps=15000),
        "a timm CNN encoder (default ResNet-50, random init) with a U-Net decoder",
    ),
)
ENGINES.add(
    "debug_vit",
    EngineEntry(
        vit("vit_tiny_patch16_224", depth=2),
        _defaults(64, 2.0, lr=3e-4, layer_decay=0.9, warmup=5, batch=8, steps=20),
        "two blocks of ViT-Tiny (~1M parameters): for tests and CI",
        takes_preset=True,
    ),
)
ENGINES.add(
    "debug_cnn",
    EngineEntry(
        cnn("resnet18", layers=(1, 1, 1, 1), channels=(16, 32, 64, 128)),
        _defaults(64, 2.0, lr=3e-3, layer_decay=1.0, warmup=5, batch=8, steps=20),
        "ResNet-18 with one block per stage and 16-128 channels (~0.3M parameters): for tests and CI",
    ),
)


def engine_entry(name: str) -> EngineEntry:
    """The registration of engine ``name`` (unknown names list the known ones)."""
    return ENGINES.get(name)


def engine_defaults(name: str, preset: str | None = None) -> dict[str, Any]:
    """The project defaults of engine ``name``, with a preset's tile size and mpp over them.

    Raises:
        ValueError: the engine takes no preset (a CNN), naming the ones that do.
    """
    entry = engine_entry(name)
    if preset is None:
        return dict(entry.defaults)
    if not entry.takes_preset:
        takers = [n for n in ENGINES.names() if engine_entry(n).takes_preset]
        raise ValueError(f"engine {name!r} takes no preset; engines that do: {', '.join(takers)}")
    p = get_preset(preset)
    sampler = {"size": p.tile_size, "mpps": [p.mpp]}
    return deep_merge(entry.defaults, {"data": {"stream": {"sampler": sampler}}})


def build_engine(config: EngineConfig) -> Engine:
    """The engine ``config.name`` names, built from its config, its fine-tuning mode applied."""
    engine = engine_entry(config.name).build(config)
    engine.prepare_training()
    return engine
