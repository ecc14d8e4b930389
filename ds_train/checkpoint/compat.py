"""Is this checkpoint one the current config may resume from? Said before any process starts.

A checkpoint records the model config, tokenizer hash, objective, global batch and data
fingerprint it was trained with; resuming with something else is refused with the differences
spelled out, instead of silently training a different model on top of old weights.
"""

from __future__ import annotations

import hashlib
import json
import logging

from ds_train.config.loader import ConfigError
from ds_train.data.batch_schedule import BatchSchedule

log = logging.getLogger(__name__)

# Keys of an HF config that do not change the model's function.
VOLATILE_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "torch_dtype",
    "dtype",
    "use_cache",
    "_attn_implementation_autoset",
    "attn_implementation",
    "_attn_implementation",
    "gradient_checkpointing",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "_commit_hash",
    "id2label",
    "label2id",
}


def model_signature(hf_config) -> dict:
    d = hf_config.to_dict()
    return {k: v for k, v in sorted(d.items()) if k not in VOLATILE_KEYS and not k.startswith("_")}


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


OWN_REMEDY = "use another run.output_dir, or run.resume=never with a fresh one"
BRANCH_REMEDY = "start afresh without run.start_from, or branch off a checkpoint of this model and batch"


def check_resume(
    state: dict,
    *,
    where: str,
    model_sig: dict,
    tokenizer_sha: str | None,
    objective: str,
    global_batch_size: int,
    batch_ramp: list | tuple = (),
    force: bool = False,
    zero_stage: int | None = None,
    decay_embeddings: bool = True,
    remedy: str = OWN_REMEDY,
) -> None:
    """Raise ConfigError naming what differs between the checkpoint and this run, ending with
    `remedy` (what to do instead). `force`
    (run.force_resume) lets a different global batch size through, never another model, nor a
    ZeRO stage DeepSpeed cannot load the checkpoint into, nor other parameter groups."""
    problems, forceable = [], []
    # Checkpoints from before train.embedding_weight_decay decayed the embeddings.
    saved_decay = state.get("decay_embeddings", True)
    if saved_decay != decay_embeddings:
        # The optimizer state is stored group by group (ZeRO: one flat partition per group): moved
        # to the other group, the embedding rows would take other parameters' Adam moments, or
        # DeepSpeed's load fails on every rank with a size mismatch.
        problems.append(
            f"train.embedding_weight_decay={str(saved_decay).lower()} (this run: {str(decay_embeddings).lower()}), "
            "which sets the optimizer's parameter groups (their state cannot be moved between groups)"
        )
    saved_stage = state.get("zero_stage")
    if (
        zero_stage is not None
        and isinstance(saved_stage, int)
        and _stage_family(saved_stage) != _stage_family(zero_stage)
    ):
        # DeepSpeed's loaders read only their own layout: ZeRO-1 and 2 share one (flat fp32
        # partitions per group), ZeRO-3 and ZeRO-0 each have their own; its errors are an
        # AssertionError or AttributeError deep in the load, on every rank
        raise ConfigError(
            f"{where} holds a checkpoint (step {state.get('step')}) written with ZeRO-{saved_stage}, which DeepSpeed "
            f"cannot load at ZeRO-{zero_stage} (stages 1 and 2 load each other's, 0 and 3 only their own): keep "
            f"zero.stage={saved_stage}, adding optimizer/parameter offload if memory is short, or export the weights "
            "(`ds-train convert to-hf`) and start a new run from them with model.init_from (the optimizer state and "
            "the data position start afresh)"
        )
    saved_sig = state.get("model_config")
    if saved_sig is not None and saved_sig != model_sig:
        diffs = [
            f"{k}: {saved_sig.get(k)!r} → {model_sig.get(k)!r}"
            for k in sorted(set(saved_sig) | set(model_sig))
            if saved_sig.get(k) != model_sig.get(k)
        ]
        problems.append(f"a different model ({'; '.join(diffs[:4])}{'; …' if len(diffs) > 4 else ''})")
    saved_tok = state.get("tokenizer_sha256")
    if saved_tok and tokenizer_sha and saved_tok != tokenizer_sha:
        problems.append("a different tokenizer")
    if state.get("objective") and state["objective"] != objective:
        problems.append(f"objective {state['objective']} (this run: {objective})")
    saved_batch = BatchSchedule.from_state(state) if state.get("global_batch_size") else None
    batch = BatchSchedule.of(global_batch_size, batch_ramp)
    step = int(state.get("step", 0))
    # forced, the data stream continues at the checkpoint's position (stream_origin.py) and the
    # schedule at its step: what changes is the samples a step takes from then on. A ramp that
    # differs only before the checkpoint's step (a finished one removed) changes nothing
    if saved_batch is not None and not saved_batch.same_from(batch, step):
        if not saved_batch.ramp and not batch.ramp:
            forceable.append(
                f"train.global_batch_size={saved_batch.final} (this run: {global_batch_size}), "
                "which changes the samples per step of the schedule"
            )
        else:
            forceable.append(
                f"{saved_batch.describe()} (this run: {batch.describe()}; train.global_batch_size, "
                f"train.batch_ramp), which changes the samples per step from step {step + 1} on"
            )
    if problems or (forceable and not force):
        hint = "" if problems else " (or run.force_resume=true to continue anyway)"
        raise ConfigError(
            f"{where} holds a checkpoint (step {state.get('step')}) of {'; '.join(problems + forceable)}: "
            f"{remedy}{hint}"
        )
    if forceable:
        log.warning("run.force_resume: resuming %s despite %s", where, "; ".join(forceable))


