"""The one exception type of the data layer.

Every problem with user data raises `DataError` whose message names the file (or source), the
line or row, and the field, e.g.::

    data/train.jsonl line 17, field 'chosen': expected a string, got null

CLIs catch it, print `str(err)` without a traceback and exit non-zero.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad preference data or data settings. Attributes: source, where, field (each may be None)."""

    def __init__(self, message: str, *, source: str | None = None, where: str | None = None, field: str | None = None):
        self.message, self.source, self.where, self.field = message, source, where, field
        prefix = " ".join(p for p in (source, where) if p)
        if field is not None:
            prefix = f"{prefix}, field {field!r}" if prefix else f"field {field!r}"
        super().__init__(f"{prefix}: {message}" if prefix else message)


class BadText(bytes):
    """Bytes from a TFDS/hub value that are not valid UTF-8, kept as read. `formats` reports them
    (source, row, field and where inside the value) when a record form reads the field, so binary
    features that nothing uses never stop a run. ``reason`` says which byte is bad."""

    def __new__(cls, raw: bytes, reason: str):
        obj = super().__new__(cls, raw)
        obj.reason = reason
        return obj


def find_bad_text(value, path: str = "") -> str | None:
    """Message for the first `BadText` inside `value` (``[i]`` / ``['key']`` path), else None."""
    if isinstance(value, BadText):
        return f"{value.reason}{' in ' + path if path else ''}"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = find_bad_text(v, f"{path}[{k!r}]")
        if found:
            return found
    return None


def decode_line(raw: bytes, source: str, where: str) -> str:
    """One line's bytes as text; `DataError` naming `source`, `where` and the bad byte's offset
    in the line when they are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1].hex()
        raise DataError(
            f"not valid UTF-8 (byte 0x{bad} at byte offset {e.start} of the line)", source=source, where=where
        ) from None


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
