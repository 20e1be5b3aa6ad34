"""The pytest side of the benchmarks: run one case under pytest-benchmark, attach ``extra_info``, record skips."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from typing import Optional

import benchlib
import pytest
import torch
from benchlib import Case

QUICK = os.environ.get("FASTCL_BENCH_QUICK") == "1"
DEVICE = os.environ.get("FASTCL_BENCH_DEVICE") or benchlib.device_of_choice()
ENFORCE_TARGETS = os.environ.get("FASTCL_BENCH_ENFORCE_TARGETS") == "1"

SKIPPED = []  # written into the JSON by conftest.pytest_benchmark_update_json


def record_skip(case: Case, reason: str, predicted: Optional[int] = None):
    SKIPPED.append({"case": json.loads(case.to_json()), "reason": reason, "predicted_bytes": predicted})


def skip_case(case: Case, reason: str, predicted: Optional[int] = None):
    record_skip(case, reason, predicted)
    pytest.skip(reason)


def check_deadline(case: Optional[Case] = None):
    deadline = os.environ.get("FASTCL_BENCH_DEADLINE")
    if deadline and time.time() > float(deadline):
        reason = "time budget of this run exhausted (FASTCL_BENCH_DEADLINE)"
        if case is not None:
            record_skip(case, reason)
        pytest.skip(reason)


def check_runnable(case: Case, memory_rule: bool = True) -> Optional[int]:
    """Skip (recorded) unless the case can run here; returns its predicted peak bytes."""
    check_deadline(case)
    reason, predicted = benchlib.skip_reason(case)
    if reason and (memory_rule or predicted is None):
        skip_case(case, reason, predicted)
    return predicted if predicted is not None else benchlib.predicted_bytes(case)


def runtime_skip(case: Case, exc: BaseException, predicted: Optional[int]):
    """A peer that fails at run time, or any implementation out of memory, is a recorded skip (not a crash)."""
    oom = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()
    if oom or case.impl in (benchlib.IMPL_PML, benchlib.IMPL_INFCL):
        exc.__traceback__ = None  # its frames hold the case's tensors: let them go with the skip
    if oom:
        skip_case(
            case, f"out of memory at run time (predicted {predicted / 2**30:.1f} GiB): {str(exc)[:200]}", predicted
        )
    if case.impl in (benchlib.IMPL_PML, benchlib.IMPL_INFCL):
        skip_case(case, f"{case.impl} failed here: {type(exc).__name__}: {str(exc)[:300]}", predicted)
    raise exc


def _release(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _median(benchmark) -> Optional[float]:
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return getattr(inner, "median", None)


def bench_case(
    benchmark,
    case: Case,
    memserver=None,
    rounds: Optional[int] = None,
    memory_rule: bool = True,
    extra: Optional[dict] = None,
) -> dict:
    """Time ``case`` with ``benchmark.pedantic``, measure its peak memory, and fill ``benchmark.extra_info``.

    CPU: the peak memory comes from a fresh fork (``memserver``), which also gives a first time estimate: calls
    longer than 5 s get no separate warm-up in this process. CUDA: a warm-up call (compilation, autotuning) is
    always made before timing, and the peak is measured in this process after a reset of the allocator's stats.
    """
    predicted = check_runnable(case, memory_rule)
    benchmark.group = f"{case.loss} {case.mode} d={case.d} {case.dtype} n={case.n}"
    memory = None
    estimate = None
    if case.device == "cpu" and memserver is not None:
        memory = memserver.measure(case)
        if "error" not in memory:
            estimate = memory["times"][0]
        elif "child died" in memory["error"]:  # killed (the OOM killer?): do not try it in this process
            skip_case(case, f"the fresh-process run died: {memory['error']}", predicted)
    inputs = benchlib.make_inputs(case)
    prepare, target = benchlib.build(case, inputs)
    warmup_s = None
    if case.device == "cuda" or estimate is None or estimate <= 5.0:
        try:
            warmup_s, round_s = benchlib.time_round(prepare, target)
        except Exception as exc:
            inputs = prepare = target = None  # free the case's tensors before the skip is recorded
            _release(case.device)
            runtime_skip(case, exc, predicted)
        estimate = round_s  # a warm round, setup included (the untimed forward of 'bwd' costs time too)
    if rounds is None:
        rounds = benchlib.rounds_for(estimate, case.device, QUICK)
    if case.mode == "bwd":
        benchmark.pedantic(target, setup=lambda: ((prepare(),), {}), rounds=rounds, iterations=1)
    else:
        benchmark.pedantic(target, args=(None,), rounds=rounds, iterations=1)
    median = _median(benchmark)
    if case.device == "cuda":
        memory = benchlib.measure_peak_cuda(case, inputs, prepare, target)

    info = {
        "impl": case.impl,
        "backend": case.backend,
        "loss": case.loss,
        "mode": case.mode,
        "n": case.n,
        "d": case.d,
        "dtype": case.dtype,
        "device": benchlib.device_name(case.device),
        "device_type": case.device,
        "n_embeddings": 2 * case.n if case.loss == "infonce" else case.n,
        "rounds": rounds,
        "warmup_s": warmup_s,
        "quick": QUICK,
        "threads": torch.get_num_threads() if case.device == "cpu" else None,
        "predicted_mem_mb": round(predicted / benchlib.MIB, 1) if predicted is not None else None,
        "load_average": benchlib.load_average(),
    }
    if memory is not None and "error" not in memory:
        info["peak_mem_mb"] = round(memory["peak_bytes"] / benchlib.MIB, 2)
        info["peak_mem_method"] = memory["peak_method"]
    else:
        info["peak_mem_mb"] = None
        info["peak_mem_error"] = (memory or {}).get("error", "not measured")
    if case.device == "cpu":  # the sgemm floor: this run's sgemm rate, same process and thread count
        rate = benchlib.sgemm_rate()
        info["sgemm_gflops"] = round(rate / 1e9, 2)
        info["floor_s"] = benchlib.cpu_floor_s(case, rate)
    if case.backend == "triton":
        info["triton_autotune"] = os.environ.get("FASTCL_TRITON_AUTOTUNE", "1") != "0"
    if case.device == "cuda":
        if case.dtype == "fp32":
            info["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        if median:
            info.update(benchlib.gpu_roofline(case, median))
    if extra:
        info.update(extra)
    benchmark.extra_info.update(info)
    inputs = prepare = target = None
    _release(case.device)
    return info


def median_time(case: Case, rounds: int) -> dict:
    """Median wall time of ``rounds`` calls of ``case`` after one warm-up (for a comparator inside a target test)."""
    inputs = benchlib.make_inputs(case)
    prepare, target = benchlib.build(case, inputs)
    try:
        benchlib.time_call(prepare, target)
    except Exception as exc:
        inputs = prepare = target = None  # free the case's tensors before the skip is recorded
        _release(case.device)
        runtime_skip(case, exc, benchlib.predicted_bytes(case))
    times = [benchlib.time_call(prepare, target)[0] for _ in range(rounds)]
    del inputs, prepare, target
    _release(case.device)
    return {"median_s": statistics.median(times), "times": times}


def target_info(
    name: str, metric: str, value: Optional[float], threshold: float, higher_is_better: bool = True, **more
) -> dict:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {
        "target": name,
        "target_metric": metric,
        "target_value": value,
        "target_threshold": threshold,
        "target_higher_is_better": higher_is_better,
        "target_met": met,
        **more,
    }
