"""The library's typed results: a command's answer as a dataclass, its JSON by `to_json()`.

The CLI prints `to_json()` (with `"ok"`), so the keys a script reads are the dataclass's
fields unless its `to_json` says otherwise; tests/contract/test_json_keys.py pins them.
Python callers read attributes and let mypy check them, instead of indexing a dict.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, ClassVar


class Result:
    """Base of a result dataclass: `to_json()` is its fields, nested results as their JSON;
    the fields named in OPTIONAL only when set (not None): keys that appear only in the
    cases that have something to say."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        assert is_dataclass(self)
        return {f.name: as_json(getattr(self, f.name)) for f in fields(self)
                if f.name not in self.OPTIONAL or getattr(self, f.name) is not None}


def as_json(value: Any) -> Any:
    """`value` as plain JSON data: results by their `to_json`, lists and dicts walked."""
    if isinstance(value, Result):
        return value.to_json()
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value
