"""Ahead-of-time lowering for real GPUs works without one and compiles what a launch compiles (one kernel here;
CI runs ``python -m fastcl.aot --json`` over its subset).

Lowering runs in a subprocess: the test session may have TRITON_INTERPRET=1, under which kernels are not compilable.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastcl import aot

SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


@pytest.fixture(autouse=True)
def _drop_kernel_modules_imported_here():
    """``aot.main()`` (called in this process by some tests) drops TRITON_INTERPRET and may import a kernel module
    for the first time, so its ``@triton.jit`` functions are compiled-mode ones; the interpreter tests after it must
    not inherit them (``0 active drivers``). Modules under ``fastcl.kernels`` first imported during a test are
    forgotten after it and import afresh, under the session's setting, when next used."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("fastcl.kernels."):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if hasattr(sys.modules.get(parent), child):
                delattr(sys.modules[parent], child)


def _in_subprocess(code: str):
    out = subprocess.run(
        [sys.executable, "-c", code], env=SUBPROCESS_ENV, capture_output=True, text=True, check=True
    ).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_one_kernel_lowers_to_sm90_cubin_with_launch_specialization():
    jobs = [
        j
        for j in aot.selection(["bf16"], [128], [90], full=True, exclude_self=(True,))
        if j["kernel"] == "bwd_anchor" and "fixed" in j["roles"] and not j["scale_from_ptr"]
    ]
    assert len(jobs) == 1
    record = _in_subprocess(f"from fastcl import aot; print(repr(aot.compile_one({jobs[0]!r})))")
    assert "error" not in record, record.get("error")
    assert set(aot.RECORD_KEYS) <= set(record)
    assert 0 < record["registers"] <= 255
    assert record["tensor_cores"] and record["mma"] == "wgmma"
    assert 0 < record["shared_bytes"] <= record["shared_limit"] == 232_448
    assert record["shared_bytes"] <= record["shared_estimate"]  # the filter's estimate is an upper bound here
    assert aot.violations(record) == []
    # as a launch: aligned embedding pointers, row strides and D divisible by 16; sizes and labels unspecialized
    assert {"anchor_ptr", "contrast_ptr", "grad_anchor_ptr", "dim", "stride_anchor", "stride_grad"} <= set(
        record["divisibility_16"]
    )
    assert not {"n_anchor", "n_contrast", "anchor_label_ptr", "mask_ptr", "self_offset"} & set(
        record["divisibility_16"]
    )


def test_compiled_kernels_carry_the_do_not_specialize_lists():
    flags = _in_subprocess(
        "from fastcl.kernels import jit; "
        "print(repr({p.name: (p.do_not_specialize, p.do_not_specialize_on_alignment) "
        "for p in jit._contrastive_bwd_anchor_kernel.params}))"
    )
    assert flags["n_anchor"][0] and flags["self_offset"][0] and flags["mask_period"][0]
    assert not flags["dim"][0] and not flags["stride_anchor"][0]
    assert flags["anchor_label_ptr"][1] and flags["grad_output_ptr"][1]
    assert not flags["anchor_ptr"][1]


def test_selection_covers_every_launchable_config():
    from fastcl.kernels import tiling

    full = aot.selection(sorted(aot.DTYPES), aot.DIMS, aot.ARCHS, full=True)
    assert {j["kernel"] for j in full} == set(tiling.KERNEL_VARIANTS)
    assert {j["arch"] for j in full} == {80, 90}
    assert {(j["dtype"], j["input_precision"]) for j in full} == {
        ("bf16", "ieee"),
        ("fp16", "ieee"),
        ("fp32", "tf32x3"),
        ("fp32", "tf32"),
    }
    assert {j["dim"] for j in full} == {3, 16, 64, 100, 128, 256, 300, 512, 1000, 1024}
    assert {j["exclude_self"] for j in full} == {True, False}  # self-excluded and two-tower
    for dtype, element_size in (("bf16", 2), ("fp32", 4)):
        for dim in aot.DIMS:
            seen = tiling.launch_dim(dim)
            for variant in tiling.KERNEL_VARIANTS:
                for exclude_self in (True, False):
                    lowered = {
                        (j["block_m"], j["block_n"], j["num_warps"], j["num_stages"])
                        for j in full
                        if j["kernel"] == variant and j["dtype"] == dtype and j["dim"] == dim and j["arch"] == 90
                        and j["exclude_self"] == exclude_self
                    }  # fmt: skip
                    launchable = {tiling.config_key(c) for c in tiling.launchable_configs(variant, seen, element_size)}
                    assert lowered == launchable
                    assert tiling.config_key(tiling.fixed_config(variant, seen, element_size)) in lowered


