"""data.downstream in a 2-rank ZeRO-3 pretraining run without validation shards: each evaluation
logs the tasks' accuracies, they can pick the best checkpoint, and the final ones equal what the
exported model scores on its own, question by question."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_train.train.downstream import load_tasks, task_record
from tests.helpers import base_config, read_metrics, torchrun, write_config
from tests.unit.test_downstream import QUESTIONS, _reference

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_pretraining_scores_tasks_at_each_evaluation(tmp_path, shards):
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS + QUESTIONS[:3]))  # 7 questions, 19 rows
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "r.yaml",
        base_config(
            run,
            shards,
            data={"downstream": [str(quiz)]},
            train={
                "max_steps": 6,
                "eval_every": 3,
                "save_every": 3,
                "keep_last": 1,
                "keep_best": True,
                "best_metric": "downstream/quiz/acc_norm",
                "export_hf": True,
                "lr": 5e-3,
            },
            zero={"stage": 3},
        ),
    )
    proc = torchrun(["pretrain", cfg])
    assert "data.downstream: quiz, 7 questions (chance 0.452)" in proc.stderr
    evals = [r for r in read_metrics(run) if "downstream/quiz/acc" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        assert "valid_loss" not in r
        assert r["downstream/quiz/acc"] * 7 == pytest.approx(round(r["downstream/quiz/acc"] * 7))
    # the final evaluation equals the exported model's own scores, row by row
    tokenizer = AutoTokenizer.from_pretrained(str(run / "hf"))
    (task,) = load_tasks(
        [str(quiz)], tokenizer, seq_len=32, bos=None
    )  # the shards start no document with BOS
    model = AutoModelForCausalLM.from_pretrained(str(run / "hf"), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        scores = _reference(model, task.rows)
    expected = task_record([task], scores)
    # a question whose two best choices are within float noise may go either way on ZeRO-3's sums
    near, at = 0, 0
    for n in task.choices:
        for per in (1, 0):  # acc, then acc_norm's per-character scores
            top = sorted(scores[at + k] / (task.choice_chars[at + k] if not per else 1) for k in range(n))
            near += top[-1] - top[-2] < 1e-4
        at += n
    for key in ("downstream/quiz/acc", "downstream/quiz/acc_norm"):
        assert abs(evals[-1][key] - expected[key]) <= near / 7
    best = max(evals, key=lambda r: r["downstream/quiz/acc_norm"])  # ties: the first, as kept
    assert (run / "checkpoints" / f"step_{best['step']:08d}").is_dir()
