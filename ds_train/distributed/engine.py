"""The one door to DeepSpeed: process group, engine construction, ZeRO-3 helpers, collectives.

Nothing else in ds_train imports deepspeed for training, apart from the loading of its compiled ops
(op_builds.py, called from `build_engine`) and checkpoint I/O (checkpoint/deepspeed_io.py);
conversion reads checkpoint files directly. Keeping it here means the model code stays free of
distributed code and a DeepSpeed upgrade touches few files.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ds_train.distributed.launch_env import LaunchEnv

log = logging.getLogger(__name__)


@dataclass
class DistributedContext:
    """What every component needs to know about the process group it runs in."""

    launch: LaunchEnv
    device: torch.device
    backend: str

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0


def init_distributed(launch: LaunchEnv, timeout_s: int) -> DistributedContext:
    """Start the process group (gloo on CPU, NCCL on GPU) through DeepSpeed."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from ds_train.distributed.op_builds import comm_ops, load_ops

    launch.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
        device, backend = torch.device("cuda", launch.local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    os.environ.setdefault("DEEPSPEED_TIMEOUT", str(max(1, timeout_s // 60)))
    if not dist.is_initialized():
        load_ops(comm_ops(get_accelerator().device_name()))  # as build_engine does, for the same reason
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            verbose=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistributedContext(launch=launch, device=device, backend=backend)


def shutdown(*, wait_for_peers: bool = False) -> None:
    """Destroy the process group. After a clean run, ranks first meet at a barrier: a rank tearing
    gloo down while a peer is still in its last collective can abort the peer at exit
    ("terminate called without an active exception"). After an error, nobody waits."""
    if dist.is_initialized():
        if wait_for_peers:
            barrier()
        dist.destroy_process_group()


def shutdown_after_error(error: BaseException) -> None:
    """Tear down after `error`. A failure every rank raised together (RunFailure.every_rank) is
    printed first and the ranks meet before leaving, so each rank's explanation reaches the log
    before the launcher kills whoever is still running; any other error leaves at once."""
    from ds_train.errors import RunFailure, report_failure

    if isinstance(error, RunFailure) and error.every_rank:
        report_failure(error)
        try:
            shutdown(wait_for_peers=True)
            return
        except RuntimeError:  # a peer left after all: nothing more to wait for
            pass
    shutdown()


# --- collectives (no-ops on one process) --------------------------------------------------------


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_floats(values: Sequence[float], device: torch.device) -> list[list[float]]:
    """The same number of floats from every rank, as one row per rank in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [list(values)]
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return torch.stack(out).tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from `src` to all ranks (one listing/manifest read per job)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- ZeRO-3 model construction ------------------------------------------------------------------


class HfZeroContext:
    """Holds transformers' HfDeepSpeedConfig for as long as the model lives.

    transformers only builds a model partitioned (and correctly initialised / loaded) under
    ZeRO-3 while an HfDeepSpeedConfig object is alive; it keeps a weak reference, so we must
    hold the object. `close()` unsets it so a later model in the same process is unaffected.
    """

    def __init__(self, ds_config: dict):
        from transformers.integrations import HfDeepSpeedConfig

        self.enabled = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
        self._obj = HfDeepSpeedConfig(ds_config) if self.enabled else None

    def close(self) -> None:
        if self._obj is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._obj = None


@contextlib.contextmanager
def gathered(params: Sequence[torch.nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full tensors of ZeRO-3 partitioned parameters inside the block (no-op otherwise).

    With modifier_rank set, that rank's in-place changes are broadcast and re-partitioned on exit.
    """
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


# --- engine -------------------------------------------------------------------------------------


def build_engine(
    model: torch.nn.Module, param_groups: list[dict], ds_config: dict, lr_lambda: Callable[[int], float]
) -> Any:
    """deepspeed.initialize with our optimizer groups and LR schedule; returns the engine."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    from ds_train.distributed.op_builds import load_ops, ops_for

    load_ops(ops_for(ds_config))  # its compiled ops, first, so that a killed earlier build cannot hang it
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups,
        config=ds_config,
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lr_lambda),
    )
    _keep_stage0_grad_norm(engine)
    return engine


def _keep_stage0_grad_norm(engine: Any) -> None:
    """Without ZeRO (stage 0, fp32), DeepSpeed clips the gradients with its clip_grad_norm_ and drops
    the norm it returns, so get_global_grad_norm() stays None and metrics.jsonl had no grad_norm at
    stage 0 (the ZeRO optimizers keep theirs). The same call, keeping the norm; and with no clipping
    (train.grad_clip=0), where DeepSpeed computes no norm at all, the norm alone, so a grad_clip
    sweep's unclipped arm logs it too (sweep audit)."""
    if engine.zero_optimization() or not hasattr(engine, "clip_fp32_gradients"):
        return
    from deepspeed.runtime.utils import clip_grad_norm_, get_global_norm_of_tensors

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_fp32_gradients
    if engine.fp16_enabled() or engine.bfloat16_enabled():
        return  # their optimizers keep a norm of their own
    take_model_step = engine._take_model_step

    def take_model_step_keeping_the_norm(*args, **kwargs):
        if engine.gradient_clipping() <= 0.0:
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            engine._global_grad_norm = get_global_norm_of_tensors(grads, mpu=engine.mpu) if grads else None
        return take_model_step(*args, **kwargs)

    engine._take_model_step = take_model_step_keeping_the_norm


def gate_optimizer_step(engine: Any, allow: Callable[[Any], bool]) -> None:
    """Run each optimizer update only if `allow(global gradient norm)` says so (train.skip_spike_sigma).

    DeepSpeed updates the weights inside engine.step(), through the torch optimizer it was built
    with (engine.basic_optimizer): ZeRO-1/2/3 step it on their fp32 partitions (ZeRO-3 once per
    sub-group), the bf16 wrapper on its master copy, stage 0 fp32 directly. Each of them has
    computed (and clipped with) the global gradient norm by then and copies the master weights back
    to the model after it, so a step skipped here leaves weights and Adam's moments as they were
    and the rest of DeepSpeed's step (zeroing gradients, the schedule) runs as usual."""
    inner = engine.basic_optimizer
    step = inner.step

    def gated_step(*args, **kwargs):
        if allow(_global_grad_norm_now(engine)):
            return step(*args, **kwargs)
        return None

    inner.step = gated_step


def _global_grad_norm_now(engine: Any) -> Any:
    """The norm DeepSpeed computed for the update in progress: its ZeRO/bf16/fp16 optimizer's, or,
    at stage 0 in fp32, the engine's (kept by _keep_stage0_grad_norm)."""
    if engine.optimizer is not engine.basic_optimizer:
        return getattr(engine.optimizer, "_global_grad_norm", None)
    return engine._global_grad_norm


def quiet_deepspeed() -> None:
    """Before deepspeed is imported: pick its CPU accelerator without the 'unable to detect' warning
    on GPU-less machines, and hide torch.distributed's deprecation notices that DeepSpeed triggers."""
    import warnings

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*TORCH_CUDA_ARCH_LIST.*")


def configure_logging(is_main: bool) -> None:
    """Quiet DeepSpeed's INFO chatter; keep warnings and our own messages on rank 0."""
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(
        level=level, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("ds_train").setLevel(level)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
