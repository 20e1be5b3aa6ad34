"""On-card checks the interpreter cannot make (precision, loss scaling, device guard, determinism), pass/fail each.

    python benches/gpu_checks.py [--json out.json]

- large_logits: fp32, embeddings of norm 100 (|logits| ~ 1e5): Triton gradients within 1e-5 (max-abs relative) of
  float64, for symmetric and one-way InfoNCE, SupCon 'all' and 'one' (the backward relies on recomputing the
  forward's dots bitwise; on sm_90 the fp32 one-way backward runs 32-row tiles against the forward's 64);
- tf32x3: fp32 with TF32 off at unit norm: loss and gradients at fp32-level accuracy against float64 (1e-5), and
  with ``allow_tf32 = True`` at TF32 level (5e-3);
- loss_scale: fp16 SupCon 'all', NT-Xent and symmetric InfoNCE with grad_output 2**16 and 2**20: finite and within
  fp16 tolerance of the chunked backend;
- device_guard: with two or more GPUs, tensors on cuda:1 while cuda:0 is current give the same loss and gradients
  as on cuda:0 (skipped with one GPU);
- deterministic: under ``torch.use_deterministic_algorithms(True)`` two runs are bitwise equal and nothing is
  autotuned;
- dot_agreement (run first): the kernels' own logits product (``_dots_tile``) in 64-row tiles (``wgmma`` on sm_90) and 32-row
  tiles (``mma.sync``), and ``x_ij`` against ``x_ji`` (operands swapped), bitwise, per dtype and input precision, at
  ``--d`` and at a looped D: the backward recomputes the forward's logits and assumes they are bitwise the same
  (the 64 vs 32 rows equality always; ``x_ij == x_ji`` where it reuses the tile for the reverse direction, i.e. not
  for tf32x3, ``launch.recompute_transposed``).

Exit status 1 if any check fails. ``--device cpu`` with TRITON_INTERPRET=1 runs the same checks at toy sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastcl import functional as FF
from fastcl.kernels import jit as K


def max_rel(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def norm_rel(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def _grads(loss_name, tensors, backend, grad_output=1.0, temperature=0.07, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    if loss_name == "info_nce":
        loss = FF.info_nce_loss(*leaves, temperature=temperature, normalize=False, backend=backend, **kw)
    elif loss_name == "nt_xent":
        loss = FF.nt_xent_loss(*leaves, temperature=temperature, normalize=False, backend=backend)
    else:
        loss = FF.supcon_loss(leaves[0], kw["labels"], temperature=temperature, contrast_mode=kw.get("mode", "all"),
                              base_temperature=temperature, backend=backend)  # fmt: skip
    (loss * grad_output).backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


def check_large_logits(n, d, device):
    out = []
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1).mul(100).to(device)
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1).mul(100).to(device)
    feats = F.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1).mul(100).to(device)
    labels = torch.randint(0, 10, (n // 2,), generator=g).to(device)
    cases = [
        ("info_nce_symmetric", "info_nce", [q, k], {}, 0.07),
        ("info_nce_one_way", "info_nce", [q, k], {"symmetric": False}, 0.07),
        ("supcon_all", "supcon", [feats], {"labels": labels}, 0.01),
        ("supcon_one", "supcon", [feats], {"labels": labels, "mode": "one"}, 0.01),
    ]
    for name, loss_name, tensors, kw, t in cases:
        _, got = _grads(loss_name, tensors, "triton", temperature=t, **kw)
        _, ref = _grads(loss_name, [x.double() for x in tensors], "chunked", temperature=t, **kw)
        err = max(max_rel(a, b) for a, b in zip(got, ref))
        out.append(dict(check=f"large_logits/{name}", error=err, tolerance=1e-5, ok=err < 1e-5))
    return out


def check_tf32x3(n, d, device):
    out = []
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow, tol in ((False, 1e-5), (True, 5e-3)):
            torch.backends.cuda.matmul.allow_tf32 = allow
            loss, got = _grads("info_nce", [q, k], "triton", temperature=0.1)
            ref_loss, ref = _grads("info_nce", [q.double(), k.double()], "chunked", temperature=0.1)
            err = max([abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())] + [norm_rel(a, b) for a, b in zip(got, ref)])
            name = "tf32" if allow else "tf32x3"
            out.append(dict(check=f"fp32_precision/{name}", error=err, tolerance=tol, ok=err < tol))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return out


def check_loss_scale(n, d, device):
    out = []
    g = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1).to(device, torch.float16)
    labels = torch.randint(0, 10, (n // 2,), generator=g).to(device)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, torch.float16)
    b = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, torch.float16)
    for scale in (2.0**16, 2.0**20):
        for name, loss_name, tensors, kw in (
            ("supcon_all", "supcon", [feats], {"labels": labels}),
            ("nt_xent", "nt_xent", [a, b], {}),
            ("info_nce_symmetric", "info_nce", [a, b], {}),
        ):
            _, got = _grads(loss_name, tensors, "triton", grad_output=scale, temperature=0.5, **kw)
            _, ref = _grads(loss_name, tensors, "chunked", grad_output=scale, temperature=0.5, **kw)
            finite = all(torch.isfinite(x).all().item() for x in got)
            ref_finite = all(torch.isfinite(x).all().item() for x in ref)
            err = max(norm_rel(x.float(), y.float()) for x, y in zip(got, ref)) if finite and ref_finite else float("inf")
            out.append(dict(check=f"loss_scale/{name}/2^{int(scale).bit_length() - 1}", error=err, tolerance=1e-2,
                            ok=finite and err < 1e-2, chunked_finite=ref_finite))  # fmt: skip
    return out


def check_learnable_scale(n, d, device):
    """A tensor logit scale (``p.exp()``) on the Triton kernels (read from a device pointer): loss and gradients
    (both towers and ``p``) against the float64 chunked backend, CLIP (two-way) and SupCon 'all', fp32 and bf16."""
    out = []
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    feats = F.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1)
    labels = torch.randint(0, 10, (n // 2,), generator=g)

    def run(case, dtype, dev, backend):
        p = torch.tensor(2.659, device=dev, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        p.requires_grad_()
        if case == "clip":
            leaves = [img.to(dev, dtype).requires_grad_(), txt.to(dev, dtype).requires_grad_()]
            loss = FF.info_nce_loss(*leaves, logit_scale=p.exp(), normalize=False, backend=backend)
        else:
            leaves = [feats.to(dev, dtype).requires_grad_()]
            loss = FF.supcon_loss(leaves[0], labels.to(dev), temperature=1 / p.exp(), base_temperature=0.07,
                                  backend=backend)  # fmt: skip
        return [loss.detach(), *torch.autograd.grad(loss, [*leaves, p])]

    for case in ("clip", "supcon_all"):
        ref = run(case, torch.float64, "cpu", "chunked")
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            if dtype == torch.bfloat16 and device != "cuda":
                continue  # the interpreter has no bf16 (its loads return garbage)
            got = run(case, dtype, device, "triton")
            err = max(norm_rel(a.float(), b.float()) for a, b in zip(got, ref))
            name = f"learnable_scale/{case}/{str(dtype).split('.')[-1]}"
            out.append(dict(check=name, error=err, tolerance=tol, ok=err < tol))
    return out


def check_device_guard(n, d, device):
    if device != "cuda" or torch.cuda.device_count() < 2:
        return [dict(check="device_guard", ok=True, skipped="needs two GPUs")]
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1)
    labels = torch.randint(0, 10, (n // 2,), generator=g)
    with torch.cuda.device(0):
        loss0, grads0 = _grads("supcon", [feats.to("cuda:0")], "triton", labels=labels.to("cuda:0"))
        loss1, grads1 = _grads("supcon", [feats.to("cuda:1")], "triton", labels=labels.to("cuda:1"))
        torch.cuda.synchronize(1)
    err = max([abs(loss0.item() - loss1.item())] + [max_rel(a, b) for a, b in zip(grads1, grads0)])
    return [dict(check="device_guard", error=err, tolerance=1e-6, ok=err < 1e-6, current=0, tensors="cuda:1")]


def check_deterministic(n, d, device):
    import fastcl.kernels.launch as K

    g = torch.Generator().manual_seed(4)
    feats = F.normalize(torch.randn(n // 2, 2, d, generator=g), dim=-1).to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    labels = torch.randint(0, 10, (n // 2,), generator=g).to(device)
    previous = torch.are_deterministic_algorithms_enabled()
    tuned_before = dict(K._tuned)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        first = _grads("supcon", [feats], "triton", labels=labels)
        second = _grads("supcon", [feats], "triton", labels=labels)
    finally:
        torch.use_deterministic_algorithms(previous)
    equal = torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    return [dict(check="deterministic", ok=equal and K._tuned == tuned_before, bitwise_equal=equal)]


@triton.jit
def _dots_probe_kernel(
    a_ptr,
    c_ptr,
    out_ptr,
    n,
    dim,
    stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The ``[n, n]`` raw dots ``a_i . c_j`` with the kernels' own tile product, in ``BLOCK_M x BLOCK_N`` tiles."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_valid, col_valid = rows < n, cols < n
    a_tile = K._load_rows(a_ptr, rows, row_valid, stride, 0, dim, BLOCK_D)
    c_tile = K._load_rows(c_ptr, cols, col_valid, stride, 0, dim, BLOCK_D)
    dots = K._dots_tile(a_ptr, c_ptr, a_tile, c_tile, rows, cols, row_valid, col_valid, dim, stride, stride,
                        BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_D_TILE, INPUT_PRECISION)  # fmt: skip
    out = rows.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(out_ptr + out, dots, mask=row_valid[:, None] & col_valid[None, :])


def _probe_dots(a, c, block_m, precision):
    from fastcl.kernels import tiling

    n, dim = a.shape
    block_d, single = tiling.block_d_for(dim, a.element_size())
    out = torch.empty(n, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(n, block_m), triton.cdiv(n, 32))
    _dots_probe_kernel[grid](a, c, out, n, dim, a.stride(0), BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=block_d,
                             SINGLE_D_TILE=single, INPUT_PRECISION=precision, num_warps=8, num_stages=2)  # fmt: skip
    return out


def check_dot_agreement(n, d, device):
    from fastcl.kernels.launch import recompute_transposed

    out = []
    g = torch.Generator().manual_seed(5)
    cases = [(torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "tf32x3"), (torch.float32, "tf32")]
    for dim in sorted({d, 1024 if device == "cuda" else 320}):
        base_a = F.normalize(torch.randn(n, dim, generator=g), dim=-1).mul(10)
        base_c = F.normalize(torch.randn(n, dim, generator=g), dim=-1).mul(10)
        for dtype, precision in cases:
            if dtype == torch.bfloat16 and device != "cuda":
                continue  # the interpreter has no bf16
            a, c = base_a.to(device, dtype), base_c.to(device, dtype)
            rows64 = _probe_dots(a, c, 64, precision)
            rows32 = _probe_dots(a, c, 32, precision)
            transposed = _probe_dots(c, a, 64, precision).T
            name = f"dot_agreement/{str(dtype).split('.')[-1]}/{precision}/D{dim}"
            differ64 = int((rows64 != rows32).sum())
            row = dict(check=f"{name}/rows64_vs_32", ok=differ64 == 0, differing=differ64)
            if device != "cuda":  # numpy's matmul blocks by shape: only the plumbing is checked off-GPU
                row.update(ok=True, skipped="(interpreter: numpy matmul, not the card's instructions)")
            out.append(row)
            differ_t = int((rows64 != transposed).sum())
            relied_on = not recompute_transposed(dtype)
            out.append(dict(check=f"{name}/ij_vs_ji", ok=differ_t == 0 or not relied_on, differing=differ_t,
                            relied_on=relied_on))  # fmt: skip
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a plumbing check)")
        return 2
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    results = []
    # the bitwise probe first: it is quick and decides which configs the backward may use (README, GPU resources);
    # the JSON is rewritten after every check, so a time-boxed run that is cut short keeps what it measured
    checks = (check_dot_agreement, check_large_logits, check_tf32x3, check_loss_scale, check_learnable_scale,
              check_device_guard, check_deterministic)  # fmt: skip
    for check in checks:
        try:
            rows = check(args.n, args.d, args.device)
        except Exception as exc:  # a crash is a failed check, reported with the others
            rows = [dict(check=check.__name__, ok=False, error=f"{type(exc).__name__}: {exc}"[:300])]
        for r in rows:
            detail = f"error {r['error']:.2e} (tol {r['tolerance']:.0e})" if isinstance(r.get("error"), float) else ""
            differing = f"{r['differing']} differing" if "differing" in r else ""
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:36s} {detail} {differing} {r.get('skipped', '')}")
        results += rows
        failed = sum(not r["ok"] for r in results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "n": args.n, "d": args.d, "failed": failed, "results": results,
                           "complete": check is checks[-1]}, f, indent=1)  # fmt: skip
    print(f"{len(results)} checks, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" and "--device" in sys.argv and "cpu" in sys.argv:
        print("--device cpu needs TRITON_INTERPRET=1 set before import")
        sys.exit(2)
    sys.exit(main())
