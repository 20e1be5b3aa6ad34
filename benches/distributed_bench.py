"""Gathered-negatives training step across W processes: fastcl vs "every rank computes the full loss".

    python benches/distributed_bench.py                        # W=2 on CPU (gloo), N=4096 global embeddings
    python benches/distributed_bench.py --device cuda --world 2 --n 65536 --dtype bf16   # W GPUs (NCCL)

One step = the loss forward and backward on every rank, collectives included (from a barrier to the last rank
done). Implementations, all on identical inputs (SupCon with labels, two views, rank r holds global samples
``r * b .. (r + 1) * b``):

* ``fastcl``: ``SupConLoss(gather_distributed=True)``: all-gather, this rank's rows x all rows (fused), one
  reduce-scatter in backward.
* ``naive-dense``: the usual recipe: differentiable all-gather (``torch.distributed.nn.all_gather``), then the
  dense SupContrast loss on the whole global batch on every rank (``backend='reference'``).
* ``naive-fused``: the same recipe with fastcl's fused loss on the whole global batch: the cost of computing the
  full loss everywhere, without the dense N x N buffers.

Prints the median step time with the quartiles, the speed-up over each naive form, and the bytes each rank
sends per step. Timings on a shared machine are noisy: compare medians only where the quartiles do not overlap.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
IMPLS = ("fastcl", "naive-fused", "naive-dense")


def _step_fn(impl, features, labels):
    from torch.distributed.nn.functional import all_gather  # the differentiable gather of the usual recipe

    from fastcl import SupConLoss

    warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)

    if impl == "fastcl":
        criterion = SupConLoss(temperature=0.1, gather_distributed=True)
        return lambda: criterion(features, labels)
    backend = "reference" if impl == "naive-dense" else "auto"
    criterion = SupConLoss(temperature=0.1, backend=backend)

    def naive():
        all_features = torch.cat(all_gather(features), dim=0)
        gathered_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered_labels, labels)
        return criterion(all_features, torch.cat(gathered_labels))

    return naive


def _worker(rank, world, port, args, out_path):
    torch.set_num_threads(max(1, args.threads))
    use_cuda = args.device == "cuda"
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    b = args.n // (2 * world)  # samples per rank; 2 views each
    g = torch.Generator().manual_seed(0)
    all_feats = torch.nn.functional.normalize(torch.randn(world * b, 2, args.dim, generator=g), dim=-1)
    all_labels = torch.randint(0, 100, (world * b,), generator=g)
    features = all_feats[rank * b : (rank + 1) * b].to(device, DTYPES[args.dtype]).requires_grad_()
    labels = all_labels[rank * b : (rank + 1) * b].to(device)
    results = {}
    for impl in args.impls:
        step = _step_fn(impl, features, labels)
        times = []
        for i in range(args.warmup + args.repeats):
            features.grad = None
            dist.barrier()
            if use_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step().backward()
            if use_cuda:
                torch.cuda.synchronize()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank is done
            if i >= args.warmup:
                times.append(elapsed.item())
        results[impl] = times
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quartiles(values):
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return q[0], statistics.median(values), q[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--n", type=int, default=4096, help="global embeddings (samples x 2 views)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per process (CPU)"
    )
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--json", help="also write the step times here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        print(f"--device cuda needs {args.world} GPUs, found {torch.cuda.device_count()}")
        return 1
    args.threads = max(1, min(args.threads, (os.cpu_count() or 2) // args.world)) if args.device == "cpu" else 1

    out_path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fastcl_dist_bench_{os.getpid()}.json")
    mp.start_processes(
        _worker, args=(args.world, _free_port(), args, out_path), nprocs=args.world, start_method="spawn"
    )
    with open(out_path) as f:
        results = json.load(f)
    os.remove(out_path)

    elem = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    rows = args.n // args.world  # rows (views x samples) per rank: M
    sent = (args.world - 1) * rows * args.dim * elem  # per rank, ring all-gather; the reduce-scatter the same
    label_bytes = (args.world - 1) * (args.n // (2 * args.world)) * 8
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {args.threads} thread(s)/rank"
    print(f"SupCon, W={args.world}, N={args.n} global embeddings (2 views), D={args.dim}, {args.dtype}, {device}")
    print(f"{'impl':<12} {'median s':>9} {'q1 s':>8} {'q3 s':>8}  vs fastcl")
    medians = {impl: _quartiles(times)[1] for impl, times in results.items()}
    for impl, times in results.items():
        q1, med, q3 = _quartiles(times)
        ratio = f"{med / medians['fastcl']:.2f}x" if "fastcl" in medians else ""
        print(f"{impl:<12} {med:>9.4f} {q1:>8.4f} {q3:>8.4f}  {ratio}")
    print(
        f"bytes sent per rank per step (fastcl): features all-gather {sent}, labels {label_bytes}, "
        f"gradient reduce-scatter {sent}, metadata {(args.world - 1) * 24 * 8}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device, "times": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
