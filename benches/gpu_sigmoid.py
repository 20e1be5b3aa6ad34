"""The sigmoid (SigLIP) loss on a GPU: on-card accuracy of the Triton kernel, then B = 65,536, D = 768, bf16,
fwd+bwd time and peak memory against open_clip's SigLipLoss and siglip-kernel on the same card.

    python benches/gpu_sigmoid.py [--n 65536] [--d 768] [--json out.json]

- accuracy: bf16 / fp16 / fp32 (tf32x3, and tf32 with ``allow_tf32``) Triton loss and gradients (towers, logit_scale,
  logit_bias) against float64 at N = 4096, unit-norm features, s = 10, b = -10; and the gathered offset pairing;
- speed: fastcl ``backend='triton'`` and ``'chunked'`` against open_clip's ``SigLipLoss`` (dense; its
  ``chunk_size`` path when the installed open_clip has one), and siglip-kernel's ``chunked_bf16`` (default chunk and
  1024) and ``chunked_bf16_pipelined``: median ms of fwd+bwd (features, log-scale and bias require grad), and peak
  memory above the inputs (``torch.cuda.max_memory_allocated``). A peer that runs out of memory or is not installed
  is reported as such. siglip-kernel takes the log of the scale and normalises by ``N * M`` (its loss is fastcl's
  / N).

``--device cpu`` with TRITON_INTERPRET=1 runs the plumbing at toy sizes (no bf16, no peers). Exit status 1 if an
accuracy check fails.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastcl import functional as FF


def _open_clip_loss():
    try:
        from open_clip import loss as module

        return module
    except Exception:
        path = Path(sysconfig.get_paths()["purelib"]) / "open_clip" / "loss.py"
        if not path.exists():
            return None
        spec = importlib.util.spec_from_file_location("open_clip_loss_by_path", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def _inputs(n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device, dtype)
    return image, text, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)


def _grads(tensors, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = FF.sigmoid_loss(*leaves, **kw)
    loss.backward()
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def _rel(got, ref):
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def check_accuracy(n, d, device):
    cases = [(torch.float32, False, 2e-5), (torch.float32, True, 5e-3), (torch.float16, False, 2e-2)]
    if device == "cuda":
        cases.append((torch.bfloat16, False, 5e-2))
    out = []
    for dtype, allow_tf32, tol in cases:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            tensors = _inputs(n, d, dtype, device)
            got = _grads(tensors, backend="triton")
            ref = _grads([t.double() for t in tensors], backend="chunked")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        err = max(_rel(a, b) for a, b in zip(got, ref))
        name = f"accuracy/{str(dtype).split('.')[-1]}{'/tf32' if allow_tf32 else ''}"
        out.append(dict(check=name, error=err, tolerance=tol, ok=err < tol))
    return out


def _timed(fn, tensors, reps, device):
    """(median ms, peak MiB above the inputs) of fwd+bwd, or the error as a string."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    try:
        for _ in range(2):
            fn(*leaves).backward()
        times = []
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        for _ in range(reps):
            for leaf in leaves:
                leaf.grad = None
            sync()
            start = time.perf_counter()
            fn(*leaves).backward()
            sync()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
        return dict(ms=sorted(times)[len(times) // 2] * 1e3, peak_mib=peak)
    except torch.cuda.OutOfMemoryError:
        return dict(error="out of memory")
    except Exception as exc:  # reported with the others
        return dict(error=f"{type(exc).__name__}: {exc}"[:200])
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()


def _candidates(device):
    """The implementations timed, in the order they run: fastcl, then the peers, open_clip's dense loss last (at
    B = 65,536 it needs several B x B logits tensors and is the likeliest to run out of memory or time)."""
    c = {
        "fastcl triton": lambda x, y, ls, b: FF.sigmoid_loss(x, y, ls.exp(), b, backend="triton"),
    }
    if device == "cuda":
        try:
            import siglip_kernel as sk

            c["siglip-kernel chunked_bf16"] = lambda x, y, ls, b: sk.fused_siglip_loss(
                x, y, ls, b, backend="chunked_bf16"
            )
            c["siglip-kernel chunked_bf16 chunk 1024"] = lambda x, y, ls, b: sk.fused_chunked_bf16_siglip_loss(
                x, y, ls, b, chunk_size=1024
            )
            c["siglip-kernel chunked_bf16_pipelined"] = lambda x, y, ls, b: sk.fused_siglip_loss(
                x, y, ls, b, backend="chunked_bf16_pipelined"
            )
        except Exception as exc:
            print(f"siglip-kernel unavailable: {type(exc).__name__}: {exc}")
    c["fastcl chunked"] = lambda x, y, ls, b: FF.sigmoid_loss(x, y, ls.exp(), b, backend="chunked")
    loss_module = _open_clip_loss()
    if loss_module is not None:
        if "chunk_size" in inspect.signature(loss_module.SigLipLoss).parameters:
            chunked = loss_module.SigLipLoss(chunk_size=4096)
            c["open_clip SigLipLoss (chunk_size=4096)"] = lambda x, y, ls, b: chunked(x, y, ls.exp(), b)
        dense = loss_module.SigLipLoss()
        c["open_clip SigLipLoss (dense)"] = lambda x, y, ls, b: dense(x, y, ls.exp(), b)
    return c


def bench(n, d, dtype, device, reps):
    """One timing row per implementation (:func:`_candidates`), yielded as each finishes."""
    image, text, scale, bias = _inputs(n, d, dtype, device, seed=1)
    tensors = [image, text, scale.log(), bias]
    for name, fn in _candidates(device).items():
        result = _timed(fn, tensors, reps, device)
        shown = f"{result['ms']:.2f} ms, {result['peak_mib']:.0f} MiB" if "ms" in result else result["error"]
        print(f"{name:42s} {shown}", flush=True)
        yield dict(name=name, n=n, d=d, dtype=str(dtype).split(".")[-1], **result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--check-n", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu with TRITON_INTERPRET=1 for a plumbing check)")
        return 2
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter)"
    checks = check_accuracy(args.check_n, 128, args.device)
    for r in checks:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']:28s} error {r['error']:.2e} (tol {r['tolerance']:.0e})")
    failed = sum(not r["ok"] for r in checks)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    timings = []

    def dump(complete):  # rewritten after every row: a time-boxed run that is cut short keeps what it measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "failed": failed, "checks": checks, "timings": timings,
                           "complete": complete}, f, indent=1)  # fmt: skip

    dump(False)
    for row in bench(args.n, args.d, dtype, args.device, args.reps):
        timings.append(row)
        dump(False)
    dump(True)
    return 1 if failed else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1" and "--device" in sys.argv and "cpu" in sys.argv:
        print("--device cpu needs TRITON_INTERPRET=1 set before import")
        sys.exit(2)
    sys.exit(main())
