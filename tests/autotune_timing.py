"""The autotuner's timer for tests on the interpreter: Triton's ``do_bench`` needs a GPU, so the tests that drive the
autotune wrapper (keys, pruning, launch grids) time each config on the host instead."""

import time


def host_timer(fn, quantiles=None):
    """``do_bench``'s call shape: one host-timed run of ``fn``; three equal values when ``quantiles`` are asked."""
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return [elapsed, elapsed, elapsed] if quantiles else elapsed
