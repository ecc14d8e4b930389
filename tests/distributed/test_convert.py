"""`ds-train convert`: ZeRO 0-3 → Hugging Face round trips checked against DeepSpeed's own
consolidation (`zero_to_fp32`), plain DeepSpeed checkpoints with frozen parameters, damaged
checkpoints, elastic resume on another world size (automatic 2→1, `convert reshard` 1→2), and an
HF directory loaded into a ZeRO-3 run without silent re-initialisation."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ds_train.checkpoint.layout import LATEST, latest_checkpoint, tag_for_step
from tests.helpers import (
    REPO,
    TOKENIZER,
    base_config,
    clean_env,
    run_cli,
    torchrun,
    torchrun_command,
    train_losses,
    write_config,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY_GPT2 = REPO / "configs" / "model" / "tiny-gpt2.json"


def _pretrain(root: Path, shards: Path, name: str, *, stage: int, nproc: int = 2, steps: int = 4, **sections):
    run = root / name
    train = {"max_steps": steps, "save_every": steps, **sections.pop("train", {})}
    cfg = base_config(run, shards, train=train, zero={"stage": stage}, **sections)
    torchrun(["pretrain", write_config(root / f"{name}.yaml", cfg)], nproc=nproc)
    return run


def _oracle(tag_dir: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of the checkpoint (fp32), the reference for every tensor."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = (
        json.loads((tag_dir / "ds_train_state.json").read_text())
        if (tag_dir / "ds_train_state.json").is_file()
        else {}
    )
    if state.get("zero_stage", 1) == 0:  # zero_to_fp32 reads ZeRO 1-3 only; stage 0 saves the module whole
        return torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def _written(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    assert files, f"no safetensors in {hf_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        assert not set(part) & set(out), "a tensor written twice"
        out.update(part)
    return out


def _load_cleanly(cls, hf_dir: Path):
    model, info = cls.from_pretrained(str(hf_dir), output_loading_info=True, local_files_only=True)
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    assert not problems, f"from_pretrained reported {problems}"
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def zero3_run(work, shards) -> Path:
    # also exports: every checkpoint in the background, and hf/ at the end
    train = {"lr": 5e-3, "save_every": 2, "keep_last": 2, "export_hf_every": 1, "export_hf": True}
    return _pretrain(work, shards, "zero3", stage=3, train=train)


# hidden 30: the norms' group (5 × 30 = 150 elements) is padded to 152 for 2 ranks, and DeepSpeed
# saves rank 1's partition without its 2 padding elements (as BERT's vocabulary-sized MLM bias is)
ODD_LLAMA = {
    "model_type": "llama", "hidden_size": 30, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 3, "num_key_value_heads": 1, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "initializer_range": 0.02,
}  # fmt: skip


@pytest.mark.parametrize(
    ("model", "stage"),
    [("micro-llama", 0), ("micro-llama", 1), ("micro-llama", 2), ("odd-llama", 2), ("tiny-gpt2", 3)],
)
def test_to_hf_equals_deepspeed_consolidation_and_loads_cleanly(tmp_path, shards, model, stage):
    from transformers import AutoModelForCausalLM

    sections = {"model": {"config": str(TINY_GPT2)}} if model == "tiny-gpt2" else {}
    if model == "odd-llama":
        (tmp_path / "odd-llama.json").write_text(json.dumps(ODD_LLAMA))
        sections = {"model": {"config": str(tmp_path / "odd-llama.json")}}
    run = _pretrain(tmp_path, shards, "run", stage=stage, **sections)
    out = tmp_path / "hf"
    # a small shard limit: several files and an index, as a large model gets
    printed = run_cli(["convert", "to-hf", run, out, "--max-shard-size", "300KB", "--verify"]).stdout
    assert "verified" in printed

    oracle = _oracle(latest_checkpoint(run / "checkpoints").path)
    written = _written(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(written)
    loaded = _load_cleanly(AutoModelForCausalLM, out)
    tied = "lm_head.weight" if loaded.config.tie_word_embeddings else None
    assert set(written) == {k for k in loaded.state_dict() if k != tied}
    for name, tensor in written.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, oracle[name].float()), f"{name} differs from zero_to_fp32"
    if tied:  # written once, re-tied on load
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
        # and a bf16 export of the tied model verifies (its reference used an unrounded alias)
        bf16 = run_cli(["convert", "to-hf", run, tmp_path / "bf16", "--dtype", "bf16", "--verify"])
        assert "verified" in bf16.stdout
    for f in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / f).is_file(), f
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")], "pickle in the output"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")], "temporary dir left behind"


def test_bf16_output_and_damaged_checkpoints(tmp_path, zero3_run):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    run_cli(["convert", "to-hf", zero3_run, out, "--dtype", "bf16"])
    oracle = _oracle(latest_checkpoint(zero3_run / "checkpoints").path)
    with safe_open(str(next(out.glob("*.safetensors"))), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
            t = fh.get_tensor(key)
            assert t.dtype == torch.bfloat16 and torch.equal(t, oracle[key].to(torch.bfloat16)), key
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # verify catches a changed tensor: exit 1, the tensor named
    tampered = tmp_path / "tampered"
    run_cli(["convert", "to-hf", zero3_run, tampered])
    from safetensors.torch import load_file, save_file

    f = next(tampered.glob("*.safetensors"))
    tensors = load_file(str(f))
    victim = sorted(tensors)[3]
    tensors[victim] = tensors[victim].clone()
    tensors[victim].view(-1)[0] += 1e-3
    save_file(tensors, str(f), metadata={"format": "pt"})
    bad = run_cli(["convert", "verify", zero3_run, tampered], check=False)
    assert bad.returncode == 1 and victim in bad.stdout, bad.stdout + bad.stderr

    # verify also checks the checkpoint's files against the sha256 recorded at save
    flipped = tmp_path / "flipped" / "step"
    shutil.copytree(latest_checkpoint(zero3_run / "checkpoints").path, flipped)
    victim_file = sorted(flipped.glob("*optim_states.pt"))[0]
    data = bytearray(victim_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    victim_file.write_bytes(bytes(data))
    damaged = run_cli(["convert", "verify", flipped, out], check=False)
    assert damaged.returncode == 1 and victim_file.name in damaged.stdout, damaged.stdout + damaged.stderr

    # a plain DeepSpeed copy of the checkpoint (no ds_train metadata) needs --model-config
    tag_dir = latest_checkpoint(zero3_run / "checkpoints").path
    plain = tmp_path / "plain" / "global_step4"
    plain.mkdir(parents=True)
    for p in tag_dir.glob("*_states.pt"):
        shutil.copy(p, plain / p.name)
    refused = run_cli(["convert", "to-hf", plain, tmp_path / "x"], check=False)
    assert refused.returncode == 2 and "--model-config" in refused.stderr
    hf_config = tag_dir / "hf_config" / "config.json"
    run_cli(["convert", "to-hf", plain, tmp_path / "x", "--model-config", hf_config, "--verify"])

    # a truncated and a missing rank file: one line naming the file, nothing written
    optim = sorted(plain.glob("*optim_states.pt"))
    with open(optim[1], "r+b") as fh:
        fh.truncate(optim[1].stat().st_size // 2)
    cut = run_cli(["convert", "to-hf", plain, tmp_path / "y", "--model-config", hf_config], check=False)
    assert cut.returncode == 2 and optim[1].name in cut.stderr and len(cut.stderr.strip().splitlines()) == 1
    optim[1].unlink()
    gone = run_cli(["convert", "to-hf", plain, tmp_path / "y", "--model-config", hf_config], check=False)
    assert gone.returncode == 2 and "Traceback" not in gone.stderr, gone.stderr
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_plain_deepspeed_checkpoint_with_a_frozen_parameter(tmp_path, stage):
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "ds"
    cmd = torchrun_command("tests.distributed.plain_deepspeed_checkpoint", [ckpt, stage])
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "hf"
    run_cli(["convert", "to-hf", ckpt, out, "--model-config", ckpt / "model_config.json", "--verify"])
    oracle = _oracle(ckpt / "global_step2")
    written = _written(out)
    frozen = "model.embed_tokens.weight"
    assert frozen in written and torch.equal(written[frozen], oracle[frozen].float())
    for name, tensor in written.items():
        assert torch.equal(tensor, oracle[name].float()), name
    _load_cleanly(AutoModelForCausalLM, out)


def test_masked_lm_bert_round_trip(tmp_path, corpus):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ds_train.data.sharding import ShardOptions, shard_corpus
    from tests.distributed.test_masked_lm import minilm_dir

    tok_dir = minilm_dir()
    shard_corpus(
        [str(corpus)],
        tmp_path / "shards",
        AutoTokenizer.from_pretrained(str(tok_dir)),
        ShardOptions(seq_len=32, rows_per_shard=200, progress=False),
    )
    model = {
        "config": str(REPO / "configs/model/tiny-bert.json"),
        "tokenizer": str(tok_dir),
        "objective": "masked_lm",
    }
    run = _pretrain(tmp_path, tmp_path / "shards", "bert", stage=3, model=model)
    out = tmp_path / "hf"
    run_cli(["convert", "to-hf", run, out, "--verify"])
    loaded = _load_cleanly(AutoModelForMaskedLM, out)
    assert (
        loaded.cls.predictions.decoder.weight.data_ptr()
        == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    )
    oracle = _oracle(latest_checkpoint(run / "checkpoints").path)
    for name, tensor in _written(out).items():
        assert torch.equal(tensor, oracle[name].float()), name


def _truncate_run(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` holding only its checkpoint at `step` (as if it had stopped there)."""
    (dst / "checkpoints").mkdir(parents=True)
    tag = tag_for_step(step)
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / LATEST).write_text(tag)


