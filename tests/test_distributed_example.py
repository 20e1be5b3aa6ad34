"""The README's torchrun example runs on CPU (gloo) with 2 processes and uneven shards, and the ranks agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest


def test_torchrun_example_on_cpu():
    pytest.importorskip("torch.distributed.run")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # gloo on CPU even on a GPU machine
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "fastcl.examples.ddp_supcon",
        "--steps",
        "2",
        "--batch",
        "8",
        "--uneven",
    ]
    with tempfile.TemporaryDirectory() as cwd:
        try:
            out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"torchrun example did not finish in {err.timeout} s:\n{err.stdout}\n{err.stderr}")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = re.findall(r"rank (\d)/2 step (\d) samples (\d+) loss (-?[\d.]+) global (-?[\d.]+)", out.stdout)
    assert sorted((r, s) for r, s, *_ in lines) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], out.stdout
    by_step = {}
    for rank, step, samples, _loss, mean in lines:
        assert samples == str(8 + 3 * int(rank))
        by_step.setdefault(step, set()).add(mean)
    assert all(len(means) == 1 for means in by_step.values()), by_step  # every rank prints the same global loss
