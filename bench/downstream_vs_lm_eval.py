"""python bench/downstream_vs_lm_eval.py  (run with a venv that has lm_eval installed, e.g.
    /tmp/lmeval-venv/bin/python bench/downstream_vs_lm_eval.py, ds_train importable via
    PYTHONPATH=. or an editable install)

Checks ds_train/train/downstream.py against lm-evaluation-harness itself: the same tiny random
Llama and tokenizer, the same multiple-choice questions, scored once by lm_eval's HFLM
(`loglikelihood` requests) and once by ds_train's load_tasks + choice_scores. Prints the largest
log-likelihood difference, how many rows agree to 1e-4, whether both split every pair into the
same tokens, and whether acc / acc_norm agree question by question.

lm_eval is not a ds_train dependency: install it in a separate venv (torch first, from the local
CPU wheel), so the project's own venv is left as it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from ds_train.config.schema import ModelSection  # noqa: E402
from ds_train.model.build import build_model, load_hf_config, load_tokenizer  # noqa: E402
from ds_train.objectives.causal_lm import CausalLM  # noqa: E402
from ds_train.train.downstream import choice_scores, load_tasks  # noqa: E402

SEED = 1234
SEQ_LEN = 128  # short on purpose: the long question below is left-truncated on both sides
BATCH = 8
TOL = 1e-4

CODE_CTX = "def add(a, b):\n    '''Return the sum.'''\n    return"
LONG_CTX = " ".join(f"Line {i} says the value is {i * 7 % 13}." for i in range(40)) + "\nSo the answer is"

# Varied on purpose: trailing / no trailing space in the context, leading / no leading space (or
# newline) in the choices, an empty context, multi-line code, one- to many-token choices, 2-5
# choices, punctuation that BPE may merge across the context/choice boundary, and one context
# longer than SEQ_LEN (truncation).
QUESTIONS = [
    {"context": "The cat sat on the", "choices": ["mat", "moon"], "label": 0},
    {"context": "The cat sat on the ", "choices": ["mat", "moon"], "label": 0},
    {"context": "The cat sat on the", "choices": [" mat", " moon"], "label": 0},
    {"context": "The cat sat on the  ", "choices": ["mat", "moon", "roof"], "label": 2},
    {"context": "", "choices": ["Hello world", "Goodbye world"], "label": 0},
    {"context": "", "choices": [" leading space", "no leading space", "x"], "label": 1},
    {"context": "Question: What is 2 + 2?\nAnswer:", "choices": ["4", "5", "22", "four"], "label": 0},
    {"context": "Question: What is 2 + 2?\nAnswer: ", "choices": ["4", "5", "22", "four"], "label": 0},
    {"context": CODE_CTX, "choices": ["a + b", "a - b", "a * b", "b", "None"], "label": 0},
    {"context": CODE_CTX + " ", "choices": ["a + b", "a - b"], "label": 0},
    {"context": "for i in range(10):\n", "choices": ["    print(i)", "print(i)", "\tprint(i)"], "label": 0},
    {"context": "import os\nimport sys\n\n\ndef main():\n", "choices": ["    pass", "pass"], "label": 0},
    {"context": "x = [1, 2, 3]\ny = len(x)\nprint(y)  #", "choices": ["3", "prints 3", "-> 3"], "label": 0},
    {
        "context": "The capital of France is",
        "choices": ["Paris", "London", "Berlin", "Madrid", "Rome"],
        "label": 0,
    },
    {
        "context": "Water boils at",
        "choices": ["100 degrees Celsius at sea level", "50 degrees", "0 degrees Celsius"],
        "label": 0,
    },
    {"context": 'She said: "', "choices": ['hello"', 'goodbye"'], "label": 0},
    {"context": "Call the function f(", "choices": ["x)", "x, y)", ")"], "label": 0},
    {"context": "The URL is https://", "choices": ["example.com", "example.org/path?q=1"], "label": 0},
    {"context": "Numbers: 1, 2, 3,", "choices": ["4", "5, 6", "4, 5, 6, 7, 8"], "label": 0},
    {
        "context": "A sentence ending with a period.",
        "choices": ["Next one.", "\nNew line.", " Spaced."],
        "label": 0,
    },
    {"context": "Tabs\there\t", "choices": ["end", "\tend"], "label": 0},
    {"context": "Unicode: caf", "choices": ["é", "e", "ée"], "label": 0},
    {"context": "Emoji test:", "choices": ["🙂", ":)", "smile"], "label": 0},
    {"context": "Mixed   spaces   inside", "choices": ["ok", "  two leading"], "label": 0},
    {"context": "a", "choices": ["b", "bb", "bbb", "bbbb"], "label": 0},
    {"context": "if x == 1:\n    y = 2\nelse:\n    y =", "choices": ["3", "2", "x"], "label": 0},
    {"context": "Translate to French: cheese =>", "choices": ["fromage", "cheese", "formaggio"], "label": 0},
    {"context": "SELECT * FROM users WHERE", "choices": ["id = 1;", "name LIKE '%a%';"], "label": 0},
    {"context": "Q: Is the sky blue?\nA:\n", "choices": ["Yes", "No"], "label": 0},
    {"context": LONG_CTX, "choices": ["7", "12", "a long answer of several words"], "label": 0},
]


def continuation(choice: str) -> str:
    """What lm-eval's multiple-choice tasks send: target_delimiter (default " ") + the choice;
    ds_train's _encode_pair builds the same."""
    return " " + choice


