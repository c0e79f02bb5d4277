"""A model package: the folder a training run exports and a predictor or Serve replica loads.

``<uri>/config.yaml`` is the run's resolved config; ``<uri>/model.pt`` holds the weights and a
little metadata. The folder may lie on disk or in a bucket: it is read and written with fsspec.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

from pathray.config import PathrayConfig, dump_config
from pathray.wsi.storage import StorageConfig, filesystem, parse_uri

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.pt"


@dataclass
class ModelPackage:
    """A package's config, weights (a state dict) and metadata (run name, step, metrics)."""

    config: PathrayConfig
    state: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def build(self, device: str = "cpu") -> tuple[Any, Any]:
        """The task model with the package's weights, in eval mode, and its task."""
        from pathray.models.task_model import build_model

        cfg = self.config.model_copy(
            update={"engine": self.config.engine.model_copy(update={"weights": None})}
        )
        model, task = build_model(cfg)
        model.load_state_dict(self.state)
        return model.to(device).eval(), task


def _join(uri: str, name: str) -> str:
    return f"{uri.rstrip('/')}/{name}"


def save_model_package(
    uri: str,
    config: PathrayConfig,
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
) -> str:
    """Write a package to ``uri`` (a folder path or a bucket prefix); returns ``uri``."""
    import torch

    location = parse_uri(uri)
    fs = filesystem(location, storage)
    fs.makedirs(location.path, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"model": state, "meta": json.loads(json.dumps(meta or {}, default=float))}, buf)
    # whole-object writes: s3fs refuses to open a file for writing with the small read block size
    fs.pipe_file(_join(location.path, WEIGHTS_FILE), buf.getvalue())
    fs.pipe_file(_join(location.path, CONFIG_FILE), dump_config(config).encode())
    return uri


def read_model_package(uri: str, storage: StorageConfig | None = None) -> ModelPackage:
    """Read a package; a missing folder or file raises FileNotFoundError naming ``uri``."""
    import torch

    location = parse_uri(uri)
    fs = filesystem(location, storage)
    try:
        with fs.open(_join(location.path, CONFIG_FILE), "r") as fh:
            config = PathrayConfig.model_validate(yaml.safe_load(fh.read()))
        with fs.open(_join(location.path, WEIGHTS_FILE), "rb") as fh:
            saved = torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri} is not a model package ({CONFIG_FILE} + {WEIGHTS_FILE})") from None
    return ModelPackage(config, saved["model"], saved.get("meta", {}))
