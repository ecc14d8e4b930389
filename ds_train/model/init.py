"""Initialisation that gives the same weights under every ZeRO stage and world size.

transformers initialises a model in construction order; under ZeRO-3 (`zero.Init`) that order and
the device differ, so the same seed gives other weights than under stages 0-2 (measured: first
loss 5.5446 vs 5.5598 for a tiny Llama). Here every module is re-initialised with its own seed,
derived from (run seed, module name), and its values are drawn on the CPU in fp32 whatever the
device, dtype or partitioning. The weights then depend on the seed and the architecture only,
which is what ZeRO-stage parity and elastic resume need.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ds_train.distributed.engine import gathered, is_partitioned

log = logging.getLogger(__name__)


def module_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# The projections that write into the residual stream in Llama-style blocks (Llama, Mistral, Qwen,
# Gemma, OLMo): each block's attention output and MLP down projection.
RESIDUAL_OUTPUT = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)$")

ResidualScale = Callable[[str], float]  # module name → factor on its drawn weight


def residual_scale(mode: str, module_names: Iterable[str]) -> ResidualScale | None:
    """model.residual_init as a factor per module name (None: the architecture's own init).
    scaled: 1/√(2L) for L blocks (Megatron's scaled init); depth: 1/√(2(l + 1)) for block l
    (torchtitan's)."""
    if mode == "default":
        return None
    found: dict[int, set[str]] = {}
    for n in module_names:
        if m := RESIDUAL_OUTPUT.search(n):
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    # every block both ways: a mixture of experts (experts' down projections are one 3-D parameter)
    # or another MLP naming would be half scaled, silently
    if not found or any(len(kinds) != 2 for kinds in found.values()):
        raise ValueError(
            f"model.residual_init={mode} knows Llama-style blocks, each with a layers.N.self_attn.o_proj "
            "and a layers.N.mlp.down_proj linear layer; this model's blocks are not all so: use default"
        )
    layers = max(found) + 1

    def scale(name: str) -> float:
        m = RESIDUAL_OUTPUT.search(name)
        if m is None:
            return 1.0
        return 1 / math.sqrt(2 * (layers if mode == "scaled" else int(m.group(1)) + 1))

    return scale


@torch.no_grad()
def initialize_weights(
    model: torch.nn.Module, seed: int, rank: int, residual: ResidualScale | None = None
) -> None:
    """Re-initialise every parameter of an HF model with `model._init_weights`, per module.

    The model may have been built without any initialisation (`model_without_init`): each module's
    values are drawn into a NaN-filled copy, so a parameter `_init_weights` leaves alone shows up
    as NaN whatever it held before. Such a parameter gets its module's `reset_parameters()` under
    the same per-module seed (torch's default init, still stage-independent), or, with none to
    call, stops the run, since it would otherwise train from uninitialised memory.

    Under ZeRO-3 the modules are drawn in rounds of one per rank: every rank draws its module of the
    round at the same time, then each module is gathered and its drawer's values broadcast. Rank 0
    drawing all of them while the others wait would make a fresh start's draw N times longer
    (a seeded CPU draw runs at ~100 M values/s per core: minutes for a 70B model), and drawing a
    round at a time keeps one module's values per rank in host memory.

    `residual` (model.residual_init) scales the weight each module draws by its factor: a normal
    draw times a factor is the same draw at that factor × std."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    writers = _ancestor_writers(model)
    # modules with buffers only (rotary) compute them: nothing is drawn
    local, partitioned = [], []
    for name, module in model.named_modules():
        if params := list(module.parameters(recurse=False)):
            entry = (name, module, params, writers.get(name, []))
            (partitioned if any(map(is_partitioned, params)) else local).append(entry)
    for name, module, params, ancestors in local:
        for p, value in zip(params, _draw(model, name, module, params, ancestors, seed, residual)):
            if value is not p.data:
                p.data.copy_(value)
            p._is_hf_initialized = True
    for start in range(0, len(partitioned), world):
        rounds = partitioned[start : start + world]
        mine = rounds[rank] if rank < len(rounds) else None
        values = _draw(model, *mine, seed, residual) if mine is not None else None
        for drawer, (_, _, params, _) in enumerate(rounds):
            with gathered(params, modifier_rank=drawer):  # drawer's values broadcast on exit
                if drawer == rank:
                    for p, value in zip(params, values):
                        p.data.copy_(value)
            for p in params:
                p._is_hf_initialized = True


def _draw(
    model: torch.nn.Module,
    name: str,
    module: torch.nn.Module,
    params: list,
    ancestors: list,
    seed: int,
    residual: ResidualScale | None = None,
) -> list:
    """`module`'s full-size values, drawn on the CPU in fp32 under its own seed, then redrawn where
    `ancestors` (name, module) re-initialise them, in transformers' order (children first), each
    under a seed of its own. Parameters that are full fp32 CPU tensors (a model built for stages
    0-2) are drawn into in place, with no second copy of the module in memory. Others (ZeRO-3
    partitions, GPU or bf16 tensors) are left as they were and the values returned."""
    originals = [p.data for p in params]
    for p in params:
        if p.device.type == "cpu" and p.dtype == torch.float32 and not is_partitioned(p):
            p.data.fill_(float("nan"))
        else:
            p.data = torch.full(tuple(getattr(p, "ds_shape", p.shape)), float("nan"), dtype=torch.float32)
        p._is_hf_initialized = False  # transformers skips tensors flagged as done
    try:
        own = {id(p) for p in params}
        with torch.random.fork_rng(devices=[]), _ParameterWrites(model, allowed=own):
            torch.manual_seed(module_seed(seed, name))
            model._init_weights(module)
            for outer, ancestor in ancestors:
                torch.manual_seed(module_seed(seed, f"{outer}>{name}"))
                model._init_weights(ancestor)
        # a NaN anywhere makes the sum NaN: one read, no boolean copy of the tensor
        untouched = [p for p in params if p.numel() and bool(p.data.sum().isnan())]
        if untouched:
            _reset_untouched(module, name, untouched, seed)
        factor = residual(name) if residual is not None else 1.0
        if factor != 1.0:
            module.weight.data.mul_(factor)
        return [p.data for p in params]
    finally:
        for p, orig in zip(params, originals):
            p.data = orig


class _ParameterWrites(TorchDispatchMode):
    """While active, in-place writes into the model's parameters other than `allowed` are skipped
    (and recorded in `seen`: id → parameter). `_init_weights(module)` may write into parameters of
    modules below it: GPT-2's attention and MLP blocks, which own no parameter themselves, redraw
    their output projection at 0.02/√(2·layers) (the scaled residual init). Drawn module by module,
    those writes must land in the module being drawn, and nowhere else: elsewhere they would hit
    real values under ZeRO 0-2 and empty partitions under ZeRO-3 (stage-dependent weights)."""

    def __init__(self, model: torch.nn.Module, allowed: set[int]):
        super().__init__()
        # by identity, and by storage for writes through a view (`weight[padding_idx]`)
        self.params = {id(p): id(p) for p in model.parameters()}
        self.params.update({p.untyped_storage().data_ptr(): id(p) for p in model.parameters() if p.numel()})
        self.allowed, self.seen = allowed, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for spec, arg in zip(func._schema.arguments, args):
            if spec.alias_info is None or not spec.alias_info.is_write or not isinstance(arg, torch.Tensor):
                continue
            param = self.params.get(id(arg)) or (
                arg.numel() and self.params.get(arg.untyped_storage().data_ptr())
            )
            if param and param not in self.allowed:
                self.seen.add(param)
                return arg  # an in-place op returns what it wrote into
        return func(*args, **(kwargs or {}))


def _ancestor_writers(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """module name → the modules above it, owning no parameter themselves, whose `_init_weights`
    writes into its parameters, nearest first (transformers initialises children before their
    parents). Found by a dry run of their `_init_weights` with every parameter write skipped.
    A module that owns parameters initialises only those (its writes elsewhere are dropped)."""
    owner = {id(p): name for name, m in model.named_modules() for p in m.parameters(recurse=False)}
    writers: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    # named_modules lists parents first: reversed, each module's nearest ancestor comes first
    for outer, module in reversed(list(model.named_modules())):
        if next(module.parameters(recurse=False), None) is not None or not owner:
            continue
        probe = _ParameterWrites(model, allowed=set())
        with torch.random.fork_rng(devices=[]), probe:
            model._init_weights(module)
        for name in dict.fromkeys(owner[i] for i in probe.seen):
            writers.setdefault(name, []).append((outer, module))
    return writers


def _reset_untouched(module: torch.nn.Module, name: str, untouched: list, seed: int) -> None:
    names = ", ".join(f"{name}.{_param_name(module, p)}" for p in untouched)
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        raise RuntimeError(
            f"{type(module).__name__}._init_weights does not initialise {names} and the module has no "
            "reset_parameters(): ds_train cannot give it stage-independent values"
        )
    redo = {id(p) for p in untouched}
    kept = {id(p): p.data.clone() for p in module.parameters(recurse=False) if id(p) not in redo}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module_seed(seed, name))
        reset()
    for p in module.parameters(recurse=False):  # what _init_weights did draw stays
        if id(p) in kept:
            p.data.copy_(kept[id(p)])
    log.warning("_init_weights left %s alone: torch's reset_parameters() initialised it", names)


def _param_name(module: torch.nn.Module, param: torch.nn.Parameter) -> str:
    return next((n for n, p in module.named_parameters(recurse=False) if p is param), "?")


@torch.no_grad()
def parameter_checksums(model: torch.nn.Module) -> dict[str, float]:
    """fp64 sum of |w| per parameter, over full (gathered) tensors: cheap and order-independent."""
    sums = {}
    for name, p in model.named_parameters():
        with gathered([p]):
            sums[name] = float(p.data.detach().double().abs().sum())
    return sums
