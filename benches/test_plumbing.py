"""Fast checks of the benchmark machinery itself (not benchmarks: skipped under --benchmark-only).

python -m pytest benches/test_plumbing.py -q
"""

import json
import os
import subprocess
import sys

import benchlib
import pytest
import report
import torch
from benchlib import Case

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sweep_is_small_first_and_quick_is_small():
    quick = benchlib.sweep("cpu", quick=True)
    assert {p[0] for p in quick} == set(benchlib.LOSSES)
    assert {p[1] for p in quick} == set(benchlib.MODES)
    assert max(p[2] for p in quick) <= 2048
    assert {64, 128, 256, 512} <= {p[2] for p in quick if p[1] == "fwd+bwd"}  # the small sizes (per-call cost)
    ns = [p[2] for p in benchlib.sweep("cpu", quick=False)]
    assert max(ns) == 65536


def test_dense_prediction_grows_quadratically_and_skips_huge():
    small = benchlib.predicted_bytes(Case("reference", "reference", "supcon", "fwd+bwd", 4096, 128, "fp32", "cpu"))
    large = benchlib.predicted_bytes(Case("reference", "reference", "supcon", "fwd+bwd", 8192, 128, "fp32", "cpu"))
    assert 3.5 < large / small < 4.5
    reason = benchlib.memory_skip(Case("reference", "reference", "supcon", "fwd+bwd", 1 << 20, 128, "fp32", "cpu"))
    assert reason and "predicted" in reason
    chunked = Case("fastcl", "chunked", "supcon", "fwd+bwd", 65536, 128, "fp32", "cpu")
    assert benchlib.memory_skip(chunked) is None
    assert benchlib.predicted_bytes(chunked) < 2**30


@pytest.mark.parametrize("loss", benchlib.LOSSES)
def test_fastcl_and_reference_compute_the_same_loss(loss):
    case = Case("fastcl", "chunked", loss, "fwd+bwd", 64, 16, "fp64", "cpu")
    inputs = benchlib.make_inputs(case)
    ours = benchlib.loss_callable(case)(inputs)
    ref = benchlib.loss_callable(case.replace(impl="reference", backend="reference"))(inputs)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", benchlib.LOSSES)
def test_pml_computes_the_same_loss(loss):
    case = Case(
        benchlib.IMPL_PML, benchlib.PEER_BACKEND[(benchlib.IMPL_PML, loss)], loss, "fwd+bwd", 64, 16, "fp64", "cpu"
    )
    reason = benchlib.unavailable(case)
    if reason:
        pytest.skip(reason)
    inputs = benchlib.make_inputs(case)
    theirs = benchlib.loss_callable(case)(inputs)
    ours = benchlib.loss_callable(case.replace(impl="fastcl", backend="chunked"))(inputs)
    torch.testing.assert_close(theirs.double(), ours.double(), rtol=1e-6, atol=1e-8)


def test_runner_reports_peak_memory_in_a_fresh_process():
    case = Case("reference", "reference", "supcon", "fwd+bwd", 2048, 64, "fp32", "cpu")
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "runner.py"), "--case", case.to_json()],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    # The dense form holds several 2048 x 2048 fp32 matrices (16 MiB each).
    assert result["peak_bytes"] > 2 * 2048 * 2048 * 4
    assert len(result["times"]) == 1


def test_report_renders_tables_and_skips(tmp_path):
    def bench(impl, backend, n, median, mem):
        return {
            "name": f"test_loss[{impl}-{n}]",
            "stats": {"median": median, "min": median, "rounds": 3},
            "extra_info": {
                "impl": impl,
                "backend": backend,
                "loss": "supcon",
                "mode": "fwd+bwd",
                "n": n,
                "d": 128,
                "dtype": "fp32",
                "device": "Test CPU",
                "device_type": "cpu",
                "peak_mem_mb": mem,
            },
        }

    data = {
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": [
            bench("fastcl", "chunked", 1024, 0.01, 8.0),
            bench("reference", "reference", 1024, 0.05, 30.0),
            bench("fastcl", "chunked", 65536, 40.0, 300.0),
            {
                "name": "test_sgemm_floor",
                "stats": {"median": 0.17, "min": 0.17, "rounds": 5},
                "extra_info": {"kind": "sgemm-floor", "gflops": 100.0, "device": "Test CPU", "threads": 1},
            },
        ],
        "fastcl": {
            "device_name": "Test CPU",
            "skipped": [
                {
                    "case": {
                        "impl": "reference",
                        "backend": "reference",
                        "loss": "supcon",
                        "mode": "fwd+bwd",
                        "n": 65536,
                        "d": 128,
                        "dtype": "fp32",
                        "device": "cpu",
                    },
                    "reason": "predicted 192.0 GiB > 50% of 20.0 GiB available",
                    "predicted_bytes": 192 * 2**30,
                }
            ],
        },
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    results = report.Results()
    results.load(str(path))
    text = report.markdown(results)
    assert "| 1,024 | 10.0 ms | 50.0 ms | 5.00x |" in text
    # chunked / dense and chunked / floor: 6 * 1024^2 * 128 flops at 100 GFLOP/s = 8.05 ms -> 0.01 / 0.00805 = 1.24
    assert "| 0.20 | 1.24 |" in text
    assert "skip: needs ~192 GiB" in text
