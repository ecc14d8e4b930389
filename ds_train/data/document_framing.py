"""The tokens framing each packed document: the separator after it (EOS, or BERT's [SEP]) and,
where the tokenizer starts every text with one, the BOS before it (`ds-train shard --bos`)."""

from __future__ import annotations

from ds_train.data.corpus_pieces import CorpusError


def document_separator(tokenizer) -> int | None:
    """The token ending each packed document: EOS, or [SEP] for BERT-style tokenizers without one."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


BOS_CHOICES = ("auto", "always", "never")


def document_start(tokenizer, mode: str = "auto") -> int | None:
    """The token starting each packed document, or None.

    auto: BOS when the tokenizer puts one before every text it encodes (Llama, Mistral, Gemma; of
    masked-LM tokenizers RoBERTa's and XLM-R's <s>, DeBERTa's [CLS]), as their own pretraining data
    has it: a model trained without it meets a BOS at the start of every prompt at inference that it
    never saw in training (its embedding still random). Tokenizers that add no BOS (GPT-2, OLMo;
    BERT, whose [CLS] is not its BOS) and those whose BOS is the separator itself (GPT-2's
    <|endoftext|>: the previous document's separator already starts the next) get none.
    always / never: force it (always needs a BOS token)."""
    if mode not in BOS_CHOICES:
        raise CorpusError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {mode!r}")
    bos = tokenizer.bos_token_id
    if mode == "never":
        return None
    if mode == "always":
        if bos is None:
            raise CorpusError("--bos always: the tokenizer has no BOS token")
        return int(bos)
    if bos is None or bos == document_separator(tokenizer):
        return None
    probe = "a b"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    adds_bos = bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)
    return int(bos) if adds_bos else None


def missing_bos_note(sources, tokenizer, key: str) -> str | None:
    """A warning when model.tokenizer puts a BOS before every text it encodes (Llama, Mistral) but
    shards of `key` start their documents without it (made with --bos never, or before --bos
    existed): the trained model would meet that BOS at the start of every prompt at inference."""
    bos = document_start(tokenizer)
    if bos is None:
        return None
    without = [s.location for s in sources if s.sft is None and s.bos_token_id != bos]
    if not without:
        return None
    return (
        f"{key} ({', '.join(without)}): documents start without the BOS token (id {bos}) model.tokenizer "
        "puts before every text it encodes, so the model never trains on what starts every prompt at "
        "inference; re-shard with `ds-train shard` (--bos auto, its default, adds it)"
    )
