"""SFT micro-batches from shard sets written by `ds-train shard --sft` (data.train / data.valid).

The order, the rank slices and resume (exact and elastic) are pretraining's streaming loader
(data/loader.py: `MicroBatches` over a `DataPlan`); the token rows come through its `RowReader`.
What SFT adds per row is the loss mask (`<key>.mask.npy`) and the example starts (`<key>.json`),
which become the `targets` and `positions` arrays the SFT objective takes from the JSON-lines path
(finetune/packing.py), so both paths train on identical batches.

A shard's masks and starts are read whole when the shard is first used (they are a third of its
bytes, and SFT sets are small); a few shards stay cached per DataLoader worker.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import OrderedDict

import numpy as np

from ds_train.data.loader import MicroBatches
from ds_train.data.reader import RowReader
from ds_train.data.shard_format import MASK_MEMBER_SUFFIX, META_MEMBER_SUFFIX, ROWS_MEMBER_SUFFIX
from ds_train.data.shard_set import DataError

MAX_CACHED_SHARDS = 8


class ShardMasks:
    """Loss masks and per-row example starts of SFT shards (one per DataLoader worker)."""

    def __init__(self, rows: RowReader):
        self.rows = rows  # its shard cache locates (and fetches) remote shards
        self._cache: OrderedDict[tuple[int, int], tuple[np.ndarray, list[list[int]]]] = OrderedDict()

    def read(
        self, source: np.ndarray, shard: np.ndarray, row: np.ndarray, *, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(masks uint8 [n, seq_len + 1], positions int64 [n, seq_len + 1], lost bool [n]) of the
        given rows. Rows flagged in `skip` (the tokens were lost) are not read. With `skip` given
        (data.skip_corrupt), a shard whose masks cannot be read loses all its rows here: they come
        back with no targets and flagged in `lost`; without it, that is a DataError naming it."""
        width = self.rows.sources[0].seq_len + 1
        masks = np.zeros((len(row), width), dtype=np.uint8)
        positions = np.tile(np.arange(width, dtype=np.int64), (len(row), 1))
        lost = np.zeros(len(row), dtype=bool) if skip is None else skip.copy()
        for j, (s, i, r) in enumerate(zip(source.tolist(), shard.tolist(), row.tolist())):
            if lost[j]:
                continue
            try:
                mask, starts = self._shard(s, i)
            except DataError:
                if skip is None:
                    raise
                lost[j] = True
                continue
            masks[j] = mask[r]
            positions[j] = row_positions(starts[r], width)
        return masks, positions, lost

    def _shard(self, s: int, i: int):
        key = (s, i)
        if key not in self._cache:
            self._cache[key] = self._load(s, i)
            while len(self._cache) > MAX_CACHED_SHARDS:
                self._cache.popitem(last=False)
        return self._cache[key]

    def _load(self, s: int, i: int) -> tuple[np.ndarray, list[list[int]]]:
        shard_set = self.rows.sources[s]
        uri = shard_set.shard_uri(i)
        path = self.rows._local_path(shard_set, i, uri)
        blocks: dict[str, dict] = {}
        try:
            with tarfile.open(path, mode="r:") as tf:
                for info in tf:
                    for suffix in (MASK_MEMBER_SUFFIX, META_MEMBER_SUFFIX, ROWS_MEMBER_SUFFIX):
                        if info.name.endswith(suffix):
                            entry = blocks.setdefault(info.name[: -len(suffix)], {})
                            if suffix != ROWS_MEMBER_SUFFIX:  # tokens come through RowReader
                                entry[suffix] = tf.extractfile(info).read()
                            break
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"shard {uri}: cannot read its SFT masks ({e})") from None
        masks, starts = [], []
        for key in sorted(blocks):
            entry = blocks[key]
            if MASK_MEMBER_SUFFIX not in entry or META_MEMBER_SUFFIX not in entry:
                raise DataError(
                    f"shard {uri}: member {key} has no {MASK_MEMBER_SUFFIX} loss mask: not an SFT shard "
                    "(make SFT shards with `ds-train shard --sft`)"
                )
            try:  # a member cut short or rewritten: numpy's and json's errors, named
                masks.append(np.load(io.BytesIO(entry[MASK_MEMBER_SUFFIX]), allow_pickle=False))
                starts.extend(json.loads(entry[META_MEMBER_SUFFIX])["doc_starts"])
            # numpy parses a damaged header with Python's tokenizer (SyntaxError, TokenError, ...);
            # damaged metadata may hold the wrong types (TypeError): all mean an unreadable member
            except Exception as e:
                raise DataError(f"shard {uri}: member {key}: unreadable SFT mask or metadata ({e})") from None
        mask = np.concatenate(masks) if masks else np.zeros((0, shard_set.seq_len + 1), dtype=np.uint8)
        if len(mask) != int(shard_set.rows[i]) or len(starts) != len(mask):
            raise DataError(f"shard {uri}: {len(mask)} mask rows, the manifest says {int(shard_set.rows[i])}")
        return mask, starts


def row_positions(starts: list[int], width: int) -> np.ndarray:
    """Position ids of a packed row: 0, 1, 2, ... restarting at each example start (a trailing pad
    tail just continues the last example: it comes after every real token, so causal attention
    never lets a real token see it, and it is never a target)."""
    cols = np.arange(width, dtype=np.int64)
    begin = np.zeros(width, dtype=np.int64)
    begin[np.asarray(starts, dtype=np.int64)] = np.asarray(starts, dtype=np.int64)
    return cols - np.maximum.accumulate(begin)


class SftShardBatches(MicroBatches):
    """`MicroBatches` whose rows carry SFT targets and positions; item k as in the parent."""

    _masks: ShardMasks | None = None

    def batch_at(self, positions: np.ndarray, step: int) -> dict:
        if self._reader is None:  # opened in the worker process, after fork
            self._reader = RowReader(self.plan.sources, self.cache_dir, skip_corrupt=self.skip_corrupt)
            self._masks = ShardMasks(self._reader)
        source, shard, row = self.plan.locate(positions)
        tokens, lost = self._reader.read(source, shard, row)
        # data.skip_corrupt: rows whose tokens or masks are unreadable become filler with no targets
        skip = lost if self.skip_corrupt else None
        targets, pos, lost = self._masks.read(source, shard, row, skip=skip)
        tokens[lost] = self.plan.filler_token
        batch = self.objective.collate({"tokens": tokens, "targets": targets, "positions": pos}, positions)
        batch["skipped"] = _tensor(int(np.count_nonzero(lost)))
        batch["step"] = _tensor(step)
        batch["source"], batch["shard"], batch["row"] = (_tensor(a) for a in (source, shard, row))
        return batch


def _tensor(value):
    import torch

    return torch.as_tensor(np.asarray(value, dtype=np.int64))
