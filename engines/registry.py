"""Name -> class registries for the pluggable parts: a worker's trainer backends and rollout
engines, and the datasets (envs/, by `data_source`).

A backend is one file in its package (engines/trainer/, engines/rollout/, envs/) whose class carries
`@REGISTRY.register("name")`; the config key (`actor.strategy`, `rollout.name`, `data.data_source`)
picks it. A name
not registered yet makes the registry import every module of its package once, so a new backend
needs no edit outside its own file. Backend modules import their heavy dependencies (CUDA
libraries, vLLM, Megatron) inside their classes, so that this discovery stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, TypeVar

T = TypeVar("T")


class Registry:
    """Classes by name for one config key (`key`, e.g. "actor.strategy"), found in `package`."""

    def __init__(self, key: str, package: str):
        """key: the config key the names are values of (named in errors); package: the dotted
        package whose modules register classes (imported on first lookup)."""
        self.key, self.package = key, package
        self._classes: dict[str, type] = {}
        self._discovered = False

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: `cls` is built for each of `names`. Raises ValueError for a name taken
        by another class."""

        def add(cls: type[T]) -> type[T]:
            for name in names:
                old = self._classes.get(name)
                if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
                    raise ValueError(f"{self.key}={name} is registered twice ({old.__qualname__}, {cls.__qualname__})")
                self._classes[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        """Every registered name, after importing the package's modules."""
        self._discover()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered for `name`. Raises ValueError (one line naming the key, the value and
        the names this build has) if none is."""
        if name not in self._classes:
            self._discover()
        if name not in self._classes:
            raise ValueError(
                f"{self.key}={name} is not supported in this build (have: {', '.join(self.names())}); "
                f"a new one is a module in {self.package.replace('.', '/')}/ that registers it"
            )
        return self._classes[name]

    def _discover(self) -> None:
        if self._discovered:
            return
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{self.package}.{mod.name}")
        self._discovered = True
