"""JSON lines, the project's one reader and writer: local paths and URLs (gs://...), gzip by suffix.

    for lineno, row in jsonl.read("gs://b/prompts.jsonl.gz"):   # (1-based line number, dict)
        ...
    jsonl.write("out/candidates.jsonl", rows)                   # atomic; parent folders made

`read` yields one object per non-blank line and raises `DataError` naming the file and line for
everything that is wrong with the bytes (missing file, directory, broken gzip, bad UTF-8, malformed
JSON, a value that is not an object, a JSON array where lines were expected). What a line's fields
must hold is the caller's to check (`DataError(..., source=path, where=f"line {n}", field=key)`),
so every message reads ``FILE line N, field 'K': ...``. An empty file yields nothing: whether
that is an error is the caller's call.

`write` writes UTF-8 (``ensure_ascii=False``), one object per line, all at once through
`core.paths.write_bytes`: a reader sees the old file or the whole new one (local: a renamed temp
file; remote: one object upload). A ``.gz`` target is gzip-compressed.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterable, Iterator

from haf_jax.core import paths
from haf_jax.data.errors import DataError, decode_line, type_name


def _gzipped(path) -> bool:
    return os.fspath(path).lower().endswith(".gz")


def read(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of the JSON-lines file `path` (local or a
    URL; gzip when the name ends in .gz). A UTF-8 BOM before the first line is ignored."""
    label = os.fspath(path)
    target = paths.path(path)
    if not target.exists():
        raise DataError("file not found", source=label)
    if target.is_dir():
        raise DataError("is a directory, expected a data file", source=label)
    gz = _gzipped(label)
    lineno = 0
    first = True
    try:
        with target.open("rb") as raw_file:
            for raw in gzip.GzipFile(fileobj=raw_file) if gz else raw_file:
                lineno += 1
                where = f"line {lineno}"
                text = decode_line(raw, label, where)
                if lineno == 1:
                    text = text.lstrip("\ufeff")
                text = text.strip()
                if not text:
                    continue
                if first and text.startswith("["):
                    raise DataError(
                        "found a JSON array where JSON lines (one object per line) were "
                        "expected; write one object per line or name the file .json",
                        source=label,
                        where=where,
                    )
                first = False
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"malformed JSON ({e.msg} at column {e.colno})", source=label, where=where
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got a {type_name(row)}", source=label, where=where)
                yield lineno, row
    except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
        if gz:
            raise DataError(f"broken gzip stream after line {lineno} ({type(e).__name__}: {e})", source=label) from None
        raise DataError(f"cannot read after line {lineno} ({type(e).__name__}: {e})", source=label) from None


def dumps(rows: Iterable[dict]) -> str:
    """The JSON-lines text of `rows` (dicts of JSON values). TypeError naming the record (0-based
    index) that is not a dict or holds a value JSON cannot write (e.g. a numpy scalar)."""
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise TypeError(f"record {i}: expected a dict, got {type(row).__name__}")
        try:
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        except (TypeError, ValueError) as e:
            raise TypeError(f"record {i}: {e}") from None
    return "".join(lines)


def write(path, rows: Iterable[dict]) -> None:
    """Write `rows` to `path` (local or a URL) as JSON lines, atomically; gzip when it ends in .gz.
    The parent folder is made when missing."""
    data = dumps(rows).encode()
    if _gzipped(path):
        data = gzip.compress(data, mtime=0)  # mtime 0: the same rows give the same bytes
    target = paths.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    paths.write_bytes(target, data)
