"""Ahead-of-time lowering of the fastcl Triton kernels exactly as a GPU launch compiles them, for real GPU targets.

``python -m fastcl.aot`` needs no GPU. For every kernel variant, every config a launch can use (the autotuned set
after pruning, and the fixed config of ``FASTCL_TRITON_AUTOTUNE=0`` / deterministic mode / the prune fallback), every
dtype and fp32 input precision (``tf32x3`` with TF32 off, ``tf32`` with it on) and every feature dim, it binds
launch-like arguments with Triton's own runtime binder (16-byte aligned embedding pointers, sizes and strides as a
call passes them, the kernels' ``do_not_specialize`` lists) so the signature, constants and divisibility attributes
are those of a real launch, then runs ``triton.compile`` down to cubin for sm_80 / sm_90 and reads registers,
stack (spills) and shared memory from the cubin with the ``cuobjdump`` that Triton ships.

Odd feature dims lower at the padded dim a launch sees (``tiling.launch_dim``: the launcher pads rows to a multiple
of 16), and every lowering runs in the launch environment's fp fusion setting (``TRITON_DEFAULT_FP_FUSION``).

Exit status 1 if any lowering fails, any shared memory exceeds the arch's limit, any sm_90 lowering emits no tensor
core instruction, any kept config spills (every dtype and precision), or the selection is empty.

    python -m fastcl.aot --json aot.json          # the covering sample (CI, below), sm_80 + sm_90
    python -m fastcl.aot --full --json aot.json   # every launchable config, D in 3..1024, self-excluded and two-tower
    python -m fastcl.aot --full --mask            # the same with a [B, B] mask instead of labels
    python -m fastcl.aot --full --dtype fp32 --dim 300 --variant two-tower --arch 90
    python -m fastcl.aot --arch 90 --dtype bf16 --dtype fp16 --dtype fp32 --dim 128 --dim 1024 --table
    python -m fastcl.aot --full --extra-columns only   # the extra-column forms (HAS_EXTRA, EXTRA_LABELS, HAS_MARGIN)
    python -m fastcl.aot --op sigmoid --full      # the sigmoid (SigLIP) kernel: every variant, source, dtype, arch
                                                  # the README's "GPU resources" rows (fixed configs, markdown)

The covering sample (default without ``--full``, :func:`covering_selection`): every kernel variant x dtype x input
precision x D bucket (D = 3, 64, 100, 256, 1000: one tile of 16, 64 and 128, the widest single tile, looped tiles;
odd D included) with the variant's fixed, widest and deepest launchable configs; the fixed config on sm_80 and
sm_90, the others on each arch in turn, and the positive source (labels, mask) and self exclusion (self-excluded,
two-tower) cycled per variant, dtype and precision, so each of them meets every variant on both archs. It also
holds the kernels' extra-column forms (:func:`extra_columns_selection`: the forward and anchor-gradient kernels with
the second column range, with and without its labels and with the margin, and the contrast-gradient kernel with the
margin), each covering config once per dtype pair.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# (kernel, label, extra constexprs): every kernel, one-way and with the reverse direction fused in (TWO_WAY).
KERNEL_VARIANTS = (
    ("_contrastive_fwd_kernel", "fwd", {}),
    ("_contrastive_bwd_anchor_kernel", "bwd_anchor", {"TWO_WAY": False}),
    ("_contrastive_bwd_anchor_kernel", "bwd_anchor[two_way]", {"TWO_WAY": True}),
    ("_contrastive_bwd_contrast_kernel", "bwd_contrast", {"TWO_WAY": False}),
    ("_contrastive_bwd_contrast_kernel", "bwd_contrast[two_way]", {"TWO_WAY": True}),
)
# The kernels' extra contrast columns (fastcl.kernels.jit, HAS_EXTRA / EXTRA_LABELS / HAS_MARGIN): (kernel, label,
# extra constexprs, the flag sets a launch compiles). The forward and the anchor-gradient kernel (one way, and TWO_WAY
# for the anchors-are-contrast route) stream the extra rows with or without their labels, one way also with the
# margin; the contrast-gradient kernel takes the margin (its launch over the extra rows is the plain kernel).
EXTRA_COLUMN_VARIANTS = (
    ("_contrastive_fwd_kernel", "fwd", {}, (("HAS_EXTRA",), ("HAS_EXTRA", "EXTRA_LABELS"), ("HAS_EXTRA", "HAS_MARGIN"))),
    ("_contrastive_bwd_anchor_kernel", "bwd_anchor", {"TWO_WAY": False},
     (("HAS_EXTRA",), ("HAS_EXTRA", "EXTRA_LABELS"), ("HAS_EXTRA", "HAS_MARGIN"))),
    ("_contrastive_bwd_anchor_kernel", "bwd_anchor[two_way]", {"TWO_WAY": True},
     (("HAS_EXTRA",), ("HAS_EXTRA", "EXTRA_LABELS"))),
    ("_contrastive_bwd_contrast_kernel", "bwd_contrast", {"TWO_WAY": False}, (("HAS_MARGIN",),)),
)  # fmt: skip
# The parameters of the extra column range, all with defaults (None, False) that a launch without it leaves as they
# are: the flags and the runtime arguments.
EXTRA_COLUMN_PARAMETERS = (
    "HAS_EXTRA",
    "EXTRA_LABELS",
    "HAS_MARGIN",
    "extra_ptr",
    "extra_label_ptr",
    "threshold_ptr",
    "n_extra",
    "stride_extra",
    "stride_extra_label",
)
# dtype -> (torch dtype name, element size, input precisions a launch can use)
DTYPES = {
    "bf16": ("bfloat16", 2, ("ieee",)),
    "fp16": ("float16", 2, ("ieee",)),
    "fp32": ("float32", 4, ("tf32x3", "tf32")),
}
# Every feature tiling a launch compiles: one tile of 16 .. 256 (fp32: 16) and looped tiles, with D a multiple of 16
# and not (3, 100, 300, 1000: lowered at the padded launch dim, 16, 112, 304, 1008).
DIMS = (3, 16, 64, 100, 128, 256, 300, 512, 1000, 1024)
# The covering sample's feature dims, one per tiling bucket of the launch dim (odd D is padded to a multiple of 16,
# ``tiling.launch_dim``): one tile of 16 (D = 3), 64, 128 (D = 100), the widest single tile (256, shared memory
# tightest) and looped tiles (D = 1000); fp32's buckets (one tile of 16, output tiles of 64 .. 256) fall on the same.
CI_DIMS = (3, 64, 100, 256, 1000)
ARCHS = (80, 90)
# Input precisions whose spills are printed and recorded (``spill_bytes``) without failing the run: none (fp32 takes
# only the configs that lower spill-free, ``FP32_CONFIGS`` in fastcl.kernels.tiling).
SPILLS_REPORTED_ONLY = ()
RECORD_KEYS = (
    "kernel",
    "extra_columns",
    "has_mask",
    "exclude_self",
    "scale_from_ptr",
    "arch",
    "dtype",
    "input_precision",
    "dim",
    "block_m",
    "block_n",
    "num_warps",
    "num_stages",
    "shared_bytes",
    "shared_limit",
    "registers",
    "spill_bytes",
    "tensor_cores",
)


def _job(
    kernel_name, label, variant, config, roles, dtype, precision, dim, arch, has_mask, exclude_self,
    scale_from_ptr=False, extra_columns=(),
) -> dict:
    """One lowering; ``scale_from_ptr``: the kernel reads ``log2(e) / t`` from a device pointer (a tensor,
    learnable, temperature) instead of taking it as a float argument; ``extra_columns``: the extra-column flags on
    (``HAS_EXTRA``, ``EXTRA_LABELS``, ``HAS_MARGIN``; :data:`EXTRA_COLUMN_VARIANTS`)."""
    return dict(
        extra_columns=list(extra_columns),
        kernel_name=kernel_name,
        kernel=label,
        variant=variant,
        arch=arch,
        dtype=dtype,
        torch_dtype=DTYPES[dtype][0],
        input_precision=precision,
        dim=dim,
        block_m=config.kwargs["BLOCK_M"],
        block_n=config.kwargs["BLOCK_N"],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        has_mask=has_mask,
        exclude_self=exclude_self,
        scale_from_ptr=scale_from_ptr,
        roles=roles,
    )


def _roles(config, autotuned, fixed) -> list:
    from fastcl.kernels import tiling

    key = tiling.config_key(config)
    return (["autotuned"] if any(tiling.config_key(c) == key for c in autotuned) else []) + (
        ["fixed"] if key == tiling.config_key(fixed) else []
    )


def covering_configs(label: str, dim: int, element_size: int, extra: bool = False) -> list:
    """The fixed, the widest (largest tile, fewest warps: most values per thread) and the deepest (most stages,
    then the largest tile) of the variant's launchable configs (``extra``: its extra-column form's), without
    repeats."""
    from fastcl.kernels import tiling

    dim = tiling.launch_dim(dim)
    configs = tiling.launchable_configs(label, dim, element_size, extra)
    size = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
    picked = [
        tiling.fixed_config(label, dim, element_size, extra=extra),
        max(configs, key=lambda c: (size(c), -c.num_warps, c.num_stages)),
        max(configs, key=lambda c: (c.num_stages, size(c), -c.num_warps)),
    ]
    out = []
    for config in picked:
        if all(tiling.config_key(config) != tiling.config_key(c) for c in out):
            out.append(config)
    return out


def selection(
    dtypes, dims, archs, full: bool, has_mask: bool = False, kernels=None, exclude_self=(True, False)
) -> list:
    """The lowering jobs: one dict per kernel variant / config / arch / dtype / precision / dim / positive source /
    self exclusion. ``full``: every launchable config of every combination (``has_mask`` picks the positive
    source, ``exclude_self`` the variants: self-excluded and two-tower). Else the covering sample
    (:func:`covering_selection`). ``kernels``: only these variant labels (default all)."""
    from fastcl.kernels import tiling

    if not full:
        return covering_selection(dtypes, dims, archs, kernels)
    jobs = []
    for dtype in dtypes:
        element_size, precisions = DTYPES[dtype][1:]
        for dim in dims:
            seen = tiling.launch_dim(dim)  # odd D: the padded dim a launch sees
            for kernel_name, label, variant in KERNEL_VARIANTS:
                if kernels and label not in kernels:
                    continue
                fixed = tiling.fixed_config(label, seen, element_size)
                autotuned = tiling.autotune_configs(label, seen, element_size)
                for config in tiling.launchable_configs(label, seen, element_size):
                    roles = _roles(config, autotuned, fixed)
                    for precision in precisions:
                        for excl in exclude_self:
                            for arch in archs:
                                jobs += [
                                    _job(kernel_name, label, variant, config, roles, dtype, precision, dim, arch,
                                         has_mask, excl, scale)
                                    for scale in (False, True)
                                ]
    return jobs


def covering_selection(dtypes, dims, archs, kernels=None) -> list:
    """The CI sample: every kernel variant x dtype x input precision x feature dim (one per tiling bucket, odd D
    included) with the fixed, widest and deepest launchable configs (:func:`covering_configs`), each lowered once.
    The positive source and self exclusion cycle per variant, dtype and precision (each meets all four), and after
    each round of the four the temperature's form (a float argument, or a pointer: ``SCALE_FROM_PTR``); the arch
    alternates with the dim and the config, and is the other one for the other dtype of a pair (bf16 / fp16 and
    tf32x3 / tf32 choose the same configs), so every config of every variant and bucket is lowered on both archs
    by one of the pair."""
    from fastcl.kernels import tiling

    sources = [(mask, excl) for mask in (False, True) for excl in (True, False)]
    jobs, pair = [], 0  # pair: the index of the dtype / precision; bf16 and fp16, tf32x3 and tf32 take opposite archs
    for dtype in dtypes:
        element_size, precisions = DTYPES[dtype][1:]
        for precision in precisions:
            for kernel_name, label, variant in KERNEL_VARIANTS:
                if kernels and label not in kernels:
                    continue
                turn = 0  # per dtype, precision and variant: the positive sources and self exclusions in turn
                for d, dim in enumerate(dims):
                    seen = tiling.launch_dim(dim)
                    fixed = tiling.fixed_config(label, seen, element_size)
                    autotuned = tiling.autotune_configs(label, seen, element_size)
                    for c, config in enumerate(covering_configs(label, dim, element_size)):
                        mask, excl = sources[turn % len(sources)]
                        scale = (turn // len(sources)) % 2 == 1  # float / pointer temperature, per round of sources
                        turn += 1
                        arch = archs[(pair + d + c) % len(archs)]
                        jobs.append(
                            _job(kernel_name, label, variant, config, _roles(config, autotuned, fixed), dtype,
                                 precision, dim, arch, mask, excl, scale)
                        )
            pair += 1
    return jobs


# dtype / precision pairs that choose the same configs (the covering sample lowers each config once per pair)
CONFIG_PAIRS = ((("bf16", "ieee"), ("fp16", "ieee")), (("fp32", "tf32x3"), ("fp32", "tf32")))


def extra_columns_selection(dtypes, dims, archs, full: bool) -> list:
    """The lowering jobs of the extra-column kernels (:data:`EXTRA_COLUMN_VARIANTS`; labels, no mask: extra columns
    take none). ``full``: every launchable config x flag set x dtype x precision x arch. Else the covering sample:
    per variant, dim and dtype pair (bf16 / fp16, tf32x3 / tf32: the same configs) the fixed, widest and deepest
    configs once each, the pair's member, the arch, the flag set and the temperature's form in turn. The configs are
    the extra-column forms' own (``tiling.launchable_configs(..., extra=True)``)."""
    from fastcl.kernels import tiling

    jobs = []
    for p, pair in enumerate(CONFIG_PAIRS):
        members = [(dtype, precision) for dtype, precision in pair if dtype in dtypes]
        for kernel_name, label, variant, flag_sets in EXTRA_COLUMN_VARIANTS:
            turn = 0
            for d, dim in enumerate(dims):
                seen = tiling.launch_dim(dim)
                for dtype, precision in members if full else members[:1]:
                    element_size = DTYPES[dtype][1]
                    fixed = tiling.fixed_config(label, seen, element_size, extra=True)
                    autotuned = tiling.autotune_configs(label, seen, element_size, extra=True)
                    configs = (tiling.launchable_configs(label, seen, element_size, extra=True) if full
                               else covering_configs(label, dim, element_size, extra=True))  # fmt: skip
                    for c, config in enumerate(configs):
                        roles = _roles(config, autotuned, fixed)
                        if full:
                            for flags in flag_sets:
                                for arch in archs:
                                    jobs.append(_job(kernel_name, label, variant, config, roles, dtype, precision,
                                                     dim, arch, False, True, False, flags))  # fmt: skip
                            continue
                        dtype_now, precision_now = members[(d + c) % len(members)]
                        flags = flag_sets[turn % len(flag_sets)]
                        scale = (turn // len(flag_sets)) % 2 == 1
                        turn += 1
                        arch = archs[(p + d + c) % len(archs)]
                        self_pair = label.endswith("[two_way]") or "EXTRA_LABELS" in flags  # SupCon; else InfoNCE
                        jobs.append(_job(kernel_name, label, variant, config, roles, dtype_now, precision_now, dim,
                                         arch, False, self_pair, scale, flags))  # fmt: skip
    return jobs


def launch_arguments(fn, job: dict, n: int = 4096) -> tuple:
    """Positional and keyword arguments shaped like a real launch of ``fn`` (mock tensors: aligned pointers)."""
    import torch
    from triton.runtime.jit import MockTensor

    from fastcl.kernels import launch, tiling

    dim, torch_dtype = tiling.launch_dim(job["dim"]), getattr(torch, job["torch_dtype"])  # padded as a launch
    block_d, single = tiling.block_d_for(dim, DTYPES[job["dtype"]][1])
    bsz = n // 2
    values = dict(
        n_anchor=n,
        n_contrast=n,
        dim=dim,
        mask_period=bsz if job["has_mask"] else 1,
        stride_anchor=dim,
        stride_contrast=dim,
        stride_anchor_label=1,
        stride_contrast_label=1,
        stride_mask_row=bsz if job["has_mask"] else 1,
        stride_mask_col=1,
        stride_mask_t_row=bsz if job["has_mask"] else 1,
        stride_mask_t_col=1,
        self_offset=0,
        n_anchor_bucket=n,
        n_contrast_bucket=n,
        stride_grad=dim,
        logit_scale_log2=20.6,
        grad_scale=1.0 / n,
    )
    constexprs = dict(
        HAS_MASK=job["has_mask"],
        EXCLUDE_SELF=job.get("exclude_self", True),
        INPUT_PRECISION=job["input_precision"],
        SINGLE_D_TILE=single,
        BLOCK_D=block_d,
        BLOCK_M=job["block_m"],
        BLOCK_N=job["block_n"],
        **job["variant"],
    )
    if "SCALE_FROM_PTR" in fn.arg_names:  # (the contrastive kernels: the temperature's form)
        constexprs["SCALE_FROM_PTR"] = job.get("scale_from_ptr", False)
    constexprs.update(_extra_column_arguments(fn, job, torch_dtype, dim, n))
    if "TWO_WAY" in constexprs:
        constexprs["RECOMPUTE_TRANSPOSED"] = constexprs["TWO_WAY"] and launch.recompute_transposed(torch_dtype)
        constexprs["BLOCK_D_OUT"] = tiling.output_block_d_for(dim, DTYPES[job["dtype"]][1], constexprs["TWO_WAY"])
        constexprs["EXP_REUSE"] = constexprs["TWO_WAY"] and launch.reuse_transposed_exp(torch_dtype)
    args = []
    for name in fn.arg_names:
        if name in constexprs or name in EXTRA_COLUMN_PARAMETERS:
            continue
        if name in ("anchor_ptr", "contrast_ptr", "grad_anchor_ptr", "grad_contrast_ptr"):
            args.append(MockTensor(torch_dtype))
        elif name in ("anchor_label_ptr", "contrast_label_ptr"):
            args.append(MockTensor(torch.int64))
        elif name.endswith("_ptr") or (name == "logit_scale_log2" and constexprs.get("SCALE_FROM_PTR")):
            args.append(MockTensor(torch.float32))
        else:
            args.append(values[name])
    return args, constexprs


def _extra_column_arguments(fn, job: dict, torch_dtype, dim: int, n: int) -> dict:
    """The keyword arguments of the job's extra-column flags (``job['extra_columns']``) and of the parameters they
    read, passed only when on, as a launch passes them (left out, they are None: compile-time constants, and the
    kernel compiles exactly as without them)."""
    import torch
    from triton.runtime.jit import MockTensor

    keywords = {flag: True for flag in job.get("extra_columns", ()) if flag in fn.arg_names}
    if keywords.get("HAS_EXTRA"):
        keywords.update(extra_ptr=MockTensor(torch_dtype), n_extra=n, stride_extra=dim)
        if keywords.get("EXTRA_LABELS"):
            keywords.update(extra_label_ptr=MockTensor(torch.int64), stride_extra_label=1)
    if keywords.get("HAS_MARGIN"):
        keywords.update(threshold_ptr=MockTensor(torch.float32))
    return keywords


def _resource_usage(cubin: bytes) -> dict:
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def lower(fn, job: dict, args, constexprs):
    """Lower the ``@triton.jit`` function ``fn`` for ``sm_{job['arch']}`` with the launch's arguments (mock
    tensors and integers), constexprs and ``num_warps`` / ``num_stages`` / ``maxnreg``, binding them as a launch
    does; ``(compiled, options, attrs, seconds)``."""
    os.environ.pop("TRITON_INTERPRET", None)  # fp fusion: as the launch environment sets it (fp_fusion_setting)
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", job["arch"], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(
        constexprs,
        num_warps=job["num_warps"],
        num_stages=job["num_stages"],
        **({"maxnreg": job["maxnreg"]} if job.get("maxnreg") else {}),
        debug=False,
        instrumentation_mode=knobs.compilation.instrumentation_mode,
        fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts,
    )
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target, options=options.__dict__)
    return compiled, options, attrs, round(time.perf_counter() - start, 2)


