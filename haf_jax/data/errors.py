"""The one exception type of the data layer.

Every problem with user data raises `DataError` whose message names the file (or source), the
line or row, and the field, e.g.::

    data/train.jsonl line 17, field 'chosen': expected a string, got null

CLIs catch it, print `str(err)` without a traceback and exit non-zero.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad preference data or data settings. Attributes: source, where, field (each may be None)."""

    def __init__(self, message: str, *, source: str | None = None, where: str | None = None,
                 field: str | None = None):
        self.source, self.where, self.field = source, where, field
        prefix = " ".join(p for p in (source, where) if p)
        if field is not None:
            prefix = f"{prefix}, field {field!r}" if prefix else f"field {field!r}"
        super().__init__(f"{prefix}: {message}" if prefix else message)


def type_name(value) -> str:
    """Short JSON-style name of a value's type for messages ('null', 'number', 'list', ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
