"""Where the chunked backend's time goes: one fwd+bwd call under torch.profiler, ops grouped into the similarity
GEMM, the two gradient GEMMs, exponentials, reductions, other elementwise work and the rest.

    python benches/profile_chunked.py --threads 1 --n 8192 --losses supcon,infonce

Prints one markdown table per loss: milliseconds and share of the call per group, and the floor (6 N^2 D flops at
the sgemm rate measured in this process) for scale. GEMMs are told apart by their operand shapes: the similarity
product has K = D (under half the output's width); a gradient product with K at least its row count multiplies a
block by the embeddings (``dA = dS C``, the symmetric route's ``M x``), one with fewer (K = the block's rows) is a
transposed block's (``dC += dS^T A``, ``M^T x``). The profiler adds a little overhead per op, so the total is
slightly above an unprofiled call.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

GROUPS = (
    ("similarity GEMM (s = a c^T, K = D; every pass)", "sim"),
    ("gradient GEMM, K = the block's width (dA = dS C; symmetric: M x)", "da"),
    ("gradient GEMM, K = the block's rows (dC += dS^T A; symmetric: M^T x)", "dc"),
    ("exp", "exp"),
    ("reductions (sum, amax, logsumexp)", "red"),
    ("other elementwise on blocks and vectors", "ew"),
    ("Python, dispatch, autograd, small ops", "rest"),
)
REDUCTIONS = ("aten::sum", "aten::amax", "aten::logsumexp", "aten::max", "aten::linalg_vecdot")
ELEMENTWISE = ("aten::mul", "aten::sub", "aten::add", "aten::div", "aten::addcmul", "aten::where", "aten::fill_",
               "aten::log_softmax", "aten::_log_softmax", "aten::softmax", "aten::_softmax", "aten::log", "aten::copy_",
               "aten::maximum", "aten::clamp_min", "aten::reciprocal", "aten::zero_", "aten::eq", "aten::index",
               "aten::index_add_", "aten::scatter_add_", "aten::sort", "aten::cumsum", "aten::masked_fill_")


def classify(event) -> str:
    name, shapes = event.key, event.input_shapes
    if name in ("aten::mm", "aten::addmm_", "aten::addmm"):
        operands = shapes[1:3] if name.startswith("aten::addmm") else shapes[:2]  # (addmm: self, mat1, mat2)
        if len(operands) < 2 or len(operands[0]) != 2 or len(operands[1]) != 2:
            return "sim"
        (m, k), (_, n) = operands
        if k < 2 * n:  # K = D against an output as wide as the contrast set: the similarity product
            return "sim"
        return "da" if k >= m else "dc"
    if name.startswith("aten::exp"):
        return "exp"
    if name in REDUCTIONS:
        return "red"
    if name.rstrip("_") in ELEMENTWISE or name in ELEMENTWISE:
        return "ew"
    return None


def profile_call(loss: str, n: int, d: int):
    case = benchlib.Case("fastcl", "chunked", loss, "fwd+bwd", n, d, "fp32", "cpu")
    prepare, target = benchlib.build(case, benchlib.make_inputs(case))
    benchlib.time_call(prepare, target)
    plain = min(benchlib.time_call(prepare, target)[0] for _ in range(2))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        benchlib.time_call(prepare, target)
        total = time.perf_counter() - start
    spent = dict.fromkeys((key for _, key in GROUPS), 0.0)
    for event in prof.key_averages(group_by_input_shape=True):
        group = classify(event)
        if group is not None:
            spent[group] += event.self_cpu_time_total / 1e6
    spent["rest"] = max(0.0, total - sum(v for k, v in spent.items() if k != "rest"))
    return plain, total, spent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--losses", default="supcon,infonce")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rate = benchlib.sgemm_rate()
    floor = 6 * args.n**2 * args.d / rate
    print(f"threads={args.threads} N={args.n} D={args.d}: sgemm 2048^3 {rate / 1e9:.1f} GFLOP/s, floor {floor * 1e3:.0f} ms")
    for loss in args.losses.split(","):
        plain, total, spent = profile_call(loss, args.n, args.d)
        print(f"\n{loss}: unprofiled {plain * 1e3:.0f} ms ({plain / floor:.2f}x floor), profiled {total * 1e3:.0f} ms\n")
        print("| where | ms | share | x floor |")
        print("|---|---|---|---|")
        for title, key in GROUPS:
            print(f"| {title} | {spent[key] * 1e3:.0f} | {spent[key] / total:.0%} | {spent[key] / floor:.2f} |")


if __name__ == "__main__":
    main()