def compile_one(job: dict) -> dict:
    """Lower one job to cubin as a launch would; returns its record (``error`` set on failure)."""
    if job.get("op") == "sigmoid":
        return compile_sigmoid_one(job)
    record = {key: job.get(key) for key in RECORD_KEYS}
    record["arch"] = f"sm_{job['arch']}"
    record["roles"] = job.get("roles", [])
    try:
        import triton

        from fastcl.kernels import jit, tiling

        fn = getattr(jit, job["kernel_name"])
        args, constexprs = launch_arguments(fn, job)
        compiled, options, attrs, record["seconds"] = lower(fn, job, args, constexprs)
        usage = _resource_usage(compiled.asm["cubin"])
        record["shared_bytes"] = compiled.metadata.shared
        record["shared_limit"] = tiling.SHARED_MEMORY_LIMITS[job["arch"]]
        config = triton.Config(
            {"BLOCK_M": job["block_m"], "BLOCK_N": job["block_n"]},
            num_warps=job["num_warps"],
            num_stages=job["num_stages"],
        )
        element_size = DTYPES[job["dtype"]][1]
        seen = tiling.launch_dim(job["dim"])
        record["launch_dim"] = seen
        record["shared_estimate"] = tiling.shared_memory_estimate(config, seen, element_size, job["kernel"])
        record["registers"] = usage.get("reg", -1)
        record["spill_bytes"] = max(usage.get("stack", 0), usage.get("local", 0))
        ptx = compiled.asm["ptx"]
        record["mma"] = tensor_core_kinds(ptx)
        record["tensor_cores"] = record["mma"] != "-"
        record["fp_fusion"] = bool(options.enable_fp_fusion)
        record["divisibility_16"] = sorted(
            fn.arg_names[path[0]] for path, attr in attrs.items() if ["tt.divisibility", 16] in attr
        )
    except Exception as exc:  # report every failure, keep going
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return record


