"""JSON from producers and clients, read strictly: an object that names a key twice is
refused. Python's `json` keeps the last of them silently, so that
`{"user_id": "a", ..., "user_id": "b"}` would publish to b what reads as a's."""

from __future__ import annotations

import json
from typing import Any


class DuplicateKey(ValueError):
    """An object names the same key twice."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(f"the field {key[:50]!r} is given more than once")
            seen.add(key)
    return result


def loads(text: str | bytes) -> Any:
    """`json.loads`, raising DuplicateKey (a ValueError) for a key given twice."""
    return json.loads(text, object_pairs_hook=_object)
