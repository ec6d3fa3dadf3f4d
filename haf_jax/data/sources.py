"""Read raw rows (dicts) from local files, the Hugging Face hub or TensorFlow Datasets.

Source spec grammar (the part after an optional ``recipe:NAME:`` prefix, see `formats.py`)::

    PATH                          local .jsonl | .jsonl.gz | .json | .json.gz | .parquet | .csv
    sample                        the bundled HH-RLHF harmless-base test sample (offline)
    hf:NAME:SPLIT                 hub dataset, e.g. hf:PKU-Alignment/PKU-SafeRLHF:train
    hf:NAME:CONFIG:SPLIT          CONFIG may be ``data_dir=DIR``:
                                  hf:Anthropic/hh-rlhf:data_dir=harmless-base:test
    hf:LOCAL_DIR[:CONFIG]:SPLIT   NAME that is an existing local directory (or starts with
                                  ``/ ./ ../ ~``): a dataset repository laid out as on the hub
                                  (parquet/jsonl shards, ``data_dir`` subfolders, README.md
                                  ``configs:``), read offline: hf:/data/hh-rlhf:data_dir=harmless-base:test
    tfds:NAME:SPLIT               TensorFlow Datasets (optional extra ``haf_jax[tfds]``, no
                                  TensorFlow needed), read from ``$TFDS_DATA_DIR`` (default
                                  ``~/tensorflow_datasets``); NAME may be ``name/config``
    tfds:NAME:data_dir=DIR:SPLIT  the same, prepared under DIR (DIR may itself contain ``:``)

SPLIT may carry a slice (``train[:10%]``) for hub and TFDS sources. Or a config block (dict):
``{"path": P}``, ``{"hf": NAME, "config": C, "data_dir": D, "split": S}`` or
``{"tfds": NAME, "split": S, "data_dir": D}``.

TFDS datasets are read through ``tfds.data_source`` (random access, no TensorFlow): they must
already be prepared in the ``array_record`` (or ``parquet``) file format, e.g. ``tfds build
--file_format=array_record`` or ``builder.download_and_prepare(file_format="array_record")``;
nothing is downloaded at read time. Text/bytes features are decoded as UTF-8 and numpy values
become Python values; a ``Sequence`` of feature dicts (e.g. messages ``{role, content}``) becomes a
list of dicts, so TFDS rows take the same record forms as every other source (formats.py).

Rows already in memory come as `Records` (a name and a list of dicts): no spec string, no file.

`read_rows(source)` yields ``(where, row)`` with ``where`` = "line N" (1-based, JSON lines and
CSV), "row N" (0-based row index, JSON list / parquet / hub / tfds) or "record N" (0-based index
of in-memory `Records`). JSON lines are read line by line by `jsonl.read` (exact line numbers in
errors); parquet and CSV go through `datasets` (cached).
Every problem raises `DataError` naming the file or dataset and split, the line/row and field.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from haf_jax.data import jsonl
from haf_jax.data.errors import BadText, DataError, decode_line, type_name

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


@dataclasses.dataclass(frozen=True)
class Source:
    """One resolved source. kind: 'file' | 'hf' | 'tfds'."""

    kind: str
    name: str  # path for files, dataset name otherwise
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


@dataclasses.dataclass(frozen=True)
class Records:
    """Rows already in memory: a list (or tuple) of dicts in any record form (formats.py), under a
    `name` that messages use in place of a file name ("candidates record 3, field 'chosen': ...",
    ``record N`` = the 0-based index in `rows`). With `recipe` the rows are that recipe's dataset
    rows. Values are taken as the hub's are (numpy values become Python ones, bytes UTF-8 text).
    Like a file's path, the name is not part of the dataset fingerprint: the same rows in memory
    and in a file are the same data."""

    name: str
    rows: Sequence[dict]  # stored as a tuple
    recipe: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(f"in-memory records need a non-empty name for messages, got {self.name!r}")
        if not isinstance(self.rows, (list, tuple)):
            raise DataError(f"expected a list of records (dicts), got a {type(self.rows).__name__}", source=self.name)
        if not self.rows:
            raise DataError("no records (an empty list)", source=self.name)
        object.__setattr__(self, "rows", tuple(self.rows))

    @property
    def label(self) -> str:
        """How messages and the data report name these records."""
        return self.name


def parse_source(spec: Any) -> Source:
    """Parse a source spec string or config block (module docstring) into a `Source`."""
    if isinstance(spec, dict):
        spec = dict(spec)
        if "path" in spec:
            return parse_source(str(spec["path"]))
        if "hf" in spec:
            return Source("hf", spec["hf"], spec.get("split", "train"), spec.get("config"), spec.get("data_dir"))
        if "tfds" in spec:
            return Source("tfds", spec["tfds"], spec.get("split", "train"), None, spec.get("data_dir"))
        raise DataError(f"data config block needs one of 'path', 'hf', 'tfds'; got keys {sorted(spec)}")
    if not isinstance(spec, (str, os.PathLike)) or not str(spec):
        raise DataError(f"data spec must be a non-empty string or a dict, got {spec!r}")
    spec = str(spec)
    if spec == "sample":
        from haf_jax.samples import sample_paths

        return Source("file", str(sample_paths()["data"]))
    if spec.startswith("hf:"):
        name, middle, split = _split_spec(spec[3:])
        if not name or not split or middle == "" or (middle and ":" in middle and not middle.startswith("data_dir=")):
            raise DataError(
                f"bad hub spec {spec!r}: expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT (CONFIG may be data_dir=DIR)"
            )
        config = data_dir = None
        if middle is not None:
            if middle.startswith("data_dir="):
                data_dir = middle[len("data_dir=") :]
            else:
                config = middle
        return Source("hf", name, split, config, data_dir)
    if spec.startswith("tfds:"):
        name, middle, split = _split_spec(spec[5:])
        if (
            not name
            or not split
            or (middle is not None and not middle.startswith("data_dir="))
            or middle == "data_dir="
        ):
            raise DataError(f"bad TFDS spec {spec!r}: expected tfds:NAME:SPLIT or tfds:NAME:data_dir=DIR:SPLIT")
        return Source("tfds", name, split, None, middle[len("data_dir=") :] if middle else None)
    return Source("file", spec)


def _split_spec(rest: str) -> tuple[str, str | None, str]:
    """'NAME[:MIDDLE]:SPLIT' -> (NAME, MIDDLE or None, SPLIT). NAME ends at the first ':', SPLIT
    starts after the last ':' outside brackets (so 'train[:10%]' and 'data_dir=gs://b/x' survive)."""
    name, sep, tail = rest.partition(":")
    if not sep:
        return name, None, ""
    depth = 0
    for i in range(len(tail) - 1, -1, -1):
        c = tail[i]
        depth += (c == "]") - (c == "[")
        if c == ":" and depth == 0:
            return name, tail[:i], tail[i + 1 :]
    return name, None, tail


def read_rows(source: Source | Records) -> Iterator[tuple[str, dict]]:
    """Yield (where, row dict) for every record of `source`, in source order."""
    if isinstance(source, Records):
        yield from _read_records(source)
    elif source.kind == "hf":
        yield from _read_hub(source)
    elif source.kind == "tfds":
        yield from _read_tfds(source)
    else:
        yield from _read_file(source.name)


def _read_records(records: Records) -> Iterator[tuple[str, dict]]:
    for i, row in enumerate(records.rows):
        where = f"record {i}"
        if not isinstance(row, dict):
            raise DataError(f"expected a record (dict), got a {type_name(row)}", source=records.name, where=where)
        yield where, plain(row)


# ----------------------------------------------------------------------------- local files
def _suffix(path: str) -> str:
    low = path.lower()
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return s
    return os.path.splitext(low)[1] or "(none)"


def _read_file(path: str) -> Iterator[tuple[str, dict]]:
    if "://" in path:
        yield from _read_remote_file(path)
        return
    suffix = _suffix(path)
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type {suffix!r}; expected one of {', '.join(SUFFIXES)}", source=path)
    if not os.path.exists(path):
        raise DataError("file not found", source=path)
    if os.path.isdir(path):
        raise DataError("is a directory, expected a data file", source=path)
    if os.path.getsize(path) == 0:
        raise DataError("empty file (0 bytes, no records)", source=path)
    n = 0
    if suffix in (".jsonl", ".jsonl.gz"):
        rows = _read_jsonl(path)
    elif suffix in (".json", ".json.gz"):
        rows = _read_json(path, suffix.endswith(".gz"))
    else:
        rows = _read_with_datasets(path, suffix)
    for item in rows:
        n += 1
        yield item
    if n == 0:
        raise DataError("empty file (no records)", source=path)


def _read_remote_file(url: str) -> Iterator[tuple[str, dict]]:
    """A gs://... (any fsspec URL) data file: copied to a temporary local file, then read as one;
    errors name the URL."""
    from haf_jax.core import paths

    remote = paths.path(url)
    if _suffix(url) not in SUFFIXES:
        raise DataError(f"unsupported file type {_suffix(url)!r}; expected one of {', '.join(SUFFIXES)}", source=url)
    if not remote.exists():
        raise DataError("file not found", source=url)
    if remote.is_dir():
        raise DataError("is a directory, expected a data file", source=url)
    with tempfile.TemporaryDirectory(prefix="haf_jax_data_") as tmp:
        local = os.path.join(tmp, remote.name)
        with open(local, "wb") as f:
            f.write(remote.read_bytes())
        try:
            yield from _read_file(local)
        except DataError as e:
            raise DataError(e.message, source=url, where=e.where, field=e.field) from None


def _read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    for lineno, row in jsonl.read(path):
        yield f"line {lineno}", row


def _read_json(path: str, gz: bool) -> Iterator[tuple[str, dict]]:
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            raw = f.read()
    except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"broken gzip stream ({type(e).__name__}: {e})", source=path) from None
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8 (byte 0x{raw[e.start : e.start + 1].hex()})", source=path, where=f"line {line}"
        ) from None
    if not text.strip():
        raise DataError("empty file (no records)", source=path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file: accept them
            yield from _read_jsonl(path)
            return
        raise DataError(
            f"malformed JSON ({e.msg} at column {e.colno})", source=path, where=f"line {e.lineno}"
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got a {type_name(data)}", source=path)
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got a {type_name(row)}", source=path, where=f"row {i}")
        yield f"row {i}", row


def _read_with_datasets(path: str, suffix: str) -> Iterator[tuple[str, dict]]:
    import datasets  # heavy import: only when needed

    builder = suffix.lstrip(".")
    if builder == "csv":
        with open(path, "rb") as f:  # exact line numbers for bad bytes
            for lineno, raw in enumerate(f, 1):
                decode_line(raw, path, f"line {lineno}")
    try:
        ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train")
    except Exception as e:  # datasets wraps parser errors in many types
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise DataError(f"cannot read as {builder} ({type(cause).__name__}: {cause})", source=path) from None
    offset, unit = (2, "line") if builder == "csv" else (0, "row")
    for i, row in enumerate(ds):
        yield f"{unit} {i + offset}", row


# ----------------------------------------------------------------------------- hub and tfds
def _first_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message` (library errors can run to pages, e.g. lists of names)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def local_repo(name: str, label: str | None = None) -> str | None:
    """The absolute path when a hub NAME names a local dataset directory, else None. Raises
    `DataError` when NAME is written as a path (``/``, ``./``, ``../``, ``~``) that is not a directory."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return os.path.abspath(path)
    if name.startswith(("/", "./", "../", "~")) or os.path.exists(path):
        raise DataError(
            f"local dataset directory {path!r} not found (an hf: NAME that is a path must be "
            "a directory laid out as a hub dataset repository)",
            source=label or f"hf:{name}",
        )
    return None