def _stage_family(stage: int) -> int:
    return 1 if stage in (1, 2) else stage


SHARDS_CHANGED = "a different shard set (shard names, row counts or checksums differ)"


def check_data_resume(
    state: dict,
    *,
    where: str,
    fingerprint_now: str,
    seq_len: int | None,
    seed: int,
    order: dict | None = None,
    force: bool = False,
    changed: str = SHARDS_CHANGED,
    stream: str = "data",
    instead: str = "start a new run.output_dir",
) -> None:
    """Raise ConfigError unless this run's data continues the checkpoint's stream (or `force`).

    `order`: data.shuffle/shuffle_window as `data.loader.order_settings` records them (checkpoints
    from before they were recorded are not compared). `seq_len` None: not compared (fine-tuning's
    fingerprint covers it). `changed` says what a different fingerprint means, `stream` what the
    stream is made of (pretraining's data, fine-tuning's examples). Each difference names its own
    way back."""
    data = state.get("data") or {}
    problems: list[tuple[str, str]] = []  # (what differs, how to restore it)
    if order is not None and data.get("order") not in (None, order):
        problems.append((f"{_order_keys(data['order'])} (now {_order_keys(order)}), which fix the {stream} order",
                         f"set {_order_keys(data['order'])}"))  # fmt: skip
    if seq_len is not None and data.get("seq_len") not in (None, seq_len):
        problems.append(
            (f"seq_len {data['seq_len']} (shards now: {seq_len})", "point data.train at the original shards")
        )
    if data.get("seed") not in (None, seed):
        problems.append((f"data seed {data['seed']} (now {seed}), which fixes the {stream} order",
                         f"set data.seed={data['seed']}"))  # fmt: skip
    if data.get("fingerprint") not in (None, fingerprint_now):
        restore = "point data.train at the original shards" if changed == SHARDS_CHANGED else "restore them"
        problems.append((changed, restore))
    what = "; ".join(p for p, _ in problems)
    if problems and force:
        log.warning("run.force_resume: resuming %s on another %s stream (%s)", where, stream, what)
    elif problems:
        restore = " and ".join(dict.fromkeys(r for _, r in problems))  # each way back once, in order
        raise ConfigError(
            f"{where} was trained with {what}: resuming would not continue the same {stream} stream; "
            f"{restore}, or {instead} (or run.force_resume=true to continue on this data)"
        )


def _order_keys(order: dict) -> str:
    """Recorded order settings as the config keys that give them."""
    return f"data.shuffle={str(order['shuffle']).lower()}" + (
        f", data.shuffle_window={order['window']}" if order["shuffle"] and order["window"] != 1 else ""
    )
