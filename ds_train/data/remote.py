"""Reading shards that are not on a local file system: http(s), s3/gs (via fsspec), pipe: commands.

Remote shards are copied whole into a local cache (checksum-verified, then renamed into place)
and read from there like local ones, so the row reader can seek. Every read is retried with
exponential backoff; each retry is logged with the URI and the error.
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
from pathlib import Path

log = logging.getLogger(__name__)

RETRIES = 4
BACKOFF_S = 0.5


def read_bytes(uri: str, retries: int = RETRIES, backoff_s: float = BACKOFF_S) -> bytes:
    """The whole object at `uri`, retrying transient failures; FileNotFoundError is not retried."""
    if not _is_remote(uri):
        return Path(uri).read_bytes()
    delay = backoff_s
    for attempt in range(retries + 1):
        try:
            return _read_remote(uri)
        except FileNotFoundError:
            raise
        except Exception as e:  # network errors come in many types
            if attempt == retries:
                raise OSError(f"reading {uri} failed after {retries + 1} attempts: {e}") from e
            log.warning("reading %s failed (%s); retry %d/%d in %.1fs", uri, e, attempt + 1, retries, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def fetch_to_cache(uri: str, cache_dir: str | os.PathLike, name: str, sha256: str | None) -> Path:
    """Local path of a verified copy of `uri` in `cache_dir` (downloaded once per machine).

    Concurrent workers and ranks on one node share the copy: a file lock serialises the download.
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
        data = read_bytes(uri)
        if sha256:
            got = hashlib.sha256(data).hexdigest()
            if got != sha256:
                raise OSError(
                    f"{uri}: checksum mismatch (manifest {sha256[:12]}…, got {got[:12]}…): "
                    "the shard changed or the transfer was corrupted"
                )
        tmp = cache / f".{name}.tmp.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        ok_marker.touch()
    return dest


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "s3://", "gs://", "pipe:"))


def _read_remote(uri: str) -> bytes:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri, timeout=60) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(uri) from None
            raise
    if uri.startswith("pipe:"):
        proc = subprocess.run(uri[len("pipe:") :], shell=True, capture_output=True, timeout=3600)
        if proc.returncode != 0:
            raise OSError(
                f"command exited {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[:200]}"
            )
        return proc.stdout
    try:
        import fsspec
    except ImportError:
        raise OSError(
            f"{uri}: install fsspec and s3fs/gcsfs (`pip install ds-train[s3]`) to read this URL"
        ) from None
    with fsspec.open(uri, "rb") as fh:
        return fh.read()
