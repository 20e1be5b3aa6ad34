"""The CPU and GPU performance targets (speed, memory, largest N that runs), as named benchmarks (marker ``targets``).

    pytest benches/test_targets.py --benchmark-only                      # all targets of this device
    FASTCL_BENCH_ENFORCE_TARGETS=1 pytest benches/test_targets.py --benchmark-only   # fail on a missed speed target

Every test records ``target``, ``target_value``, ``target_threshold`` and ``target_met`` in ``extra_info``
(``report.py`` prints them). Memory targets and "must run" targets always assert; speed targets assert only with
``FASTCL_BENCH_ENFORCE_TARGETS=1``, because a shared CI machine's timings are noisy. ``python benches/targets.py``
measures the same targets without pytest-benchmark, one fresh process per case.

CPU, SupCon with labels, two views, D = 128, fp32, fwd+bwd:
  * N = 8192: the chunked backend at least 3x faster than the dense reference on the same inputs (medians);
  * N = 32768: the chunked backend's peak RSS growth under 1 GiB;
  * N = 65536: the chunked backend runs (the dense reference would need > 100 GB).
GPU, bf16, D = 128, fwd+bwd:
  * SupCon N = 65536 within 2x of the roofline (benchlib.gpu_roofline);
  * InfoNCE N = 65536 at least 2x faster than Inf-CL's cal_flash_loss on the same work;
  * SupCon N = 16384 at least 10x faster than the dense reference;
  * SupCon N = 1,048,576 runs (marker ``huge``; needs FASTCL_TRITON_AUTOTUNE=0, see test_gpu_runs_n1m).
"""

import json
import os

import benchlib
import pytest
from benchlib import Case
from harness import DEVICE, ENFORCE_TARGETS, QUICK, bench_case, check_deadline, median_time, skip_case, target_info

pytestmark = pytest.mark.targets

cpu_only = pytest.mark.skipif(DEVICE != "cpu", reason="a CPU target; this run benchmarks CUDA")
gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="a GPU target: needs a CUDA device")
not_quick = pytest.mark.skipif(QUICK, reason="large-N target, not part of FASTCL_BENCH_QUICK=1")


def _supcon(impl, backend, n, dtype="fp32", device="cpu", loss="supcon"):
    return Case(impl, backend, loss, "fwd+bwd", n, 128, dtype, device)


def _speed_target(
    benchmark, memserver, ours: Case, theirs: Case, name: str, threshold: float, rounds: int, their_rounds: int
):
    their_reason, _ = benchlib.skip_reason(theirs)
    if their_reason:
        skip_case(theirs, f"comparator unavailable: {their_reason}")
    info = bench_case(benchmark, ours, memserver, rounds=rounds)
    check_deadline()
    theirs_timing = median_time(theirs, their_rounds)
    ours_median = benchmark.stats.stats.median if benchmark.stats else None
    ratio = theirs_timing["median_s"] / ours_median if ours_median else None
    benchmark.extra_info.update(
        target_info(
            name,
            f"speedup vs {theirs.label}",
            ratio,
            threshold,
            comparator=theirs.label,
            comparator_case=json.loads(theirs.to_json()),
            comparator_median_s=theirs_timing["median_s"],
            comparator_times_s=theirs_timing["times"],
            median_s=ours_median,
        )
    )
    if ENFORCE_TARGETS:
        assert ratio is not None and ratio >= threshold, f"{name}: speedup {ratio} < {threshold}x"
    return info


# ------------------------------------------------------------------------------------------------------------
# CPU: SupCon with labels, D = 128, fp32, chunked backend
# ------------------------------------------------------------------------------------------------------------


@cpu_only
def test_cpu_speedup_n8192(benchmark, memserver):
    """Chunked fwd+bwd at N = 8192 (bsz 4096 x 2 views) >= 3x faster than the dense reference (medians)."""
    _speed_target(
        benchmark,
        memserver,
        _supcon("fastcl", "chunked", 8192),
        _supcon("reference", "reference", 8192),
        "cpu-supcon-speedup-vs-reference-n8192",
        3.0,
        rounds=5,
        their_rounds=3,
    )