def test_covering_sample_meets_every_factor():
    """The CI sample: every kernel variant x dtype x precision x D bucket has its fixed, widest and deepest
    configs, each on both archs within the dtype pair that shares configs (bf16 / fp16, tf32x3 / tf32); every kernel
    variant x dtype x precision meets both positive sources and both self exclusions, and every kernel variant each
    of them on each arch."""
    from fastcl.kernels import tiling

    ci = aot.selection(list(aot.DTYPES), aot.CI_DIMS, aot.ARCHS, full=False)
    assert 100 < len(ci) < 160
    assert {tiling.launch_dim(d) % 16 for d in aot.CI_DIMS} == {0} and any(d % 16 for d in aot.CI_DIMS)
    for dtype, (_, element_size, precisions) in aot.DTYPES.items():
        for precision in precisions:
            mine = [j for j in ci if j["dtype"] == dtype and j["input_precision"] == precision]
            for variant in tiling.KERNEL_VARIANTS:
                jobs = [j for j in mine if j["kernel"] == variant]
                assert {(j["has_mask"], j["exclude_self"]) for j in jobs} == {
                    (m, e) for m in (False, True) for e in (False, True)
                }, (dtype, precision, variant)
                for dim in aot.CI_DIMS:
                    at = {(j["block_m"], j["block_n"], j["num_warps"], j["num_stages"], j["arch"]) for j in jobs
                          if j["dim"] == dim}  # fmt: skip
                    for config in aot.covering_configs(variant, dim, element_size):
                        assert any(key[:4] == tiling.config_key(config) for key in at)
                    fixed = tiling.config_key(tiling.fixed_config(variant, tiling.launch_dim(dim), element_size))
                    assert any(key[:4] == fixed for key in at)
    for pair in (("bf16", "fp16"), ("fp32",)):  # same configs within a pair: each on both archs
        for variant in tiling.KERNEL_VARIANTS:
            for dim in aot.CI_DIMS:
                jobs = [j for j in ci if j["dtype"] in pair and j["kernel"] == variant and j["dim"] == dim]
                configs = {}
                for j in jobs:
                    key = (j["block_m"], j["block_n"], j["num_warps"], j["num_stages"])
                    configs.setdefault(key, set()).add(j["arch"])
                assert all(archs == set(aot.ARCHS) for archs in configs.values()), (pair, variant, dim, configs)
    for variant in tiling.KERNEL_VARIANTS:
        combos = {(j["arch"], j["has_mask"], j["exclude_self"]) for j in ci if j["kernel"] == variant}
        assert {(a, m) for a, m, _ in combos} == {(a, m) for a in aot.ARCHS for m in (False, True)}
        assert {(a, e) for a, _, e in combos} == {(a, e) for a in aot.ARCHS for e in (False, True)}


def test_violations():
    ok = dict(shared_bytes=1000, shared_limit=2000, arch="sm_90", tensor_cores=True, spill_bytes=0)
    assert aot.violations(ok) == []
    assert aot.violations(dict(ok, shared_bytes=3000))
    assert aot.violations(dict(ok, tensor_cores=False))
    assert aot.violations(dict(ok, arch="sm_80", tensor_cores=False)) == []
    assert aot.violations(dict(ok, spill_bytes=8))
    assert aot.violations({"error": "CompilationError: boom"})


def test_fp32_spills_break_the_invariant_too():
    """No precision is exempt any more: fp32 via tf32x3 spilled 48 B - 6 KB with its old configs and was only
    reported; its kept configs now lower spill-free, so a spill there fails the run like any other."""
    ok = dict(shared_bytes=1000, shared_limit=2000, arch="sm_90", tensor_cores=True, spill_bytes=0)
    for precision in ("tf32x3", "tf32", "ieee"):
        assert aot.violations(dict(ok, input_precision=precision)) == []
        assert aot.violations(dict(ok, input_precision=precision, spill_bytes=48)) == ["spills 48 B"]


