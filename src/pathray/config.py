"""Typed config tree: defaults < YAML file < ``--set key=value`` overrides, with ``${ENV:-default}``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pathray.datasets.config import DataConfig
from pathray.models.config import EngineConfig, TaskConfig
from pathray.training.config import (
    OptimConfig,
    RunSection,
    ScaleConfig,
    TrainConfig,
    deep_merge,
    engine_defaults,
)
from pathray.wsi.storage import StorageConfig
from pathray.wsi.tissue import TissueConfig

M = TypeVar("M", bound=BaseModel)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says where."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ObjectStoreConfig(Section):
    """The embedded S3-compatible endpoint used by the demo and the tests."""

    bucket: str = "pathray"
    port: int = Field(0, ge=0, le=65535, description="S3 port; 0 picks a free one")
    data_dir: str | None = Field(None, description="where SeaweedFS keeps its data; None: a temp dir")
    volume_size_limit_mb: int = Field(256, gt=0, le=30000, description="SeaweedFS volume size")
    start_timeout_s: float = Field(60.0, gt=0, description="how long to wait for S3 to accept writes")
    stop_timeout_s: float = Field(
        20.0, ge=0, description="SIGINT grace before SIGKILL when data_dir is kept (a temp dir gets 1 s)"
    )


class PathrayConfig(Section):
    """The root of the config tree. Components take their own section, never the root."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    object_store: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    run: RunSection = Field(default_factory=RunSection)
    train: TrainConfig = Field(default_factory=TrainConfig)


def interpolate_env(value: Any) -> Any:
    """Replace ``${NAME}`` and ``${NAME:-default}`` in every string of a nested structure."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(f"environment variable {name} is not set and has no default")

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_env(v) for v in value]
    return value


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[M] = PathrayConfig,  # type: ignore[assignment]
) -> M:
    """Load ``model`` from defaults, then a YAML file, then CLI overrides (later wins)."""
    tree: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, not {type(loaded).__name__}")
        tree = loaded
    for override in overrides or []:
        apply_override(tree, override)
    tree = interpolate_env(tree)
    if model is PathrayConfig:
        # Switching engine.name switches its defaults (tile size, lr, batch, steps); what the
        # project set itself still wins.
        tree = deep_merge(engine_defaults(tree), tree)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(where + "; ".join(lines)) from None


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML, saved with every run."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
