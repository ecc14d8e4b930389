"""Per-rank training memory: model states (ZeRO paper), communication buffers, activations.

Model states, in bytes per parameter Ψ, with p bytes per parameter, g per gradient and K for the
optimizer (the fp32 master copy, 4, plus Adam's two moments, 8):

    stage 0:  (p + g + K)·Ψ        stage 2:  p·Ψ + (g + K)·Ψ/N
    stage 1:  (p + g)·Ψ + K·Ψ/N    stage 3:  (p + g + K)·Ψ/N

Mixed precision (bf16/fp16): p = g = 2, K = 12, which are the ZeRO paper's formulas (16Ψ,
4Ψ + 12Ψ/N, 2Ψ + 14Ψ/N, 16Ψ/N). fp32 training: p = g = 4; DeepSpeed's ZeRO optimizers still keep
a separate fp32 master partition (K = 12: 8Ψ + 12Ψ/N, 4Ψ + 16Ψ/N, 20Ψ/N), while stage 0 hands the
fp32 parameters straight to torch's AdamW (K = 8: 16Ψ). bench/bench_memory.py measures all of
these on DeepSpeed itself (docs/benchmarks.md, "Memory").

Gradients are counted as held between micro-batches (accumulation): stage 1 keeps the whole
gradient, stages 2-3 only their partition. Optimizer offload moves K·Ψ/N and an fp32 gradient
partition (4·Ψ/N) to the host; parameter offload (stage 3) moves p·Ψ/N.

Buffers: DeepSpeed allocates its gradient-reduction bucket at the configured size
(`zero.reduce_bucket_size` elements of gradient dtype; two with overlap_comm at stages 1-2),
whatever the model size; stage 3 also gathers whole parameters for the layer in use and the
prefetch bucket ahead of it.

Activations (saved for backward, per micro-batch of b sequences of s tokens, e bytes per
activation element) of a decoder block with flash/SDPA attention, measured on HF Llama with
saved-tensor hooks, and the peak of a whole forward and backward measured by counting every live
tensor (tests/unit/test_plan_memory.py checks both):

    per layer per token:  e·(8h + 2·kv + 4f)  (+4h when e = 2: RMSNorm's fp32 upcast)
    eager attention:      + heads·s·(4 + e if e < 4 else 4)  (softmax probabilities)
    outside the layers:   e·3h (+4h when e = 2) + 4V (the fp32 log-softmax of the loss)
    loss backward peak:   + 8·V  (the loss's gradient and the log-softmax's input gradient, both
                          fp32, at the start of backward, whatever the model dtype)

That is the loss from full logits (`model.loss_chunk_tokens=0`). ds-train's default chunked,
target-only head loss (ds_train/objectives/head_loss.py) saves no logits: per target token it keeps
the hidden state's gradient (e·h, in place of the head's input), and once per micro-batch the fp32
weight-gradient accumulator (4·V·h, + 4V with a bias); its peak is one chunk of c tokens' logits:

    chunked loss peak:    4·c·V when e = 4, else (4 + e)·c·V + e·V·h (+ 24·c: per-token scalars)
                          (the chunk's fp32 logits, turned into log-probabilities and then their
                          gradient in place; below fp32, their model-dtype copy next to the
                          chunk's [V, h] weight-gradient product, which fp32 accumulates in place)

With activation checkpointing of the first K of the L blocks (model.activation_checkpointing_layers;
all by default) each of those keeps only its input (e·h per token), and one block's activations
exist again while it is recomputed (with the gradient of its MLP activation, e·f per token, in
flight), after the loss's backward and the L − K later blocks have freed what they kept: the peak
is the larger of the two moments.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ds_train.plan.model_shape import ModelShape

GiB = 1024**3


@dataclass(frozen=True)
class HeadLoss:
    """How the loss meets the output head (`model.loss_chunk_tokens`)."""

    chunk_tokens: int = 0  # 0: full logits, as transformers computes them; else the chunked head loss
    target_fraction: float = 1.0  # target tokens per token: 1 for causal LM, mlm_probability for masked LM
    bias: bool = False  # the head has a bias (BERT's decoder): its fp32 gradient accumulator too

    @property
    def chunked(self) -> bool:
        return self.chunk_tokens > 0


FULL_LOGITS = HeadLoss()


@dataclass(frozen=True)
class Precision:
    name: str
    param_bytes: int  # p
    grad_bytes: int  # g
    activation_bytes: int  # e

    @property
    def mixed(self) -> bool:
        return self.param_bytes < 4

    @property
    def fp32_grads(self) -> bool:
        """16-bit weights with fp32 gradients (train.grad_dtype=fp32): ZeRO-2/3 only."""
        return self.mixed and self.grad_bytes == 4


PRECISIONS = {
    "bf16": Precision("bf16", 2, 2, 2),
    "fp16": Precision("fp16", 2, 2, 2),
    "fp32": Precision("fp32", 4, 4, 4),
}


def with_grad_dtype(precision: Precision, grad_dtype: str) -> Precision:
    """train.grad_dtype=fp32 on a bf16 run: DeepSpeed accumulates each rank's gradient partition and
    reduces in fp32 (g = 4: stage 2 holds 2Ψ + 16Ψ/N, stage 3 18Ψ/N, as bench/bench_memory.py
    --grad-dtype fp32 measures exactly; the reduce bucket doubles). fp16 keeps its loss-scaled fp16
    gradients (config validation refuses fp32 there)."""
    if grad_dtype == "fp32" and precision.name == "bf16":
        return replace(precision, name="bf16, fp32 grads", grad_bytes=4)
    return precision


ADAM_MOMENTS = 8  # exp_avg + exp_avg_sq, fp32
MASTER_COPY = 4  # fp32 weights the optimizer steps


def optimizer_bytes_per_param(precision: Precision, stage: int) -> int:
    """K: fp32 master copy (mixed precision, or any DeepSpeed ZeRO stage ≥ 1) + Adam's moments."""
    master = MASTER_COPY if (precision.mixed or stage >= 1) else 0
    return master + ADAM_MOMENTS


