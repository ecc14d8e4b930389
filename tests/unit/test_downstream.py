"""data.downstream: multiple-choice tasks scored by log-likelihood at each evaluation. The pairs
are split as lm-evaluation-harness splits them, the scores equal a plain forward's
log-probabilities row by row (through the chunked head and padding, on 1 and 2 ranks), and acc /
acc_norm pick what they should."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ds_train.config import ConfigError, load_config
from ds_train.objectives.causal_lm import CausalLM
from ds_train.train import pretrain
from ds_train.train.best_metric import evaluation_figures
from ds_train.train.downstream import (
    MultipleChoiceTask,
    ScoredRow,
    _encode_pair,
    _padded_length,
    choice_scores,
    load_tasks,
    task_record,
)
from tests.helpers import MICRO_LLAMA, TOKENIZER, base_config, run_on_gloo_ranks, write_config

QUESTIONS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon", "floor of the house"], "label": 0},
    {"context": "def add(a, b):\n    return ", "choices": ["a + b", "a - b"], "label": 0},
    {"context": "Return the number of items in ", "choices": ["the list.", "a"], "label": 1},
    {"context": "", "choices": ["Hello", "world"], "label": 1},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _write(path, questions) -> str:
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return str(path)


def test_pairs_split_where_the_context_ends(tokenizer):
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tokens, n = _encode_pair(tokenizer, [], "The cat sat", "on the mat")
    assert tokens == enc("The cat sat on the mat")
    assert tokenizer.decode(tokens[-n:]) == " on the mat"  # lm-eval's target delimiter, one space
    # as lm-eval: the context's trailing space moves to the choice, after the delimiter's
    tokens, n = _encode_pair(tokenizer, [], "The cat sat ", "on the mat")
    assert tokens == enc("The cat sat  on the mat") and n == len(tokens) - len(enc("The cat sat"))
    assert _encode_pair(tokenizer, [7], "Q", "A")[0][0] == 7  # the documents' BOS comes first


def test_empty_or_blank_contexts_score_after_the_prefix_token(tmp_path, tokenizer):
    """lm-eval scores a choice with no context after its prefix token (BOS, else EOS); a context
    of spaces alone, moved to the choice, leaves none either."""
    path = _write(
        tmp_path / "q.jsonl",
        [{"context": c, "choices": ["Hello", "world"], "label": 0} for c in ("", "  \n")],
    )
    (task,) = load_tasks([path], tokenizer, seq_len=64, bos=None)
    for row in task.rows:
        assert row.tokens[0] == tokenizer.bos_token_id and len(row.tokens) == row.choice_tokens + 1
    (task,) = load_tasks([path], tokenizer, seq_len=64, bos=5)
    assert all(row.tokens[0] == 5 for row in task.rows)


def test_a_choice_with_no_token_of_its_own_names_file_and_line(tmp_path):
    """A tokenizer that drops whitespace leaves a choice of spaces nothing to score."""

    class NoSpaces:
        bos_token_id, eos_token_id = None, 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text if not c.isspace()]}

    questions = [
        {"context": "a", "choices": ["b", "c"], "label": 0},
        {"context": "a", "choices": ["b", " "], "label": 0},
    ]
    path = _write(tmp_path / "q.jsonl", questions)
    with pytest.raises(
        ConfigError, match=f"data.downstream {path}:2: the choice .* encodes to no token of its own"
    ):
        load_tasks([path], NoSpaces(), seq_len=64, bos=None)


def test_load_tasks_reads_limits_and_truncates(tmp_path, tokenizer):
    path = _write(tmp_path / "quiz.jsonl", QUESTIONS)
    (task,) = load_tasks([path], tokenizer, seq_len=64, bos=None)
    assert task.name == "quiz" and task.labels == [0, 0, 1, 1] and task.choices == [3, 2, 2, 2]
    assert task.choice_chars[:3] == [3, 4, 18] and len(task.rows) == 9
    (two,) = load_tasks([path], tokenizer, seq_len=64, bos=None, max_examples=2)
    assert two.labels == [0, 0]
    long = _write(tmp_path / "long.jsonl", [{"context": "word " * 200, "choices": ["a b", "c"], "label": 0}])
    (task,) = load_tasks([long], tokenizer, seq_len=16, bos=None)
    row = task.rows[0]
    full, n = _encode_pair(tokenizer, [], "word " * 200, "a b")
    assert (
        row.tokens.tolist() == full[-17:] and row.choice_tokens == n
    )  # the context's end kept, the choice whole


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "expected a JSON object with context, choices and label"),
        ('{"context": "a", "choices": ["b"], "label": 0}', "choices two or more texts"),
        ('{"context": "a", "choices": ["b", ""], "label": 0}', "choices two or more texts"),
        ('{"context": "a", "choices": ["b", "c"], "label": 2}', r"label must index choices \(0..1\)"),
        ('{"context": "a", "choices": ["b", "c"]}', "expected a JSON object"),
    ],
)
def test_malformed_questions_name_file_and_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QUESTIONS[0]) + "\n\n" + line + "\n")
    with pytest.raises(ConfigError, match=f"data.downstream {path}:3: .*{message}"):
        load_tasks([str(path)], tokenizer, seq_len=64, bos=None)


def test_task_files_are_checked_before_the_start(tmp_path, shards, tokenizer):
    good = _write(tmp_path / "quiz.jsonl", QUESTIONS)
    cfg_file = write_config(tmp_path / "r.yaml", base_config(tmp_path / "run", shards))
    assert pretrain.check(load_config(cfg_file, [f"data.downstream=[{good}]"]), world_size=2)
    for override, message in [
        (f"data.downstream=[{tmp_path / 'nope.jsonl'}]", "data.downstream: no such file"),
        (f"data.downstream={good}", "data.downstream: expected a list"),
        ("data.downstream=[1]", "data.downstream must be a list of JSON-lines files"),
        (f"data.downstream=[{good}, {tmp_path / 'x' / 'quiz.jsonl'}]", "no such file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pretrain.check(load_config(cfg_file, [override]), world_size=2)
    (tmp_path / "x").mkdir()
    _write(tmp_path / "x" / "quiz.jsonl", QUESTIONS)
    with pytest.raises(ConfigError, match="two files share a task name"):
        pretrain.check(
            load_config(cfg_file, [f"data.downstream=[{good}, {tmp_path / 'x' / 'quiz.jsonl'}]"]),
            world_size=2,
        )
    masked = load_config(cfg_file, [f"data.downstream=[{good}]", "model.objective=masked_lm"])
    with pytest.raises(ConfigError, match="causal_lm only"):
        pretrain.check(masked, world_size=2)
    # the tasks' figures are what train.best_metric may name; without data.valid, only they
    cfg = load_config(cfg_file, [f"data.downstream=[{good}]"])
    assert evaluation_figures(cfg, None) == {"downstream/quiz/acc", "downstream/quiz/acc_norm"}
    cfg.data.valid = str(shards / "valid")
    assert {"downstream/quiz/acc", "downstream/quiz/acc_norm", "valid_loss"} <= evaluation_figures(cfg, None)


def _model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(MICRO_LLAMA))).eval()


def _reference(model, rows: list[ScoredRow]) -> list[float]:
    """Each row alone, unpadded, through the full logits."""
    out = []
    for r in rows:
        t = torch.from_numpy(r.tokens.astype("int64"))[None]
        logp = torch.log_softmax(model(input_ids=t[:, :-1]).logits.double(), -1)[0]
        targets = t[0, 1:]
        picked = logp[torch.arange(len(targets)), targets]
        out.append(float(picked[-r.choice_tokens :].sum()))
    return out


@pytest.mark.parametrize("chunk", [0, 16])
def test_scores_equal_each_rows_own_forward(tmp_path, tokenizer, chunk):
    (task,) = load_tasks([_write(tmp_path / "quiz.jsonl", QUESTIONS)], tokenizer, seq_len=64, bos=None)
    model = _model()
    objective = CausalLM(eos_id=None, loss_chunk_tokens=chunk)
    with torch.no_grad():
        scores = choice_scores(model, objective, task.rows, 3, lambda b: b, torch.device("cpu"), 0, 1, 0)
        expected = _reference(model, task.rows)
    assert scores.tolist() == pytest.approx(expected, rel=1e-5)


def _two_ranks(rank: int, world: int, rows: list[ScoredRow], out: str) -> None:
    model = _model()
    scores = choice_scores(
        model, CausalLM(eos_id=None), rows, 2, lambda b: b, torch.device("cpu"), rank, world, 0
    )
    if rank == 0:
        torch.save(scores, out)


def test_two_ranks_score_every_row_once(tmp_path, tokenizer):
    """9 rows on 2 ranks of 2: the last global batch leaves rank 1 a padding forward."""
    (task,) = load_tasks([_write(tmp_path / "quiz.jsonl", QUESTIONS)], tokenizer, seq_len=64, bos=None)
    run_on_gloo_ranks(_two_ranks, 2, task.rows, str(tmp_path / "scores.pt"))
    with torch.no_grad():
        expected = _reference(_model(), task.rows)
    assert torch.load(tmp_path / "scores.pt").tolist() == pytest.approx(expected, rel=1e-5)


def test_acc_takes_the_likeliest_choice_and_acc_norm_the_likeliest_per_character():
    task = MultipleChoiceTask("quiz", choices=[2, 2], labels=[1, 0], choice_chars=[2, 10, 4, 4])
    # question 1: choice 0 likelier in total (-4 > -6), choice 1 per character (-0.6 > -2)
    # question 2: choice 0 likelier either way
    record = task_record([task], [-4.0, -6.0, -1.0, -3.0])
    assert record == {"downstream/quiz/acc": 0.5, "downstream/quiz/acc_norm": 1.0}
    other = MultipleChoiceTask("other", choices=[3], labels=[2], choice_chars=[1, 1, 1])
    both = task_record([task, other], [-4.0, -6.0, -1.0, -3.0, -5.0, -5.0, -0.5])
    assert both["downstream/other/acc"] == 1.0 and both["downstream/quiz/acc"] == 0.5


def test_the_trainer_scores_tasks_without_validation_shards():
    """data.downstream alone makes an evaluation: the record holds the tasks' figures."""
    from ds_train.train.trainer import Trainer

    calls = []
    stand_in = SimpleNamespace(
        eval_batches=None,
        downstream=lambda engine, to_device: (
            calls.append((engine, to_device)) or {"downstream/quiz/acc": 0.75}
        ),
        _to_device=lambda batch: batch,
        engine=SimpleNamespace(eval=lambda: None, train=lambda: None),
        step=4,
        best=SimpleNamespace(update=lambda record, step: False),
        s=SimpleNamespace(keep_best=False),
        ctx=SimpleNamespace(is_main=False),
    )
    record = Trainer.evaluate(stand_in)
    assert record == {"step": 4, "downstream/quiz/acc": 0.75}
    assert calls == [(stand_in.engine, stand_in._to_device)]  # the trainer's own batch mover


