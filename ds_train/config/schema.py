"""The run config: one typed dataclass per section, every field documented.

A run config is YAML with the sections below; `ds-train pretrain CONFIG.yaml a.b=c` overrides any
field from the command line. `ds-train config` prints this schema with the docs.
Validation that needs more than a type (batch arithmetic, contradictory ZeRO options) lives in
`ds_train.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and its documentation (read by `describe()`)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


REQUIRED: Any = None  # fields documented as required are checked in validate.py


@dataclass
class RunSection:
    output_dir: str = doc(
        REQUIRED,
        "Run directory: config.yaml, metrics.jsonl, checkpoints/, tensorboard/. Re-running on it resumes. "
        "Must not be empty, and must be creatable and writable (checked before the start and by --check).",
    )
    seed: int = doc(
        1234,
        "Seed for model initialisation, data order and masking. Integers only: nothing is seeded from time.",
    )
    name: str | None = doc(
        None, "Human-readable run name for trackers; defaults to the output_dir's basename."
    )
    resume: Literal["auto", "never", "require"] = doc(
        "auto",
        "auto: resume from the latest complete checkpoint if one exists; never: refuse to start on a dir holding checkpoints; "
        "require: fail if there is none (run.start_from's counts until the run has its own).",
    )
    force_resume: bool = doc(
        False,
        "Resume even though the data (shard set, seq_len, run.seed) or train.global_batch_size differ from the checkpoint's: training continues from its step on the new data stream. A different model or tokenizer is always refused.",
    )
    start_from: str | None = doc(
        None,
        "Another run's checkpoint to branch this run off while output_dir holds none of its own: a run "
        "directory (its latest checkpoint), its checkpoints/ or a step directory (checkpoints/step_00001000). "
        "Loads what a resume loads (weights, optimizer, LR schedule position, data position, RNG) and trains on "
        "from its step under this config: e.g. a WSD schedule's decay taken from a stable-phase checkpoint. "
        "Other data or batches need run.force_resume, as on a resume. The best-evaluation record starts afresh. "
        "Once this run has saved, it resumes from its own checkpoints. The other run's directory is only read.",
    )
    tensorboard: bool = doc(True, "Write TensorBoard event files under <output_dir>/tensorboard.")
    wandb: bool = doc(
        False,
        "Log to Weights & Biases (needs `pip install wandb`; offline mode unless WANDB_MODE says otherwise). "
        "The run id is kept in <output_dir>/wandb_run_id: every attempt of the run logs to one W&B run.",
    )
    wandb_project: str | None = doc(None, "W&B project name.")
    collective_timeout_s: int = doc(
        600,
        "Timeout of every collective. A dead rank makes the others exit after this many seconds instead of hanging.",
    )


@dataclass
class ModelSection:
    config: str | None = doc(
        None,
        "Path to a local HF config JSON (e.g. configs/model/tiny-llama.json): the model is built fresh from it.",
    )
    init_from: str | None = doc(
        None,
        "Path to a local HF model directory (config.json + safetensors) to start from. Exclusive with `config`.",
    )
    tokenizer: str | None = doc(
        None,
        "Local tokenizer directory. Defaults to init_from. A model built from `config` takes its vocabulary size from it.",
    )
    objective: Literal["causal_lm", "masked_lm"] = doc(
        "causal_lm",
        "causal_lm: next-token prediction (GPT/Llama; an encoder config such as BERT's is made a decoder, "
        "is_decoder=True, with a warning). masked_lm: BERT-style masked tokens.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = doc(
        "sdpa",
        "Attention kernel passed to transformers. With document masking, sdpa gets a dense "
        "block-diagonal mask (which rules out its flash kernel); flex_attention (PyTorch FlexAttention, "
        "GPU only: torch has no CPU backward) skips the blocks between documents; flash_attention_2 "
        "needs the flash_attn package.",
    )
    activation_checkpointing: bool = doc(
        False, "Recompute each transformer block's activations in backward (HF gradient checkpointing)."
    )
    activation_checkpointing_layers: int = doc(
        0,
        "With activation_checkpointing: recompute only the first N transformer blocks, the rest keep "
        "their activations (Megatron's 'block' method). 0: all blocks. Fewer blocks recompute less "
        "and keep more; `ds-train plan --device-memory` finds the fewest that fit.",
    )
    compile: bool = doc(
        False,
        "torch.compile each transformer block in place (as torchtitan does): blocks of one class "
        "usually share one graph, so compile time does not grow with depth; the output head keeps its chunked loss; "
        "parameter names are unchanged. The first step pays the compile. ZeRO stages 0-2 only: "
        "ZeRO-3's parameter fetches split each block at every layer, leaving little to fuse.",
    )
    document_masking: bool = doc(
        True,
        "Reset position ids at each document boundary of a packed row; causal models then get a block-diagonal attention mask. "
        "causal_lm only: masked_lm attends across the whole packed row, as BERT's pretraining did.",
    )
    pad_vocab_multiple: int = doc(
        1,
        "Round the embedding size up to a multiple of this (64 or 128 helps GPU matmuls). model.config only: "
        "a model.init_from model keeps its embeddings.",
    )
    residual_init: Literal["default", "scaled", "depth"] = doc(
        "default",
        "Initialisation of the projections that write into the residual stream (each block's attention "
        "output and MLP down projection; Llama-style blocks). default: the architecture's own "
        "(transformers' N(0, initializer_range) for Llama, as OLMo 2 trains; GPT-2 already scales). "
        "scaled: std / √(2 × layers), Megatron's and GPT-2's. depth: std / √(2 × (layer + 1)), the "
        "depth scaling torchtitan gives these projections (its other choices, truncated normals and "
        "up_proj's std, are not copied). A model built fresh from model.config only (set "
        "initializer_range in it for std); mixtures of experts are refused.",
    )
    loss_chunk_tokens: int = doc(
        1024,
        "Compute the output head and its cross-entropy together, on target tokens only, this many "
        "tokens at a time, so full logits never exist (memory; masked LM and SFT skip the head on "
        "non-targets). 0: full logits, as transformers computes them. Models that transform logits "
        "after the head (soft-capping) always use full logits.",
    )
    z_loss: float = doc(
        0.0,
        "Weight of PaLM's z-loss, added to the training loss: z · (log Z)² per target token, Z the "
        "softmax's normaliser, which keeps the output logits from drifting (bf16 stability; PaLM and "
        "OLMo 2 use 1e-4). Logged as z_loss beside the cross-entropy loss; evaluations leave it out. "
        "Language-model objectives only (not classification). 0: off.",
    )


@dataclass
class DataSection:
    train: Any = doc(
        REQUIRED,
        "Training shards: a shard directory, a manifest path, a brace pattern, a URL, or a list of {path, weight} to mix.",
    )
    valid: Any = doc(
        None,
        "Validation shards, same forms as `train`. Omit to skip validation. Several sets are each "
        "reported too (`valid_loss/<name>`; `{path, name}` names one, else the end of its path).",
    )
    downstream: list = doc(
        [],
        "Multiple-choice tasks scored at each evaluation (causal_lm pretraining): JSON-lines files, one "
        'question a line: {"context": "...", "choices": ["...", "..."], "label": 0}. Each choice is scored '
        "by its log-likelihood after the context, as lm-evaluation-harness does; metrics "
        "`downstream/<task>/acc` and `acc_norm` (per character; the task: the file name without .jsonl), usable "
        "as train.best_metric.",
    )
    downstream_max_examples: int = doc(
        0, "Score only the first N questions of each data.downstream file (0: all of them)."
    )
    num_workers: int = doc(1, "DataLoader worker processes per rank. Order and contents do not depend on it.")
    shuffle: bool = doc(True, "Shuffle shard order per epoch and rows within a window of shards.")
    shuffle_window: int = doc(
        16, "Shards whose rows are shuffled together. Larger mixes better; memory is per-row indices only."
    )
    mlm_probability: float = doc(0.15, "Fraction of tokens masked for the masked_lm objective.")
    seed: int | None = doc(
        None,
        "Seed of the data order (shuffle, mixture draws) and of masked-LM masking. Default: run.seed, "
        "which then seeds everything. Set apart, a seed study varies the initialisation with the data "
        "order fixed, or the order with the same initial weights (OLMo-core's data seed).",
    )
    cache_dir: str | None = doc(
        None, "Local cache for remote shards (http/s3/pipe). Default: <output_dir>/shard_cache."
    )
    skip_corrupt: bool = doc(
        False, "Skip samples from corrupt shards (counted in metrics) instead of stopping with an error."
    )
    prefetch_factor: int = doc(4, "Micro-batches each DataLoader worker prepares ahead.")


@dataclass
class TrainSection:
    max_steps: int | None = doc(
        REQUIRED, "Optimizer steps to run in total (a resumed run continues up to this). Or set epochs."
    )
    epochs: float | None = doc(
        None,
        "Instead of max_steps: passes over the training data (data.train's rows together, or the "
        "tokenized finetune.train_file's rows). max_steps becomes ceil(epochs × rows / global_batch_size), "
        "computed at start and printed by --check. Set one of the two.",
    )
    global_batch_size: int = doc(
        REQUIRED,
        "Sequences per optimizer step across all ranks = micro_batch_size × grad accumulation × data-parallel size.",
    )
    micro_batch_size: int = doc(
        REQUIRED,
        "Sequences per forward pass on one rank. Gradient accumulation is derived, never configured.",
    )
    batch_ramp: list = doc(
        [],
        "Pretraining: smaller global batches first, as GPT-3, Megatron's rampup and Llama 3's stages do. "
        "A list of [last step, global batch] stages: [[500, 256], [1500, 512]] trains steps 1-500 with "
        "batches of 256, 501-1500 with 512, then global_batch_size. Each batch is at most global_batch_size "
        "and a multiple of micro_batch_size × ranks (the stages accumulate fewer micro-batches). The "
        "learning-rate schedule still counts steps; the data stream and samples/tokens count what each "
        "step took. Resumes mid-ramp are exact; a resume whose stages differ from its step on needs "
        "run.force_resume, like another global_batch_size. []: none.",
    )
    lr: float = doc(
        3e-4,
        "Peak learning rate. A resume uses this value (and the optimizer settings below), not the checkpoint's. "
        "Every number in the config must be finite (inf and nan are refused).",
    )
    min_lr_ratio: float = doc(0.1, "Final learning rate as a fraction of lr (cosine/linear).")
    warmup_steps: int = doc(
        0, "Linear warmup steps: step k (1-based) of the warmup trains with lr × k / warmup_steps."
    )
    schedule: Literal["cosine", "linear", "constant", "wsd", "wsd_sqrt"] = doc(
        "cosine",
        "Decay after warmup, down to lr × min_lr_ratio at max_steps (the last step trains just above it). "
        "wsd / wsd_sqrt: warmup-stable-decay (MiniCPM, DeepSeek LLM): lr held after warmup, then a cooldown "
        "over the last train.decay_steps steps, linear or 1-sqrt (Hägele et al. 2024), to lr × min_lr_ratio; "
        "raising max_steps before the cooldown extends the run seamlessly.",
    )
    decay_steps: int | None = doc(
        None,
        "wsd / wsd_sqrt: steps of the final cooldown. Default: 20% of max_steps. With keep_every, the "
        "stable phase's checkpoints stay to branch other cooldowns from (run.start_from).",
    )
    weight_decay: float = doc(
        0.1, "AdamW weight decay, applied to matrices (ndim ≥ 2) only: never to biases or norm weights."
    )
    embedding_weight_decay: bool = doc(
        True,
        "Decay the embedding tables too (every nn.Embedding: tokens, and positions or token types where "
        "the model has them), as the transformers Trainer, Megatron and GPT-NeoX do. false: OLMo 2's "
        "choice (decay pulls rare tokens' rows to zero, and small embedding norms destabilise early "
        "training); with tied embeddings the output head goes undecayed with them. Fixed for a run: "
        "it sets the optimizer's parameter groups, so a resume with the other value is refused (not under "
        "LoRA, which trains no embedding table).",
    )
    adam_beta1: float = doc(0.9, "AdamW beta1.")
    adam_beta2: float = doc(0.95, "AdamW beta2.")
    adam_eps: float = doc(1e-8, "AdamW epsilon.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "auto: bf16 on GPUs that support it, fp32 on CPU."
    )
    grad_dtype: Literal["model", "fp32"] = doc(
        "model",
        "bf16 runs: the dtype gradients are accumulated over micro-batches and reduced across ranks "
        "in. model: bf16 (DeepSpeed's and the transformers Trainer's default: half the gradient memory "
        "and reduce traffic); fp32: Megatron's and torchtitan's choice, no bf16 rounding of the sums "
        "over long accumulations and many ranks, for fp32 gradient partitions (4 bytes a parameter "
        "of each rank's partition where bf16 takes 2: ZeRO-2 2Ψ + 16Ψ/N, ZeRO-3 18Ψ/N; ds-train plan "
        "counts them), twice the reduce-bucket memory and twice the traffic. "
        "fp32 needs zero.stage 2 or 3 (DeepSpeed offers it at stage 1 only through another optimizer).",
    )
    log_every: int = doc(10, "Write a metrics.jsonl line (and TensorBoard scalars) every N steps.")
    save_every: int = doc(
        100, "Checkpoint every N steps (and at the end unless save_final=false). 0: only at the end."
    )
    save_final: bool = doc(
        True,
        "Checkpoint at max_steps. false: no checkpoint at the end (throughput tests, smoke runs; such a "
        "run cannot be converted or resumed from its end). A stop for preemption or Ctrl-C still saves.",
    )
    keep_every: int = doc(
        0,
        "Also keep every checkpoint whose step is a multiple of N: keep_last never prunes them (e.g. a "
        "wsd run's stable phase, to branch a cooldown off any of them with run.start_from). 0: none.",
    )
    keep_last: int = doc(
        3, "Complete checkpoints to keep; older ones are deleted after a new one is complete."
    )
    best_metric: str = doc(
        "valid_loss",
        "Evaluation figure that says which evaluation is best (valid_loss, valid_accuracy, "
        "valid_macro_f1, a valid_loss/<set>...): lower is better for losses and perplexities, higher "
        "otherwise. Used by keep_best and early_stopping_patience; the best is logged at the end.",
    )
    keep_best: bool = doc(
        False,
        "Never delete the checkpoint of the best evaluation (when one was saved at that step: make "
        "eval_every a multiple of save_every), beside the keep_last newest.",
    )
    early_stopping_patience: int = doc(
        0,
        "Stop after this many evaluations in a row without a better best_metric; the run ends as at "
        "max_steps (exit 0, final checkpoint and export). 0: never.",
    )
    save_async: bool = doc(
        False,
        "Periodic saves copy the checkpoint to host memory and write it while training goes on (it becomes "
        "`latest` at the first step after every rank's files are written); the end and preemption saves are "
        "always written before the run exits. Costs host memory for one copy of each rank's checkpoint files.",
    )
    save_async_keep_memory: bool = doc(
        True,
        "With save_async, keep the host memory of one save's copy for the next, so "
        "later copies skip allocating it (4.8x faster copies on CPU, docs/benchmarks.md); false frees it "
        "after each save's writes, for hosts short of memory between saves.",
    )
    eval_every: int = doc(
        0,
        "Validation loss/perplexity every N steps (and at the end) when data.valid is set. 0: only at the end.",
    )
    eval_steps: int = doc(
        4,
        "Global batches of validation data per evaluation (shard sets: the first ones, in order; "
        "at most one pass, each row counted once). Not the transformers Trainer's eval_steps, "
        "which is an interval: that is eval_every here.",
    )
    peak_flops: float | None = doc(
        None, "Peak FLOP/s of one device for MFU. Default: known GPUs (H100/H200 bf16: 989e12); none on CPU."
    )
    export_hf: bool = doc(
        False,
        "Write a Hugging Face directory to <output_dir>/hf at the end of pretraining "
        "(ds-train finetune writes it through finetune.export_hf).",
    )
    export_hf_every: int = doc(
        0,
        "Also convert the checkpoint of every N-th scheduled save (steps that are multiples of N × save_every) "
        "and the final one to <output_dir>/exports/<tag>, in a background process (log in <output_dir>/logs/); "
        "1: every checkpoint, preemption saves included. Decided by step, so requeued runs export the same ones. "
        "0: off. Keep train.keep_last >= 2 so pruning cannot remove one being read.",
    )
    gc_every: int = doc(
        50,
        "Run Python's garbage collector every N steps on every rank, with its automatic runs off and "
        "start-up objects frozen, so no rank stalls the others at a random step. 0: Python's default.",
    )
    nonfinite: Literal["stop", "skip"] = doc(
        "stop", "On a NaN/Inf loss: stop with the step and batch named, or skip the update and count it."
    )
    max_nonfinite: int = doc(3, "With nonfinite=skip: stop after this many consecutive non-finite steps.")
    skip_spike_sigma: float = doc(
        0.0,
        "Skip the update of a step whose loss or gradient norm lies more than this many standard "
        "deviations above the mean of the last skip_spike_window steps (OLMo-core's SkipStepAdamW; OLMo 2 "
        "uses 6): weights and Adam's moments stay as they were, the batch is consumed, the step counted "
        "in metrics.jsonl's skipped_steps. Costs a scalar all-reduce and a host sync per step. 0: off.",
    )
    skip_spike_window: int = doc(
        128, "skip_spike_sigma: steps the mean and deviation are taken over (active once half are seen)."
    )
    per_layer_norms_every: int = doc(
        0,
        "Every N steps (a multiple of log_every), log each block's gradient norm and fp32 weight norm, and "
        "those of every other module (embeddings, final norm, head), to metrics.jsonl, TensorBoard and W&B; "
        "`ds-train report` draws them per layer over the run. Finds where a spike or a divergence starts. "
        "Costs, at those steps, a pass over this rank's gradient and weight partition and one small "
        "all-reduce. 0: off.",
    )
    straggler_ratio: float = doc(
        1.2,
        "Warn when one rank's forwards take this many times the other ranks' median in two log intervals in a "
        "row (a slow rank sets every rank's pace); metrics.jsonl logs the slowest rank and its ratio either "
        "way. 0: no warning.",
    )


@dataclass
class ZeroSection:
    preset: str | None = doc(
        None,
        "Name of a preset in configs/zero/ (stage0..stage3, stage2-offload-optimizer, stage3-offload-optimizer, stage3-offload-all, stage3-nvme) or a path to one. Its values are defaults for this section.",
    )
    stage: Literal[0, 1, 2, 3] = doc(
        2, "ZeRO stage: 0 plain data parallel, 1 shard optimizer, 2 + gradients, 3 + parameters."
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = doc(
        "none", "Keep optimizer state (and the step) on CPU (stage ≥ 1) or NVMe (stage 3)."
    )
    offload_param: Literal["none", "cpu", "nvme"] = doc(
        "none", "Keep parameters on CPU or NVMe between uses. Stage 3 only."
    )
    nvme_path: str | None = doc(None, "Existing directory for NVMe offload files.")
    overlap_comm: bool | None = doc(
        None, "Overlap gradient reduction with backward. None: DeepSpeed's default for the stage."
    )
    contiguous_gradients: bool = doc(True, "Copy gradients into one contiguous buffer as they are produced.")
    reduce_bucket_size: int = doc(500_000_000, "Elements per gradient reduce bucket.")
    allgather_bucket_size: int = doc(500_000_000, "Elements per all-gather bucket (stages 1-2).")
    stage3_prefetch_bucket_size: int = doc(
        50_000_000, "Stage 3: elements of parameters prefetched ahead of use."
    )
    stage3_param_persistence_threshold: int = doc(
        100_000, "Stage 3: parameters smaller than this stay unpartitioned."
    )
    stage3_max_live_parameters: int = doc(1_000_000_000, "Stage 3: most parameter elements resident at once.")
    ds_config_overrides: dict = doc(
        {},
        "Raw DeepSpeed JSON keys merged last into the generated config (expert escape hatch), for "
        "tuning keys ds_train does not set (sub_group_size, round_robin_gradients, aio, ...). Keys "
        "ds_train sets are refused, naming the setting to use: the batch sizes and accumulation, "
        "gradient_clipping, zero_optimization.stage and offload devices, the bucket sizes, "
        "overlap_comm, contiguous_gradients and stage-3 thresholds above, bf16/fp16.enabled, the "
        "optimizer's type, lr, betas, eps and weight_decay, and a scheduler.",
    )


@dataclass
class FinetuneSection:
    task: Literal["sft", "classification", "masked_lm"] = doc(
        "sft",
        "`ds-train finetune` only. sft: instruction/chat tuning of a causal LM (loss on response tokens); classification: sequence classification (text, label); masked_lm: continued masked-LM pretraining of a BERT-style model.",
    )
    train_file: Any = doc(
        None,
        "Training examples: a local JSON-lines file (.jsonl, .jsonl.gz) or a list of them (docs/finetune.md gives the fields per task).",
    )
    valid_file: Any = doc(
        None, "Validation examples, same forms as train_file. Evaluated in full at each eval."
    )
    valid_fraction: float = doc(
        0.0,
        "Without valid_file: hold out this fraction of train_file for validation (chosen by a hash of each line, so stable across runs).",
    )
    seq_len: int = doc(
        512,
        "Tokens per row. sft/masked_lm: packed row length; classification: texts are truncated to this. Longer sft examples are truncated.",
    )
    packing: bool = doc(
        True,
        "sft: pack several examples into each row (positions restart per example, so they do not attend to each other); false: one padded example per row.",
    )
    train_on_inputs: bool = doc(
        False, "sft: also compute the loss on prompt/system/user tokens (default: response tokens only)."
    )
    chat_template: Literal["auto", "tokenizer", "plain"] = doc(
        "auto",
        "sft: auto uses the tokenizer's chat template when it has one, else the plain template (docs/finetune.md); tokenizer requires one; plain always uses the plain template.",
    )
    prompt_field: str = doc("prompt", "sft: field of the prompt in prompt/response examples.")
    response_field: str = doc("response", "sft: field of the response in prompt/response examples.")
    system_field: str = doc(
        "system", "sft: optional field with a system message for prompt/response examples."
    )
    messages_field: str = doc(
        "messages", "sft: field of a chat example: a list of {role: system|user|assistant, content}."
    )
    text_field: str = doc("text", "classification/masked_lm: field holding the text.")
    text_pair_field: str | None = doc(
        None,
        "classification: field holding a second text, for sentence pairs (NLI, paraphrase, query-passage "
        "relevance). Encoded as the tokenizer's pair ([CLS] a [SEP] b [SEP] with segment ids for BERT-style "
        "models); truncation shortens the longer text first. Downstream, call tokenizer(a, b).",
    )
    label_field: str = doc(
        "label", "classification: field holding the label (a string or an integer class id)."
    )
    labels: list = doc(
        [],
        "classification: class names in id order. Default: the sorted distinct labels of train_file.",
    )
    class_weights: Any = doc(
        "none",
        "classification: weigh each class's training loss. none; balanced: examples / (classes × the "
        "class's count in train_file), so a rare class weighs more and the weights average 1 over the "
        "training examples (the loss keeps its scale); or a list of positive numbers in class order. "
        "Validation losses and metrics stay unweighted.",
    )
    adapter: Literal["none", "lora"] = doc(
        "none", "none: full fine-tuning. lora: train LoRA adapters (peft) on a frozen base model."
    )
    lora_r: int = doc(8, "LoRA rank.")
    lora_alpha: float = doc(16.0, "LoRA scaling numerator: the update is scaled by alpha / r.")
    lora_dropout: float = doc(0.05, "Dropout on the LoRA input.")
    lora_target_modules: Any = doc(
        "all-linear",
        "Modules that get adapters: a list of module-name suffixes (e.g. [q_proj, v_proj]) or 'all-linear' (every linear layer except the output head).",
    )
    export_hf: bool = doc(
        True,
        "At the end, write <output_dir>/hf: a Hugging Face model (LoRA merged in) with a model card README.md; LoRA adapters also go to <output_dir>/adapter.",
    )


@dataclass
class ProfileSection:
    start_step: int = doc(
        0,
        "Record torch.profiler traces of training steps start_step .. start_step+steps-1 to "
        "<output_dir>/profile/steps_A-B/ (a Perfetto/chrome://tracing trace, an op table and a "
        "summary per rank; docs/performance.md). The window must end before train.max_steps. 0: off.",
    )
    steps: int = doc(2, "Training steps recorded.")
    warmup_steps: int = doc(
        2,
        "Steps the profiler runs before start_step without recording, so its own start-up cost "
        "stays out of the trace.",
    )
    ranks: Any = doc([0], "Ranks that record: a list of rank numbers, or 'all'.")
    record_shapes: bool = doc(
        False, "Record operator input shapes (bigger trace; the op table groups by them)."
    )
    with_stack: bool = doc(False, "Record the Python stack of each operator (bigger, slower trace).")
    memory: bool = doc(
        False,
        "Record memory allocations; on a GPU also write a CUDA memory snapshot (rankN.memory.pickle, "
        "viewable at pytorch.org/memory_viz).",
    )


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    profile: ProfileSection = field(default_factory=ProfileSection)

    @property
    def data_seed(self) -> int:
        """The seed of the data order and masking: data.seed, or run.seed."""
        return self.data.seed if self.data.seed is not None else self.run.seed


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "zero": ZeroSection,
    "finetune": FinetuneSection,
    "profile": ProfileSection,
}