def _fake_record(job, **overrides):
    record = {key: job.get(key) for key in aot.RECORD_KEYS}
    record.update(
        arch=f"sm_{job['arch']}", shared_bytes=1000, shared_limit=232_448, registers=128, spill_bytes=0,
        tensor_cores=True, shared_estimate=2000, mma="wgmma", seconds=0.0,
    )  # fmt: skip
    record.update(overrides)
    return record


def test_main_writes_json_and_fails_on_a_broken_invariant(monkeypatch, tmp_path, capsys):
    """Exit 1 on over-limit shared memory and on an empty selection; --json writes the records."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main() drops it for its workers; restored afterwards
    monkeypatch.setattr(aot, "ProcessPoolExecutor", _SerialPool)
    monkeypatch.setattr(aot, "compile_one", lambda job: _fake_record(job))
    path = tmp_path / "aot.json"
    assert aot.main(["--dtype", "bf16", "--dim", "128", "--arch", "90", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert records and set(aot.RECORD_KEYS) <= set(records[0])
    monkeypatch.setattr(aot, "compile_one", lambda job: _fake_record(job, shared_bytes=300_000))
    assert aot.main(["--dtype", "bf16", "--dim", "128", "--arch", "90"]) == 1
    monkeypatch.setattr(aot, "selection", lambda *a, **k: [])
    monkeypatch.setattr(aot, "sigmoid_selection", lambda *a, **k: [])  # (the sigmoid kernel's jobs, added by main)
    monkeypatch.setattr(aot, "extra_columns_selection", lambda *a, **k: [])  # (the extra-column forms', too)
    assert aot.main(["--dtype", "bf16", "--dim", "128"]) == 1
    assert "empty selection" in capsys.readouterr().out


class _SerialPool:
    def __init__(self, max_workers=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)


def test_table_prints_the_readme_rows_of_the_fixed_configs(monkeypatch, capsys):
    """--table ends with one markdown row per fixed config (README "GPU resources"), sorted by D, dtype, kernel;
    the --kernel filter keeps only the named variants."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "ProcessPoolExecutor", _SerialPool)
    monkeypatch.setattr(
        aot,
        "compile_one",
        lambda job: _fake_record(job, roles=job["roles"], registers=201, spill_bytes=0, shared_bytes=33_536),
    )
    argv = ["--dtype", "fp32", "--dtype", "bf16", "--dim", "1024", "--dim", "128", "--arch", "90", "--table"]
    assert aot.main(argv + ["--kernel", "bwd_anchor[two_way]", "--kernel", "fwd"]) == 0
    out = capsys.readouterr().out
    table = out[out.index(aot.TABLE_HEADER) :].split("\n\n")[0].splitlines()
    assert table[:2] == aot.TABLE_HEADER.splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (kernel, dtype, dim)
        for dim in ("128", "1024")
        for dtype in ("bf16", "fp32 / tf32", "fp32 / tf32x3")
        for kernel in ("bwd_anchor[two_way]", "fwd")
    ]
    from fastcl.kernels import tiling

    fixed = tiling.fixed_config("bwd_anchor[two_way]", 1024, 4)
    m, n = fixed.kwargs["BLOCK_M"], fixed.kwargs["BLOCK_N"]
    assert rows[10][3:] == [f"{m}x{n}, {fixed.num_warps}, {fixed.num_stages}", "201", "0", "33,536", "wgmma"]


def test_markdown_table_of_records():
    """Only fixed configs become rows; one table per arch; a failed lowering is a row that says so."""
    base = dict(kernel="fwd", dtype="bf16", input_precision="ieee", dim=128, block_m=64, block_n=64, num_warps=8,
                num_stages=2, registers=208, spill_bytes=0, shared_bytes=49_664, mma="wgmma", roles=["fixed"])  # fmt: skip
    records = [
        dict(base, arch="sm_90"),
        dict(base, arch="sm_80", mma="mma", registers=190),
        dict(base, arch="sm_90", block_m=128, roles=["autotuned"]),
        dict(base, arch="sm_90", kernel="bwd_anchor", error="CompilationError: boom"),
    ]
    lines = aot.markdown_table(records).splitlines()
    assert lines[0] == "sm_80:" and lines[4] == "sm_90:"
    assert lines[3] == "| fwd | bf16 | 128 | 64x64, 8, 2 | 190 | 0 | 49,664 | mma |"
    assert lines[7] == "| bwd_anchor | bf16 | 128 | 64x64, 8, 2 | failed | - | - | - |"
    assert lines[8] == "| fwd | bf16 | 128 | 64x64, 8, 2 | 208 | 0 | 49,664 | wgmma |"
    assert len(lines) == 9
    assert aot.markdown_table([dict(base, arch="sm_90")]).splitlines()[0] == aot.TABLE_HEADER.splitlines()[0]