def tensor_core_kinds(ptx: str) -> str:
    """Every tensor-core instruction kind in ``ptx``: ``wgmma`` (sm_90 warpgroup products, M >= 64 per
    warpgroup), ``mma`` (``mma.sync``), both as ``wgmma+mma`` (e.g. the logits product on one, ``dS^T A`` on the
    other), or ``-``."""
    patterns = (("wgmma", r"\bwgmma\.mma_async"), ("mma", r"\bmma\.sync"))
    kinds = [kind for kind, pattern in patterns if re.search(pattern, ptx)]
    return "+".join(kinds) or "-"


TABLE_HEADER = (
    "| kernel | dtype / precision | D | BLOCK_M x BLOCK_N, warps, stages | registers | spills (B) | shared (B) "
    "| tensor cores |\n|---|---|---|---|---|---|---|---|"
)


def markdown_table(records) -> str:
    """The README's "GPU resources" rows: one markdown row per lowered fixed config (the one
    ``FASTCL_TRITON_AUTOTUNE=0`` and deterministic mode launch), ordered by arch, D, dtype and kernel variant, under
    :data:`TABLE_HEADER`; one table per arch (a ``sm_XX:`` line before each when there are several). Records that
    failed to lower are rows too (``failed`` in the registers column). The rows are the float-temperature kernels
    (the ``scale_from_ptr`` form of a config is lowered and checked too, but not tabled twice)."""
    order = {dtype: i for i, dtype in enumerate(DTYPES)}
    rows = sorted(
        (r for r in records
         if "fixed" in r.get("roles", ()) and not r.get("scale_from_ptr") and not r.get("extra_columns")),
        key=lambda r: (r["arch"], r["dim"], order.get(r["dtype"], len(order)), r["input_precision"], r["kernel"]),
    )
    archs = sorted({r["arch"] for r in rows})
    lines = []
    for arch in archs:
        if len(archs) > 1:
            lines.append(f"{arch}:")
        lines.append(TABLE_HEADER)
        for r in (r for r in rows if r["arch"] == arch):
            dtype = r["dtype"] if r["input_precision"] == "ieee" else f"{r['dtype']} / {r['input_precision']}"
            config = f"{r['block_m']}x{r['block_n']}, {r['num_warps']}, {r['num_stages']}"
            if "error" in r:
                usage = "failed | - | - | -"
            else:
                usage = f"{r['registers']} | {r['spill_bytes']:,} | {r['shared_bytes']:,} | {r['mma']}"
            lines.append(f"| {r['kernel']} | {dtype} | {r['dim']} | {config} | {usage} |")
    return "\n".join(lines)


