"""The sigmoid kernel's AOT records: the selection covers every launch variant, positive source, dtype and
precision on both archs, and a launch-shaped lowering (the bench's D = 768, bf16) compiles to sm_90 cubin with
tensor cores and no spill. Lowering runs in a subprocess (the session may have TRITON_INTERPRET=1)."""

import ast
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastcl import aot

SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_selection_covers_variants_sources_dtypes_and_archs():
    jobs = aot.sigmoid_selection(list(aot.DTYPES), aot.SIGMOID_DIMS, aot.ARCHS, full=False)
    assert all(job["op"] == "sigmoid" for job in jobs)
    seen = {(j["kernel"], j["dtype"], j["input_precision"], j["exclude_self"], j["has_mask"]) for j in jobs}
    for label, _ in aot.SIGMOID_VARIANTS:
        for dtype, (_, _, precisions) in aot.DTYPES.items():
            for precision in precisions:
                for has_ids, has_weights in aot.SIGMOID_SOURCES:
                    assert (label, dtype, precision, has_ids, has_weights) in seen
    assert {j["arch"] for j in jobs} == set(aot.ARCHS)
    assert 768 in {j["dim"] for j in jobs}


def test_bench_shape_lowers_without_spills():
    job = next(
        j
        for j in aot.sigmoid_selection(["bf16"], [768], [90], full=True)
        if j["kernel"] == "sigmoid_images" and j["exclude_self"] and j["has_mask"]
    )
    code = f"from fastcl import aot; print(repr(aot.compile_one({job!r})))"
    out = subprocess.run([sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True, check=True)
    record = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    assert "error" not in record, record.get("error")
    assert record["spill_bytes"] == 0 and 0 < record["registers"] <= 255
    assert record["tensor_cores"] and aot.violations(record) == []