@cpu_only
@not_quick
def test_cpu_rss_n32768(benchmark, memserver):
    """Chunked fwd+bwd at N = 32768: peak RSS growth (fresh process) under 1 GiB."""
    case = _supcon("fastcl", "chunked", 32768)
    info = bench_case(benchmark, case, memserver, rounds=1)
    peak_mb = info["peak_mem_mb"]
    benchmark.extra_info.update(
        target_info("cpu-supcon-rss-n32768", "peak RSS growth (MiB)", peak_mb, 1024.0, higher_is_better=False)
    )
    assert peak_mb is not None and peak_mb < 1024.0, f"peak RSS growth {peak_mb} MiB >= 1 GiB"


@cpu_only
@not_quick
def test_cpu_runs_n65536(benchmark, memserver):
    """Chunked fwd+bwd at N = 65536 runs (the dense reference would need the predicted bytes below)."""
    case = _supcon("fastcl", "chunked", 65536)
    dense = benchlib.predicted_bytes(_supcon("reference", "reference", 65536))
    info = bench_case(benchmark, case, memserver, rounds=1)
    benchmark.extra_info.update(
        target_info(
            "cpu-supcon-runs-n65536",
            "runs (peak RSS growth MiB)",
            info["peak_mem_mb"],
            1.0,
            dense_reference_predicted_gb=round(dense / 1e9, 1),
        )
    )
    benchmark.extra_info["target_met"] = info["peak_mem_mb"] is not None


# ------------------------------------------------------------------------------------------------------------
# GPU: Triton backend, bf16, D = 128
# ------------------------------------------------------------------------------------------------------------


@gpu_only
def test_gpu_roofline_n65536(benchmark):
    """Triton SupCon bf16 D=128 fwd+bwd at N = 65536 within 2x of the roofline (roofline_fraction >= 0.5)."""
    case = _supcon("fastcl", "triton", 65536, "bf16", "cuda")
    info = bench_case(benchmark, case, rounds=10)
    fraction = info.get("roofline_fraction")
    benchmark.extra_info.update(target_info("gpu-supcon-roofline-n65536", "fraction of roofline", fraction, 0.5))
    if ENFORCE_TARGETS:
        assert fraction is not None and fraction >= 0.5


@gpu_only
def test_gpu_vs_infcl_n65536(benchmark):
    """Triton InfoNCE (symmetric) bf16 fwd+bwd at N = 65536 >= 2x faster than Inf-CL's cal_flash_loss."""
    ours = Case("fastcl", "triton", "infonce", "fwd+bwd", 65536, 128, "bf16", "cuda")
    theirs = Case("inf-cl", "cal_flash_loss", "infonce", "fwd+bwd", 65536, 128, "bf16", "cuda")
    _speed_target(benchmark, None, ours, theirs, "gpu-infonce-speedup-vs-infcl-n65536", 2.0, rounds=10, their_rounds=5)


@gpu_only
def test_gpu_vs_reference_n16384(benchmark):
    """Triton SupCon bf16 fwd+bwd at N = 16384 >= 10x faster than the dense reference."""
    _speed_target(
        benchmark,
        None,
        _supcon("fastcl", "triton", 16384, "bf16", "cuda"),
        _supcon("reference", "reference", 16384, "bf16", "cuda"),
        "gpu-supcon-speedup-vs-reference-n16384",
        10.0,
        rounds=20,
        their_rounds=10,
    )


@gpu_only
@pytest.mark.huge
def test_gpu_runs_n1m(benchmark):
    """Triton SupCon bf16 fwd+bwd at N = 1,048,576 runs.

    Autotuning 14 configs x 3 kernels at this size takes minutes, so this runs only with a fixed config
    (FASTCL_TRITON_AUTOTUNE=0) or when FASTCL_BENCH_ALLOW_HUGE_AUTOTUNE=1 accepts the wait.
    """
    autotune = os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") != "0"
    if autotune and os.environ.get("FASTCL_BENCH_ALLOW_HUGE_AUTOTUNE") != "1":
        pytest.skip(
            "set FASTCL_TRITON_AUTOTUNE=0 (fixed config) or FASTCL_BENCH_ALLOW_HUGE_AUTOTUNE=1: autotuning "
            "every config at N=2**20 takes minutes"
        )
    case = _supcon("fastcl", "triton", 1048576, "bf16", "cuda")
    info = bench_case(benchmark, case, rounds=1)
    benchmark.extra_info.update(
        target_info(
            "gpu-supcon-runs-n1m",
            "runs (median s)",
            benchmark.stats.stats.median if benchmark.stats else None,
            0.0,
            autotune=os.environ.get("FASTCL_TRITON_AUTOTUNE", "1"),
        )
    )
    benchmark.extra_info["target_met"] = info.get("peak_mem_mb") is not None
