"""Run a test worker on several local processes (gloo on 127.0.0.1) and collect what each rank saved.

The worker is called as ``worker(rank, *leading, port, out_dir)``, initialises its process group on
``tcp://127.0.0.1:port`` and saves its results to ``out_dir/rank{rank}.pt``. The test fails, never hangs, when a
process does not finish in time or exits with an error. Once the worker has returned, the process exits at once
(``os._exit``): the destructors of gloo's threads at interpreter teardown can abort a process whose work is done and
saved ("terminate called without an active exception"), which is no result of the code under test.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from typing import Callable, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_gloo(rank: int, world: int, port: int) -> None:
    """In a worker: join the gloo process group of ``world`` ranks on ``tcp://127.0.0.1:port`` (60 s timeout)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip


def _run_then_exit(worker: Callable, args) -> None:
    try:
        worker(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(worker: Callable, world: int, out_dir, timeout_s: float, *leading) -> List:
    """Start ``world`` spawned processes running ``worker``; the list of what each rank saved, in rank order."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_run_then_exit, args=(worker, (rank, *leading, port, str(out_dir))), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} of {world} did not finish within {timeout_s} s"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"worker exit codes {codes}"
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False) for rank in range(world)]
