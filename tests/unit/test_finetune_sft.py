"""SFT data: loss only on response tokens (checked token by token), packing keeps examples apart,
chat templates (the tokenizer's and the plain one) locate the assistant turns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ds_train.config.schema import FinetuneSection
from ds_train.finetune.chat import ChatFormat
from ds_train.finetune.encode import encode_split
from ds_train.finetune.records import SplitSpec
from ds_train.finetune.sft import SupervisedFineTuning
from ds_train.objectives.base import IGNORE_INDEX
from tests.helpers import TOKENIZER

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER))


@pytest.fixture(scope="module")
def chatml_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _encode(tmp_path, rows, tokenizer, **options):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = FinetuneSection(task="sft", train_file=str(path), **options)
    chat = ChatFormat(tokenizer, section.chat_template)
    arrays, stats = encode_split(
        section, SplitSpec([str(path)]).examples(), tokenizer, class_names=[], chat=chat
    )
    batch = SupervisedFineTuning().collate(arrays, np.arange(len(arrays["tokens"])))
    return arrays, stats, batch


def _examples_in_rows(arrays):
    """(row, start, end) of each packed example, from the positions restarting at 0."""
    out = []
    for r, (positions, count) in enumerate(zip(arrays["positions"], arrays["examples"])):
        starts = np.flatnonzero(positions == 0)[:count]
        ends = [*starts[1:], None]
        for s, e in zip(starts, ends):
            if e is None:  # the last example ends where the padding (another position run) starts
                e = s + 1
                while e < len(positions) and positions[e] == e - s:
                    e += 1
            out.append((r, int(s), int(e)))
    return out


PROMPTS = [
    {"prompt": "What does `json.dumps` do?", "response": "Serialize obj to a JSON formatted str."},
    {"prompt": "Name a sorting function.", "response": "sorted", "system": "Answer in one word."},
    {"prompt": "And the length of a list?", "response": "len(list) returns it."},
    {"prompt": "Say nothing useful at length please.", "response": "Fine."},
]


def test_loss_only_on_response_tokens_token_by_token(tmp_path, tokenizer):
    arrays, stats, batch = _encode(tmp_path, PROMPTS, tokenizer, seq_len=96)
    assert stats["examples"] == 4 and stats["dropped_no_target"] == 0
    assert len(arrays["tokens"]) < 4, "short examples must be packed several to a row"
    tokens, labels = arrays["tokens"].astype(np.int64), batch["labels"].numpy()
    spans = _examples_in_rows(arrays)
    assert len(spans) == 4
    for (r, s, e), example in zip(spans, _row_order(arrays)):
        row_labels = labels[r]
        targeted, untargeted = [], []
        for t in range(s, e):  # token t is predicted from position t - 1
            is_target = t > 0 and row_labels[t - 1] != IGNORE_INDEX
            if is_target:
                assert row_labels[t - 1] == tokens[r, t], "a label must be the next token"
            (targeted if is_target else untargeted).append(int(tokens[r, t]))
        response = PROMPTS[example]["response"] + tokenizer.eos_token
        assert tokenizer.decode(targeted) == response
        prompt_text = tokenizer.decode(untargeted)
        assert PROMPTS[example]["prompt"] in prompt_text and PROMPTS[example]["response"] not in prompt_text
    # nothing outside the examples (padding) is a target, and the count matches
    assert int(batch["num_targets"]) == int((labels != IGNORE_INDEX).sum()) == stats["target_tokens"]


def _row_order(arrays):
    """Example index of each packed example, in row/column order (rows keep their examples' input order)."""
    order = []
    for r, count in enumerate(arrays["examples"]):
        first = int(arrays["origin"][r])
        order.extend(range(first, first + int(count)))
    return order


def test_positions_restart_per_example_and_attention_stays_inside(tmp_path, tokenizer):
    """Packed rows give the same per-example logits as the examples run one by one."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    arrays, _, batch = _encode(tmp_path, PROMPTS, tokenizer, seq_len=96)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_cache=False,  # as in training: with a KV cache transformers ignores packed positions
        ),
        attn_implementation="sdpa",
    ).eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        for r, s, e in _examples_in_rows(arrays):
            e = min(e, batch["input_ids"].shape[1])
            alone = model(input_ids=batch["input_ids"][r : r + 1, s:e]).logits[0]
            torch.testing.assert_close(packed[r, s:e], alone, atol=1e-5, rtol=1e-4)


def test_unpacked_rows_hold_one_example_each(tmp_path, tokenizer):
    arrays, _, batch = _encode(tmp_path, PROMPTS, tokenizer, seq_len=96, packing=False)
    assert len(arrays["tokens"]) == 4 and (arrays["examples"] == 1).all()
    assert int(batch["num_targets"]) > 0


def test_train_on_inputs_targets_everything_but_example_starts(tmp_path, tokenizer):
    arrays, _, _batch = _encode(tmp_path, PROMPTS, tokenizer, seq_len=96, train_on_inputs=True)
    for r, s, e in _examples_in_rows(arrays):
        targets = arrays["targets"][r, s:e]
        assert targets[0] == 0 and targets[1:].all()


def test_truncation_and_examples_without_response_tokens(tmp_path, tokenizer):
    long_prompt = {"prompt": "word " * 200, "response": "ok"}
    arrays, stats, _ = _encode(
        tmp_path, [long_prompt, {"prompt": "Hi?", "response": "Hello."}], tokenizer, seq_len=32
    )
    assert stats["truncated"] == 1 and stats["dropped_no_target"] == 1  # the response fell off the end
    assert len(arrays["where"]) == 1 and arrays["where"][0].tolist() == [0, 2]  # file 0, line 2 survived


def test_tokenizer_chat_template_multi_turn(tmp_path, chatml_tokenizer):
    convo = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
        ]
    }
    arrays, _, batch = _encode(tmp_path, [convo], chatml_tokenizer, seq_len=96)
    tokens, labels = arrays["tokens"][0].astype(np.int64), batch["labels"][0].numpy()
    targeted = [int(tokens[t + 1]) for t in np.flatnonzero(labels != IGNORE_INDEX)]
    # each assistant turn's content and end-of-turn marker (+ the template's newline after it)
    assert chatml_tokenizer.decode(targeted) == "Hello!<|im_end|>\nFour.<|im_end|>\n"


def test_plain_template_matches_its_exported_jinja(tokenizer):
    """The exported tokenizer formats prompts at inference exactly as training did."""
    from transformers import AutoTokenizer

    chat = ChatFormat(tokenizer, "auto")
    assert chat.name == "plain"
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"},
    ]
    rendered = chat.render(messages)
    exported = AutoTokenizer.from_pretrained(str(TOKENIZER))
    exported.chat_template = chat.export_template()
    assert exported.apply_chat_template(messages, tokenize=False) == rendered.text
    prompt = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered.text + "### Assistant:\n"


def test_a_template_that_rewrites_earlier_turns_is_refused_before_training(tmp_path):
    from transformers import AutoTokenizer

    from ds_train.data.shard_set import DataError
    from ds_train.finetune.records import check_examples, split_specs

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    # numbers every turn by the conversation's length: earlier turns change as it grows
    tok.chat_template = "{% for m in messages %}[{{ messages | length }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    section = FinetuneSection(task="sft", train_file=str(path))
    with pytest.raises(
        DataError, match=r"chat\.jsonl:1: the tokenizer's chat template renders .*chat_template=plain"
    ):
        check_examples(section, split_specs(section), ChatFormat(tok, "auto"))
