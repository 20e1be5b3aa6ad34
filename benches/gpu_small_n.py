"""Everyday batch sizes on a GPU: fused Triton against the dense reference (and Inf-CL where installed), fwd+bwd.

    python benches/gpu_small_n.py [--n 512 1024 2048 4096 16384 65536] [--dtypes fp32 bf16] [--json out.json]

For SupCon 'all' (labels) and symmetric InfoNCE at D = 128, times forward + backward of each implementation with CUDA
events (warm-up first, so autotuning and compilation are outside the timing; median of ``--reps``) and reports the
ratios the GPU targets are stated in: reference / triton (>= 1 at N = 1024, >= 10 at N = 16384 in bf16, >= 3 in
fp32 via tf32x3). The dense reference materialises N x N logits, so it is skipped where that would exceed
``--dense-max-gib``. fp32 runs with ``torch.backends.cuda.matmul.allow_tf32 = False`` (PyTorch's default) for both:
the reference in IEEE fp32, fastcl via tf32x3.

Without CUDA it refuses, unless ``--device cpu`` with TRITON_INTERPRET=1 (plumbing check at toy sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastcl import functional as FF

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _inputs(loss: str, n: int, d: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(n)
    if loss == "supcon":
        x = F.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1)
        labels = torch.randint(0, max(2, n // 20), (n // 2,), generator=g)
        return {"features": x.to(device, dtype).requires_grad_(), "labels": labels.to(device)}
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return {"query": q.to(device, dtype).requires_grad_(), "key": k.to(device, dtype).requires_grad_()}


def _loss_fn(loss: str, impl: str):
    if impl == "infcl":
        from inf_cl import cal_flash_loss

        def infcl(x):
            q, k = x["query"], x["key"]
            d = q.shape[-1]
            scale = 1.0 / 0.07
            return 0.5 * (
                cal_flash_loss(q, k, None, scale, head_dim=d).mean()
                + cal_flash_loss(k, q, None, scale, head_dim=d).mean()
            )

        return infcl
    if loss == "supcon":
        return lambda x: FF.supcon_loss(x["features"], x["labels"], temperature=0.07, backend=impl)
    return lambda x: FF.info_nce_loss(x["query"], x["key"], temperature=0.07, normalize=False, backend=impl)


def _time(fn, inputs, reps: int, device: str) -> float:
    leaves = [v for v in inputs.values() if v.requires_grad]

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(inputs).backward()

    for _ in range(2):
        step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 16384, 65536])
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--losses", nargs="+", default=["supcon", "infonce"], choices=["supcon", "infonce"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dense-max-gib", type=float, default=24.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a plumbing check)")
        return 2
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("--device cpu needs TRITON_INTERPRET=1")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    deadline = float(os.environ.get("FASTCL_BENCH_DEADLINE", "inf"))
    try:
        import inf_cl  # noqa: F401

        have_infcl = args.device == "cuda"
    except ImportError:
        have_infcl = False

    rows = []
    print(f"{'loss':8s} {'dtype':5s} {'N':>6s} {'triton ms':>10s} {'ref ms':>9s} {'ref/triton':>10s} {'infcl ms':>9s}")
    for dtype_name in args.dtypes:
        for loss in args.losses:
            for n in args.n:
                if time.time() > deadline:
                    print("deadline reached: stopping")
                    break
                dtype = DTYPES[dtype_name]
                inputs = _inputs(loss, n, args.d, dtype, args.device)
                row = dict(loss=loss, dtype=dtype_name, n=n, d=args.d)
                row["triton_s"] = _time(_loss_fn(loss, "triton"), inputs, args.reps, args.device)
                dense_gib = 4 * n * n * 4 / 2**30  # logits, exp, mask, grad: ~4 fp32 N x N buffers
                if dense_gib <= args.dense_max_gib:
                    row["reference_s"] = _time(_loss_fn(loss, "reference"), inputs, args.reps, args.device)
                    row["reference_over_triton"] = row["reference_s"] / row["triton_s"]
                if have_infcl and loss == "infonce" and dtype != torch.float32:
                    try:
                        row["infcl_s"] = _time(_loss_fn(loss, "infcl"), inputs, args.reps, args.device)
                    except Exception as exc:  # a peer failing is reported, not fatal
                        row["infcl_error"] = f"{type(exc).__name__}: {exc}"[:200]
                rows.append(row)
                ref = f"{row['reference_s'] * 1e3:9.3f}" if "reference_s" in row else f"{'-':>9s}"
                ratio = f"{row['reference_over_triton']:10.2f}" if "reference_s" in row else f"{'-':>10s}"
                inf = f"{row['infcl_s'] * 1e3:9.3f}" if "infcl_s" in row else f"{'-':>9s}"
                print(f"{loss:8s} {dtype_name:5s} {n:6d} {row['triton_s'] * 1e3:10.3f} {ref} {ratio} {inf}", flush=True)
                del inputs
                if args.device == "cuda":
                    torch.cuda.empty_cache()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "results": rows}, f, indent=1)
    print(f"{len(rows)} cases on {device_name}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
