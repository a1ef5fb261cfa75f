"""Name -> class registries for the pluggable parts: a worker's trainer backends and rollout
engines, and the datasets (envs/, by `data_source`).

A backend is one file in its package (engines/trainer/, engines/rollout/, envs/) whose class carries
`@REGISTRY.register("name")`; the config key (`actor.strategy`, `rollout.name`, `data.data_source`)
picks it. A name
not registered yet makes the registry import every module of its package once, so a new backend
needs no edit outside its own file. Backend modules import their heavy dependencies (CUDA
libraries, vLLM, Megatron) inside their classes, so that this discovery stays cheap.

A module that fails to import is skipped (what it registered is taken back): one warning line
names its file and the error, and a name that is then not found is one error line listing the
names this build has and the modules that failed. Two classes registering one name is an error
naming both files.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


class DuplicateRegistration(ValueError):
    """Two classes register one name: a build error, never skipped as a broken module."""


def _source_file(cls: type) -> str:
    """The file that defines `cls`, relative to the repository root when inside it."""
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if file is None:
        return cls.__module__
    path = Path(file).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Registry:
    """Classes by name for one config key (`key`, e.g. "actor.strategy"), found in `package`."""

    def __init__(self, key: str, package: str):
        """key: the config key the names are values of (named in errors); package: the dotted
        package whose modules register classes (imported on first lookup)."""
        self.key, self.package = key, package
        self._classes: dict[str, type] = {}
        self._discovered = False
        self._broken: dict[str, str] = {}  # file -> its import error, one line (skipped by discovery)
        self._warned = False

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator: `cls` is built for each of `names`. Raises DuplicateRegistration (a
        ValueError naming both classes and their files) for a name taken by another class."""

        def add(cls: type[T]) -> type[T]:
            for name in names:
                old = self._classes.get(name)
                if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
                    raise DuplicateRegistration(
                        f"{self.key}={name} is registered twice: {old.__qualname__} in "
                        f"{_source_file(old)} and {cls.__qualname__} in {_source_file(cls)}; "
                        "rename one of them"
                    )
                self._classes[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        """Every registered name, after importing the package's modules (a warning line for each
        module that failed to import)."""
        self._discover()
        self._warn()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered for `name`. Raises ValueError (one line naming the key, the value,
        the names this build has and the modules that failed to import) if none is."""
        if name not in self._classes:
            self._discover()
        if name not in self._classes:
            broken = "; ".join(f"{file}: {error}" for file, error in self._broken.items())
            raise ValueError(
                f"{self.key}={name} is not supported in this build (have: {', '.join(sorted(self._classes))}"
                + (f"; failed to import: {broken}" if broken else "")
                + f"); a new one is a module in {self.package.replace('.', '/')}/ that registers it"
            )
        self._warn()
        return self._classes[name]

    def _discover(self) -> None:
        """Import every module of the package once; one that raises is skipped and its
        registrations taken back (a DuplicateRegistration is raised: two files claim a name)."""
        if self._discovered:
            return
        pkg = importlib.import_module(self.package)
        for mod in pkgutil.iter_modules(pkg.__path__):
            module = f"{self.package}.{mod.name}"
            try:
                importlib.import_module(module)
            except DuplicateRegistration:
                raise
            except Exception as e:
                self._classes = {  # what it registered before failing is not usable
                    n: c
                    for n, c in self._classes.items()
                    if c.__module__ != module and not c.__module__.startswith(f"{module}.")
                }
                file = f"{self.package.replace('.', '/')}/{mod.name}{'/' if mod.ispkg else '.py'}"
                text = str(e).strip().splitlines()
                self._broken[file] = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
        self._discovered = True

    def _warn(self) -> None:
        """One warning line per module discovery skipped, once per registry."""
        if self._warned:
            return
        self._warned = True
        for file, error in self._broken.items():
            log.warning(
                "%s: skipped, it does not import (%s); the %s names it registers are unavailable", file, error, self.key
            )
