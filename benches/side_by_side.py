"""Chunked vs dense vs the sgemm floor, interleaved in one process: the numbers behind RESULTS.md's table.

    python benches/side_by_side.py --threads 2 --n 64,256,1024,2048,8192 --losses all --repeats 15

Each repeat runs every implementation once in turn (same inputs), so a noisy neighbour slows all of them alike; the
table gives medians. Floor = 6 N^2 D flops at R, the rate of a square 2048^3 sgemm measured in this process again
before each N (a shared machine's rate drifts; the R column shows it).

Losses (``--losses``, comma-separated, or ``all``): the sweep's ``supcon`` (labels, contrast_mode 'all'), ``ntxent``
and ``infonce`` (symmetric), and the other modes: ``supcon-one`` (labels, 'one'), ``supcon-unsup`` (no
labels, 'all': SimCLR), ``supcon-mask`` (a [bsz, bsz] mask), ``infonce-oneway`` (symmetric=False, default pairing),
``infonce-labels`` (symmetric=False, random positive indices). N is the side of the similarity matrix as in
:mod:`benchlib` (for 'one' the anchors are the N/2 first views).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

BASE = ("supcon", "ntxent", "infonce")
VARIANTS = ("supcon-one", "supcon-unsup", "supcon-mask", "infonce-oneway", "infonce-labels")


def variant_target(loss: str, backend: str, n: int, d: int):
    """``(prepare, target)`` of one fwd+bwd call, as :func:`benchlib.build` for the sweep's losses."""
    base = loss.split("-")[0]
    case = benchlib.Case(benchlib.IMPL_FASTCL if backend == "chunked" else "reference", backend, base, "fwd+bwd", n,
                         d, "fp32", "cpu")  # fmt: skip
    inputs = benchlib.make_inputs(case)
    if loss in BASE:
        return benchlib.build(case, inputs)
    import fastcl.functional as FF

    t = benchlib.TEMPERATURE[base]
    gen = torch.Generator().manual_seed(1)
    if loss == "supcon-one":
        fn = lambda x: FF.supcon_loss(x["features"], x["labels"], temperature=t, base_temperature=t,  # noqa: E731
                                      contrast_mode="one", backend=backend)  # fmt: skip
    elif loss == "supcon-unsup":
        fn = lambda x: FF.supcon_loss(x["features"], temperature=t, base_temperature=t, backend=backend)  # noqa: E731
    elif loss == "supcon-mask":
        labels = inputs["labels"]
        inputs["mask"] = (labels[:, None] == labels[None, :]).float()
        fn = lambda x: FF.supcon_loss(x["features"], mask=x["mask"], temperature=t, base_temperature=t,  # noqa: E731
                                      backend=backend)  # fmt: skip
    elif loss == "infonce-oneway":
        fn = lambda x: FF.info_nce_loss(x["query"], x["key"], temperature=t, symmetric=False,  # noqa: E731
                                        backend=backend)  # fmt: skip
    elif loss == "infonce-labels":
        inputs["labels"] = torch.randint(0, n, (n,), generator=gen)
        fn = lambda x: FF.info_nce_loss(x["query"], x["key"], x["labels"], temperature=t,  # noqa: E731
                                        symmetric=False, backend=backend)  # fmt: skip
    else:
        raise ValueError(f"unknown loss {loss!r}; choose from {BASE + VARIANTS}")
    leaves = [v for v in inputs.values() if v.requires_grad]
    return (lambda: None), (lambda _: torch.autograd.grad(fn(inputs), leaves))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", default="64,256,1024,2048")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--losses", default="infonce,supcon,ntxent")
    parser.add_argument("--repeats", type=int, default=11, help="most repeats per row")
    parser.add_argument("--budget-s", type=float, default=20.0, help="fewer repeats (>= 3) for rows slower than this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    losses = BASE + VARIANTS if args.losses == "all" else tuple(args.losses.split(","))
    rate = benchlib.sgemm_rate()
    print(f"threads={args.threads} sgemm 2048^3: {rate / 1e9:.1f} GFLOP/s")
    print("| loss | N | chunked | dense | chunked/dense | floor | chunked/floor | R GFLOP/s | repeats |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(v) for v in args.n.split(",")]:
        rate = benchlib.sgemm_rate(fresh=True)
        for loss in losses:
            runs = {backend: variant_target(loss, backend, n, args.d) for backend in ("chunked", "reference")}
            times = {k: [] for k in runs}
            start = time.perf_counter()
            for prepare, target in runs.values():
                benchlib.time_call(prepare, target)
            per_round = time.perf_counter() - start
            repeats = max(3, min(args.repeats, int(args.budget_s / max(per_round, 1e-6))))
            if per_round < 0.05:
                benchlib.time_call(*runs["chunked"]), benchlib.time_call(*runs["reference"])
            for _ in range(repeats):
                for k, (prepare, target) in runs.items():
                    times[k].append(benchlib.time_call(prepare, target)[0])
            chunked, dense = (statistics.median(times[k]) for k in ("chunked", "reference"))
            pairs = n * n // 2 if loss == "supcon-one" else n * n  # 'one': N/2 anchors against N
            floor = 6 * pairs * args.d / rate
            print(
                f"| {loss} | {n} | {chunked * 1e3:.2f} ms | {dense * 1e3:.2f} ms | {chunked / dense:.2f} "
                f"| {floor * 1e3:.2f} ms | {chunked / floor:.2f} | {rate / 1e9:.1f} | {repeats} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
