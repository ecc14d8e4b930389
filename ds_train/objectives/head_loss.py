"""The output head and its cross-entropy as one step, over target tokens only, in chunks.

A transformers LM computes `logits = head(hidden)` for every position and then the loss. Two
costs follow, both avoidable without changing the result:

- **Positions that are not targets still pay for the head.** Masked LM predicts ~15% of tokens
  and SFT only the response tokens, yet the `[tokens, vocab]` matmul runs on all of them (for a
  BERT-small the head is about half the forward). Here only target rows enter the head (the
  ModernBERT "sparse prediction" idea); their indices are computed by `collate` in the DataLoader
  workers, so selecting them costs the GPU no host sync.
- **Full logits are the largest activation of a training step.** For a 128k vocabulary, 8k tokens
  of fp32 logits, their log-softmax and their gradient take several GB. Here the head runs on
  `chunk` tokens at a time: each chunk's loss and its gradients with respect to the hidden states
  and the head's weight are computed at once, in the forward (the loss is a scalar, so the
  backward only scales them), and the chunk's logits are freed before the next one (the approach
  of Liger's fused linear cross-entropy, in plain PyTorch ops so it runs on CPU and any GPU).

The head is the model's own module (`get_output_embeddings()`), called through the model's own
forward with its `forward` swapped for the duration of the call: every hook on it keeps working,
which is what ZeRO-3 needs (it gathers the partitioned weight in the module's pre-forward hook and
again before its backward). Models whose forward transforms the logits after the head (Gemma's
soft-capping, Cohere's and Granite's logit scaling) would transform the loss instead, so they,
heads that are not a plain `nn.Linear` (e.g. LoRA-wrapped) and compiled models (torch.compile
would recompile for each swapped forward) take the full-logits path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_train.objectives.base import IGNORE_INDEX, row_cross_entropy, summed_cross_entropy, target_index

# HF config attributes of a post-head transformation of the logits (None or 1.0 when unused)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias` against `labels` (every one a target),
    gradients computed chunk by chunk in the forward; with `groups` (a group id per target), also
    the cross-entropy summed per group, from the same per-token values (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, z_loss: float, groups, num_groups: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulators: chunk contributions are summed here, rounded once at the end
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        group_sums = torch.zeros(
            num_groups if groups is not None else 0, dtype=torch.float32, device=hidden.device
        )
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk, None]
            # The softmax in place, in the chunk's one fp32 buffer: torch.log_softmax and logsumexp
            # each allocate a second [chunk, vocab] fp32 tensor (the latter internally).
            logits = F.linear(h, weight, bias).float()
            target_logit = logits.gather(1, y)
            peak = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(peak).exp_()
            norm = grad.sum(dim=-1, keepdim=True)
            grad.div_(norm)  # softmax = d(sum of -log p_y)/d logits, before the one-hot below
            lse = peak + norm.log()  # log Z, the softmax's normaliser
            token_loss = lse - target_logit  # -log p_y = log Z - logit_y
            total += token_loss.sum()
            if groups is not None:  # one index_add of `chunk` values: small beside the chunk's matmul
                group_sums.index_add_(0, groups[start : start + chunk], token_loss.squeeze(1))
            if z_loss:  # + z·(log Z)²: d/d logits = 2z·log Z·softmax
                z_sum += lse.square().sum()
                grad.mul_(1.0 + 2.0 * z_loss * lse)
            grad.scatter_add_(1, y, torch.full(y.shape, -1.0, device=grad.device))
            grad = grad.to(weight.dtype)
            if need_h:  # written in place: no [chunk, hidden] temporary beside the chunk's gradient
                torch.mm(grad, weight, out=grad_h[start : start + chunk])
            if need_w and weight.dtype == torch.float32:
                grad_w.addmm_(grad.t(), h)  # in place: no [vocab, hidden] temporary
            elif need_w:  # bf16/fp16: the chunk's product rounds once, the sum stays fp32;
                grad_w.add_(grad.t() @ h)  # add_ upcasts element by element: no fp32 copy of it
            if need_b:
                grad_b += grad.float().sum(0)
            del logits, grad  # freed before the next chunk's logits are allocated, not after
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        z_term = z_loss * z_sum
        ctx.mark_non_differentiable(z_term, group_sums)
        return total + z_term, z_term, group_sums

    @staticmethod
    def backward(ctx, grad_out, _grad_z_term, _grad_group_sums):
        # Scaled in place: these buffers are this node's alone and backward runs once, so the
        # start of backward (all activations still alive) holds no second weight-sized copy.
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_h is None else grad_h.mul_(grad_out.to(grad_h.dtype)),
            None if grad_w is None else grad_w.mul_(grad_out).to(w_dtype),
            None if grad_b is None else grad_b.mul_(grad_out).to(b_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T + bias, labels[i]), as `linear_cross_entropy_z` without z-loss."""
    return linear_cross_entropy_z(hidden, weight, bias, labels, chunk)[0]


