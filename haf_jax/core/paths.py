"""Local and remote locations alike: every user-given path goes through `path()`.

`pathlib.Path("gs://b/run")` silently becomes the local directory `gs:/b/run`; `etils.epath.Path`
(the path type orbax itself uses) keeps the URL and reads/writes it through fsspec (gcsfs for
gs://, s3fs for s3://), while orbax writes checkpoint arrays through tensorstore's own drivers.
Local paths come back absolute (orbax needs that) with `~` expanded.

Emulators: `STORAGE_EMULATOR_HOST` (e.g. http://127.0.0.1:9023) is the standard variable that
Google's client libraries and gcsfs honour. tensorstore reads its own `TENSORSTORE_GCS_HTTP_URL`
and asks for credentials; when the emulator variable is set and those are not, `path()` sets them
from it (an emulator takes no credentials), so one variable points the whole stack at a fake GCS.

Directory listings are never cached (see below). Helpers for what epath does not do in one call:
an atomic file write (a kill never leaves half a file: a local temp file renamed over the target;
a remote object appears whole when written), and copying a local directory tree up (tokenizer,
exports) or a remote one down (libraries such as transformers' tokenizers read local directories
only).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import fsspec
from etils import epath

# fsspec filesystems cache directory listings for the life of the process; a reader (score,
# export, an eval loop) would then never see the checkpoints another process commits later
# (orbax lists the directory to find steps). Object-store listings are cheap next to checkpoints.
for _protocol in ("gs", "s3"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_remote(p) -> bool:
    """True for URLs such as gs://bucket/dir (anything with a scheme), False for local paths."""
    return "://" in os.fspath(p)


def path(p) -> epath.Path:
    """`p` as an epath.Path: URLs kept as they are, local paths made absolute (~ expanded)."""
    s = os.fspath(p)
    if is_remote(s):
        _point_tensorstore_at_emulator()
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


def _point_tensorstore_at_emulator() -> None:
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    url = host if "://" in host else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore's no-credentials switch
    # gcsfs (read when it is first imported) otherwise asks the storage-control gRPC API, which
    # emulators lack, for every bucket's layout, and logs a warning each time that fails.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def write_bytes(target, data: bytes) -> None:
    """Writes `target` so that readers see the old file or the whole new one, never a part."""
    target = path(target)
    if is_remote(target):  # an object upload is atomic
        target.write_bytes(data)
        return
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, target)


def write_text(target, text: str) -> None:
    write_bytes(target, text.encode())


def upload_dir(local_dir, target) -> None:
    """Copies the files under the local directory `local_dir` to `target` (created; local or remote)."""
    target = path(target)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        dst = target if rel == "." else target / rel
        dst.mkdir(parents=True, exist_ok=True)
        for name in files:
            (dst / name).write_bytes(open(os.path.join(root, name), "rb").read())


@contextlib.contextmanager
def local_dir(source) -> Iterator[str]:
    """A local directory with the contents of `source`: itself when local, else a temporary copy."""
    if not is_remote(source):
        yield os.fspath(path(source))
        return
    src = path(source)
    if not src.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    with tempfile.TemporaryDirectory(prefix="haf_jax_") as tmp:
        prefix = os.fspath(src).split("://", 1)[1]
        for root, _, files in src.walk():  # fsspec gives the roots without their scheme
            rel = os.fspath(root).split("://", 1)[-1][len(prefix) :].strip("/")
            os.makedirs(os.path.join(tmp, rel), exist_ok=True)
            for name in files:
                with open(os.path.join(tmp, rel, name), "wb") as out:
                    out.write(((src / rel if rel else src) / name).read_bytes())
        yield tmp


@contextlib.contextmanager
def writable_dir(target) -> Iterator[str]:
    """A local directory to write into that ends up at `target`: itself when local, else a
    temporary one uploaded when the block ends without an error."""
    if not is_remote(target):
        path(target).mkdir(parents=True, exist_ok=True)
        yield os.fspath(path(target))
        return
    with tempfile.TemporaryDirectory(prefix="haf_jax_") as tmp:
        yield tmp
        upload_dir(tmp, target)
