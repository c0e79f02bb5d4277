"""The root config: every section, assembled and validated once at an entry point (the CLI, the demo).

    cfg = load_config("configs/gleason-foundation.yaml", ["scale.workers=2"])     # a project
    app = load_config("configs/serve.yaml", model=ServeAppConfig)                 # what serving reads

Components take their own sections, never the root: ``run_training`` takes the project,
``build_model`` the engine and task, the predictor the inference section, and so on. A file may
hold any of the root's sections; a model that does not read a section leaves it alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

from pathray.cluster.local import ObjectStoreConfig
from pathray.inference.config import InferenceConfig
from pathray.section import ROOT_SECTIONS, ConfigError, dump_section, load_section
from pathray.serving.config import ServeSection
from pathray.training.config import ProjectConfig
from pathray.training.mil import MILConfig

M = TypeVar("M", bound=BaseModel)

__all__ = ["ConfigError", "PathrayConfig", "dump_config", "load_config"]


class PathrayConfig(ProjectConfig):
    """Every section: a project (slides, engine, task, training), inference, serving, the local store."""

    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    serve: ServeSection = Field(default_factory=ServeSection)
    object_store: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)
    mil: MILConfig | None = Field(None, description="slide-level learning on tile embeddings (pathray train)")


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] | None = None,
    model: type[M] = PathrayConfig,  # type: ignore[assignment]
) -> M:
    """``model`` from defaults, then a YAML file, then ``a.b=value`` overrides (later wins).

    Sections of the root that ``model`` does not read are left alone; any other unknown key is a
    ``ConfigError`` that names it.
    """
    return load_section(model, path, overrides or (), ignore=ROOT_SECTIONS)


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (credentials are never part of it)."""
    return dump_section(config)
