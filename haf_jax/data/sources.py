"""Read raw rows (dicts) from local files, the Hugging Face hub or TensorFlow Datasets.

Source spec grammar (the part after an optional ``recipe:NAME:`` prefix, see `formats.py`)::

    PATH                          local .jsonl | .jsonl.gz | .json | .json.gz | .parquet | .csv
    sample                        the bundled HH-RLHF harmless-base test sample (offline)
    hf:NAME:SPLIT                 hub dataset, e.g. hf:PKU-Alignment/PKU-SafeRLHF:train
    hf:NAME:CONFIG:SPLIT          CONFIG may be ``data_dir=DIR``:
                                  hf:Anthropic/hh-rlhf:data_dir=harmless-base:test
    tfds:NAME:SPLIT               TensorFlow Datasets (optional extra ``haf_jax[tfds]``)

or a config block (dict): ``{"path": P}``, ``{"hf": NAME, "config": C, "data_dir": D,
"split": S}`` or ``{"tfds": NAME, "split": S}``.

`read_rows(source)` yields ``(where, row)`` with ``where`` = "line N" (1-based, JSON lines and
CSV) or "row N" (0-based row index, JSON list / parquet / hub / tfds). JSON lines are read here
line by line (exact line numbers in errors); parquet and CSV go through `datasets` (cached).
Every problem raises `DataError` naming the file, line/row and field.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from typing import Any, Iterator

from haf_jax.data.errors import DataError, type_name

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


@dataclasses.dataclass(frozen=True)
class Source:
    """One resolved source. kind: 'file' | 'hf' | 'tfds'."""
    kind: str
    name: str                      # path for files, dataset name otherwise
    split: str | None = None
    config: str | None = None
    data_dir: str | None = None

    @property
    def label(self) -> str:
        """How messages name this source."""
        if self.kind == "file":
            return self.name
        extra = ":".join(x for x in (self.config, f"data_dir={self.data_dir}" if self.data_dir else None) if x)
        return ":".join(x for x in (self.kind, self.name, extra, self.split) if x)


def parse_source(spec: Any) -> Source:
    """Parse a source spec string or config block (module docstring) into a `Source`."""
    if isinstance(spec, dict):
        spec = dict(spec)
        if "path" in spec:
            return parse_source(str(spec["path"]))
        if "hf" in spec:
            return Source("hf", spec["hf"], spec.get("split", "train"), spec.get("config"), spec.get("data_dir"))
        if "tfds" in spec:
            return Source("tfds", spec["tfds"], spec.get("split", "train"))
        raise DataError(f"data config block needs one of 'path', 'hf', 'tfds'; got keys {sorted(spec)}")
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise DataError(f"data spec must be a non-empty string or a dict, got {spec!r}")
    spec = str(spec)
    if spec == "sample":
        from haf_jax.samples import sample_paths
        return Source("file", str(sample_paths()["data"]))
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise DataError(f"bad hub spec {spec!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
        config = data_dir = None
        if len(parts) == 3:
            if parts[1].startswith("data_dir="):
                data_dir = parts[1][len("data_dir="):]
            else:
                config = parts[1]
        return Source("hf", parts[0], parts[-1], config, data_dir)
    if spec.startswith("tfds:"):
        parts = spec[5:].split(":")
        if len(parts) != 2 or not all(parts):
            raise DataError(f"bad TFDS spec {spec!r}: expected tfds:NAME:SPLIT")
        return Source("tfds", parts[0], parts[1])
    return Source("file", spec)


def read_rows(source: Source) -> Iterator[tuple[str, dict]]:
    """Yield (where, row dict) for every record of `source`, in source order."""
    if source.kind == "hf":
        yield from _read_hub(source)
    elif source.kind == "tfds":
        yield from _read_tfds(source)
    else:
        yield from _read_file(source.name)


# ----------------------------------------------------------------------------- local files
def _suffix(path: str) -> str:
    low = path.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return s
    return os.path.splitext(low)[1] or "(none)"


def _read_file(path: str) -> Iterator[tuple[str, dict]]:
    suffix = _suffix(path)
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}",
                        source=path)
    if not os.path.exists(path):
        raise DataError("file not found", source=path)
    if os.path.isdir(path):
        raise DataError("is a directory, expected a data file", source=path)
    if os.path.getsize(path) == 0:
        raise DataError("empty file (0 bytes, no records)", source=path)
    n = 0
    if suffix in (".jsonl", ".jsonl.gz"):
        rows = _read_jsonl(path, suffix.endswith(".gz"))
    elif suffix in (".json", ".json.gz"):
        rows = _read_json(path, suffix.endswith(".gz"))
    else:
        rows = _read_with_datasets(path, suffix)
    for item in rows:
        n += 1
        yield item
    if n == 0:
        raise DataError("empty file (no records)", source=path)


def _open_bytes(path: str, gz: bool):
    return gzip.open(path, "rb") if gz else open(path, "rb")


def _gzip_errors():
    return (gzip.BadGzipFile, EOFError, zlib.error, OSError)


def _decode(raw: bytes, path: str, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1].hex()
        raise DataError(f"not valid UTF-8 (byte 0x{bad} at byte offset {e.start} of the line)",
                        source=path, where=where) from None


def _read_jsonl(path: str, gz: bool) -> Iterator[tuple[str, dict]]:
    lineno = 0
    first = True
    try:
        with _open_bytes(path, gz) as f:
            for raw in f:
                lineno += 1
                where = f"line {lineno}"
                text = _decode(raw, path, where)
                if lineno == 1:
                    text = text.lstrip("\ufeff")
                text = text.strip()
                if not text:
                    continue
                if first and text.startswith("["):
                    raise DataError("found a JSON array where JSON lines (one object per line) were "
                                    "expected; write one object per line or name the file .json",
                                    source=path, where=where)
                first = False
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as e:
                    raise DataError(f"malformed JSON ({e.msg} at column {e.colno})",
                                    source=path, where=where) from None
                if not isinstance(row, dict):
                    raise DataError(f"expected a JSON object, got a {type_name(row)}",
                                    source=path, where=where)
                yield where, row
    except _gzip_errors() as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"broken gzip stream after line {lineno} ({type(e).__name__}: {e})",
                        source=path) from None


def _read_json(path: str, gz: bool) -> Iterator[tuple[str, dict]]:
    try:
        with _open_bytes(path, gz) as f:
            raw = f.read()
    except _gzip_errors() as e:
        raise DataError(f"broken gzip stream ({type(e).__name__}: {e})", source=path) from None
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte 0x{raw[e.start:e.start + 1].hex()})",
                        source=path, where=f"line {line}") from None
    if not text.strip():
        raise DataError("empty file (no records)", source=path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":     # JSON lines in a .json file: accept them
            yield from _read_jsonl(path, gz)
            return
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", source=path,
                        where=f"line {e.lineno}") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got a {type_name(data)}", source=path)
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got a {type_name(row)}", source=path,
                            where=f"row {i}")
        yield f"row {i}", row


def _read_with_datasets(path: str, suffix: str) -> Iterator[tuple[str, dict]]:
    import datasets  # heavy import: only when needed

    builder = suffix.lstrip(".")
    if builder == "csv":
        with open(path, "rb") as f:       # exact line numbers for bad bytes
            for lineno, raw in enumerate(f, 1):
                _decode(raw, path, f"line {lineno}")
    try:
        ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train")
    except Exception as e:  # datasets wraps parser errors in many types
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"cannot read as {builder} ({type(cause).__name__}: {cause})",
                        source=path) from None
    offset, unit = (2, "line") if builder == "csv" else (0, "row")
    for i, row in enumerate(ds):
        yield f"{unit} {i + offset}", row


# ----------------------------------------------------------------------------- hub and tfds
def _read_hub(source: Source) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(source.name, source.config, data_dir=source.data_dir,
                                   split=source.split)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (" (this machine is offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; download the "
                "dataset once online or pass a local file)" if offline else "")
        raise DataError(f"cannot load hub dataset ({type(e).__name__}: {e}){hint}",
                        source=source.label) from None
    for i, row in enumerate(ds):
        yield f"row {i}", row


def _read_tfds(source: Source) -> Iterator[tuple[str, dict]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("TensorFlow Datasets is not installed; pip install 'haf_jax[tfds]' "
                        "(tensorflow-datasets; prepared datasets are read through "
                        "tfds.data_source, which needs no TensorFlow at read time)",
                        source=source.label) from None
    try:
        ds = tfds.data_source(source.name, split=source.split)
    except Exception as e:
        raise DataError(f"cannot load TFDS dataset ({type(e).__name__}: {e})",
                        source=source.label) from None
    for i in range(len(ds)):
        yield f"row {i}", _to_python(ds[i])


def _to_python(x):
    """TFDS examples hold bytes and numpy values: make them JSON-like."""
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="strict")
    if isinstance(x, dict):
        return {k: _to_python(v) for k, v in x.items()}
    if hasattr(x, "tolist"):
        return _to_python(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_to_python(v) for v in x]
    return x