def test_extra_column_forms_in_the_covering_sample():
    """The kernels' extra-column forms: every variant of :data:`aot.EXTRA_COLUMN_VARIANTS` with each of its flag
    sets, each covering config once per dtype pair (bf16 / fp16, tf32x3 / tf32), both archs per variant; the
    batch-only sample is unchanged."""
    from fastcl.kernels import tiling

    extra = aot.extra_columns_selection(list(aot.DTYPES), aot.CI_DIMS, aot.ARCHS, full=False)
    assert 30 < len(extra) < 80
    assert all(not j["has_mask"] for j in extra)
    for _kernel_name, label, variant, flag_sets in aot.EXTRA_COLUMN_VARIANTS:
        jobs = [j for j in extra if j["kernel"] == label and j["variant"] == variant]
        assert {tuple(j["extra_columns"]) for j in jobs} == set(flag_sets)
        assert {j["arch"] for j in jobs} == set(aot.ARCHS)
        for pair in aot.CONFIG_PAIRS:
            element_size = aot.DTYPES[pair[0][0]][1]
            for dim in aot.CI_DIMS:
                covering = aot.covering_configs(label, dim, element_size, extra=True)
                lowered = [tiling.config_key(config) for config in covering]
                at = [(j["block_m"], j["block_n"], j["num_warps"], j["num_stages"]) for j in jobs
                      if (j["dtype"], j["input_precision"]) in pair and j["dim"] == dim]  # fmt: skip
                assert sorted(at) == sorted(lowered)
    base = aot.selection(list(aot.DTYPES), aot.CI_DIMS, aot.ARCHS, full=False)
    assert all(not j["extra_columns"] for j in base)


def test_launch_arguments_leave_the_extra_range_out_unless_on():
    """Without its flags a lowering passes none of the extra range's parameters (they stay None: compile-time
    constants, so the kernel compiles as without them); with them, the pointers and sizes a launch passes."""
    from fastcl.kernels import jit

    jobs = aot.extra_columns_selection(["bf16"], [64], [90], full=False)
    job = next(j for j in jobs if j["kernel"] == "fwd")
    fn = jit._contrastive_fwd_kernel
    args, keywords = aot.launch_arguments(fn, dict(job, extra_columns=[]))
    assert not set(aot.EXTRA_COLUMN_PARAMETERS) & set(keywords)
    assert len(args) + len(keywords) == len(fn.arg_names) - len(aot.EXTRA_COLUMN_PARAMETERS)
    _, keywords = aot.launch_arguments(fn, dict(job, extra_columns=["HAS_EXTRA", "EXTRA_LABELS", "HAS_MARGIN"]))
    assert set(aot.EXTRA_COLUMN_PARAMETERS) <= set(keywords)
    job = next(j for j in jobs if j["kernel"] == "bwd_contrast")
    _, keywords = aot.launch_arguments(jit._contrastive_bwd_contrast_kernel, job)
    assert keywords["HAS_MARGIN"] and "threshold_ptr" in keywords and "extra_ptr" not in keywords


def test_an_extra_column_kernel_lowers_clean():
    jobs = [
        j
        for j in aot.extra_columns_selection(["bf16"], [128], [90], full=True)
        if j["kernel"] == "bwd_anchor" and "fixed" in j["roles"] and j["extra_columns"] == ["HAS_EXTRA", "HAS_MARGIN"]
    ]
    assert len(jobs) == 1
    record = _in_subprocess(f"from fastcl import aot; print(repr(aot.compile_one({jobs[0]!r})))")
    assert aot.violations(record) == [] and record["mma"] == "wgmma"
    assert record["extra_columns"] == ["HAS_EXTRA", "HAS_MARGIN"]
