"""Ahead-of-time lowering of every fastcl Triton kernel, in every autotune config, for real GPU targets.

``python -m fastcl.aot`` needs no GPU: it runs Triton's compiler (``triton.compile`` with a ``GPUTarget``) down to
cubin for sm_80 and sm_90 and prints one row per kernel / config / arch with registers, stack (spills), shared
memory and compile time, read from the cubin with the ``cuobjdump`` that Triton ships. Exit status 1 if any
kernel fails to compile. Configs that ``keep_config`` prunes for the chosen dim and dtype are skipped, as the
autotuner would skip them.

    python -m fastcl.aot                       # bf16, D=128, labels, self excluded; sm_80 + sm_90
    python -m fastcl.aot --dtype fp32 --dim 512 --mask --arch 90
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# (kernel, extra constexprs, label): every kernel, one-way and with the reverse direction fused in (TWO_WAY).
KERNEL_VARIANTS = (
    ("_contrastive_fwd_kernel", {}, "fwd"),
    ("_contrastive_bwd_anchor_kernel", {"TWO_WAY": False}, "bwd_anchor"),
    ("_contrastive_bwd_anchor_kernel", {"TWO_WAY": True}, "bwd_anchor[two_way]"),
    ("_contrastive_bwd_contrast_kernel", {"TWO_WAY": False}, "bwd_contrast"),
    ("_contrastive_bwd_contrast_kernel", {"TWO_WAY": True}, "bwd_contrast[two_way]"),
)
DTYPES = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("fp32", 4)}
FLOAT_SCALARS = ("logit_scale_log2", "grad_scale")
EMBEDDING_POINTERS = ("anchor_ptr", "contrast_ptr", "grad_anchor_ptr", "grad_contrast_ptr")
LABEL_POINTERS = ("anchor_label_ptr", "contrast_label_ptr")


def kernel_signature(arg_names, dtype: str, constexprs: dict) -> dict:
    """Triton type strings for each argument of a fastcl kernel."""
    signature = {}
    for name in arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in EMBEDDING_POINTERS:
            signature[name] = "*" + dtype
        elif name in LABEL_POINTERS:
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature


def _resource_usage(cubin: bytes) -> dict:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_one(job: tuple) -> dict:
    """Lower one kernel/config/arch to cubin; returns a result row (``error`` set on failure)."""
    kernel_name, variant, label, config_kwargs, num_warps, num_stages, arch, dtype, dim, has_mask = job
    row = dict(kernel=label, arch=f"sm_{arch}", warps=num_warps, stages=num_stages, **config_kwargs)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from fastcl.kernels import contrastive as K

        fn = getattr(K, kernel_name)
        block_d, single = K.block_d_for(dim)
        constexprs = dict(
            HAS_MASK=has_mask,
            EXCLUDE_SELF=True,
            INPUT_PRECISION="ieee",
            SINGLE_D_TILE=single,
            BLOCK_D=block_d,
            **variant,
            **config_kwargs,
        )
        start = time.perf_counter()
        compiled = triton.compile(
            ASTSource(fn, kernel_signature(fn.arg_names, DTYPES[dtype][0], constexprs), constexprs),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
        row["seconds"] = round(time.perf_counter() - start, 2)
        row["shared"] = compiled.metadata.shared
        row.update(_resource_usage(compiled.asm["cubin"]))
        row["mma"] = (
            "wgmma" if "wgmma" in compiled.asm["ptx"] else ("mma" if "mma.sync" in compiled.asm["ptx"] else "-")
        )
    except Exception as exc:  # report every failure, keep going
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return row


def jobs(dtype: str, dim: int, has_mask: bool, archs) -> list:
    from fastcl.kernels import contrastive as K

    block_d, _ = K.block_d_for(dim)
    element_size = DTYPES[dtype][1]
    return [
        (name, variant, label, dict(config.kwargs), config.num_warps, config.num_stages, arch, dtype, dim, has_mask)
        for name, variant, label in KERNEL_VARIANTS
        for config in K.CONFIGS
        if K.keep_config(config, block_d, element_size)
        for arch in archs
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastcl.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--dim", type=int, default=128, help="feature dim D (sets BLOCK_D)")
    parser.add_argument("--mask", action="store_true", help="the [bsz, bsz] mask variant instead of labels")
    parser.add_argument("--arch", type=int, action="append", help="SM version(s), default 80 and 90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.pop("TRITON_INTERPRET", None)

    todo = jobs(args.dtype, args.dim, args.mask, args.arch or [80, 90])
    header = (
        f"{'kernel':22s} {'arch':6s} {'BM':>4s} {'BN':>4s} {'warps':>5s} {'stages':>6s} "
        f"{'regs':>5s} {'stack':>5s} {'shared':>7s} {'mma':>6s} {'sec':>5s}"
    )
    print(f"fastcl AOT: {len(todo)} lowerings, dtype={args.dtype}, D={args.dim}, mask={args.mask}")
    print(header)
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(compile_one, todo):
            prefix = (
                f"{row['kernel']:22s} {row['arch']:6s} {row['BLOCK_M']:4d} {row['BLOCK_N']:4d} "
                f"{row['warps']:5d} {row['stages']:6d}"
            )
            if "error" in row:
                failures += 1
                print(f"{prefix} FAILED {row['error']}")
            else:
                print(
                    f"{prefix} {row.get('reg', -1):5d} {row.get('stack', -1):5d} {row['shared']:7d} "
                    f"{row['mma']:>6s} {row['seconds']:5.1f}"
                )
    print(f"fastcl AOT: {len(todo) - failures} compiled, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
