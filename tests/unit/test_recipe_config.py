"""configs/runs/pretrain-llama-1b.yaml, the pretraining starting point: it loads, validates and
passes `--check` on 8 ranks (its batch ramp's stages divide on them) with only its data paths
replaced."""

from __future__ import annotations

from ds_train.cli import main
from tests.helpers import REPO


def test_the_1b_recipe_passes_the_checks_a_start_makes(shards, tmp_path, capsys):
    recipe = REPO / "configs/runs/pretrain-llama-1b.yaml"
    overrides = [
        f"data.train={shards / 'train'}",
        f"data.valid={shards / 'valid'}",
        f"run.output_dir={tmp_path}",
    ]
    assert main(["pretrain", str(recipe), *overrides, "--check", "--world-size", "8"]) == 0, (
        capsys.readouterr().err
    )
    out = capsys.readouterr().out
    assert out.startswith("ok: 512 = 4 micro × 16 accum × 8 ranks; max_steps 100000; ")
    assert "global batches of 128 to step 2000, 256 to step 6000, then 512 (train.batch_ramp)" in out