@dataclass(frozen=True)
class StateBytes:
    """Bytes per rank, split by kind and by where they live."""

    params: float
    grads: float
    optimizer: float
    host: float = 0.0  # pinned CPU memory (offload)
    nvme: float = 0.0

    @property
    def device(self) -> float:
        return self.params + self.grads + self.optimizer


def model_states(
    psi: int,
    stage: int,
    world_size: int,
    precision: Precision,
    offload_optimizer: str = "none",
    offload_param: str = "none",
) -> StateBytes:
    """Model-state bytes one rank holds on the device (and host/NVMe with offload)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}")
    n = world_size
    p, g, k = precision.param_bytes, precision.grad_bytes, optimizer_bytes_per_param(precision, stage)
    params = p * psi / n if stage == 3 else p * psi
    grads = g * psi / n if stage >= 2 else g * psi
    optimizer = k * psi / n if stage >= 1 else k * psi
    host = nvme = 0.0
    if offload_optimizer != "none":
        if stage == 0:
            raise ValueError("optimizer offload needs ZeRO stage ≥ 1")
        moved = optimizer + MASTER_COPY * psi / n  # the fp32 gradient partition the CPU Adam reads
        optimizer = 0.0
        if stage >= 2:
            grads = 0.0  # reduced straight into the host partition; only the bucket stays
        if offload_optimizer == "cpu":
            host += moved
        else:
            host += MASTER_COPY * psi / n
            nvme += moved - MASTER_COPY * psi / n
    if offload_param != "none":
        if stage != 3:
            raise ValueError("parameter offload needs ZeRO stage 3")
        if offload_param == "cpu":
            host += params
        else:
            nvme += params
        params = 0.0
    return StateBytes(params, grads, optimizer, host, nvme)


# DeepSpeed's NVMe swapping stages tensors through pinned host buffers allocated at start-up
# (deepspeed/runtime/zero/offload_config.py defaults; ds-train sets only the parameter buffers'
# size, to one partition of the largest parameter: distributed/deepspeed_config.py).
PARAM_SWAP_BUFFERS = 5  # offload_param.buffer_count
OPTIMIZER_SWAP_BUFFERS = 4  # offload_optimizer.buffer_count
SUB_GROUP_SIZE = 1_000_000_000  # zero_optimization.sub_group_size's default: elements per optimizer sub-group


def swap_buffer_bytes(
    shape: ModelShape,
    world_size: int,
    precision: Precision,
    offload_optimizer: str,
    offload_param: str,
    sub_group_size: int = SUB_GROUP_SIZE,
) -> float:
    """Host memory of the NVMe swap buffers, per rank (none without NVMe offload).

    Parameters: `buffer_count` buffers of one partition of the largest parameter, in the parameter
    dtype. Optimizer (ZeRO-3's swapper): `buffer_count` fp32 buffers of the largest optimizer
    sub-group's partition, which is the rank's whole partition until it exceeds `sub_group_size`
    (so, with the default, they hold 16 bytes per parameter of the partition: more pinned memory than
    offloading the optimizer to the CPU takes, until sub_group_size is lowered)."""
    out = 0.0
    if offload_param == "nvme":
        out += PARAM_SWAP_BUFFERS * -(-shape.largest_param // world_size) * precision.param_bytes
    if offload_optimizer == "nvme":
        # sub-groups are closed once they reach sub_group_size, so one may overrun it by a parameter
        largest_group = min(
            shape.params / world_size, sub_group_size - 1 + -(-shape.largest_param // world_size)
        )
        out += OPTIMIZER_SWAP_BUFFERS * largest_group * MASTER_COPY
    return out


@dataclass(frozen=True)
class BucketSizes:
    reduce_bucket: int = 500_000_000
    overlap_comm: bool | None = None  # None: DeepSpeed's default (off at stages 1-2, on at 3)
    prefetch_bucket: int = 50_000_000
    sub_group_size: int = SUB_GROUP_SIZE  # sizes the NVMe optimizer swap buffers


def buffer_bytes(shape: ModelShape, stage: int, precision: Precision, buckets: BucketSizes) -> float:
    """Communication buffers and, at stage 3, the parameters gathered for the layer in use."""
    if stage == 0:
        return 0.0  # torch DDP-style all-reduce of each gradient in place (no persistent bucket)
    g, p = precision.grad_bytes, precision.param_bytes
    if stage in (1, 2):
        copies = 2 if buckets.overlap_comm else 1
        return copies * buckets.reduce_bucket * g
    gathered = (min(buckets.prefetch_bucket, shape.params) + shape.largest_layer_params) * p
    return buckets.reduce_bucket * g + gathered


def saved_activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    precision: Precision,
    *,
    checkpoint_layers: int = 0,
    attention: str = "sdpa",
    loss: HeadLoss = FULL_LOGITS,
) -> float:
    """Tensors the forward of one micro-batch saves for backward (formula in the module docstring).
    The first `checkpoint_layers` blocks keep only their input."""
    e, h = precision.activation_bytes, shape.hidden
    upcast = 4 * h if e < 4 else 0
    per_layer = _layer_bytes_per_token(shape, seq_len, precision, attention)
    k = _checked_layers(shape, checkpoint_layers)
    layers = k * e * h + (shape.layers - k) * per_layer
    outside = e * 3 * h + upcast
    if loss.chunked:  # the head's input gives way to its gradient, on target tokens only
        outside -= e * h * (1 - loss.target_fraction)
    return micro_batch * seq_len * (layers + outside) + _loss_saved_bytes(shape, micro_batch * seq_len, loss)


def _checked_layers(shape: ModelShape, checkpoint_layers: int) -> int:
    if not 0 <= checkpoint_layers <= shape.layers:
        raise ValueError(f"checkpoint_layers={checkpoint_layers} of {shape.layers} layers")
    return checkpoint_layers


def _loss_saved_bytes(shape: ModelShape, tokens: int, loss: HeadLoss) -> float:
    """What the loss itself keeps for backward: every token's fp32 log-softmax (full logits), or the
    fp32 gradient accumulators of the head's weight and bias (chunked)."""
    v = shape.vocab
    if loss.chunked:
        return 4 * v * shape.hidden + (4 * v if loss.bias else 0)
    return 4 * v * tokens


def loss_peak_bytes(
    shape: ModelShape, micro_batch: int, seq_len: int, precision: Precision, loss: HeadLoss = FULL_LOGITS
) -> float:
    """The loss's transient memory on top of the saved tensors (formulas in the module docstring)."""
    e, v = precision.activation_bytes, shape.vocab
    targets = micro_batch * seq_len * (loss.target_fraction if loss.chunked else 1.0)
    if not loss.chunked:
        return targets * 8 * v
    c = min(loss.chunk_tokens, targets)
    per_token = 24 * c  # a few fp32 scalars a token: the target's logit, the max, the sum, log Z…
    if e == 4:  # one fp32 chunk, worked on in place; the weight gradient accumulates with addmm_
        return 4 * c * v + per_token
    return (4 + e) * c * v + e * v * shape.hidden + per_token


def _layer_bytes_per_token(shape: ModelShape, seq_len: int, precision: Precision, attention: str) -> float:
    e = precision.activation_bytes
    h, kv, f = shape.hidden, shape.kv_dim, shape.intermediate
    upcast = 4 * h if e < 4 else 0
    per_layer = e * (8 * h + 2 * kv + (4 if shape.gated_mlp else 2) * f) + upcast
    if attention == "eager":
        per_layer += shape.heads * seq_len * ((4 + e) if e < 4 else 4)
    return per_layer


def activation_bytes(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    precision: Precision,
    *,
    checkpoint_layers: int = 0,
    attention: str = "sdpa",
    loss: HeadLoss = FULL_LOGITS,
) -> float:
    """Peak activation memory of one micro-batch: the saved tensors plus the loss's peak (full
    logits: their gradients at the start of backward; chunked: one chunk's logits), or, with
    checkpointing and if larger, what the checkpointed blocks kept plus the one being recomputed."""
    tokens, e = micro_batch * seq_len, precision.activation_bytes
    saved = saved_activation_bytes(
        shape,
        micro_batch,
        seq_len,
        precision,
        checkpoint_layers=checkpoint_layers,
        attention=attention,
        loss=loss,
    )
    at_loss = saved + loss_peak_bytes(shape, micro_batch, seq_len, precision, loss)
    if not checkpoint_layers:
        return at_loss
    per_layer = _layer_bytes_per_token(shape, seq_len, precision, attention)
    # by then the loss and the blocks after the checkpointed ones have freed what they kept
    freed = _loss_saved_bytes(shape, tokens, loss) + tokens * (shape.layers - checkpoint_layers) * per_layer
    # the recomputed block, and the gradient of its MLP activation in flight through it
    return max(at_loss, saved - freed + tokens * (per_layer + e * shape.intermediate))


@dataclass(frozen=True)
class Estimate:
    stage: int
    offload_optimizer: str
    offload_param: str
    checkpoint_layers: int  # the first K blocks recompute their activations; 0: none
    states: StateBytes
    buffers: float
    activations: float
    swap_buffers: float = 0.0  # pinned host memory of NVMe swapping

    @property
    def device(self) -> float:
        return self.states.device + self.buffers + self.activations

    @property
    def host(self) -> float:
        return self.states.host + self.swap_buffers

    @property
    def label(self) -> str:
        if self.offload_param != "none":
            return f"ZeRO-{self.stage}, offload opt+params→{self.offload_param}"
        if self.offload_optimizer != "none":
            return f"ZeRO-{self.stage}, offload opt→{self.offload_optimizer}"
        return f"ZeRO-{self.stage}"


def estimate(
    shape: ModelShape,
    *,
    stage: int,
    world_size: int,
    precision: Precision,
    micro_batch: int,
    seq_len: int,
    checkpoint_layers: int,
    offload_optimizer: str = "none",
    offload_param: str = "none",
    buckets: BucketSizes | None = None,
    attention: str = "sdpa",
    loss: HeadLoss = FULL_LOGITS,
) -> Estimate:
    buckets = buckets or BucketSizes()
    states = model_states(shape.params, stage, world_size, precision, offload_optimizer, offload_param)
    buffers = buffer_bytes(shape, stage, precision, buckets)
    acts = activation_bytes(
        shape,
        micro_batch,
        seq_len,
        precision,
        checkpoint_layers=checkpoint_layers,
        attention=attention,
        loss=loss,
    )
    swap = swap_buffer_bytes(
        shape, world_size, precision, offload_optimizer, offload_param, buckets.sub_group_size
    )
    return Estimate(stage, offload_optimizer, offload_param, checkpoint_layers, states, buffers, acts, swap)