def violations(record: dict) -> list:
    """The invariants a record breaks (empty when it is fine)."""
    if "error" in record:
        return [f"failed: {record['error']}"]
    out = []
    if record["shared_bytes"] > record["shared_limit"]:
        out.append(f"shared {record['shared_bytes']} B > {record['shared_limit']} B")
    if record["arch"] == "sm_90" and not record["tensor_cores"]:
        out.append("no tensor-core instruction on sm_90")
    if record["spill_bytes"] > 0 and record.get("input_precision") not in SPILLS_REPORTED_ONLY:
        out.append(f"spills {record['spill_bytes']} B")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcl.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), action="append", help="default: all")
    parser.add_argument("--dim", type=int, action="append", help="feature dim(s) D; default: the subset's")
    parser.add_argument("--mask", action="store_true", help="--full: the [bsz, bsz] mask instead of labels")
    parser.add_argument("--arch", type=int, action="append", help="SM version(s), default 80 and 90")
    parser.add_argument(
        "--kernel", choices=[label for _, label, _ in KERNEL_VARIANTS], action="append", help="default: all variants"
    )
    parser.add_argument("--full", action="store_true", help="every launchable config, D in 3..1024 (odd D included)")
    parser.add_argument(
        "--variant",
        choices=["self", "two-tower"],
        action="append",
        help="--full: self-excluded (EXCLUDE_SELF) and/or two-tower rows; default both",
    )
    parser.add_argument(
        "--extra-columns",
        choices=["with", "none", "only"],
        help="the kernels' extra-column forms (HAS_EXTRA / EXTRA_LABELS / HAS_MARGIN): with the others, none, or "
        "only them; default: with them in the covering sample, none with --full or --table",
    )
    parser.add_argument(
        "--op", choices=["contrastive", "sigmoid"], action="append", help="the ops' kernels to lower; default both"
    )
    parser.add_argument("--json", metavar="PATH", help="write the records (a JSON list) here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--table", action="store_true", help="finish with the fixed configs' rows as markdown (README, GPU resources)"
    )
    return parser


