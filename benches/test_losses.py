"""The sweep: every loss x mode x size x implementation available on this device (see benchlib.sweep).

    pytest benches/test_losses.py --benchmark-only                      # CUDA if present, else CPU
    FASTCL_BENCH_QUICK=1 pytest benches/ --benchmark-only               # the small CI subset
    FASTCL_BENCH_N=4096,8192 FASTCL_BENCH_LOSSES=supcon pytest benches/test_losses.py --benchmark-only

Implementations: fastcl (each backend usable on the device: 'chunked' everywhere, 'triton' on CUDA), the dense
reference (SupContrast / CLIP formulation), pytorch-metric-learning's SupConLoss / NTXentLoss and Inf-CL's
cal_flash_loss (GPU) where installed; ``FASTCL_BENCH_IMPLS=fastcl,reference`` restricts them.
"""

import os

import benchlib
import pytest
import torch
from harness import DEVICE, QUICK, bench_case


def _cases():
    wanted = os.environ.get("FASTCL_BENCH_IMPLS")
    wanted = {w.strip() for w in wanted.split(",")} if wanted else None
    params = []
    for loss, mode, n, d, dtype in benchlib.sweep(DEVICE, QUICK):
        for impl, backend in benchlib.implementations(loss, DEVICE):
            if impl == benchlib.IMPL_FASTCL and backend == "triton" and DEVICE != "cuda":
                continue  # a backend of this device only; the interpreter is not a benchmark target
            if wanted and impl not in wanted and backend not in wanted:
                continue
            if QUICK and n in benchlib.SMALL_N and impl not in (benchlib.IMPL_FASTCL, benchlib.IMPL_REFERENCE):
                continue  # the small sizes compare chunked with dense (PML's NTXentLoss alone is ~1 min at 512)
            case = benchlib.Case(impl, backend, loss, mode, n, d, dtype, DEVICE)
            params.append(pytest.param(case, id=case.id))
    return params


@pytest.mark.sweep
@pytest.mark.parametrize("case", _cases())
def test_loss(benchmark, case, memserver):
    bench_case(benchmark, case, memserver)


@pytest.mark.sweep
@pytest.mark.skipif(DEVICE != "cpu", reason="the sgemm floor is the CPU reference rate (GPU: benchlib.matmul_rate)")
def test_sgemm_floor(benchmark):
    """The floor case: a square 2048^3 fp32 matmul in this process and thread count. ``report.py`` divides each
    row's model FLOPs (6 N^2 D for fwd+bwd) by this rate: the time the loss would take if it were only its GEMMs."""
    size = 2048
    a, b = torch.randn(size, size), torch.randn(size, size)
    benchmark.pedantic(lambda: a @ b, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "kind": "sgemm-floor",
            "size": size,
            "threads": torch.get_num_threads(),
            "gflops": 2 * size**3 / median / 1e9,
            "device": benchlib.device_name("cpu"),
        }
    )
