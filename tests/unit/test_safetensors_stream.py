"""Streaming safetensors writes from rank files: a dtype conversion reads the mmap silently."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, clean_env

# torch warns about a non-writable buffer once per process, so the check runs in a fresh one,
# with every warning an error
SCRIPT = """
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from ds_train.convert.safetensors_stream import OutputTensor, PieceReader, write_safetensors
from ds_train.convert.zero_layout import Piece, TensorPlan

src, out = sys.argv[1], sys.argv[2]
values = torch.arange(12, dtype=torch.float32)
Path(src).write_bytes(b"x" * 8 + values.numpy().tobytes())
plan = TensorPlan("w", (3, 4), torch.float32, [Piece(src, 8, 12)], "trainable")
reader = PieceReader()
write_safetensors(out, [OutputTensor(plan, torch.bfloat16)], reader)
reader.close()
assert torch.equal(load_file(out)["w"], values.view(3, 4).to(torch.bfloat16))
"""


def test_converting_a_dtype_from_the_read_only_map_emits_no_warning(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-c",
            SCRIPT,
            str(tmp_path / "rank.bin"),
            str(tmp_path / "out.safetensors"),
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not writable" not in proc.stderr
