"""The model store (sub-folders are model packages; id = folder name) and the results store."""

from __future__ import annotations

import json
from typing import Any

import yaml

from pathray.models.package import CONFIG_FILE, WEIGHTS_FILE
from pathray.serving.security import is_safe_id
from pathray.wsi.storage import StorageConfig, filesystem, parse_uri


def join(uri: str, *names: str) -> str:
    """``uri/name/...`` for folders and bucket prefixes alike."""
    return "/".join([uri.rstrip("/"), *names])


class _Store:
    """A folder or bucket prefix read and written with fsspec."""

    def __init__(self, uri: str, storage: StorageConfig | None = None) -> None:
        self.uri = uri
        self.storage = storage
        self._location = parse_uri(uri)

    def _fs(self) -> Any:
        return filesystem(self._location, self.storage)


class ModelStore(_Store):
    """A folder or bucket prefix of model packages (``pathray.models.package``); id = sub-folder name.

    A sub-folder is a package itself (``<id>/config.yaml`` + ``<id>/model.pt``) or a training run
    that exported one (``<id>/model/...``), so a runs folder can be served as it is.
    """

    LAYOUTS = ("", "model/")

    def _package_dir(self, fs: Any, model_id: str) -> str | None:
        """``<id>/`` or ``<id>/model/`` (relative to the store), whichever holds a package."""
        root = self._location.path.rstrip("/")
        for layout in self.LAYOUTS:
            folder = f"{model_id}/{layout}"
            if fs.exists(f"{root}/{folder}{CONFIG_FILE}") and fs.exists(f"{root}/{folder}{WEIGHTS_FILE}"):
                return folder
        return None

    def ids(self) -> list[str]:
        """Model ids: the sub-folders holding a package (or a run's exported one), sorted."""
        fs = self._fs()
        root = self._location.path.rstrip("/")
        fs.invalidate_cache(root)  # bucket listings are cached by s3fs; new packages must show
        try:
            entries = fs.ls(root, detail=True)
        except FileNotFoundError:
            return []
        names = [
            str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
        ]
        return sorted(n for n in names if is_safe_id(n) and self._package_dir(fs, n) is not None)

    def uri_for(self, model_id: str) -> str:
        """The package URI of ``model_id``; ValueError for ids that are not plain names or packages."""
        if not is_safe_id(model_id):
            raise ValueError(f"model id {model_id!r} is not a plain name")
        folder = self._package_dir(self._fs(), model_id)
        if folder is None:
            raise FileNotFoundError(f"no model package {model_id!r} in {self.uri}")
        return join(self.uri, folder.rstrip("/"))

    def describe(self, model_id: str) -> dict[str, Any]:
        """What ``GET /v1/models`` shows of a model: task, engine, classes (from its config only)."""
        fs = self._fs()
        package = parse_uri(self.uri_for(model_id)).path
        with fs.open(f"{package}/{CONFIG_FILE}", "r") as fh:
            cfg = yaml.safe_load(fh.read()) or {}
        task, engine = cfg.get("task") or {}, cfg.get("engine") or {}
        info: dict[str, Any] = {"id": model_id, "task": task.get("name"), "engine": engine.get("name")}
        info["classes"] = task.get("point_classes" if task.get("name") == "detection" else "classes")
        return info


class ResultStore(_Store):
    """``<output>/<analysis id>/``: outputs and status.json, so results outlive any replica."""

    def dest(self, analysis_id: str) -> str:
        """The URI of one analysis's folder (what ``write_outputs`` writes into)."""
        return join(self.uri, analysis_id)

    def _path(self, analysis_id: str, name: str) -> str:
        if not is_safe_id(analysis_id) or not is_safe_id(name):
            raise ValueError(f"not a safe name: {analysis_id!r}/{name!r}")
        return f"{self._location.path.rstrip('/')}/{analysis_id}/{name}"

    def write_bytes(self, analysis_id: str, name: str, data: bytes) -> str:
        """Write one whole object (one PUT on object storage), replacing any earlier version."""
        fs = self._fs()
        path = self._path(analysis_id, name)
        if self._location.is_local:
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
        return join(self.dest(analysis_id), name)

    def write_json(self, analysis_id: str, name: str, doc: dict[str, Any]) -> None:
        """Write ``doc`` as JSON, replacing any earlier version."""
        self.write_bytes(analysis_id, name, json.dumps(doc, indent=2, default=str).encode())

    def read_bytes(self, analysis_id: str, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        fs = self._fs()
        try:
            with fs.open(self._path(analysis_id, name), "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_json(self, analysis_id: str, name: str) -> dict[str, Any] | None:
        data = self.read_bytes(analysis_id, name)
        return None if data is None else json.loads(data)
