"""GPU correctness at benchmark sizes: the Triton backend against float64, in fp32 / bf16 / fp16, at large N.

    python benches/gpu_correctness.py [--n 16384] [--d 128] [--json out.json]

For each loss (SupCon with labels, NT-Xent, symmetric InfoNCE) and dtype, the inputs are quantised to the dtype
once; the float64 truth is the loss and gradients of *those* quantised inputs computed in float64 by the chunked
backend on the same GPU (exact formulas, blockwise, so N = 16384 costs milliseconds and no N x N buffer). The float64
chunked path is itself tied to the dense reference (fastcl.ops.reference, float64) at ``--n-dense`` (default 4096).
Errors are norm-relative: ``|loss - ref| / |ref|`` and ``||grad - ref|| / ||ref||``. Where installed, the peers are
checked to compute the same quantities as the benchmarks assume (Inf-CL InfoNCE, PML SupConLoss / NTXentLoss).

Exit status 1 if any fastcl check exceeds its tolerance (the same per-dtype tolerances as
tests/kernels/test_triton_kernels.py); a disagreeing peer is reported but does not fail the run.
Without CUDA it refuses, unless ``--device cpu`` is given with TRITON_INTERPRET=1 (a slow plumbing check at small N).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib
import torch
from benchlib import Case

# (loss, grad) tolerances, norm-relative; tests/kernels/test_triton_kernels.py uses the loss ones and 5x for gradients.
TOLERANCE = {"fp32": (2e-5, 1e-4), "fp16": (2e-3, 1e-2), "bf16": (2e-2, 1e-1)}
PEER_TOLERANCE = (1e-3, 1e-2)  # peers in fp32: Inf-CL's dots run in TF32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def value_and_grads(case: Case, inputs: dict):
    leaves = [v for v in inputs.values() if v.requires_grad]
    loss = benchlib.loss_callable(case)(inputs)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), [g.detach() for g in grads]


def cast_inputs(inputs: dict, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in inputs.items():
        if value.is_floating_point():
            out[key] = value.detach().to(dtype).requires_grad_()
        else:
            out[key] = value
    return out


def compare(name, loss, grads, ref_loss, ref_grads, tol) -> dict:
    loss_err = abs(loss.double().item() - ref_loss.double().item()) / max(abs(ref_loss.double().item()), 1e-300)
    grad_err = max(rel(g, r) for g, r in zip(grads, ref_grads))
    finite = bool(torch.isfinite(loss).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    ok = finite and loss_err <= tol[0] and grad_err <= tol[1]
    return {
        "check": name,
        "loss": loss.double().item(),
        "ref_loss": ref_loss.double().item(),
        "loss_rel_err": loss_err,
        "grad_rel_err": grad_err,
        "loss_tol": tol[0],
        "grad_tol": tol[1],
        "finite": finite,
        "ok": ok,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="side of the N x N similarity matrix")
    parser.add_argument("--n-dense", type=int, default=4096, help="N of the dense float64 cross-check")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_correctness: no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a plumbing check)")
        return 2
    device = args.device
    results = []
    start = time.time()

    def record(row):
        results.append(row)
        flag = "ok " if row["ok"] else "FAIL"
        print(
            f"{flag} {row['check']:58s} loss {row['loss']:.6g} (ref {row['ref_loss']:.6g}) "
            f"loss err {row['loss_rel_err']:.2e} (tol {row['loss_tol']:.0e}) grad err {row['grad_rel_err']:.2e} "
            f"(tol {row['grad_tol']:.0e})",
            flush=True,
        )

    for loss_name in benchlib.LOSSES:
        # The float64 chunked path against the dense float64 reference: ties the large-N truth to the formulas.
        n_dense = min(args.n_dense, args.n)
        base = Case("fastcl", "chunked", loss_name, "fwd+bwd", n_dense, args.d, "fp64", device)
        inputs = benchlib.make_inputs(base, seed=3)
        loss, grads = value_and_grads(base, inputs)
        ref_loss, ref_grads = value_and_grads(
            base.replace(impl="reference", backend="reference"), cast_inputs(inputs, torch.float64)
        )
        record(
            compare(
                f"{loss_name} chunked-f64 vs dense-f64 N={n_dense}", loss, grads, ref_loss, ref_grads, (1e-10, 1e-9)
            )
        )
        del inputs, grads, ref_grads

        for dtype_name in args.dtypes.split(","):
            case = Case("fastcl", "triton", loss_name, "fwd+bwd", args.n, args.d, dtype_name, device)
            inputs = benchlib.make_inputs(case, seed=4)
            loss, grads = value_and_grads(case, inputs)
            truth = case.replace(backend="chunked", dtype="fp64")
            ref_loss, ref_grads = value_and_grads(truth, cast_inputs(inputs, torch.float64))
            record(
                compare(
                    f"{loss_name} triton {dtype_name} vs f64 N={args.n} D={args.d}",
                    loss,
                    grads,
                    ref_loss,
                    ref_grads,
                    TOLERANCE[dtype_name],
                )
            )
            del inputs, grads, ref_grads
            if device == "cuda":
                torch.cuda.empty_cache()

    # Peers: the benchmarks compare against them on "the same work"; check that it is the same quantity.
    for impl, loss_name, n in (
        (benchlib.IMPL_INFCL, "infonce", 4096),
        (benchlib.IMPL_PML, "supcon", 1024),
        (benchlib.IMPL_PML, "ntxent", 128),
        (benchlib.IMPL_PML, "infonce", 128),
    ):
        peer = Case(impl, benchlib.PEER_BACKEND[(impl, loss_name)], loss_name, "fwd+bwd", n, args.d, "fp32", device)
        reason = benchlib.unavailable(peer)
        if reason:
            print(f"skip {impl} {loss_name}: {reason}")
            continue
        inputs = benchlib.make_inputs(peer, seed=5)
        loss, grads = value_and_grads(peer, inputs)
        ours = peer.replace(impl="fastcl", backend="chunked", dtype="fp64")
        if loss_name == "supcon":  # PML normalises (cosine similarity): compare with fastcl's normalize=True
            import fastcl.functional as FF

            x64 = cast_inputs(inputs, torch.float64)
            t = benchlib.TEMPERATURE["supcon"]
            ref_loss = FF.supcon_loss(
                x64["features"], x64["labels"], temperature=t, base_temperature=t, normalize=True, backend="chunked"
            )
            ref_grads = torch.autograd.grad(ref_loss, [x64["features"]])
        else:
            ref_loss, ref_grads = value_and_grads(ours, cast_inputs(inputs, torch.float64))
        row = compare(
            f"peer {impl} {loss_name} fp32 vs fastcl f64 N={n}", loss, grads, ref_loss, ref_grads, PEER_TOLERANCE
        )
        row["informational"] = True  # a peer that disagrees makes the comparison unfair, not fastcl wrong
        record(row)

    failed = [r for r in results if not r["ok"] and not r.get("informational")]
    peers_off = [r for r in results if not r["ok"] and r.get("informational")]
    if peers_off:
        print(f"gpu_correctness: {len(peers_off)} peer check(s) disagree with fastcl (informational)")
    summary = {
        "device": benchlib.device_name(device),
        "n": args.n,
        "d": args.d,
        "versions": benchlib.versions(),
        "seconds": round(time.time() - start, 1),
        "failed": len(failed),
        "results": results,
    }
    print(
        f"gpu_correctness: {sum(r['ok'] for r in results)} passed, {len(failed)} failed "
        f"({summary['seconds']} s on {summary['device']})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