def linear_cross_entropy_z(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int,
    z_loss: float = 0.0,
    groups: torch.Tensor | None = None,
    num_groups: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_i CE(hidden[i] @ weight.T + bias, labels[i]) + z-term, z-term, per-group CE sums) for
    hidden `[n, H]`, labels `[n]`, all targets; the z-term is z_loss · sum_i (log Z_i)², PaLM's
    z-loss (0 when z_loss is 0 or without gradients: evaluation leaves it out); with `groups`
    (`[n]` ids below `num_groups`), each group's summed cross-entropy (`[num_groups]`, else
    empty), without gradient. Never more than `chunk` rows of logits at a time. fp32."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, z_loss, groups, num_groups)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    group_sums = torch.zeros(
        num_groups if groups is not None else 0, dtype=torch.float32, device=hidden.device
    )
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], weight, bias).float()
        if groups is None:
            total += F.cross_entropy(logits, labels[start : start + chunk], reduction="sum")
            continue
        losses = F.cross_entropy(logits, labels[start : start + chunk], reduction="none")
        total += losses.sum()
        group_sums.index_add_(0, groups[start : start + chunk], losses)
    return total, torch.zeros_like(total), group_sums


def linear_cross_entropy_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk: int,
    rows: torch.Tensor,
    num_rows: int,
) -> torch.Tensor:
    """Evaluation only (no gradient): the cross-entropy of each target `i` (as in
    `linear_cross_entropy_sum`) summed into `out[rows[i]]`, `out` of length `num_rows`. fp32."""
    out = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk], weight, bias).float()
        losses = F.cross_entropy(logits, labels[start : start + chunk], reduction="none")
        out.index_add_(0, rows[start : start + chunk], losses)
    return out


def _source_sums(
    batch: dict, losses: torch.Tensor, is_target: torch.Tensor, rows: torch.Tensor, n: int
) -> None:
    """batch["source_loss"]: each source's summed token loss and target count, detached (`losses`
    per position, 0 where not a target; `rows`: each position's row)."""
    sources = batch["source"].index_select(0, rows)
    out = torch.zeros(n, 2, dtype=torch.float32, device=losses.device)  # no bincount: it syncs on GPU
    out.index_add_(0, sources, torch.stack([losses.detach().float(), is_target.float()], 1))
    batch["source_loss"] = out


