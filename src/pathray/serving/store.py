"""The model store (sub-folders are model packages; id = folder name) and the results store."""

from __future__ import annotations

import json
from typing import Any

from pathray.inference.spec import ModelSpec
from pathray.models.package import CONFIG_FILE, WEIGHTS_FILE, PackageConfig, read_package_config
from pathray.serving.security import is_safe_id
from pathray.storage import (
    ObjectNotFoundError,
    StorageConfig,
    call,
    filesystem,
    join_uri,
    parse_uri,
    read_bytes,
    write_bytes,
)


class ModelStore:
    """A folder or bucket prefix of model packages (``pathray.models.package``); id = sub-folder name.

    A sub-folder is a package itself (``<id>/model.yaml`` + ``<id>/weights.safetensors``) or a
    training run that exported one (``<id>/model/...``), so a runs folder can be served as it is.
    Only the packages' YAML is read here: the ingress plans slides without loading any weights.
    """

    LAYOUTS = ("", "model/")

    def __init__(self, uri: str, storage: StorageConfig | None = None) -> None:
        self.uri, self.storage = uri, storage
        self._location = parse_uri(uri)

    def _exists(self, path: str) -> bool:
        return bool(call(self._location, self.storage, "exists", path))

    def _package_dir(self, model_id: str) -> str | None:
        """``<id>/`` or ``<id>/model/`` (relative to the store), whichever holds a package."""
        root = self._location.path.rstrip("/")
        for layout in self.LAYOUTS:
            folder = f"{model_id}/{layout}"
            if all(self._exists(f"{root}/{folder}{name}") for name in (CONFIG_FILE, WEIGHTS_FILE)):
                return folder
        return None

    def ids(self) -> list[str]:
        """Model ids: the sub-folders holding a package (or a run's exported one), sorted."""
        root = self._location.path.rstrip("/")
        filesystem(self._location, self.storage).invalidate_cache(root)  # s3fs caches listings
        try:
            entries = call(self._location, self.storage, "ls", root, detail=True)
        except ObjectNotFoundError:
            return []
        names = [
            str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
        ]
        return sorted(n for n in names if is_safe_id(n) and self._package_dir(n) is not None)

    def uri_for(self, model_id: str) -> str:
        """The package URI of ``model_id``; ValueError for ids that are not plain names or packages."""
        if not is_safe_id(model_id):
            raise ValueError(f"model id {model_id!r} is not a plain name")
        folder = self._package_dir(model_id)
        if folder is None:
            raise FileNotFoundError(f"no model package {model_id!r} in {self.uri}")
        return join_uri(self.uri, folder)

    def config(self, model_id: str) -> PackageConfig:
        """The package's ``model.yaml``."""
        return read_package_config(self.uri_for(model_id), self.storage)

    def spec(self, model_id: str) -> ModelSpec:
        """What the model predicts and from which tiles (the ingress plans the grid with it)."""
        return ModelSpec.from_package(self.config(model_id), name=model_id)

    def describe(self, model_id: str) -> dict[str, Any]:
        """What ``GET /v1/models`` shows of a model: task, engine (and foundation preset), classes and
        the tiles it reads (from its config only)."""
        config = self.config(model_id)
        task = ModelSpec.from_package(config, name=model_id).task
        return {
            "id": model_id,
            "task": task.name,
            "engine": config.engine.name,
            "preset": config.engine.preset,
            "classes": task.classes,
            "tile_size": config.input.tile_size,
            "mpp": config.input.mpp,
        }


class ResultStore:
    """``<output>/<analysis id>/``: outputs and status.json, so results outlive any replica."""

    def __init__(self, uri: str, storage: StorageConfig | None = None) -> None:
        self.uri, self.storage = uri, storage

    def dest(self, analysis_id: str) -> str:
        """The URI of one analysis's folder (what ``write_outputs`` writes into)."""
        return join_uri(self.uri, analysis_id)

    def _uri(self, analysis_id: str, name: str) -> str:
        if not is_safe_id(analysis_id) or not is_safe_id(name):
            raise ValueError(f"not a safe name: {analysis_id!r}/{name!r}")
        return join_uri(self.uri, analysis_id, name)

    def write_bytes(self, analysis_id: str, name: str, data: bytes) -> str:
        """Write one whole object (one PUT on object storage), replacing any earlier version."""
        return write_bytes(self._uri(analysis_id, name), data, self.storage)

    def write_json(self, analysis_id: str, name: str, doc: dict[str, Any]) -> None:
        """Write ``doc`` as JSON, replacing any earlier version."""
        self.write_bytes(analysis_id, name, json.dumps(doc, indent=2, default=str).encode())

    def read_bytes(self, analysis_id: str, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return read_bytes(self._uri(analysis_id, name), self.storage)
        except ObjectNotFoundError:
            return None

    def read_json(self, analysis_id: str, name: str) -> dict[str, Any] | None:
        data = self.read_bytes(analysis_id, name)
        return None if data is None else json.loads(data)
