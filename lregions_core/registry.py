"""Components registered by name: feature extractors, scorers, editors and segmenters.

A factory takes the whole :class:`~lregions_core.config.Config` and reads the fields it needs,
so presets (data) choose components by name, as timm and open_clip do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def build(self, name: str, config) -> T:
        try:
            factory = self._factories[name]
        except KeyError:
            known = ", ".join(sorted(self._factories)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {known}") from None
        return factory(config)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: str) -> bool:
        return name in self._factories


FEATURE_EXTRACTORS: Registry = Registry("feature extractor")
SCORERS: Registry = Registry("scorer")
EDITORS: Registry = Registry("editor")
SEGMENTERS: Registry = Registry("segmenter")
