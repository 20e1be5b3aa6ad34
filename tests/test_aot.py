"""Ahead-of-time lowering for real GPUs works without one (one config here; CI runs the full table).

Runs in a subprocess: the test session may have TRITON_INTERPRET=1, under which kernels are not compilable.
"""

import ast
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastcl import aot


def test_one_kernel_lowers_to_sm90_cubin():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    job = (
        "_contrastive_bwd_anchor_kernel",
        {"TWO_WAY": True},
        "bwd_anchor[two_way]",
        {"BLOCK_M": 64, "BLOCK_N": 64},
        8,
        2,
        90,
        "bf16",
        128,
        False,
    )
    out = (
        subprocess.run(
            [sys.executable, "-c", f"from fastcl import aot; print(repr(aot.compile_one({job!r})))"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    row = ast.literal_eval(out)
    assert "error" not in row, row.get("error")
    assert 0 < row["reg"] <= 255
    assert row["mma"] == "wgmma"


def test_job_list_covers_every_kernel_and_arch():
    jobs = aot.jobs("bf16", 128, False, [80, 90])
    assert {j[2] for j in jobs} == {
        "fwd",
        "bwd_anchor",
        "bwd_anchor[two_way]",
        "bwd_contrast",
        "bwd_contrast[two_way]",
    }
    assert {j[6] for j in jobs} == {80, 90}