def fused_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's output head if the chunked loss can stand in for it, else None (see module doc)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    if getattr(model, "is_compiled", False) or inner._compiled_call_impl is not None:
        return None  # torch.compile would guard on the swapped forward and recompile every step
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if type(head) is not torch.nn.Linear:
        return None
    config = getattr(inner, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


def lm_loss_sum(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    chunk: int,
    *,
    by_row: bool = False,
    z_loss: float = 0.0,
    by_source: int = 0,
) -> torch.Tensor:
    """Summed token loss of `model(**inputs)` against `batch["labels"]`: through the chunked,
    target-only head when `chunk` > 0 and the model allows it, else from the full logits.
    `by_row` (evaluation, no gradient): a `[rows]` tensor, each row's summed loss. `z_loss` > 0
    (training): PaLM's z-loss added, z · sum over targets of (log Z)², the log of the softmax's
    normaliser, which keeps the logits from drifting (bf16 stability); that term alone, detached,
    goes to `batch["z_loss"]`, so the trainer logs the cross-entropy and the z-loss apart.
    `by_source` > 1 (training on a mixture of that many sources): each source's cross-entropy sum
    and target count, detached, go to `batch["source_loss"]` (`[by_source, 2]`), by the source of
    each row (`batch["source"]`), from the same per-token values."""
    grouped = by_source > 1 and torch.is_grad_enabled() and not by_row
    head = fused_head(model) if chunk > 0 else None
    if head is None:
        logits = model(**inputs).logits
        if by_row:
            return row_cross_entropy(logits, batch["labels"])
        if not ((z_loss or grouped) and torch.is_grad_enabled()):
            return summed_cross_entropy(logits, batch["labels"])
        # one fp32 copy of the logits for every term (logsumexp's own temporary is transient)
        flat, labels = logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1)
        if grouped:  # per position, for the sums by source
            losses = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="none")
            loss = losses.sum()
            rows = torch.arange(labels.shape[0], device=labels.device) // batch["labels"].shape[1]
            _source_sums(batch, losses, labels != IGNORE_INDEX, rows, by_source)
        else:
            loss = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        if not z_loss:
            return loss
        lse = torch.logsumexp(flat, dim=-1)
        # where, not a product: a non-target position's inf must not make the sum NaN
        z_term = z_loss * torch.where(labels != IGNORE_INDEX, lse.square(), 0.0).sum()
        batch["z_loss"] = z_term.detach()
        return loss + z_term
    labels = batch["labels"].reshape(-1)
    index = batch.get("target_index")
    if index is None:  # a batch not from our collate: find the targets here (a host sync on GPU)
        index = target_index(labels)
    calls = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat, targets, where = hidden.reshape(-1, hidden.shape[-1]), labels, None
        if index.shape[0] != flat.shape[0]:  # shapes are known on the host: no sync
            flat, targets, where = flat.index_select(0, index), labels.index_select(0, index), index
        calls.append(flat.shape[0])
        rows = None
        if by_row or grouped:  # each target's row
            if where is None:
                where = torch.arange(flat.shape[0], device=flat.device)
            rows = torch.div(where, batch["labels"].shape[1], rounding_mode="floor")  # labels: [rows, T]
        if by_row:
            return linear_cross_entropy_rows(
                flat, head.weight, head.bias, targets, chunk, rows, hidden.shape[0]
            )
        groups = batch["source"].index_select(0, rows) if grouped else None
        loss, z_term, group_sums = linear_cross_entropy_z(
            flat, head.weight, head.bias, targets, chunk, z_loss, groups, by_source
        )
        if z_loss and torch.is_grad_enabled():
            batch["z_loss"] = z_term
        if grouped:  # the sums came from the head's own per-token values; the counts here
            counts = group_sums.new_zeros(by_source)
            counts.index_add_(0, groups, torch.ones(groups.shape[0], device=groups.device))
            batch["source_loss"] = torch.stack([group_sums, counts], 1)
        return loss

    head.forward = forward  # an instance attribute: the module's hooks still run around it
    try:
        out = model(**inputs)
    finally:
        del head.forward
    if len(calls) != 1 or out.logits.dim() != (1 if by_row else 0):
        raise RuntimeError(
            f"{type(getattr(model, 'module', model)).__name__} does not call its output head once on the "
            "hidden states; set model.loss_chunk_tokens=0 to compute the loss from full logits"
        )
    return out.logits  # the head's result as the model returned it: through ZeRO-3's backward hooks