def build_and_save(directory: Path) -> None:
    # the model as ds_train builds a fresh one (vocab from the tokenizer, seeded init), saved as
    # an HF directory both sides load
    section = ModelSection(
        config=str(ROOT / "configs/model/tiny-llama.json"),
        tokenizer=str(ROOT / "configs/tokenizers/stdlib-bpe-4k"),
    )
    tokenizer = load_tokenizer(section)
    model = build_model(section, load_hf_config(section, tokenizer), seed=SEED, rank=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def lm_eval_scores(directory: Path, pairs: list[tuple[str, str]]) -> tuple[list[float], HFLM]:
    lm = HFLM(pretrained=str(directory), device="cpu", batch_size=BATCH, max_length=SEQ_LEN, dtype="float32")
    requests = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i, metadata=("check", i, 1))
        for i, pair in enumerate(pairs)
    ]
    return [ll for ll, _greedy in lm.loglikelihood(requests, disable_tqdm=True)], lm


def lm_eval_tokens(lm: HFLM, context: str, cont: str) -> tuple[list[int], int]:
    """The tokens lm-eval feeds for one request (its loglikelihood + _loglikelihood_tokens logic),
    to compare splits with ds_train's rows."""
    if context == "":
        cont_enc = lm.tok_encode(cont, add_special_tokens=False)
        ctx_enc, cont_enc = (
            ([lm.prefix_token_id], cont_enc)
            if lm.prefix_token_id != cont_enc[0]
            else (cont_enc[:1], cont_enc[1:])
        )
    else:
        ctx_enc, cont_enc = lm._encode_pair(context, cont)
    return (ctx_enc + cont_enc)[-(lm.max_length + 1) :], len(cont_enc)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # first on ties, as numpy


def main() -> int:
    torch.manual_seed(SEED)
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # a 2-core machine
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "model"
        build_and_save(model_dir)
        task_path = tmp / "check.jsonl"
        task_path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))

        pairs = [(q["context"], continuation(c)) for q in QUESTIONS for c in q["choices"]]
        theirs, lm = lm_eval_scores(model_dir, pairs)

        # ds_train: the same directory loaded with transformers, scored as the trainer does
        tokenizer = load_tokenizer(ModelSection(tokenizer=str(model_dir)))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # bos=None: this tokenizer adds no BOS, so its shards start no document with one
        (task,) = load_tasks([str(task_path)], tokenizer, SEQ_LEN, bos=None)
        pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        ours = choice_scores(
            model, CausalLM(eos_id=None), task.rows, BATCH, lambda b: b, torch.device("cpu"), 0, 1, pad_id
        ).tolist()

        diffs = [abs(a - b) for a, b in zip(ours, theirs)]
        same_tokens = 0
        print(
            f"lm_eval HFLM max_length={lm.max_length}, prefix_token_id={lm.prefix_token_id}, "
            f"add_bos_token={lm.add_bos_token}; ds_train seq_len={SEQ_LEN}"
        )
        print(f"{len(QUESTIONS)} questions, {len(pairs)} (context, choice) rows")
        for i, ((ctx, cont), row) in enumerate(zip(pairs, task.rows)):
            tokens, n_cont = lm_eval_tokens(lm, ctx, cont)
            split_ok = tokens == row.tokens.tolist() and n_cont == row.choice_tokens
            same_tokens += split_ok
            if diffs[i] > TOL or not split_ok:
                print(
                    f"  row {i}: ctx={ctx[-30:]!r} cont={cont!r} ds_train={ours[i]:.6f} lm_eval={theirs[i]:.6f} "
                    f"same tokens={split_ok} (ds_train {row.choice_tokens} choice tokens of {len(row.tokens)}, "
                    f"lm_eval {n_cont} of {len(tokens)})"
                )
        print(f"max |ds_train - lm_eval| log-likelihood: {max(diffs):.3e}")
        print(f"rows agreeing to {TOL:g}: {sum(d <= TOL for d in diffs)}/{len(diffs)}")
        print(f"rows split into identical tokens: {same_tokens}/{len(pairs)}")

        acc_same = norm_same = right = right_norm = 0
        at = 0
        for qi, q in enumerate(QUESTIONS):
            n = len(q["choices"])
            chars = [len(c) for c in q["choices"]]  # lm-eval's acc_norm: per character of the choice
            picks = []
            for ll in (ours[at : at + n], theirs[at : at + n]):
                picks.append((argmax(ll), argmax([x / max(c, 1) for x, c in zip(ll, chars)])))
            acc_same += picks[0][0] == picks[1][0]
            norm_same += picks[0][1] == picks[1][1]
            right += picks[0][0] == q["label"]
            right_norm += picks[0][1] == q["label"]
            if picks[0] != picks[1]:
                print(f"  question {qi}: ds_train picks (acc, acc_norm)={picks[0]}, lm_eval {picks[1]}")
            at += n
        nq = len(QUESTIONS)
        print(f"acc argmax agrees: {acc_same}/{nq}; acc_norm argmax agrees: {norm_same}/{nq}")
        print(f"(random model) ds_train acc={right / nq:.3f} acc_norm={right_norm / nq:.3f}")

        ok = max(diffs) <= TOL and same_tokens == len(pairs) and acc_same == norm_same == nq
        print("AGREE" if ok else "DISAGREE")
        return 0 if ok and not math.isnan(max(diffs)) else 1


if __name__ == "__main__":
    sys.exit(main())
