"""The embedded default, end to end, on any machine without network:

stdlib docstrings → corpus.jsonl → shards (train/valid) → 2-rank ZeRO-3 pretraining of a tiny Llama
→ checkpoint → Hugging Face export (when `ds-train convert` is available) → fine-tuning (a
pretrained MiniLM classifier vs random init; SFT of the tiny Llama) → a summary of where
everything went. Each stage runs the same commands a user would (`ds-train shard`, a launcher,
`ds-train convert`), as subprocesses, so the demo exercises the real entry points.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ds_train.config.loader import repo_configs_dir

RUN_CONFIG = "runs/demo-tiny-llama.yaml"


def run_demo(out: Path, *, steps: int | None, nproc: int, keep: bool, finetune: bool = True) -> int:
    out = out.absolute()
    repo = repo_configs_dir().parent
    corpus, shards, run_dir, hf_dir = out / "corpus.jsonl", out / "shards", out / "pretrain", out / "hf"
    t0 = time.time()

    if not corpus.is_file():
        from ds_train.demo.corpus import write_corpus

        _say(f"1/6 corpus: writing Python {sys.version.split()[0]} stdlib docstrings to {corpus}")
        n = write_corpus(corpus)
        _say(f"    {n:,} documents")
    else:
        _say(f"1/6 corpus: {corpus} (exists)")

    tokenizer_dir = repo_configs_dir() / "tokenizers" / "stdlib-bpe-4k"
    if not _shards_match(shards, tokenizer_dir):
        _say(f"2/6 shards: tokenizing and packing into {shards}")
        shutil.rmtree(shards, ignore_errors=True)
        _ds(
            [
                "shard",
                corpus,
                "--output",
                shards,
                "--tokenizer",
                tokenizer_dir,
                "--seq-len",
                "128",
                "--valid-fraction",
                "0.05",
                "--rows-per-shard",
                "512",
                "--no-progress",
            ],
            repo,
        )
    else:
        _say(f"2/6 shards: {shards} (exist)")

    if run_dir.exists() and not keep:
        shutil.rmtree(run_dir)  # the demo starts fresh; --keep resumes instead
    overrides = [
        f"run.output_dir={run_dir}",
        f"data.train={shards / 'train'}",
        f"data.valid={shards / 'valid'}",
    ]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    _say(f"3/6 pretrain: tiny Llama, {nproc} ranks, ZeRO-3 (torchrun) → {run_dir}")
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ds_train",
        "pretrain",
        str(repo_configs_dir() / RUN_CONFIG),
        *overrides,
    ]
    code = subprocess.call(launch, cwd=repo)
    if code != 0:
        _say(f"pretraining failed (exit {code})")
        return code
    _print_losses(run_dir)

    if importlib.util.find_spec("ds_train.convert") is not None:
        _say(f"4/6 export: Hugging Face directory → {hf_dir} (verified against the checkpoint)")
        _ds(["convert", "to-hf", run_dir, hf_dir, "--verify"], repo)
    else:
        _say("4/6 export: skipped (ds-train convert is not available in this version)")

    if finetune:
        from ds_train.demo.finetune_stage import run_finetune_demo

        code = run_finetune_demo(out, repo, nproc=nproc, pretrain_dir=run_dir, keep=keep)
        if code != 0:
            return code

    _say(f"\ndone in {time.time() - t0:.0f}s. Everything is under {out}:")
    for path, what in [
        (corpus, "corpus (JSON lines)"),
        (shards, "webdataset shards + index.json manifests"),
        (run_dir / "metrics.jsonl", "metrics, one JSON line per logged step"),
        (run_dir / "checkpoints", "ZeRO checkpoints (latest = newest complete)"),
        (run_dir / "tensorboard", "TensorBoard events: tensorboard --logdir " + str(run_dir)),
        (hf_dir, "Hugging Face model: AutoModelForCausalLM.from_pretrained(...)"),
        (
            out / "finetune",
            "fine-tuning runs, each with metrics.jsonl and hf/ (model + README.md model card)",
        ),
    ]:
        if path.exists():
            _say(f"  {path}  {what}")
    return 0


def _shards_match(shards: Path, tokenizer_dir: Path) -> bool:
    """Existing demo shards are reused only if they were made with the demo tokenizer as it is now."""
    manifest = shards / "train" / "index.json"
    if not manifest.is_file():
        return False
    from transformers import AutoTokenizer

    from ds_train.data.shard_format import tokenizer_fingerprint

    want = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tokenizer_dir)))["sha256"]
    return json.loads(manifest.read_text())["tokenizer"].get("sha256") == want


def _print_losses(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    valid = [r for r in records if "valid_loss" in r]
    if not train:
        return
    marks = sorted(
        {train[0]["step"], *[r["step"] for r in train[:: max(1, len(train) // 6)]], train[-1]["step"]}
    )
    by_step = {r["step"]: r for r in train}
    _say("    step   loss    tokens/s")
    for s in marks:
        r = by_step[s]
        _say(f"    {s:>4}  {r['loss']:.3f}  {r['tokens_per_s']:>8,.0f}")
    for r in valid:
        _say(f"    valid at step {r['step']}: loss {r['valid_loss']:.3f}, perplexity {r['valid_ppl']:.1f}")
    if train[-1]["loss"] < train[0]["loss"]:
        _say(f"    loss fell from {train[0]['loss']:.3f} to {train[-1]['loss']:.3f}")


def _ds(args: list, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "ds_train", *map(str, args)], cwd=cwd, check=True)


def _say(text: str) -> None:
    print(text, flush=True)
