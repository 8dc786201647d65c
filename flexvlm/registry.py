"""Name -> class registries, with plugins from other installed packages found via entry points."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A named set of classes. Plugins register themselves by installing an entry point in
    ``group`` (``name = "pkg.module:Class"``); they are loaded on the first lookup, never at import."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind, self.group = kind, group
        self._classes: dict[str, type[T]] = {}
        self._broken: dict[str, str] = {}  # a plugin name whose entry point failed to load -> why
        self._plugins_loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {self._classes[name].__qualname__}")
            self._classes[name] = cls
            return cls

        return decorator

    def _load_plugins(self) -> None:
        """Each plugin on its own: one that fails to import breaks its own name, not every lookup."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            try:
                self.register(ep.name)(ep.load())
            except Exception as err:  # any error of third-party code at import
                package = ep.dist.name if ep.dist is not None else "an unknown package"
                self._broken[ep.name] = (f"the plugin {ep.name!r} = {ep.value!r} of the package {package!r} (entry "
                                         f"point group {self.group!r}) failed to load: {type(err).__name__}: {err}")

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        self._load_plugins()
        if name in self._broken:
            raise ImportError(f"{self.kind} {name!r}: {self._broken[name]}; fix or uninstall that package")
        if name not in self._classes:
            broken = f"; plugins that failed to load: {sorted(self._broken)}" if self._broken else ""
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {self.names()} "
                             f"(or give any importable class by class_path){broken}")
        return self._classes[name]
