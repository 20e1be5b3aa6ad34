"""Where a run executes: the process group under ``torchrun``, the device, CPU threads and bf16 autocast."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "autocast", "device_name", "gather_objects", "peak_memory_mb", "resolve_device",
           "setup_distributed", "torch_threads"]


@dataclass
class Dist:
    """This process's place in the job: rank, number of processes, local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The device named by ``--device`` (``'auto'``: CUDA when available); a bare ``'cuda'`` becomes this local
    rank's GPU, which is made current."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: CUDA is not available in this torch build / machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_name: str, threads: int = 0) -> Dist:
    """Single process, or one rank of a ``torchrun`` job (``WORLD_SIZE > 1``): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    if world <= 1:
        return Dist(0, 1, 0, resolve_device(device_name, 0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cpu" and threads <= 0:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def gather_objects(obj: Any, d: Dist) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when ``enabled``; nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch threads, then restore the count. Small full-batch fits (the probes) run on one:
    on a shared CPU the hand-offs of more threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device) -> str:
    """The device as the summary records it: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak host RSS and, on CUDA, peak allocated / reserved device memory, in MiB."""
    out = {"host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if device.type == "cuda":
        out["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out
