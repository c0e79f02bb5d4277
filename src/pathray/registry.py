"""One registry for engines, tasks, samplers and backends: names in YAML, never import paths."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A name that is unknown, or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; people should read it plainly
        return str(self.args[0])


class Registry(Generic[T]):
    """A named table of factories.

    Registering a name twice is an error (two plugins must not silently shadow each other);
    asking for an unknown name is an error that lists the known names, so a typo in a
    config file says what would have worked.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that adds ``obj`` under ``name``."""

        def add(obj: T) -> T:
            self.add(name, obj)
            return obj

        return add

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise RegistryError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def remove(self, name: str) -> T:
        """Take ``name`` out again (a plugin unloading; a test's own entry)."""
        obj = self.get(name)
        del self._items[name]
        return obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)


# The project's registries. Modules add to them when they are imported; the factories
# (`open_slide`, `build_sampler`, `build_engine`, `build_task`, `build_learner`) import the
# built-in ones first.
SLIDE_BACKENDS: Registry[type] = Registry("slide backend")
"""Slide readers by name (``pathray.wsi.backends``)."""
SAMPLERS: Registry[type] = Registry("sampler")
"""Where tiles come from (``pathray.wsi.patching.samplers``)."""
ENGINES: Registry[Any] = Registry("engine")
"""Backbone + decoder: a builder and the defaults a project switches with it (``pathray.models.engines``)."""
TASKS: Registry[type] = Registry("task")
"""Task specs: targets, augmentation of targets, head, loss, metrics, outputs (``pathray.models.tasks``)."""
LEARNERS: Registry[type] = Registry("learner")
"""How a task trains and is evaluated: supervised, self-distillation (``pathray.training.learners``)."""
PRESETS: Registry[Any] = Registry("foundation preset")
"""Public pathology foundation models: architecture, normalisation, pooling (``pathray.models.presets``)."""
MIL_MODELS: Registry[Any] = Registry("MIL model")
"""Slide-level models on bags of tile embeddings: ABMIL, mean-pool (``pathray.models.mil``)."""
