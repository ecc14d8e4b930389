"""Run the sharder's independent tasks (pieces, shards) in K worker processes, with live progress.

Hand-written rather than multiprocessing.Pool because the workers need a large read-only object
(the tokenizer) that fork hands over for free, without a module-level global to hold it in the
worker (Pool's initializer idiom), and because progress must flow back while a task runs, not only
when it ends. Results come back in task order; the first failure stops the pool and re-raises in
the parent with the worker's exception.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

ProgressFn = Callable[[int, int], None]
TaskFn = Callable[..., Any]  # fn(item, *args, progress=ProgressFn) -> picklable result


def run_tasks(
    fn: TaskFn,
    items: Sequence[Any],
    *,
    workers: int,
    args: tuple = (),
    progress: ProgressFn | None = None,
) -> list[Any]:
    """[fn(item, *args, progress=...) for item in items], spread over `workers` processes."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item, *args, progress=progress) for item in items]
    # each worker is one core: the Rust tokenizer must not start its own thread pool per worker
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = mp.get_context("fork")
    tasks: mp.Queue = ctx.Queue()
    results: mp.Queue = ctx.Queue()
    n = min(workers, len(items))
    for i in range(len(items)):
        tasks.put(i)
    for _ in range(n):
        tasks.put(None)
    # the task each worker started last, in shared memory: written before the task runs, so it is
    # there even when the worker is killed outright (a queued message may not have left it yet)
    working_on = ctx.Array("q", [-1] * n, lock=False)
    procs = [
        ctx.Process(target=_worker, args=(fn, items, args, tasks, results, working_on, w), daemon=True)
        for w in range(n)
    ]
    for p in procs:
        p.start()
    out: list[Any] = [None] * len(items)
    pending = len(items)
    try:
        while pending:
            try:
                kind, a, b = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    w = procs.index(dead[0])
                    raise _died(dead[0], items, working_on[w] if working_on[w] >= 0 else None) from None
                continue
            if kind == "progress":
                if progress is not None:
                    progress(a, b)
            elif kind == "done":
                out[a] = b
                pending -= 1
            else:  # error
                raise b
    finally:
        for p in procs:
            if p.is_alive() and pending:
                p.terminate()
            p.join()
    return out


def _worker(
    fn: TaskFn, items: Sequence[Any], args: tuple, tasks: mp.Queue, results: mp.Queue, working_on, w: int
) -> None:
    def report(a: int, b: int) -> None:
        results.put(("progress", a, b))

    def stop(*_) -> None:
        # the parent stops the other workers when one fails: exit through Python so that a task's
        # clean-up (its temporary files) runs instead of dying mid-write, without waiting to flush
        # progress messages the parent no longer reads (that wait would never end)
        results.cancel_join_thread()
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)

    while (i := tasks.get()) is not None:
        working_on[w] = i
        try:
            results.put(("done", i, fn(items[i], *args, progress=report)))
        except SystemExit:
            return
        except BaseException as e:
            results.put(("error", i, _picklable(e)))
            return


def _died(proc, items: Sequence[Any], task: int | None) -> Exception:
    """One line for a worker that died outright: which task it had, and the likely cause of a
    SIGKILL (the kernel's OOM killer, which leaves no traceback)."""
    from ds_train.data.corpus_pieces import CorpusError

    code = proc.exitcode
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    if code == -signal.SIGKILL:
        how += ", e.g. by the kernel's out-of-memory killer: fewer --workers leave each more memory"
    item = items[task] if task is not None else None
    what = f" while on {item.describe() if hasattr(item, 'describe') else item}" if item is not None else ""
    return CorpusError(f"a sharding worker died{what} ({how})")


def _picklable(e: BaseException) -> BaseException:
    """The exception itself when it survives pickling (our CorpusError/DataError), else its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError("".join(traceback.format_exception(e)).strip())