def test_console_line_and_fine_tuning(capsys):
    from ds_train.config.validate_finetune import validate_finetune
    from ds_train.train.callbacks.progress import Progress

    bar = Progress.__new__(Progress)
    bar.bar = None
    bar.on_eval(None, {"step": 6, "downstream/quiz/acc": 0.5, "downstream/quiz/acc_norm": 0.25})
    assert capsys.readouterr().err == "eval step 6: quiz/acc 0.500, quiz/acc_norm 0.250\n"
    bar.on_eval(None, {"step": 6, "valid_loss": 2.0, "downstream/quiz/acc": 0.5})
    assert capsys.readouterr().err == "eval step 6: valid_loss 2.0000 | quiz/acc 0.500\n"
    cfg = SimpleNamespace(
        train=SimpleNamespace(batch_ramp=[]), data=SimpleNamespace(downstream=["q.jsonl"]), finetune=None
    )
    with pytest.raises(ConfigError, match="data.downstream .* is scored in ds-train pretrain runs"):
        validate_finetune(cfg)


def test_report_summarises_each_task(tmp_path):
    from ds_train.report.plots import summary
    from ds_train.report.series import load_run_metrics

    lines = [{"step": s, "loss": 3.0, "interval_steps": 1} for s in (1, 2, 3, 4)]
    lines += [{"step": 2, "downstream/quiz/acc": 0.5}, {"step": 4, "downstream/quiz/acc": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    metrics = load_run_metrics(tmp_path)
    assert metrics.downstream["quiz/acc"].steps == [2, 4] and not len(metrics.valid_loss)
    assert "downstream quiz/acc: 0.2500 at step 4 (best 0.5000 at step 2)" in summary(metrics)


def test_batches_pad_to_powers_of_two_within_the_longest_row():
    assert [_padded_length(n, 2048) for n in (5, 32, 33, 100, 1500)] == [32, 32, 64, 128, 2048]
    assert _padded_length(900, 1000) == 1000  # never past seq_len: a model's positions end there


def test_task_accuracies_are_higher_is_better_whatever_the_names():
    from ds_train.train.best_metric import lower_is_better

    assert not lower_is_better("downstream/apple_qa/acc")  # "ppl" inside the task name
    assert not lower_is_better("downstream/glossary/acc_norm")  # "loss" inside it
    assert (
        lower_is_better("valid_loss") and lower_is_better("valid_loss/apple") and lower_is_better("valid_ppl")
    )
    assert not lower_is_better("valid_accuracy") and not lower_is_better("valid_macro_f1")