def _read_hub(source: Source) -> Iterator[tuple[str, dict]]:
    import datasets

    local = local_repo(source.name, source.label)
    if local is not None and source.data_dir and not os.path.isdir(os.path.join(local, source.data_dir)):
        raise DataError(f"no folder {source.data_dir!r} in the local dataset directory {local}", source=source.label)
    try:
        ds = datasets.load_dataset(local or source.name, source.config, data_dir=source.data_dir, split=source.split)
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = (
            " (this machine is offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; download the "
            "dataset once online, or pass a local file or a local dataset directory)"
            if offline and local is None
            else ""
        )
        what = "local dataset directory" if local else "hub dataset"
        raise DataError(f"cannot load {what} ({_first_line(e)}){hint}", source=source.label) from None
    for i, row in enumerate(ds):
        where = f"row {i}"
        yield where, plain(row)


TFDS_CHUNK = 1024  # records fetched per random-access call


def _read_tfds(source: Source) -> Iterator[tuple[str, dict]]:
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "TensorFlow Datasets is not installed; pip install 'haf_jax[tfds]' "
            "(tensorflow-datasets without TensorFlow: prepared datasets are read through "
            "tfds.data_source)",
            source=source.label,
        ) from None
    data_dir = source.data_dir or os.environ.get("TFDS_DATA_DIR") or None
    where_from = (
        f"data_dir {data_dir}" + ("" if source.data_dir else " (TFDS_DATA_DIR)")
        if data_dir
        else "the default data dir ~/tensorflow_datasets (set TFDS_DATA_DIR or give data_dir=DIR)"
    )
    if source.data_dir and "://" not in data_dir and not os.path.isdir(os.path.expanduser(data_dir)):
        raise DataError(f"TFDS data_dir {data_dir!r} is not a directory", source=source.label)
    try:
        ds = tfds.data_source(
            source.name, split=source.split, data_dir=os.path.expanduser(data_dir) if data_dir else None, download=False
        )
    except Exception as e:
        text = str(e)
        if (
            type(e).__name__ == "DatasetNotFoundError"
            or "could not find data" in text.lower()
            or "not been generated" in text
        ):
            msg = f"dataset not found (not prepared) in {where_from}"
        elif "TFRECORD" in text:
            msg = (
                f"dataset in {where_from} is prepared as TFRecord, which needs TensorFlow to read; "
                "prepare it with file_format='array_record'"
            )
        elif "split" in text.lower():
            msg = f"cannot read split {source.split!r} from {where_from} ({_first_line(e)})"
        else:
            msg = f"cannot load TFDS dataset from {where_from} ({_first_line(e)})"
        raise DataError(msg, source=source.label) from None
    features = getattr(getattr(ds, "dataset_info", None), "features", None)
    seq, fdict = tfds.features.Sequence, tfds.features.FeaturesDict
    n = len(ds)
    for start in range(0, n, TFDS_CHUNK):
        idx = list(range(start, min(n, start + TFDS_CHUNK)))
        try:
            records = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
        except Exception as e:
            raise DataError(f"cannot read rows {idx[0]}..{idx[-1]} ({_first_line(e)})", source=source.label) from None
        for i, rec in zip(idx, records):
            yield f"row {i}", plain(_tfds_lists(rec, features, seq, fdict))