def _assert_same_losses(reference: Path, resumed: Path, steps: range) -> None:
    a, b = train_losses(reference), train_losses(resumed)
    first = steps[0]
    assert b[first] == pytest.approx(a[first], rel=1e-4), (
        f"first loss after the resume: {b[first]} vs {a[first]}"
    )
    for step in steps:
        assert b[step] == pytest.approx(a[step], rel=1e-3), f"step {step}: {b[step]} vs {a[step]}"


def test_elastic_resume_two_to_one_rank_zero3_automatic(tmp_path, shards):
    train = {"max_steps": 8, "save_every": 4}
    reference = _pretrain(tmp_path, shards, "ref", stage=3, steps=8, train=train)
    resumed = tmp_path / "resumed"
    _truncate_run(reference, resumed, 4)
    cfg = base_config(resumed, shards, train=train, zero={"stage": 3})
    proc = torchrun(["pretrain", write_config(tmp_path / "resumed.yaml", cfg)], nproc=1)
    assert "universal" in proc.stderr  # it said what it did
    assert sorted(train_losses(resumed)) == [5, 6, 7, 8]
    _assert_same_losses(reference, resumed, range(5, 9))
    # the converted copy is cleaned up once the run has its own checkpoint
    assert not list((resumed / "checkpoints").glob("*.universal"))
    # the finished 2-rank reference started again on 1 rank: nothing to train, nothing converted
    before = (reference / "metrics.jsonl").read_text()
    again = base_config(reference, shards, train=train, zero={"stage": 3})
    proc = torchrun(["pretrain", write_config(tmp_path / "again.yaml", again)], nproc=1)
    assert "is finished" in proc.stderr
    assert (reference / "metrics.jsonl").read_text() == before
    assert not list((reference / "checkpoints").glob("*.universal"))


