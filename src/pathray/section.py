"""Config sections and how a tree of them is loaded: defaults < YAML < inline < ``--set``, ``${ENV:-x}``.

Every component owns a small typed ``Section`` and receives only that; entry points assemble a
root of sections once (``pathray.config``) with ``load_section``. Unknown keys are errors that
say where, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


ROOT_SECTIONS = (
    "storage",
    "tissue",
    "data",
    "engine",
    "task",
    "optim",
    "scale",
    "run",
    "train",
    "tracking",
    "inference",
    "serve",
    "object_store",
    "mil",
)
"""The top-level sections of pathray's root config (``pathray.config.PathrayConfig``): a file may hold
any of them, and a part that reads only some (serving) leaves the others alone."""


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says where."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored.

    ``process_local`` names secret fields that stay in the process that read them: a section
    pickled for another process (a Ray worker, actor or Serve replica, or the app Serve stores)
    carries None there, and that process reads the secret from its environment instead.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    process_local: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        if self.process_local:
            state["__dict__"] = {**state["__dict__"], **dict.fromkeys(self.process_local)}
        return state


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


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, section by section (``top`` wins on every key it sets)."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_tree(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(loaded).__name__}")
    return loaded


def load_section(
    model: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    inline: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
) -> M:
    """``model`` from its defaults, then a YAML file, then inline sections, then overrides.

    Args:
        model: the section type to validate into.
        path: a YAML file (optional).
        overrides: ``a.b=value`` strings; later ones win.
        inline: sections given as a mapping (what ``serve run`` passes as app args).
        ignore: top-level sections to drop when ``model`` does not read them (other sections of
            a root config file); any other unknown section is an error.
    """
    tree = read_tree(path) if path is not None else {}
    tree = deep_merge(tree, inline or {})
    for override in overrides:
        apply_override(tree, override)
    own = set(model.model_fields)
    tree = {k: v for k, v in tree.items() if k in own or k not in set(ignore)}
    return validate(model, interpolate_env(tree), f"{path}: " if path else "")


def validate(model: type[M], tree: Mapping[str, Any], where: str = "") -> M:
    """``model.model_validate(tree)`` with every problem in one line that names its key."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(where + "; ".join(lines)) from None


def dump_section(config: BaseModel) -> str:
    """A section tree as YAML, saved with every run (secrets are excluded fields: never written)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
