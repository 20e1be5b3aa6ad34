"""SupCon over the global batch of all ranks with DistributedDataParallel, on CPUs (gloo) or GPUs (NCCL).

    torchrun --nproc_per_node=2 -m fastcl.examples.ddp_supcon [--steps 5] [--batch 32] [--uneven]

Each rank draws its own batch of a small synthetic task (points around class centres, two noisy views each),
encodes it with a DDP-wrapped MLP and calls ``SupConLoss(..., gather_distributed=True)``: its samples are the
anchors and every rank's samples the contrast set. The same script runs unchanged on GPUs, one per process (NCCL),
and on CPUs (gloo). ``--uneven`` gives rank r ``batch + 3 r`` samples. Each rank prints its loss; ``global`` is the
mean over ranks, which is the loss of one process on the concatenated batch (and DDP's averaged gradients are
that process's gradients).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from fastcl import SupConLoss


def _batch(step: int, rank: int, size: int, centres: torch.Tensor, device: torch.device):
    g = torch.Generator().manual_seed(1000 * step + rank)
    labels = torch.randint(0, centres.shape[0], (size,), generator=g)
    points = centres[labels] + 0.5 * torch.randn(size, centres.shape[1], generator=g)
    views = [points + 0.3 * torch.randn(points.shape, generator=g) for _ in range(2)]
    return torch.cat(views).to(device), labels.to(device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank (two views each)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--uneven", action="store_true", help="rank r gets batch + 3 r samples")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    torch.manual_seed(0)  # same task and initial weights everywhere (DDP also broadcasts rank 0's weights)
    centres = 2.0 * torch.randn(args.classes, 16)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32)).to(device)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    criterion = SupConLoss(temperature=0.1, normalize=True, gather_distributed=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    size = args.batch + (3 * rank if args.uneven else 0)
    for step in range(args.steps):
        views, labels = _batch(step, rank, size, centres, device)
        z = model(views)  # [2 * size, 32]: view 0 of every sample, then view 1
        features = torch.stack(z.chunk(2), dim=1)  # [size, 2, 32]
        loss = criterion(features, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the gather's reduce-scatter, then DDP's gradient all-reduce
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        line = f"rank {rank}/{world} step {step} samples {size} loss {loss.item():.4f} global {mean.item() / world:.4f}"
        sys.stdout.write(line + "\n")  # one write per line: the ranks share the terminal
        sys.stdout.flush()
    # Release what holds the process group (the DDP model, the last step's graph) before destroying it, so that its
    # gloo worker threads finish while Python still runs: a worker that drops the last reference to a tensor during
    # interpreter shutdown aborts the process ("terminate called without an active exception"; PyTorch 2.13 with
    # gloo, 1 to 2 runs in 40 on a busy 2-core machine, a plain DDP script included).
    del model, optimizer, loss, mean
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