def fp_fusion_setting() -> str:
    """What the lowerings use for FMA contraction: the launch environment's setting (``TRITON_DEFAULT_FP_FUSION``,
    ``TRITON_FORCE_DISABLE_FP_FUSION``), else Triton's default, exactly as a launch in this environment would;
    set them here as the training job sets them."""
    default = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    forced_off = os.environ.get("TRITON_FORCE_DISABLE_FP_FUSION", "0").lower() in ("1", "true", "on", "yes")
    source = "TRITON_FORCE_DISABLE_FP_FUSION" if forced_off else (
        f"TRITON_DEFAULT_FP_FUSION={default}" if default is not None else "unset: Triton's default"
    )
    return f"fp fusion as a launch here compiles it ({source})"


def _print_record(record) -> bool:
    """Print one lowering's row; whether it breaks an invariant (:func:`violations`)."""
    source = ("M" if record.get("has_mask") else "L") + ("x" if record.get("exclude_self", True) else "-")
    extra = {"HAS_EXTRA": "+q", "EXTRA_LABELS": "l", "HAS_MARGIN": "+m"}
    kernel = record["kernel"] + "".join(extra[flag] for flag in record.get("extra_columns") or ())
    prefix = (
        f"{kernel:22s} {source:3s} {record['arch']:6s} {record['dtype']:5s} {record['input_precision']:6s} "
        f"{record['dim']:5d} {record['block_m']:4d} {record['block_n']:4d} {record['num_warps']:3d} "
        f"{record['num_stages']:3d}"
    )
    problems = violations(record)
    if "error" in record:
        print(f"{prefix} FAILED {record['error']}")
        return bool(problems)
    if not problems and record["spill_bytes"] > 0:
        problems_note = "  (spills reported only)"
    else:
        problems_note = f"  <- {'; '.join(problems)}" if problems else ""
    print(
        f"{prefix} {record['registers']:4d} {record['spill_bytes']:5d} {record['shared_bytes']:7d} "
        f"{record['shared_estimate']:7d} {record['mma']:>5s} {record['seconds']:5.1f}{problems_note}"
    )
    return bool(problems)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"fastcl AOT: {fp_fusion_setting()}")

    dims = args.dim or (DIMS if args.full else CI_DIMS)
    dtypes = args.dtype or list(DTYPES)
    variants = tuple(v == "self" for v in args.variant) if args.variant else (True, False)
    if args.table and not args.full:  # the README rows: the fixed configs, labels or --mask, self-excluded
        todo = selection(dtypes, dims, args.arch or ARCHS, True, args.mask, args.kernel, (True,))
        todo = [job for job in todo if "fixed" in job["roles"]]
    else:
        todo = selection(dtypes, dims, args.arch or ARCHS, args.full, args.mask, args.kernel, variants)
    extra_columns = args.extra_columns or ("none" if args.full or args.table else "with")
    if extra_columns == "only":
        todo = []
    if extra_columns != "none" and not args.mask:  # (extra columns take labels, never a mask)
        extra = extra_columns_selection(dtypes, dims, args.arch or ARCHS, args.full)
        todo += [job for job in extra if not args.kernel or job["kernel"] in args.kernel]
    if args.op and "contrastive" not in args.op:
        todo = []
    if not args.kernel and (not args.op or "sigmoid" in args.op) and extra_columns != "only":
        todo += sigmoid_selection(dtypes, args.dim or SIGMOID_DIMS, args.arch or ARCHS, args.full)
    what = f"full, mask={args.mask}" if args.full else ("fixed configs" if args.table else "covering sample")
    print(f"fastcl AOT: {len(todo)} lowerings ({what}), dims={list(dims)}")
    print(
        f"{'kernel':22s} {'src':3s} {'arch':6s} {'dtype':5s} {'prec':6s} {'D':>5s} {'BM':>4s} {'BN':>4s} {'wrp':>3s} "
        f"{'stg':>3s} "
        f"{'regs':>4s} {'spill':>5s} {'shared':>7s} {'estim':>7s} {'mma':>5s} {'sec':>5s}"
    )
    records, bad = [], 0
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for record in pool.map(compile_one, todo):
            records.append(record)
            bad += _print_record(record)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if not records:
        print("fastcl AOT: empty selection (nothing lowered)")
        return 1
    if args.table:
        print()
        print(markdown_table(records))
        print()
    print(
        f"fastcl AOT: {len(records)} lowered in {time.perf_counter() - start:.0f} s, {bad} break an invariant "
        "(compile failure, shared memory over the arch limit, no tensor cores on sm_90, spills)"
    )
    return 1 if bad else 0


