"""sha256 of the files ds_train writes (shards, checkpoints): computed while they are written, or
by reading a file back when it is verified.

Hashing as the bytes go out saves a second pass over every file: for a checkpoint that pass
re-reads the whole thing (from the page cache if it still fits, otherwise from the disk or a
parallel file system: a second transfer of the checkpoint) while training waits. A large write
is hashed in a helper thread at the same time as it is written (hashlib and file writes both
release the GIL), so the hash costs no time on top of a write that is slower than sha256
(~1.7 GB/s per core with SHA extensions).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

OVERLAP_MIN_BYTES = 1 << 20  # below this a thread hand-off costs more than it hides
STOP_CHECK_BYTES = 64 << 20  # a stoppable writer checks its stop flag between pieces this size


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashingWriter:
    """A write-only file object that passes bytes on to `fh` and hashes them.

    Give it to a writer that takes a file object (`torch.save`, `webdataset.TarWriter`); it has no
    `seek`, so a writer that needs one fails loudly instead of producing a wrong hash. Use it as a
    context manager when `overlap` is on (the helper thread ends with it). Once `stop` is set, the
    next write raises OSError(ECANCELED): a background checkpoint write abandoned by a failing run."""

    def __init__(self, fh: BinaryIO, *, overlap: bool = False, stop: threading.Event | None = None):
        self.fh, self.sha, self.size, self.stop = fh, hashlib.sha256(), 0, stop
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256") if overlap else None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        # a stoppable writer writes in pieces, so that a stop ends a write within one piece, not
        # one whole storage (GBs); any other writes the buffer in one piece
        piece = STOP_CHECK_BYTES if self.stop is not None else max(view.nbytes, 1)
        for start in range(0, max(view.nbytes, 1), piece):
            if self.stop is not None and self.stop.is_set():
                raise OSError(errno.ECANCELED, "write abandoned")
            self._write(view[start : start + piece])
        return view.nbytes

    def _write(self, view: memoryview) -> None:
        if self._pool is not None and view.nbytes >= OVERLAP_MIN_BYTES:
            # The buffer may be reused once write() returns, so the hash must finish before that.
            hashed = self._pool.submit(self.sha.update, view)
            self.fh.write(view)
            hashed.result()
        else:
            self.sha.update(view)
            self.fh.write(view)
        self.size += view.nbytes

    def flush(self) -> None:
        self.fh.flush()

    def hexdigest(self) -> str:
        return self.sha.hexdigest()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
