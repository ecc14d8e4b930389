"""Decompress a corpus input stream (.gz, .bz2, .xz, .zst), refusing a truncated one by name.

A file cut short (an interrupted copy or download) must never be sharded as if it were whole:
gzip, bz2 and lzma raise a bare EOFError at the cut, and zstandard's stream_reader just reports
end of file, so the documents after the cut would vanish without a word. `.zst` is therefore read
frame by frame here (a file may hold several frames, e.g. from `cat a.zst b.zst`) and a frame
still open when the input ends is an error; every codec's error becomes a CorpusError naming the
input.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from ds_train.data.corpus_pieces import CorpusError

READ_BUFFER = 1 << 20


def truncated(path: str) -> CorpusError:
    return CorpusError(f"{path}: compressed stream ends before its end marker (truncated)")


def decompressed(raw: BinaryIO, compression: str | None, path: str) -> BinaryIO:
    """`raw` decompressed according to `compression` (its suffix, or None for as-is)."""
    if compression == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if compression == ".bz2":
        return bz2.BZ2File(raw)
    if compression == ".xz":
        return lzma.LZMAFile(raw)
    if compression == ".zst":
        return io.BufferedReader(_ZstdFrames(raw, path), READ_BUFFER)
    return raw


@contextmanager
def codec_errors(path: str, compression: str | None) -> Iterator[None]:
    """Turn a codec's error inside the block into a one-line CorpusError naming `path`."""
    if compression is None:
        yield
        return
    errors: tuple[type[BaseException], ...] = (zlib.error, gzip.BadGzipFile, lzma.LZMAError)
    if compression == ".zst":
        import zstandard

        errors += (zstandard.ZstdError,)
    try:
        yield
    except EOFError:
        raise truncated(path) from None
    except errors as e:
        raise CorpusError(f"{path}: not a valid {compression} stream ({e})") from None
    except OSError as e:
        if compression == ".bz2" and "Invalid data stream" in str(e):  # bz2's only word for corrupt data
            raise CorpusError(f"{path}: not a valid {compression} stream ({e})") from None
        raise


class _ZstdFrames(io.RawIOBase):
    """The concatenated content of every zstd frame of `raw`; a frame cut short is an error."""

    def __init__(self, raw: BinaryIO, path: str):
        import zstandard

        self._raw = raw
        self._path = path
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None  # decompressobj of the frame being read (None between frames)
        self._pending = b""  # input read past the end of the last frame
        self._out = memoryview(b"")
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out and not self._done:
            self._fill()
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _fill(self) -> None:
        data, self._pending = (self._pending or self._raw.read(READ_BUFFER)), b""
        if not data:
            if self._frame is not None:
                raise truncated(self._path)
            self._done = True
            return
        if self._frame is None:
            self._frame = self._dctx.decompressobj()
        self._out = memoryview(self._frame.decompress(data))
        if self._frame.eof:
            self._pending = self._frame.unused_data
            self._frame = None

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
