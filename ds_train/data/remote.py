"""Reading objects that are not on a local file system: http(s), pipe: commands, any fsspec URL.

- http(s) goes through urllib (stdlib), so no extra package is needed for the common case;
- `pipe:COMMAND` runs COMMAND through the shell and reads its stdout (webdataset's convention);
- anything else with a scheme (`s3://`, `gs://`, `memory://`, ...) goes through fsspec, which
  needs the matching backend (s3fs, gcsfs) installed.

Remote shards are streamed into a local cache file (hashed on the way, checked against the
manifest, then renamed into place) and read from there like local ones, so the row reader can
seek. A failed transfer is retried with exponential backoff and each retry is logged with the URI
and the error; a missing object (HTTP 404, FileNotFoundError) is not retried.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

log = logging.getLogger(__name__)

RETRIES = 4
BACKOFF_S = 0.5
TIMEOUT_S = 60
CHUNK = 1 << 20
_NOT_TRANSIENT_HTTP = {400, 401, 403, 404, 405, 410}

T = TypeVar("T")


class BackendMissing(OSError):
    """The URL needs a package that is not installed: retrying cannot help."""


def is_remote(uri: str) -> bool:
    return uri.startswith("pipe:") or ("://" in uri and not uri.startswith("file://"))


def with_retries(
    what: str, fn: Callable[[], T], retries: int | None = None, backoff_s: float | None = None
) -> T:
    """fn(), retried with exponential backoff on anything but a missing object or bad data."""
    retries = RETRIES if retries is None else retries
    delay = BACKOFF_S if backoff_s is None else backoff_s
    for attempt in range(retries + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, BackendMissing, ValueError):
            raise  # missing, forbidden, or bad data (CorpusError, DataError): reading again gives the same
        except Exception as e:  # network errors come in many types
            if attempt == retries:
                raise OSError(f"{what} failed after {retries + 1} attempts: {e}") from e
            log.warning("%s failed (%s); retry %d/%d in %.1fs", what, e, attempt + 1, retries, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def read_bytes(uri: str) -> bytes:
    """The whole (small) object at `uri`, e.g. a manifest; retried like every remote read."""
    if not is_remote(uri):
        return Path(uri.removeprefix("file://")).read_bytes()

    def attempt() -> bytes:
        with open_stream(uri) as fh:
            return fh.read()

    return with_retries(f"reading {uri}", attempt)


def open_stream(uri: str) -> BinaryIO:
    """A readable binary stream of the object at `uri` (not retried: the caller retries the whole
    transfer, since a stream that broke half-way cannot be resumed in general)."""
    if uri.startswith(("http://", "https://")):
        try:
            return urllib.request.urlopen(uri, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(f"{uri}: not found (HTTP 404)") from None
            if e.code in _NOT_TRANSIENT_HTTP:
                raise PermissionError(f"{uri}: HTTP {e.code} {e.reason}") from None
            raise
    if uri.startswith("pipe:"):
        return _PipeStream(uri[len("pipe:") :])
    try:
        import fsspec
    except ImportError:
        raise BackendMissing(
            f"{uri}: install fsspec and its backend (s3fs for s3://, gcsfs for gs://) to read this URL"
        ) from None
    try:
        return fsspec.open(uri, "rb").open()
    except ImportError as e:
        raise BackendMissing(f"{uri}: {e} (install the fsspec backend for this URL scheme)") from None


class _PipeStream:
    """stdout of a shell command as a stream; a non-zero exit is an error when the stream closes."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def readline(self) -> bytes:
        return self.proc.stdout.readline()

    def close(self) -> None:
        if not self.proc.stdout.closed:
            self.proc.stdout.read()  # drain, so the command is not killed by SIGPIPE mid-write
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        code = self.proc.wait()
        if code != 0:
            raise OSError(f"`{self.command}` exited {code}: {err[-300:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fetch_to_cache(uri: str, cache_dir: str | os.PathLike, name: str, sha256: str | None) -> Path:
    """Local path of a verified copy of `uri` in `cache_dir` (downloaded once per machine).

    Concurrent workers and ranks on one node share the copy: a file lock serialises the download.
    The transfer streams to disk (bounded memory whatever the shard size) and is retried whole.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / name
    ok_marker = cache / f".{name}.ok"
    if dest.exists() and ok_marker.exists():
        return dest
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists() and ok_marker.exists():
            return dest
        tmp = cache / f".{name}.tmp.{os.getpid()}"

        def attempt() -> None:
            h = hashlib.sha256()
            with open_stream(uri) as src, open(tmp, "wb") as out:
                while block := src.read(CHUNK):
                    h.update(block)
                    out.write(block)
            if sha256 and h.hexdigest() != sha256:
                raise OSError(
                    f"checksum mismatch (manifest {sha256[:12]}…, got {h.hexdigest()[:12]}…): "
                    "the shard changed or the transfer was corrupted"
                )

        try:
            with_retries(f"fetching {uri}", attempt)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        ok_marker.touch()
    return dest
