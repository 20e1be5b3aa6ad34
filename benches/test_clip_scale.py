"""Learnable-scale InfoNCE (CLIP's loss with ``logit_scale = p.exp()``) against open_clip's ``ClipLoss``.

    pytest benches/test_clip_scale.py --benchmark-only          # CUDA if present, else CPU
    FASTCL_BENCH_N=8192 pytest benches/test_clip_scale.py --benchmark-only

fwd+bwd (gradients for both towers and ``p``), fp32, D = 128, peak memory next to time (CPU: peak RSS growth of a
fresh fork; CUDA: ``max_memory_allocated``), as the sweep in test_losses.py. fastcl runs ``fastcl.ClipLoss()``
(chunked everywhere, Triton on CUDA), open_clip its ``ClipLoss()`` (loss.py loaded by path), both in one
process.
"""

import benchlib
import pytest
from harness import DEVICE, QUICK, bench_case

IMPLS = [(benchlib.IMPL_FASTCL, "chunked"), (benchlib.IMPL_OPEN_CLIP, "ClipLoss")]
if DEVICE == "cuda":
    IMPLS.insert(0, (benchlib.IMPL_FASTCL, "triton"))


def _sizes():
    given = benchlib._env_list("FASTCL_BENCH_N", [], int)
    if given:
        return given
    if DEVICE == "cpu":
        return [256, 1024] if QUICK else [256, 1024, 4096, 8192]
    return [4096, 16384] if QUICK else [4096, 16384, 65536]


def _cases():
    params = []
    for n in _sizes():
        for impl, backend in IMPLS:
            case = benchlib.Case(impl, backend, benchlib.CLIP_LOSS, "fwd+bwd", n, 128, "fp32", DEVICE)
            params.append(pytest.param(case, id=case.id))
    return params


@pytest.mark.parametrize("case", _cases())
def test_clip_learnable_scale(benchmark, case, memserver):
    bench_case(benchmark, case, memserver)
