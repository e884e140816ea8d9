"""File-and-line problems for hand-written YAML, as `scgw rules check` reports them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import yaml

from simulators.faults.scenario import ScenarioError

KeyPath = tuple[str | int, ...]


def line_index(text: str) -> dict[KeyPath, int]:
    """Every key path of the document -> the 1-based line it starts on."""
    lines: dict[KeyPath, int] = {}

    def walk(node: yaml.Node, path: KeyPath, depth: int) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if depth > 32:
            return
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*path, str(key.value))
                walk(value, child, depth + 1)
                lines[child] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i), depth + 1)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, (), 0)
    return lines


class Reader:
    """Looks values up by key path and files problems at their lines."""

    def __init__(self, source: str, data: Mapping[str, Any], lines: dict[KeyPath, int]) -> None:
        self.source, self.data, self.lines = source, data, lines
        self.problems: list[tuple[int, str]] = []

    def line(self, path: KeyPath) -> int:
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return 1

    def fail(self, path: KeyPath, message: str) -> None:
        dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        line = self.line(path)
        self.problems.append((line, f"{self.source}:{line}: {dotted or '(file)'}: {message}"))

    def keys(self, node: object, path: KeyPath, allowed: set[str]) -> Mapping[str, Any]:
        if node is None:
            return {}
        if not isinstance(node, Mapping):
            self.fail(path, f"expected a mapping, found {type(node).__name__}")
            return {}
        for key in node:
            if key not in allowed:
                self.fail((*path, str(key)), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return node

    def items(self, node: object, path: KeyPath) -> list[Any]:
        if node is None:
            return []
        if not isinstance(node, list):
            self.fail(path, f"expected a list, found {type(node).__name__}")
            return []
        return node

    def number(self, node: Mapping[str, Any], key: str, path: KeyPath, default: float,
               lo: float = 0.0, hi: float = float("inf"), integer: bool = False) -> float:
        value = node.get(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and integer and not isinstance(value, int):
            ok = False
        if not ok or not lo <= value <= hi:
            kind = "an integer" if integer else "a number"
            self.fail((*path, key), f"expected {kind} in [{lo:g}, {hi:g}], found {value!r}")
            return default
        return float(value)

    def parsed(self, parse: Callable[[object, str], Any], value: object, path: KeyPath,
               default: Any) -> Any:
        try:
            return parse(value, "")
        except ScenarioError as exc:
            self.fail(path, str(exc).removeprefix(": "))
            return default