def _tfds_lists(value, feature, seq, fdict):
    """TFDS decodes a Sequence of feature dicts as a dict of lists: turn it into a list of dicts
    (the shape messages ``[{role, content}]`` have everywhere else). Guided by the features."""
    if not isinstance(value, dict) or feature is None:
        return value
    if isinstance(feature, seq) and isinstance(feature.feature, fdict):
        inner = feature.feature
        cols = {k: _tfds_lists(v, inner[k] if k in inner else None, seq, fdict) for k, v in value.items()}
        lengths = {len(v) for v in cols.values() if hasattr(v, "__len__")}
        if len(lengths) == 1 and len(cols) == sum(hasattr(v, "__len__") for v in cols.values()):
            m = lengths.pop()
            return [{k: v[j] for k, v in cols.items()} for j in range(m)]
        return cols
    if isinstance(feature, fdict):
        return {k: _tfds_lists(v, feature[k] if k in feature else None, seq, fdict) for k, v in value.items()}
    return value


def plain(x):
    """JSON-like Python values from TFDS/hub values: numpy -> Python, bytes -> str (UTF-8). Bytes
    that are not UTF-8 become `BadText` (kept, reported with row and field if a record form reads
    them, so binary features that nothing uses do not stop a run)."""
    if isinstance(x, str):
        return x
    if isinstance(x, (bytes, bytearray)):
        try:
            return bytes(x).decode("utf-8")
        except UnicodeDecodeError as e:
            return BadText(
                bytes(x), f"not valid UTF-8 (byte 0x{bytes(x)[e.start : e.start + 1].hex()} at byte offset {e.start})"
            )
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if hasattr(x, "tolist"):  # numpy arrays and scalars (np.bytes_ is bytes: handled above)
        return plain(x.tolist())
    return x
