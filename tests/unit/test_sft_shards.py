"""`ds-train shard --sft`: the shards keep the SFT loss mask, token for token what the JSON-lines
fine-tuning path computes, stock webdataset reads them, and the finetune reader gives back the same
batches (tokens, labels, positions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_train.config.schema import FinetuneSection
from ds_train.data.reader import RowReader
from ds_train.data.sft_sharding import shard_sft
from ds_train.data.shard_set import load_shard_set
from ds_train.data.sharding import ShardOptions
from ds_train.finetune.chat import ChatFormat
from ds_train.finetune.encode import encode_split
from ds_train.finetune.records import SplitSpec
from ds_train.finetune.sft import SupervisedFineTuning
from ds_train.finetune.shard_examples import ShardMasks
from tests.helpers import TOKENIZER
from tests.unit.test_finetune_sft import CHATML

EXAMPLES = [
    {"prompt": "What does `json.dumps` do?", "response": "Serialize obj to a JSON formatted str."},
    {"prompt": "Name a sorting function.", "response": "sorted", "system": "Answer in one word."},
    {"prompt": "And the length of a list?", "response": "len(list) returns it."},
    {
        "messages": [
            {"role": "user", "content": "Two turns?"},
            {"role": "assistant", "content": "Yes."},
            {"role": "user", "content": "And the second?"},
            {"role": "assistant", "content": "It is also a target."},
        ]
    },
    {"prompt": "Say nothing useful at length please.", "response": "Fine."},
] * 3


@pytest.fixture(scope="module", params=["plain", "chatml"])
def tokenizer(request):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    if request.param == "chatml":
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = CHATML
    return tok


def _jsonl(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    return path


def _jsonl_arrays(path, tokenizer, seq_len):
    """What `ds-train finetune` with finetune.train_file builds from the same lines."""
    section = FinetuneSection(task="sft", train_file=str(path), seq_len=seq_len)
    chat = ChatFormat(tokenizer, "auto")
    arrays, _ = encode_split(section, SplitSpec([str(path)]).examples(), tokenizer, class_names=[], chat=chat)
    return arrays


def _stock_read(directory):
    """Every block of every shard through the stock webdataset reader, in shard order."""
    import webdataset as wds

    manifest = json.loads((directory / "index.json").read_text())
    urls = [str(directory / s["name"]) for s in manifest["shards"]]
    tokens, masks, starts = [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        tokens.append(sample["tokens.npy"])
        masks.append(sample["mask.npy"])
        starts.extend(sample["json"]["doc_starts"])
    return manifest, np.concatenate(tokens), np.concatenate(masks), starts


SEQ_LEN = 96  # no example is truncated


def test_sft_shards_keep_the_finetune_mask_token_by_token(tmp_path, tokenizer):
    path = _jsonl(tmp_path)
    opts = ShardOptions(seq_len=SEQ_LEN, rows_per_shard=2, member_bytes=2 * (SEQ_LEN + 1) * 2, progress=False)
    manifests = shard_sft([str(path)], tmp_path / "out", tokenizer, opts)
    ref = _jsonl_arrays(path, tokenizer, SEQ_LEN)

    manifest, tokens, masks, starts = _stock_read(tmp_path / "out" / "train")
    assert manifests["train"]["total_rows"] == len(tokens) == len(ref["tokens"])
    assert manifest["sft"]["chat_template"] == ChatFormat(tokenizer, "auto").name
    assert len(manifest["shards"]) > 1  # blocks and shards are cut, masks stay aligned
    assert masks.dtype == np.uint8 and masks.shape == tokens.shape == (len(tokens), SEQ_LEN + 1)
    np.testing.assert_array_equal(tokens, ref["tokens"])
    np.testing.assert_array_equal(masks, ref["targets"])  # token by token, 0 on prompts/templates
    for r, (row_starts, positions, count) in enumerate(zip(starts, ref["positions"], ref["examples"])):
        assert row_starts == np.flatnonzero(positions == 0)[:count].tolist(), r
    assert manifest["total_documents"] == int(ref["examples"].sum())

    # independently of the finetune code: the masked tokens of each example are its responses
    responses = []
    for ex in EXAMPLES:
        if "messages" in ex:
            responses += [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        else:
            responses.append(ex["response"])
    masked_text = "".join(
        tokenizer.decode(tokens[r][masks[r] == 1].tolist(), skip_special_tokens=True)
        for r in range(len(tokens))
    )
    unmasked_text = "".join(
        tokenizer.decode(tokens[r][masks[r] == 0].tolist(), skip_special_tokens=True)
        for r in range(len(tokens))
    )
    masked_text = masked_text.replace("\n", "")  # chatml: the newline after <|im_end|> is a target
    # first-fit packing reorders examples across rows: compare as multisets of responses
    assert len(masked_text) == sum(len(r) for r in responses)
    for response in set(responses):
        assert masked_text.count(response) == responses.count(response), response
    for ex in EXAMPLES:
        for prompt in [ex.get("prompt")] + [
            m["content"] for m in ex.get("messages", []) if m["role"] == "user"
        ]:
            if prompt:
                assert prompt not in masked_text and prompt in unmasked_text


def test_finetune_reader_gives_the_jsonl_batches(tmp_path, tokenizer):
    path = _jsonl(tmp_path)
    opts = ShardOptions(seq_len=SEQ_LEN, rows_per_shard=4, progress=False)
    shard_sft([str(path)], tmp_path / "out", tokenizer, opts)
    ref = _jsonl_arrays(path, tokenizer, SEQ_LEN)
    shard_set = load_shard_set(str(tmp_path / "out" / "train"))
    assert shard_set.sft is not None
    n = shard_set.num_rows
    shard = np.repeat(np.arange(len(shard_set.rows)), shard_set.rows)
    row = np.concatenate([np.arange(k) for k in shard_set.rows])
    source = np.zeros(n, dtype=np.int64)
    reader = RowReader([shard_set], None)
    tokens, _ = reader.read(source, shard, row)
    targets, positions, lost = ShardMasks(reader).read(source, shard, row)
    assert not lost.any()
    sft = SupervisedFineTuning()
    got = sft.collate({"tokens": tokens, "targets": targets, "positions": positions}, np.arange(n))
    want = sft.collate(ref, np.arange(n))
    for key in ("input_ids", "labels", "num_targets"):
        assert got[key].equal(want[key]), key
    # positions agree on every example token (the padding tail only continues the last example)
    for r in range(n):
        zeros = np.flatnonzero(ref["positions"][r] == 0)
        end = zeros[ref["examples"][r]] if len(zeros) > ref["examples"][r] else SEQ_LEN + 1
        np.testing.assert_array_equal(positions[r, :end], ref["positions"][r, :end])


def test_sft_valid_split_and_bad_example_names_the_line(tmp_path, tokenizer):
    from ds_train.data.corpus_pieces import CorpusError

    path = _jsonl(tmp_path)
    manifests = shard_sft(
        [str(path)],
        tmp_path / "out",
        tokenizer,
        ShardOptions(seq_len=SEQ_LEN, valid_fraction=0.4, progress=False),
    )
    assert set(manifests) == {"train", "valid"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: no 'messages' and no 'prompt' field"):
        shard_sft([str(bad)], tmp_path / "out2", tokenizer, ShardOptions(seq_len=SEQ_LEN, progress=False))


def test_a_corrupt_sft_shard_is_named_or_skipped_with_data_skip_corrupt(tmp_path, tokenizer):
    import torch

    from ds_train.data.loader import build_plan
    from ds_train.data.shard_set import DataError
    from ds_train.distributed.deepspeed_config import BatchLayout
    from ds_train.finetune.shard_examples import SftShardBatches

    opts = ShardOptions(seq_len=SEQ_LEN, rows_per_shard=4, progress=False)
    shard_sft([str(_jsonl(tmp_path))], tmp_path / "out", tokenizer, opts)
    plan = build_plan(str(tmp_path / "out" / "train"), seed=0, shuffle=False, window=1)
    rows = plan.sources[0].rows
    assert len(rows) >= 2
    broken = tmp_path / "out" / "train" / plan.sources[0].names[1]
    broken.write_bytes(broken.read_bytes()[:700])  # cut short inside its first member
    n = int(rows[0]) + int(rows[1])  # shard 0 whole, then shard 1
    layout = BatchLayout(n, n, 1, 1)
    objective = SupervisedFineTuning()
    with pytest.raises(DataError, match=plan.sources[0].names[1]):
        SftShardBatches(plan, layout, 0, 0, objective, None).batch_at(np.arange(n), 0)
    batch = SftShardBatches(plan, layout, 0, 0, objective, None, skip_corrupt=True).batch_at(np.arange(n), 0)
    assert int(batch["skipped"]) == int(rows[1])  # shard 1's rows, counted
    has_targets = (batch["labels"] != -100).any(dim=1)
    assert has_targets[: int(rows[0])].all() and not has_targets[int(rows[0]) :].any()
    assert batch["num_targets"] == (batch["labels"] != -100).sum()
    intact = SftShardBatches(plan, layout, 0, 0, objective, None).batch_at(np.arange(int(rows[0])), 0)
    assert torch.equal(intact["labels"], batch["labels"][: int(rows[0])])  # shard 0 as without the fault
    # a damaged byte in a loss mask's .npy header (numpy's tokenizer raised TokenError before)
    first = tmp_path / "out" / "train" / plan.sources[0].names[0]
    data = first.read_bytes()
    mask_header = data.index(b"{'descr'", data.index(b".mask.npy"))
    first.write_bytes(data[:mask_header] + data[mask_header:].replace(b"}", b"(", 1))
    with pytest.raises(DataError, match=rf"{first.name}: member .* unreadable SFT mask or metadata"):
        SftShardBatches(plan, layout, 0, 0, objective, None).batch_at(np.arange(int(rows[0])), 0)
