"""A model package: what a training run exports and a predictor or Serve replica loads. No pickle.

    <uri>/model.yaml             engine, task, input tile size and mpp, normalisation, meta
    <uri>/weights.safetensors    the task model's state dict

The folder may lie on disk or in a bucket. Loading parses YAML and safetensors only, so whoever
can write to a model store can at worst serve wrong weights, never run code in a replica.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field

from pathray.models.config import WEIGHT_SCHEMES, EngineConfig, TaskConfig
from pathray.section import Section, validate
from pathray.storage import ObjectNotFoundError, StorageConfig, join_uri, read_bytes, write_bytes

if TYPE_CHECKING:
    from torch import Tensor

    from pathray.models.task_model import TaskModel
    from pathray.models.tasks import TaskSpec

CONFIG_FILE = "model.yaml"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "pathray.model/1"


class InputSection(Section):
    """The tiles the model was trained on: it sees the same at inference."""

    tile_size: int = Field(..., ge=8, description="tile side in px")
    mpp: float = Field(..., gt=0, description="µm per pixel of the tiles")


class Normalisation(Section):
    """Per-channel mean and std applied to tiles scaled to 0-1."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class PackageConfig(Section):
    """``model.yaml``: everything needed to rebuild the model and to know what it predicts."""

    format: Literal["pathray.model/1"] = FORMAT
    engine: EngineConfig
    task: TaskConfig
    input: InputSection
    normalisation: Normalisation
    meta: dict[str, Any] = Field(default_factory=dict, description="run, step, metrics, source weights")


@dataclass
class ModelPackage:
    """A package's config and weights (a state dict of tensors)."""

    config: PackageConfig
    state: dict[str, Tensor]

    @property
    def meta(self) -> dict[str, Any]:
        return self.config.meta

    def build(self, device: str = "cpu") -> tuple[TaskModel, TaskSpec]:
        """The task model with the package's weights and normalisation, in eval mode, and its task.

        A preset's architecture is rebuilt from the recorded engine section (preset, model_kwargs,
        pooling); the weights are the package's own, never the original checkpoint."""
        from pathray.models.foundation import random_init_expected
        from pathray.models.task_model import build_model

        engine = self.config.engine.model_copy(update={"weights": None})
        with random_init_expected():
            model, task = build_model(engine, self.config.task)
        model.load_state_dict(self.state, strict=True)
        norm = self.config.normalisation
        model.engine.set_normalization(norm.mean, norm.std)
        return model.to(device).eval(), task


def package_config(
    engine: EngineConfig,
    task: Any,
    tile_size: int,
    mpp: float,
    normalisation: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> PackageConfig:
    """The ``model.yaml`` of a trained model; the engine's own weights source and its fine-tuning
    mode move to ``meta`` (a package is a plain model: LoRA adapters are merged into it)."""
    finetune = "frozen" if engine.freeze_backbone else engine.finetune
    trained = {"init_weights": engine.weights, "finetune": finetune}
    meta = json.loads(json.dumps({**(meta or {}), **trained}, default=float))
    plain = {"weights": None, "finetune": "full", "freeze_backbone": False, "grad_checkpointing": False}
    return PackageConfig(
        engine=engine.model_copy(update=plain),
        task=task,
        input=InputSection(tile_size=tile_size, mpp=mpp),
        normalisation=Normalisation(mean=normalisation["mean"], std=normalisation["std"]),
        meta=meta,
    )


def package_model(
    model: TaskModel,
    engine: EngineConfig,
    task: Any,
    tile_size: int,
    mpp: float,
    meta: dict[str, Any] | None = None,
) -> ModelPackage:
    """A built task model as a package: its weights (LoRA adapters merged into a copy: a plain timm
    state dict), and its normalisation read from its engine."""
    from pathray.models.finetune import has_lora, merge_lora

    config = package_config(engine, task, tile_size, mpp, model.engine.data_config, meta)
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    return ModelPackage(config, model.state_dict())


def save_model_package(uri: str, package: ModelPackage, storage: StorageConfig | None = None) -> str:
    """Write a package to ``uri`` (a folder path or a bucket prefix); returns ``uri``."""
    from safetensors.torch import save

    weights = save({k: v.detach().cpu().contiguous() for k, v in package.state.items()})
    write_bytes(join_uri(uri, WEIGHTS_FILE), weights, storage)
    text = yaml.safe_dump(package.config.model_dump(mode="json"), sort_keys=False)
    write_bytes(join_uri(uri, CONFIG_FILE), text.encode(), storage)
    return uri


def read_package_config(uri: str, storage: StorageConfig | None = None) -> PackageConfig:
    """A package's ``model.yaml`` alone (what the Serve ingress and the model list read).

    Raises:
        FileNotFoundError: ``uri`` holds no package.
        ConfigError: the file is not a package config of this version.
    """
    try:
        text = read_bytes(join_uri(uri, CONFIG_FILE), storage)
    except ObjectNotFoundError:
        raise FileNotFoundError(f"{uri} is not a model package ({CONFIG_FILE} + {WEIGHTS_FILE})") from None
    return validate(PackageConfig, yaml.safe_load(text) or {}, f"{join_uri(uri, CONFIG_FILE)}: ")


def with_package_backbone(engine: EngineConfig) -> EngineConfig:
    """``engine`` whose ``weights`` name a local model package (its folder or the weights file in it,
    e.g. an SSL run's exported teacher ``runs/<run>/model``) as the package's backbone: its
    ``preset``, ``model`` and ``model_kwargs`` (registers, LayerScale: the weights fit no other
    architecture; the section's own keys go over them), and its normalisation and pooling where the
    section leaves them unset, with ``weights`` the package's weights file. Anything else is
    returned as it is. ``pathray train`` applies it to the project's engine section.

    Raises:
        ValueError: the section names another engine, preset or timm model than the package's.
    """
    source_uri = engine.weights
    if not source_uri or "://" in source_uri or source_uri.split(":", 1)[0] in WEIGHT_SCHEMES:
        return engine
    path = Path(source_uri).expanduser()
    folder = path if path.is_dir() else path.parent
    if not ((folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()):
        return engine
    if path != folder and path.name != WEIGHTS_FILE:
        return engine
    package = read_package_config(str(folder))
    source = package.engine
    for key in ("name", "preset", "model"):
        mine, theirs = getattr(engine, key), getattr(source, key)
        if mine != theirs and (key == "name" or mine is not None):  # unset: the package's
            raise ValueError(
                f"engine.{key} {mine!r} contradicts the model package {folder} ({key} {theirs!r}): "
                f"its weights fit its own architecture; set engine.{key}: {theirs if theirs else 'null'}"
            )
    norm = package.normalisation
    return engine.model_copy(
        update={
            "preset": source.preset,
            "model": source.model,
            "model_kwargs": {**source.model_kwargs, **engine.model_kwargs},
            "mean": engine.mean or norm.mean,
            "std": engine.std or norm.std,
            "pooling": engine.pooling or source.pooling,
            "weights": str(folder / WEIGHTS_FILE),
        }
    )


def read_model_package(uri: str, storage: StorageConfig | None = None) -> ModelPackage:
    """A package's config and weights; a missing folder or file raises FileNotFoundError naming ``uri``."""
    from safetensors.torch import load

    config = read_package_config(uri, storage)
    try:
        weights = read_bytes(join_uri(uri, WEIGHTS_FILE), storage)
    except ObjectNotFoundError:
        raise FileNotFoundError(f"{uri} is not a model package ({CONFIG_FILE} + {WEIGHTS_FILE})") from None
    return ModelPackage(config, load(weights))