# ----------------------------------------------------------------------------------------------------------------
# The sigmoid (SigLIP) op's kernel: fastcl.kernels.sigmoid_jit, launched by fastcl.kernels.sigmoid_launch
# ----------------------------------------------------------------------------------------------------------------

# (label, constexprs): the image launch (loss, dL/dimage, ds / db partials), the text launch (dL/dtext), and the
# forward-only image launch (loss only)
SIGMOID_VARIANTS = (
    ("sigmoid_images", {"WANT_STATS": True, "WANT_GRAD": True}),
    ("sigmoid_texts", {"WANT_STATS": False, "WANT_GRAD": True}),
    ("sigmoid_loss_only", {"WANT_STATS": True, "WANT_GRAD": False}),
)
# positive sources: the default pairing, labels, labels with SigLIP+ weights (recorded as has_mask / exclude_self:
# M = weights, x = ids)
SIGMOID_SOURCES = ((False, False), (True, False), (True, True))
SIGMOID_DIMS = CI_DIMS + (768,)


def sigmoid_selection(dtypes, dims, archs, full: bool) -> list:
    """The sigmoid kernel's lowering jobs: every variant x dtype x precision x dim with the config a launch uses
    (``sigmoid_launch.config_for``); ``full``: every positive source on every arch, else the sources and archs in
    turn (each source meets each variant and dtype on both archs across the dims)."""
    from fastcl.kernels import sigmoid_launch

    jobs, turn = [], 0
    for dtype in dtypes:
        element_size, precisions = DTYPES[dtype][1:]
        for precision in precisions:
            for label, constexprs in SIGMOID_VARIANTS:
                for dim in dims:
                    config = sigmoid_launch.config_for(dim, element_size, precision, interpreter=False)
                    combos = [(src, arch) for src in SIGMOID_SOURCES for arch in archs]
                    if not full:
                        combos = [(SIGMOID_SOURCES[turn % 3], archs[turn % len(archs)])]
                        turn += 1
                    for (has_ids, has_weights), arch in combos:
                        job = _job("_sigmoid_side_kernel", label, constexprs, config, ["fixed"], dtype, precision,
                                   dim, arch, has_weights, has_ids)
                        jobs.append(dict(job, op="sigmoid"))
    return jobs


