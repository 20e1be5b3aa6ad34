"""InfoNCE with a queue of extra negatives (MNRL / MoCo with in-batch keys), fwd+bwd, fp32, D = 128: fastcl's
extra-column pass (``info_nce_loss(q, k, negatives=queue, symmetric=False)``) against the dense formula
(``cross_entropy(q @ cat([k, queue]).T / t, arange(N))``), with peak memory and the GEMM floor.

    pytest benches/test_negatives.py --benchmark-only                       # CUDA if present, else CPU
    FASTCL_BENCH_QUICK=1 pytest benches/test_negatives.py --benchmark-only  # N, M = (256, 4096), (1024, 16384)
    FASTCL_BENCH_NM=4096x65536 FASTCL_BENCH_DTYPE=bf16 pytest benches/test_negatives.py --benchmark-only

Grid: queue M = 4,096 .. 65,536, batch N = 256 .. 4,096. The queue is detached (a MoCo queue), queries and keys
require grad. Recorded per case (``extra_info``): peak memory of one fwd+bwd beyond the inputs (CPU: peak RSS
growth of a fresh process, ``python benches/test_negatives.py --peak IMPL N M``, gradients included; CUDA:
``max_memory_allocated`` after a first call),
the floor ``(6 N M D + 6 N^2 D) / R`` with ``R`` the square-sgemm rate measured in the same run (the flop count of
forward, recompute and query gradient over the queue columns plus the full batch), and time / floor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DIM, TEMPERATURE = 128, 0.07
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("FASTCL_BENCH_QUICK", "") not in ("", "0")
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
    os.environ.get("FASTCL_BENCH_DTYPE", "fp32")
]
IMPLS = ("fastcl", "dense")


def _grid():
    given = os.environ.get("FASTCL_BENCH_NM")
    if given:
        return [tuple(int(v) for v in item.split("x")) for item in given.split(",")]
    if QUICK:
        return [(256, 4096), (1024, 16384)]
    return [(n, m) for n in (256, 1024, 4096) for m in (4096, 16384, 65536)]


def _inputs(n, m, device):
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(n, DIM, generator=g), dim=1).to(device, DTYPE).requires_grad_()
    key = F.normalize(torch.randn(n, DIM, generator=g), dim=1).to(device, DTYPE).requires_grad_()
    queue = F.normalize(torch.randn(m, DIM, generator=g), dim=1).to(device, DTYPE)
    return query, key, queue


def _loss(impl, query, key, queue):
    if impl == "fastcl":
        from fastcl import functional as FF

        return FF.info_nce_loss(query, key, negatives=queue, symmetric=False, normalize=False, temperature=TEMPERATURE)
    logits = query @ torch.cat([key, queue]).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def _step(impl, query, key, queue):
    query.grad = key.grad = None
    _loss(impl, query, key, queue).backward()
    if query.is_cuda:
        torch.cuda.synchronize()


def _gemm_rate(device, size=2048, repeats=5):
    """FLOP/s of a square fp32 matmul on ``device`` (median of ``repeats`` after a warm-up)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return 2.0 * size**3 / times[len(times) // 2]


def _peak_bytes(impl, n, m):
    """Peak memory of one fwd+bwd beyond its inputs (and the gradients' buffers of a first call)."""
    if DEVICE == "cuda":
        tensors = _inputs(n, m, DEVICE)
        _step(impl, *tensors)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(impl, *tensors)
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak", impl, str(n), str(m)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def _peak_here(impl, n, m):
    """In a fresh process: the VmHWM growth of one fwd+bwd beyond its inputs (CPU), after a small call of the same
    implementation has loaded its libraries."""
    _step(impl, *_inputs(64, 64, "cpu"))
    tensors = _inputs(n, m, "cpu")

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    _step(impl, *tensors)
    return status("VmHWM") - base


_RATE = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m", _grid(), ids=lambda v: str(v))
def test_info_nce_with_queue(benchmark, impl, n, m):
    if DEVICE not in _RATE:
        _RATE[DEVICE] = _gemm_rate(DEVICE)
    rate = _RATE[DEVICE]
    tensors = _inputs(n, m, DEVICE)
    _step(impl, *tensors)  # warm-up (and the gradients' buffers)
    rounds = 15 if n * m <= 2**21 else (3 if n * m <= 1024 * 16384 else 1)
    benchmark.pedantic(_step, args=(impl, *tensors), rounds=rounds, iterations=1)
    floor = (6.0 * n * m * DIM + 6.0 * n * n * DIM) / rate
    median = benchmark.stats.stats.median
    info = dict(
        device=DEVICE,
        implementation=impl,
        n=n,
        m=m,
        d=DIM,
        dtype=str(DTYPE).split(".")[-1],
        gemm_rate_flops=rate,
        floor_s=floor,
    )
    info.update(time_over_floor=median / floor, peak_bytes=_peak_bytes(impl, n, m))
    benchmark.extra_info.update(info)
    print(json.dumps(info))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--peak":
    torch.set_num_threads(int(os.environ.get("FASTCL_BENCH_THREADS", torch.get_num_threads())))
    print(_peak_here(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
