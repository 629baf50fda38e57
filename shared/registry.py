"""A tiny name -> callable registry (mdistiller-style), used for losses, rules, models, baselines."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to callables; unknown names raise an error that lists the valid ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def add(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            return fn
        return add

    def __getitem__(self, name: str) -> F:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)

    def parse(self, spec: str) -> list[tuple[str, float]]:
        """'name:weight,name' -> [(name, weight)], weight 1 when omitted; unknown names raise."""
        out = []
        for part in spec.split(","):
            name, _, weight = part.strip().partition(":")
            self[name]
            out.append((name, float(weight) if weight else 1.0))
        return out