def sigmoid_launch_arguments(fn, job: dict, n: int = 4096) -> tuple:
    """Arguments shaped like a launch of the sigmoid kernel (mock tensors: aligned pointers)."""
    import torch
    from triton.runtime.jit import MockTensor

    from fastcl.kernels import sigmoid_launch, tiling

    dim, torch_dtype = tiling.launch_dim(job["dim"]), getattr(torch, job["torch_dtype"])
    block_d, single, block_d_out = sigmoid_launch.tiles_for(dim, DTYPES[job["dtype"]][1], interpreter=False)
    values = dict(n_rows=n, n_cols=n, dim=dim, stride_rows=dim, stride_cols=dim, stride_grad=dim, pair_offset=0,
                  inv_norm=1.0 / n)
    constexprs = dict(
        job["variant"],
        HAS_IDS=job["exclude_self"],
        HAS_WEIGHTS=job["has_mask"],
        INPUT_PRECISION=job["input_precision"],
        SINGLE_D_TILE=single,
        BLOCK_M=job["block_m"],
        BLOCK_N=job["block_n"],
        BLOCK_D=block_d,
        BLOCK_D_OUT=block_d_out,
    )
    pointers = {"rows_ptr": torch_dtype, "cols_ptr": torch_dtype, "row_ids_ptr": torch.int64,
                "col_ids_ptr": torch.int64}
    args = [MockTensor(pointers.get(name, torch.float32)) if name.endswith("_ptr") else values[name]
            for name in fn.arg_names if name not in constexprs]
    return args, constexprs


def compile_sigmoid_one(job: dict) -> dict:
    """:func:`compile_one` for the sigmoid kernel."""
    record = {key: job.get(key) for key in RECORD_KEYS}
    record.update(arch=f"sm_{job['arch']}", roles=job.get("roles", []), shared_estimate=0)
    try:
        from fastcl.kernels import sigmoid_jit, tiling

        fn = sigmoid_jit._sigmoid_side_kernel
        args, constexprs = sigmoid_launch_arguments(fn, job)
        compiled, _, _, record["seconds"] = lower(fn, job, args, constexprs)
        usage = _resource_usage(compiled.asm["cubin"])
        record.update(shared_bytes=compiled.metadata.shared, shared_limit=tiling.SHARED_MEMORY_LIMITS[job["arch"]])
        record.update(registers=usage.get("reg", -1), spill_bytes=max(usage.get("stack", 0), usage.get("local", 0)))
        record["mma"] = tensor_core_kinds(compiled.asm["ptx"])
        record["tensor_cores"] = record["mma"] != "-"
    except Exception as exc:  # report every failure, keep going
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return record


if __name__ == "__main__":
    sys.exit(main())