def test_elastic_resume_one_to_two_ranks_by_convert_reshard(tmp_path, shards):
    train = {"max_steps": 8, "save_every": 4}
    reference = _pretrain(tmp_path, shards, "ref", stage=2, nproc=1, steps=8, train=train)
    resumed = tmp_path / "resumed"
    run_cli(
        [
            "convert",
            "reshard",
            reference / "checkpoints",
            resumed / "checkpoints",
            "--world-size",
            "2",
            "--tag",
            tag_for_step(4),
        ]
    )
    assert latest_checkpoint(resumed / "checkpoints").step == 4
    cfg = base_config(resumed, shards, train=train, zero={"stage": 2})
    torchrun(["pretrain", write_config(tmp_path / "resumed.yaml", cfg)], nproc=2)
    _assert_same_losses(reference, resumed, range(5, 9))


def test_a_universal_checkpoint_converts_like_the_one_it_was_made_from(tmp_path, zero3_run):
    """`convert reshard` (and an elastic resume) write DeepSpeed's universal format, each parameter
    whole in zero/<name>/fp32.pt: to-hf, verify and a second reshard read it (they refused it)."""
    resharded = tmp_path / "resharded"
    run_cli(["convert", "reshard", zero3_run / "checkpoints", resharded / "checkpoints", "--world-size", "1"])
    hf = tmp_path / "hf"
    run_cli(["convert", "to-hf", resharded, hf, "--verify"])
    original = _written(zero3_run / "hf")  # the run's own export of the same step
    exported = _written(hf)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    assert "OK" in run_cli(["convert", "verify", resharded, zero3_run / "hf"]).stdout
    again = tmp_path / "again"  # a reshard of a reshard is a copy: the format is world-size free
    run_cli(["convert", "reshard", resharded / "checkpoints", again / "checkpoints", "--world-size", "4"])
    run_cli(["convert", "to-hf", again, tmp_path / "hf2"])
    assert all(torch.equal(t, original[k]) for k, t in _written(tmp_path / "hf2").items())
    # a parameter's file gone: named, not a traceback
    tag = latest_checkpoint(again / "checkpoints").path
    (tag / "zero" / "model.norm.weight" / "fp32.pt").unlink()
    proc = run_cli(["convert", "to-hf", again, tmp_path / "hf3"], check=False)
    assert proc.returncode != 0
    assert "model.norm.weight/fp32.pt: missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_hf_directory_loads_exactly_into_zero3(tmp_path, shards, zero3_run):
    """Start a ZeRO-3 run from a converted directory: its first loss equals a one-process stage-0
    start from the same directory, and is below the fresh model's loss on that batch (the source
    run's first step: same seed, same data order)."""
    hf = tmp_path / "hf"
    run_cli(["convert", "to-hf", zero3_run, hf])
    # the run's own exports went through the same code: the final one equals this conversion
    final = _written(hf)
    assert final.keys() == _written(zero3_run / "hf").keys()
    assert all(torch.equal(final[k], v) for k, v in _written(zero3_run / "hf").items())
    assert all(torch.equal(final[k], v) for k, v in _written(zero3_run / "exports" / tag_for_step(4)).items())
    early = _written(zero3_run / "exports" / tag_for_step(2))
    assert not all(torch.equal(final[k], v) for k, v in early.items())  # step 2's weights, not step 4's
    assert (zero3_run / "logs" / f"export-{tag_for_step(2)}.log").is_file()
    losses = {}
    for name, stage, nproc in (("z3", 3, 2), ("z0", 0, 1)):
        cfg = base_config(
            tmp_path / name,
            shards,
            model={"config": None, "init_from": str(hf), "tokenizer": str(TOKENIZER)},
            train={"max_steps": 1, "warmup_steps": 0},
            zero={"stage": stage},
        )
        torchrun(["pretrain", write_config(tmp_path / f"{name}.yaml", cfg)], nproc=nproc)
        losses[name] = train_losses(tmp_path / name)[1]
    assert losses["z3"] == pytest.approx(losses["z0"], rel=1e-5)
    fresh = train_losses(zero3_run)[1]
    assert losses["z3"] < fresh - 0.1, (losses, fresh)
