"""When a collective fails: which ranks are gone?

A rank that dies (OOM kill, node failure) or hangs (a stuck driver, a dead file system) leaves
its peers in a collective. They do not wait for ever: a closed connection fails at once, a silent
peer at `run.collective_timeout_s`. The error torch raises then names a socket, not a rank, so
each survivor answers a roll call in the rendezvous store (which torchrun's agent, or rank 0 under
srun, keeps) and reports the ranks that did not answer. It first tears its own process group
down, so that peers still waiting on it fail at once instead of timing out one after another.
"""

from __future__ import annotations

import logging
import re
import time

import torch.distributed as dist

from ds_train.checkpoint.layout import CheckpointRef
from ds_train.errors import RunFailure

log = logging.getLogger(__name__)

ROLL_CALL_KEY = "ds_train/roll_call"
_COLLECTIVE_ERROR = re.compile(
    r"gloo|nccl|Connection (reset|closed|refused)|Broken pipe|Timed out waiting|ProcessGroup",
    re.IGNORECASE,
)


_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")


def is_collective_failure(e: BaseException) -> bool:
    """Did this exception come from a collective whose peer died or went silent?"""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and dist.is_initialized() and bool(_COLLECTIVE_ERROR.search(str(e)))


def first_sentence(e: BaseException) -> str:
    """The gist of a (gloo/NCCL) error: its first sentence, without the C++ source location."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = _SOURCE_LOCATION.sub("", text)
    return text.split(". ")[0][:200]


def roll_call(wait_s: float, poll_s: float = 0.2) -> tuple[list[int] | None, str]:
    """(ranks that did not answer within `wait_s`, or None if the store is unreachable; a note).

    Called by every surviving rank after a collective failed; tears the process group down.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        store = None
    dist.destroy_process_group()
    if store is None:
        return None, "no rendezvous store to ask"
    try:
        store.append(f"{ROLL_CALL_KEY}/ranks", f"{rank},".encode())
        count = store.add(f"{ROLL_CALL_KEY}/count", 1)
        deadline = time.monotonic() + wait_s
        while count < world and time.monotonic() < deadline:
            time.sleep(poll_s)
            count = store.add(f"{ROLL_CALL_KEY}/count", 0)
        answered = {int(r) for r in store.get(f"{ROLL_CALL_KEY}/ranks").decode().split(",") if r}
        return [
            r for r in range(world) if r not in answered
        ], f"{len(answered)} of {world} ranks answered within {wait_s:.0f}s"
    except Exception as e:  # the store lives in rank 0 under srun: gone with it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return (
            None,
            f"the rendezvous store is unreachable ({first[:120]}): rank 0 hosts it (unless torchrun's "
            "agent does), so rank 0 is probably the one lost",
        )


def wait_for_roll_call(timeout_s: float) -> float:
    """How long survivors wait for each other's answers: peers blocked on a survivor fail as soon
    as it tears its group down, so seconds suffice; and it must stay inside the grace period a
    launcher gives before SIGKILL (torchrun: 30 s)."""
    return float(min(10.0, max(2.0, timeout_s / 10)))


class RankLostError(RunFailure):
    """A collective failed: another rank died or went silent."""


def lost_contact(
    e: RuntimeError, timeout_s: float, activity: str, latest: CheckpointRef | None
) -> RankLostError:
    """The error a rank raises when a collective failed (`activity`: what it was doing, e.g. "in
    step 7"), after the roll call that names the ranks that did not answer."""
    wait = wait_for_roll_call(timeout_s)
    log.error("rank %d: a collective failed; roll call (%.0fs)", dist.get_rank(), wait)
    missing, note = roll_call(wait)
    if missing:
        who = f"rank(s) {', '.join(map(str, missing))} did not answer ({note}): dead or hung, see their log"
    elif missing is None:
        who = note
    else:
        who = f"{note}, so no rank is gone: the collective itself failed"
    resume = f"re-run to resume from {latest.tag}" if latest else "there is no checkpoint yet"
    return RankLostError(f"lost contact with other ranks {activity} ({first_sentence(e)}); {who}; {resume}")
