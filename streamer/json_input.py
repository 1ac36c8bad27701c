"""JSON from producers and clients, read strictly: an object that names a key twice is
refused. Python's `json` keeps the last of them silently, so that
`{"user_id": "a", ..., "user_id": "b"}` would publish to b what reads as a's. A number
longer than Python turns into an int is refused as such, not as text that is no JSON."""

from __future__ import annotations

import json
import sys
from typing import Any


class RefusedValue(ValueError):
    """JSON that parses, with a value that cannot be taken; the message says which."""


class DuplicateKey(RefusedValue):
    """An object names the same key twice."""


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # it has JSON's shape: too long for Python (4300 digits by default)
        limit = sys.get_int_max_str_digits()
        raise RefusedValue(f"a number has more than {limit} digits") from None


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
    """`json.loads`, raising RefusedValue (a ValueError) for a key given twice or a
    number too long for Python."""
    return json.loads(text, object_pairs_hook=_object, parse_int=_int)
