"""Chunked vs dense vs the sgemm floor, interleaved in one process (issue 13): the numbers behind RESULTS.md's table.

    python benches/side_by_side.py --threads 2 --n 64,256,1024,2048,8192 --losses infonce,supcon,ntxent --repeats 15

Each repeat runs every implementation once in turn (same inputs), so a noisy neighbour slows all of them alike; the
table gives medians. Floor = 6 N^2 D flops at the rate of a square 2048^3 sgemm measured in this process.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def sgemm_rate(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", default="64,256,1024,2048")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--losses", default="infonce,supcon,ntxent")
    parser.add_argument("--modes", default="fwd+bwd")
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rate = sgemm_rate()
    print(f"threads={args.threads} sgemm 2048^3: {rate / 1e9:.1f} GFLOP/s")
    print("| loss | mode | N | chunked | dense | chunked/dense | floor | chunked/floor |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(v) for v in args.n.split(",")]:
        for loss in args.losses.split(","):
            for mode in args.modes.split(","):
                runs = {}
                for impl, backend in ((benchlib.IMPL_FASTCL, "chunked"), (benchlib.IMPL_REFERENCE, "reference")):
                    case = benchlib.Case(impl, backend, loss, mode, n, args.d, "fp32", "cpu")
                    runs[backend] = benchlib.build(case, benchlib.make_inputs(case))
                times = {k: [] for k in runs}
                for _ in range(2):
                    for prepare, target in runs.values():
                        benchlib.time_call(prepare, target)
                for _ in range(args.repeats):
                    for k, (prepare, target) in runs.items():
                        times[k].append(benchlib.time_call(prepare, target)[0])
                chunked, dense = (statistics.median(times[k]) for k in ("chunked", "reference"))
                floor = 6 * n * n * args.d / rate
                print(
                    f"| {loss} | {mode} | {n} | {chunked * 1e3:.2f} ms | {dense * 1e3:.2f} ms | {chunked / dense:.2f} "
                    f"| {floor * 1e3:.2f} ms | {chunked / floor:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
