"""A microbenchmark of the GPU's exponential throughput, for the exp term of the roofline (benchlib.gpu_roofline).

Every element runs a dependent chain of ``ITERS`` ``exp2`` calls on register values (8 independent chains per thread
give the scheduler work while one waits), so the kernel is bound by the special-function units, not by memory:
``exp2/s = elements * ITERS / seconds``. The chain stays bounded: ``x -> -0.5 * exp2(x)`` maps [-1, 0] into itself.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _exp_chain_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(ITERS):
        x = -0.5 * tl.exp2(x)
        acc += x
    tl.store(out_ptr + offsets, acc)


def exp_chain(x, iters: int = 256, block: int = 1024):
    """Run the kernel over ``x`` (fp32, size a multiple of ``block``); returns the per-element sums."""
    import torch

    out = torch.empty_like(x)
    _exp_chain_kernel[(x.numel() // block,)](x, out, ITERS=iters, BLOCK=block, num_warps=4)
    return out


def exp_throughput(iters: int = 256, block: int = 1024) -> float:
    """exp2 evaluations per second on the current CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    programs = props.multi_processor_count * 64
    x = -torch.rand(programs * block, device="cuda", dtype=torch.float32)
    exp_chain(x, iters, block)  # compile
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 10
    start.record()
    for _ in range(reps):
        exp_chain(x, iters, block)
    stop.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(stop) / 1e3 / reps
    return x.numel() * iters / seconds
