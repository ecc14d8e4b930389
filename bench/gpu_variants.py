"""The knobs bench/gpu_bench.py measures on one GPU, each a `ds-train pretrain` option (or a
DeepSpeed setting) changed from the baseline, and how the tuned run picks among them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Variant:
    name: str
    knob: str  # variants sharing a knob are alternatives; the tuned run takes the best of each
    what: str
    overrides: list[str] = field(default_factory=list)
    compile: bool = False
    needs: str | None = None  # an importable module the variant needs, or "cuda" (else skipped)
    same_math: bool = True  # False: changes what is trained (kept out of the tuned combination)
    tunable: bool = True  # False: puts back a cost ds-train removed, to measure it (never tuned)

    @property
    def compiles(self) -> bool:
        """Pays a torch.compile in its first step (engine.compile() or model.compile)."""
        return self.compile or "model.compile=true" in self.overrides


def variants(micro: int, layers: int, log_every: int = 1) -> list[Variant]:
    """In the order they run: the likeliest to matter first, so a --budget-s run keeps those.
    `layers`: the model's transformer blocks (for checkpointing half of them); `log_every`: the
    runs' log interval (per-layer norms are measured at most that often).

    Second comes "candidate", the combination most likely to reach the MFU goal (compiled blocks,
    FlexAttention's block-sparse document mask, micro-batch ×2, 4k-token loss chunks), so a lease
    cut short still measures it; the single knobs follow, then the ones that cannot win on one GPU
    (bucket sizes and overlap have no communication to act on; checkpointing only trades speed for
    memory a 1B model at micro 4-8 does not need), which a budget cuts first."""
    return [
        Variant("baseline", "-", f"ds-train defaults: ZeRO-2, sdpa, document masking, micro {micro}"),
        Variant("candidate", "candidate",
                f"compile + flex_attention + micro {micro * 2} + loss chunks of 4096 (the likeliest best)",
                ["model.compile=true", "model.attn_implementation=flex_attention",
                 f"train.micro_batch_size={micro * 2}", "model.loss_chunk_tokens=4096"],
                needs="cuda", tunable=False),
        # the document mask as FlexAttention's block mask: blocks between documents are skipped
        # (sdpa with a dense mask runs its memory-efficient kernel, not flash); the image has no flash_attn
        Variant("flex_attention", "attn", "attn_implementation=flex_attention (block-sparse document mask)",
                ["model.attn_implementation=flex_attention"], needs="cuda"),
        Variant("compile", "compile", "model.compile=true (torch.compile per block; chunked head loss kept)",
                ["model.compile=true"]),
        # bigger chunks: fewer fp32 accumulations of the head's weight gradient, more logits memory
        Variant("loss_chunk_4096", "loss", "model.loss_chunk_tokens=4096 (default 1024)",
                ["model.loss_chunk_tokens=4096"]),
        Variant(f"micro_{micro * 2}", "micro", f"train.micro_batch_size={micro * 2}",
                [f"train.micro_batch_size={micro * 2}"]),
        Variant("no_doc_mask", "mask", "model.document_masking=false (plain causal: flash SDPA path)",
                ["model.document_masking=false"], same_math=False),
        Variant("zero1", "stage", "zero.stage=1", ["zero.stage=1"]),
        # the cost of fp32 gradient accumulation (Megatron's default; ds-train's is bf16): numerics, not speed
        Variant("fp32_grads", "grads", "train.grad_dtype=fp32 (gradients accumulated and reduced in fp32)",
                ["train.grad_dtype=fp32"], same_math=False),
        # the cost of train.skip_spike_sigma: one scalar all-reduce and a host sync per step (off by default)
        Variant("skip_spikes", "spikes", "train.skip_spike_sigma=6 (OLMo-core's loss/grad-norm spike skipping)",
                ["train.skip_spike_sigma=6"], tunable=False),
        # the cost of train.per_layer_norms_every at its most frequent (every log line): a pass over the
        # gradients and weights, one small all-reduce
        Variant("per_layer_norms", "per_layer_norms", f"train.per_layer_norms_every={log_every} (per-layer norms at every log line)",
                [f"train.per_layer_norms_every={log_every}"], tunable=False),
        Variant("full_logits", "loss", "model.loss_chunk_tokens=0 (the loss from full logits, as transformers does)",
                ["model.loss_chunk_tokens=0"]),
        Variant("unfused_adamw", "adamw", "torch AdamW without fused=True (foreach)",
                ['zero.ds_config_overrides={"optimizer": {"params": {"fused": false}}}']),
        # DeepSpeed's default, which ds-train turns off: a device sync at every forward and engine.step()
        Variant("tput_timer_sync", "timer", "DeepSpeed's throughput timer on (its default: 2 device syncs per micro-batch)",
                ['zero.ds_config_overrides={"timers": {"throughput": {"enabled": true}}}'], tunable=False),
        Variant(f"micro_{micro // 2}", "micro", f"train.micro_batch_size={micro // 2}",
                [f"train.micro_batch_size={micro // 2}"]),
        # The whole model compiled, as DeepSpeed's engine.compile() does: not a ds-train option (its
        # forward cannot take the chunked head loss, so it computes full logits: compare it with
        # full_logits too), measured against per-block compile and never tuned in.
        Variant("compile_model", "compile", "whole model via DeepSpeed engine.compile() (full logits)",
                compile=True, tunable=False),
        Variant("flash_attn2", "attn", "attn_implementation=flash_attention_2 (varlen packing)",
                ["model.attn_implementation=flash_attention_2"], needs="flash_attn"),
        # Checkpointing pays off only through the bigger micro-batch it makes room for, so it
        # competes with the micro-batch variants (one knob) instead of adding to them.
        Variant("act_ckpt", "micro", f"activation checkpointing, micro {micro * 2}",
                ["model.activation_checkpointing=true", f"train.micro_batch_size={micro * 2}"]),
        # the first half of the blocks only: half the recompute, and the memory `ds-train plan`
        # says it needs (the plan recommends the fewest blocks that fit)
        Variant("act_ckpt_half", "micro", f"checkpointing the first {layers // 2} of {layers} blocks, micro {micro * 2}",
                ["model.activation_checkpointing=true", f"model.activation_checkpointing_layers={layers // 2}",
                 f"train.micro_batch_size={micro * 2}"]),
        # with several GPUs: gradient reduction to overlap and bucket; on one, little to act on
        Variant("overlap_comm", "overlap", "zero.overlap_comm=true", ["zero.overlap_comm=true"]),
        Variant("buckets_2e8", "buckets", "reduce/allgather buckets 2e8 elements (default 5e8)",
                ["zero.reduce_bucket_size=200000000", "zero.allgather_bucket_size=200000000"]),
        Variant("buckets_1e9", "buckets", "reduce/allgather buckets 1e9 elements",
                ["zero.reduce_bucket_size=1000000000", "zero.allgather_bucket_size=1000000000"]),
        Variant("no_contiguous_grads", "contiguous", "zero.contiguous_gradients=false",
                ["zero.contiguous_gradients=false"]),
    ]  # fmt: skip


def tuned_choice(all_variants: list[Variant], results: dict[str, dict]) -> dict[str, Variant]:
    """For each knob, the variant that beat the baseline's tokens/s by the most (over 1%): the
    tuned run combines them. Variants that change what is trained, or that only measure a cost
    ds-train removed, are never chosen."""
    base = results["baseline"]["tokens_per_s"]
    best: dict[str, Variant] = {}
    gains: dict[str, float] = {}
    for v in all_variants:
        r = results.get(v.name, {})
        if v.knob == "-" or not v.same_math or not v.tunable or "tokens_per_s" not in r:
            continue
        gain = r["tokens_per_s"] / base - 1
        if gain > 0.01 and gain > gains.get(v.knob, 0):
            best[v.knob], gains[v.knob] = v, gain
    return best
