"""How the Triton kernels are launched: device guard, config choice (fixed, deterministic, autotuned, fallback),
resource filter and autotune keys. Runs through the interpreter (config choices are plain Python)."""

import contextlib
import time

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import DEVICE

from fastcl import functional as FF
from fastcl.kernels import jit, launch, tiling
from fastcl.ops.dispatch import contrastive_loss
from fastcl.ops.problem import Problem

pytestmark = pytest.mark.triton

INTERPRETER_ONLY = pytest.mark.skipif(DEVICE == "cuda", reason="drives the config choice through the interpreter")


def _host_timer(fn, quantiles=None):
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return [elapsed, elapsed, elapsed] if quantiles else elapsed


def _supcon(n=13, dim=8, mode="all"):
    torch.manual_seed(3)
    x = F.normalize(torch.randn(n, 2, dim, device=DEVICE), dim=-1).requires_grad_()
    loss = FF.supcon_loss(x, torch.randint(0, 3, (n,), device=DEVICE), contrast_mode=mode, backend="triton")
    loss.backward()
    return loss.detach(), x.grad


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with launch._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch._device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]  # no CUDA guard for CPU (interpreter) tensors


def test_every_launch_runs_inside_the_device_guard(monkeypatch):
    """Each kernel launch happens while the guard for the tensors' device is held (forward and backward)."""
    depth, seen = [0], []

    @contextlib.contextmanager
    def recording_guard(device):
        depth[0] += 1
        seen.append(device)
        try:
            yield
        finally:
            depth[0] -= 1

    class CheckedKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                assert depth[0] == 1, "kernel launched outside the device guard"
                return self.kernel[grid](*args, **kwargs)

            return launch

    original = launch._kernel_and_config
    monkeypatch.setattr(launch, "_device_guard", recording_guard)
    monkeypatch.setattr(
        launch, "_kernel_and_config", lambda *a: (lambda kc: (CheckedKernel(kc[0]), kc[1]))(original(*a))
    )
    _supcon(mode="one")
    assert seen == [torch.device(DEVICE)] * 3  # fwd, bwd_anchor, bwd_contrast


ARCH_LIMITS = sorted(tiling.SHARED_MEMORY_LIMITS.items())


@pytest.mark.parametrize("element_size", [2, 4])
@pytest.mark.parametrize("dim", [16, 64, 100, 128, 256, 512, 1024])
@pytest.mark.parametrize("kernel", tiling.KERNEL_VARIANTS)
def test_every_launchable_config_passes_the_filter_for_every_arch(kernel, dim, element_size):
    configs = tiling.launchable_configs(kernel, dim, element_size)
    assert configs
    fixed = tiling.fixed_config(kernel, dim, element_size)
    assert any(tiling.config_key(c) == tiling.config_key(fixed) for c in configs)
    for config in configs:
        for arch, limit in ARCH_LIMITS:
            assert tiling.keep_config(config, dim, element_size, kernel, shared_limit=limit), (arch, config)
    # the prune fallback (nothing kept from a hopeless candidate list) is the fixed config, not configs[:1]
    huge = [triton.Config({"BLOCK_M": 512, "BLOCK_N": 512}, num_warps=1, num_stages=4)]
    assert [tiling.config_key(c) for c in tiling.autotune_configs(kernel, dim, element_size, huge)] == [
        tiling.config_key(fixed)
    ]


@pytest.mark.parametrize("dim", [1, 16, 17, 32, 64, 100, 128, 256, 300, 1024])
def test_fp32_keeps_only_the_spill_free_configs(dim):
    """fp32 (tf32x3 / tf32) launches only configs of FP32_CONFIGS, which lowered without spills on sm_80 and sm_90
    (``python -m fastcl.aot`` fails otherwise), with one feature tile up to D = 16 and looped tiles of 32 beyond;
    configs that spilled (32x32 two-way tiles, 64x32 / 8 warps forward with 128-wide feature tiles) are never used."""
    block_d, single = tiling.block_d_for(dim, 4)
    assert (block_d, single) == ((16, True) if dim <= 16 else (32, False))
    assert tiling.block_d_for(dim, 2)[0] >= min(128, max(16, dim))  # half precision keeps its wide feature tiles
    for kernel in tiling.KERNEL_VARIANTS:
        allowed = [tiling.config_key(c) for c in tiling._fp32_configs(kernel, dim)]
        by_width = (kernel, tiling.output_block_d_for(dim, 4, kernel.endswith("[two_way]")))
        if single or by_width not in tiling.FP32_CONFIGS_BY_OUTPUT_TILE:
            assert allowed == [tiling.config_key(c) for c in tiling.FP32_CONFIGS[(kernel, single)]]
        launchable = [tiling.config_key(c) for c in tiling.launchable_configs(kernel, dim, 4)]
        assert launchable and set(launchable) <= set(allowed)
        assert tiling.config_key(tiling.fixed_config(kernel, dim, 4)) == allowed[0]
        assert tiling.config_key(tiling.fixed_config(kernel, dim, 4, list(tiling.FIXED_PREFERENCE))) == allowed[0]
    # the fp32-only candidates (appended to the autotune list) are never autotuned for half precision
    for kernel in tiling.KERNEL_VARIANTS:
        tuned = {tiling.config_key(c) for c in tiling.autotune_configs(kernel, dim, 2)}
        tuned.discard(tiling.config_key(tiling.fixed_config(kernel, dim, 2)))  # the prune fallback (FIXED_PREFERENCE)
        assert not tuned & set(tiling._FP32_ONLY)
    assert tiling.config_key(tiling.FP32_CONFIGS[("bwd_contrast[two_way]", False)][0]) == (32, 64, 8, 1)
    two_way_dc = tiling.config_key(tiling.fixed_config("bwd_contrast[two_way]", dim, 4))
    assert two_way_dc == ((32, 64, 8, 2) if 32 < dim <= 64 else (32, 64, 8, 1) if dim > 16 else two_way_dc)
    # the logits loop over tiles of 32, but each backward program owns an output tile of up to 256 columns (128
    # for the two-way kernels): D = 128 recomputes the logits once, D = 1024 four times (two-way: eight)
    for two_way, widest in ((False, 256), (True, 128)):
        width = tiling.output_block_d_for(dim, 4, two_way)
        assert width == (16 if dim <= 16 else min(widest, triton.next_power_of_2(dim)))
        assert tiling.backward_output_tiles(dim, 4, two_way) == triton.cdiv(dim, width)
    assert tiling.backward_output_tiles(128, 4, True) == 1 and tiling.backward_output_tiles(1024, 4, True) == 8
    assert tiling.backward_output_tiles(1024, 4) == 4


def test_filter_rejects_the_configs_that_overflowed_shared_memory(monkeypatch):
    """fp32 with one [*, 256] feature tile (D in 129..256) in a 128x64 / 8 warps / 2 stages config needs 262,656 B
    (fwd), 263,424 B and 330,240 B (backward, two-way): over sm_90's 232,448 B, so keep_config rejects it (fp32
    loops feature tiles of 32 instead)."""
    overflowing = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    for kernel in tiling.KERNEL_VARIANTS:
        assert not tiling.keep_config(overflowing, 256, 4, kernel, shared_limit=tiling.SHARED_MEMORY_LIMITS[90])
    monkeypatch.setattr(tiling, "MAX_SINGLE_D_TILE_FP32", 256)
    for kernel in tiling.KERNEL_VARIANTS:
        assert not tiling.keep_config(overflowing, 256, 4, kernel, shared_limit=tiling.SHARED_MEMORY_LIMITS[90])
    assert tiling.shared_memory_estimate(overflowing, 256, 4, "fwd") >= 262_656
    assert tiling.shared_memory_estimate(overflowing, 256, 4, "bwd_anchor") >= 263_424
    assert tiling.shared_memory_estimate(overflowing, 256, 4, "bwd_contrast") >= 330_240


@INTERPRETER_ONLY
@pytest.mark.parametrize("how", ["deterministic", "autotune_off"])
def test_fixed_config_without_autotuning(monkeypatch, how):
    """Under torch.use_deterministic_algorithms(True) (and FASTCL_TRITON_AUTOTUNE=0) nothing is timed: one fixed,
    fitting config per kernel and feature tile, the same in every process."""
    candidates = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    ]
    monkeypatch.setattr(launch, "tuning_configs", lambda: candidates)
    monkeypatch.setattr(launch, "AUTOTUNE_DO_BENCH", _host_timer)
    monkeypatch.setattr(launch, "_tuned", {})
    used = []
    original = launch._kernel_and_config
    monkeypatch.setattr(launch, "_kernel_and_config", lambda *a: used.append((a, original(*a))) or used[-1][1])
    if how == "deterministic":
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        monkeypatch.setenv("FASTCL_TRITON_AUTOTUNE", "0")
    try:
        first = _supcon()
        second = _supcon()
    finally:
        if how == "deterministic":
            torch.use_deterministic_algorithms(previous)
    assert launch._tuned == {}
    assert {a[0] for a, _ in used} == {"fwd", "bwd_anchor[two_way]"}  # SupCon 'all': the one-kernel route
    for (variant, dim, element_size), (kernel, config) in used:
        assert config is not None and kernel in launch.RAW_KERNELS.values()
        expected = tiling.fixed_config(variant, dim, element_size, list(tiling.FIXED_PREFERENCE) + candidates)
        assert tiling.config_key(config) == tiling.config_key(expected)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@INTERPRETER_ONLY
def test_autotune_key_buckets_the_sizes(monkeypatch):
    """Sizes in one power-of-two bucket share one tuned config (no re-benchmark for a last partial batch)."""
    candidates = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
    ]
    monkeypatch.setattr(launch, "tuning_configs", lambda: candidates)
    monkeypatch.setattr(launch, "AUTOTUNE_DO_BENCH", _host_timer)
    monkeypatch.setattr(launch, "_tuned", {})
    _supcon(n=10)  # 2N = 20 -> bucket 32
    _supcon(n=13)  # 26 -> 32
    assert len(launch._tuned["fwd"].cache) == 1
    _supcon(n=17)  # 34 -> 64
    assert len(launch._tuned["fwd"].cache) == 2


def test_sizes_and_offsets_are_not_specialized():
    """Batch sizes, offsets, the mask period and label/mask strides never trigger a recompile; embedding pointers,
    row strides and the feature dim keep Triton's 16-divisibility specialization (vectorized, pipelined loads)."""
    every_name = set().union(*(kernel.arg_names for kernel in launch.RAW_KERNELS.values()))
    assert set(jit.NOT_SPECIALIZED) <= every_name and set(jit.NOT_ALIGNMENT_SPECIALIZED) <= every_name  # no stale names
    backward_only = {"stride_mask_t_row", "stride_mask_t_col", "mask_t_ptr"}  # the transposed mask of TWO_WAY
    extra_range = {"n_extra", "stride_extra_label", "extra_label_ptr"}  # the second column range (fwd, bwd_anchor)
    for name, kernel in launch.RAW_KERNELS.items():
        names = set(kernel.arg_names)
        assert (backward_only <= names) == (name != "fwd")
        assert (extra_range <= names) == (name != "bwd_contrast") and "threshold_ptr" in names
        not_specialized = set(jit.NOT_SPECIALIZED)  # applied by @triton.jit; tests/test_aot.py checks the params
        assert {"n_anchor", "n_contrast", "self_offset", "mask_period", "n_anchor_bucket", "n_extra"} <= not_specialized
        assert not_specialized - backward_only - extra_range <= names
        assert not {"dim", "stride_anchor", "stride_contrast", "stride_extra"} & not_specialized
        not_aligned = set(jit.NOT_ALIGNMENT_SPECIALIZED)
        assert {"anchor_label_ptr", "contrast_label_ptr", "mask_ptr", "threshold_ptr"} <= not_aligned & names
        assert not {"anchor_ptr", "contrast_ptr", "extra_ptr"} & not_aligned


def test_fp32_uses_tensor_core_precisions(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert launch.input_precision_for(torch.float32) == "tf32x3"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert launch.input_precision_for(torch.float32) == "tf32"
    assert launch.input_precision_for(torch.bfloat16) == "ieee"


def test_bad_arguments_name_the_argument():
    x = torch.randn(5, 4, device=DEVICE)
    labels = torch.arange(5, device=DEVICE)
    with pytest.raises(TypeError, match="anchor"):
        launch.triton_forward(Problem(None, x.double(), labels, labels, None, 0, 1.0, 1.0), "anchors_are_contrast")
    with pytest.raises(ValueError, match="contrast_labels"):
        launch.triton_forward(Problem(x, x, labels, labels[:3], None, 0, 1.0, 1.0), "one_way")
    with pytest.raises(ValueError, match="mask"):
        launch.triton_forward(Problem(x, x, None, None, torch.ones(2, 3, device=DEVICE), 0, 1.0, 1.0), "one_way")


@pytest.mark.parametrize("route", ["anchors_are_contrast", "one_way", "two_way"])
def test_entry_points_called_directly_as_the_custom_op_does(route):
    """triton_forward / triton_backward with a 0-dim device grad_output, as a torch.library op calls them: residuals
    are four fp32 vectors of the documented shapes and the gradients equal the autograd path's."""
    torch.manual_seed(5)
    n_a, n_c = (14, 14) if route != "one_way" else (9, 14)
    a = F.normalize(torch.randn(n_a, 12, device=DEVICE), dim=-1)
    c = a if route == "anchors_are_contrast" else F.normalize(torch.randn(n_c, 12, device=DEVICE), dim=-1)
    la = torch.randint(0, 4, (n_a,), device=DEVICE)
    lc = la if route == "anchors_are_contrast" else torch.randint(0, 4, (n_c,), device=DEVICE)
    offset = 0 if route == "anchors_are_contrast" else None
    problem = Problem(None if route == "anchors_are_contrast" else a, c, la, lc, None, offset, 1 / 0.3, 0.8, route == "two_way")
    assert launch.triton_route(problem) == route
    loss, residuals = launch.triton_forward(problem, route)
    assert len(residuals) == 4 and all(r.dtype == torch.float32 and r.dim() == 1 for r in residuals)
    expected_cols = n_c if route == "two_way" else 0
    assert [r.shape[0] for r in residuals] == [n_a, n_a, expected_cols, expected_cols]
    grad_output = torch.tensor(1.7, device=DEVICE)
    grad_a, grad_c = launch.triton_backward(grad_output, problem, residuals, route)

    leaf_a = a.clone().requires_grad_()
    leaf_c = leaf_a if route == "anchors_are_contrast" else c.clone().requires_grad_()
    two_way = route == "two_way"
    settings = dict(self_offset=offset, temperature=0.3, scale=0.8, backend="triton", two_way=two_way)
    ref = contrastive_loss(leaf_a, leaf_c, la, lc, None, **settings)
    (ref * 1.7).backward()
    assert torch.allclose(loss, ref.detach())
    assert torch.allclose(grad_a, leaf_a.grad, rtol=1e-5, atol=1e-7)
    if route == "anchors_are_contrast":
        assert grad_c is None
    else:
        assert torch.allclose(grad_c, leaf_c.grad, rtol=1e-5, atol=1e-7)


def test_split_count_fills_the_gpu_at_everyday_batch_sizes():
    """N >= 1024 on 132 SMs: at least 2 x SMs programs per launch (output blocks x splits); large N: no split."""
    device = torch.device("cuda", 0)
    launch._sm_counts[0] = 132
    try:
        for n in (1024, 2048, 4096, 8192):
            blocks = triton.cdiv(n, launch.NOMINAL_BLOCK)
            assert blocks * launch.split_count(blocks, n, device) >= 2 * 132, n
        assert launch.split_count(triton.cdiv(65536, launch.NOMINAL_BLOCK), 65536, device) == 1
        assert launch.split_count(1, 40, device) == 1  # too short a range to share
    finally:
        del launch._sm_counts[0]


@INTERPRETER_ONLY
@pytest.mark.parametrize(
    "case", ["supcon_all", "supcon_one_mask", "info_nce_symmetric", "info_nce_one_way_long_dim", "large_logits"]
)
def test_split_reduction_matches_float64(monkeypatch, case):
    """Columns (forward, bwd_anchor) and rows (bwd_contrast) split over an extra grid axis with a fixed-order
    combine: float64 agreement at odd sizes, splits really taken, and bitwise-equal reruns."""
    from float64_reference import info_nce_float64, supcon_float64

    monkeypatch.setattr(launch, "INTERPRETER_SMS", 8)
    monkeypatch.setattr(launch, "MIN_SPLIT_LENGTH", 16)
    grids = []
    original = launch._launch
    monkeypatch.setattr(
        launch, "_launch", lambda name, grid_of, *a: grids.append(grid_of({"BLOCK_M": 16, "BLOCK_N": 16})) or original(
            name, grid_of, *a
        )
    )
    def run():
        torch.manual_seed(7)
        if case.startswith("supcon") or case == "large_logits":
            norm = 100.0 if case == "large_logits" else 1.0
            features = F.normalize(torch.randn(29, 2, 20), dim=-1) * norm
            labels = torch.randint(0, 4, (29,))
            mode = "one" if "one" in case else "all"
            mask = (torch.rand(29, 29) < 0.3).float() if "mask" in case else None
            t = 0.05 if case == "large_logits" else 0.2
            x = features.clone().requires_grad_()
            loss = FF.supcon_loss(x, None if mask is not None else labels, mask=mask, temperature=t,
                                  contrast_mode=mode, backend="triton")  # fmt: skip
            loss.backward()
            ref_x = features.double().requires_grad_()
            ref = supcon_float64(ref_x, None if mask is not None else labels, mask=mask, temperature=t,
                                 contrast_mode=mode)  # fmt: skip
            ref.backward()
            return loss, [x.grad], ref, [ref_x.grad]
        symmetric = case == "info_nce_symmetric"
        dim = 300 if "long_dim" in case else 12
        query, key = torch.randn(37, dim), torch.randn(37 if symmetric else 53, dim)
        labels = None if symmetric else torch.randint(0, 53, (37,))
        q, k = query.clone().requires_grad_(), key.clone().requires_grad_()
        loss = FF.info_nce_loss(q, k, labels, temperature=0.1, symmetric=symmetric, backend="triton")
        loss.backward()
        rq, rk = query.double().requires_grad_(), key.double().requires_grad_()
        ref = info_nce_float64(F.normalize(rq, dim=-1), F.normalize(rk, dim=-1), labels, 0.1, symmetric)
        ref.backward()
        return loss, [q.grad, k.grad], ref, [rq.grad, rk.grad]

    loss, grads, ref, ref_grads = run()
    assert any(len(g) > 1 and g[-1] > 1 for g in grids), grids  # a split grid was launched
    assert abs(loss.item() - ref.item()) <= 2e-5 * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert ((g.double() - r).abs().max() / r.abs().max()).item() < (1e-5 if case == "large_logits" else 1e-4)
    again = run()
    assert torch.equal(loss, again[0]) and all(torch.equal(a, b) for a, b in zip(grads, again[1]))


def _launched_backward_flops(monkeypatch, route, n, dim, dtype):
    """Tensor-core FLOPs of the backward launches as the kernels' loops run them, counted from the launches
    themselves (grid, BLOCK_* of the config chosen, constexprs; nothing executes): each program of grid
    ``(row blocks, feature tiles, splits)`` multiplies every column block of its share, recomputing the logits over
    ``cdiv(D, BLOCK_D)`` feature tiles (twice when RECOMPUTE_TRANSPOSED) and accumulating ``BLOCK_D_OUT`` columns."""
    launches = []
    monkeypatch.setattr(launch, "_launch", lambda name, grid_of, leading, args, scalars, constexprs: launches.append(
        (name, grid_of, constexprs)))  # fmt: skip
    # as on a GPU: bf16 / fp16 tensor-core dots are exact, so two-way tiles reuse x_ij for x_ji
    monkeypatch.setattr(launch, "recompute_transposed", lambda dt: dt == torch.float32)
    x = torch.randn(n, dim, dtype=dtype)
    labels = torch.arange(n) % 7
    args = launch._LaunchArgs(Problem(None if route == "anchors_are_contrast" else x.clone(), x, labels, labels, None, 0, 1.0, 1.0))
    stats = tuple(torch.zeros(n) for _ in range(3))
    col_stats = {"anchors_are_contrast": stats, "one_way": None, "two_way": tuple(torch.zeros(n) for _ in range(3))}[route]
    launch.contrastive_backward(args, torch.ones(1), 1.0, stats, col_stats)
    total = 0
    for name, grid_of, constexprs in launches:
        variant = tiling.variant_name(name, constexprs["TWO_WAY"])
        config = tiling.fixed_config(variant, dim, x.element_size())
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        programs, feature_tiles, _ = grid_of(dict(config.kwargs))
        block_d = constexprs["BLOCK_D"]
        block_d_out = constexprs.get("BLOCK_D_OUT", block_d)  # (no BLOCK_D_OUT: the output tile is BLOCK_D wide)
        reduced_blocks = triton.cdiv(n, block_n if name == "bwd_anchor" else block_m)  # over all splits
        logits = triton.cdiv(dim, block_d) * block_d * (2 if constexprs["RECOMPUTE_TRANSPOSED"] else 1)
        total += programs * feature_tiles * reduced_blocks * 2 * block_m * block_n * (logits + block_d_out)
    return total


@pytest.mark.parametrize("dim", [512, 1024])
@pytest.mark.parametrize("route", ["anchors_are_contrast", "one_way", "two_way"])
def test_backward_flops_at_looped_feature_dims(monkeypatch, route, dim):
    """Each backward program recomputes the whole logits product for the output feature tile it owns; with
    128-wide output tiles the anchors-are-contrast route (SupCon 'all' / NT-Xent) would do 3.0x the dense
    formulation's FLOPs at D = 1024 (9 tile products per 128 output columns where dense needs 2); with the wide
    output tiles it does <= 1.5x.
    The model (tiling.backward_flops) is checked against the launches the launcher really makes."""
    n = 4096
    dense = tiling.dense_backward_flops(n, n, dim)
    with monkeypatch.context() as m:
        launched = _launched_backward_flops(m, route, n, dim, torch.bfloat16)
    assert launched == tiling.backward_flops(route, n, n, dim, 2)
    if route == "anchors_are_contrast":
        assert launched <= 1.5 * dense
    with monkeypatch.context() as m:  # 128-wide output tiles
        m.setattr(tiling, "MAX_OUTPUT_D_TILE", 128)
        narrow = _launched_backward_flops(m, route, n, dim, torch.bfloat16)
        assert narrow == tiling.backward_flops(route, n, n, dim, 2)
    tiles = dim // 128
    assert narrow == (1 if route == "anchors_are_contrast" else 2) * 2 * n * n * tiles * (dim + 128)
    if route == "anchors_are_contrast":
        assert narrow > 1.5 * dense
    # D = 512: one output tile (no recomputation at all); D = 1024: two instead of eight
    assert launched / narrow == pytest.approx((2 * dim if dim == 512 else 3 * dim) / (tiles * (dim + 128)))


@pytest.mark.parametrize("dim", [128, 1024])
@pytest.mark.parametrize("route", ["anchors_are_contrast", "one_way", "two_way"])
def test_fp32_backward_flops_with_wide_output_tiles(monkeypatch, route, dim):
    """fp32 loops the logits over feature tiles of 32 but accumulates output tiles of up to 256 columns (two-way:
    128), so D = 128 recomputes the logits once instead of four times (32-wide output tiles, the structure the
    spill-free FP32_CONFIGS were first swept with). The model is checked against the launches (two-way tiles
    recompute the transposed dots in fp32)."""
    n = 4096
    dense = tiling.dense_backward_flops(n, n, dim)
    with monkeypatch.context() as m:
        launched = _launched_backward_flops(m, route, n, dim, torch.float32)
    assert launched == tiling.backward_flops(route, n, n, dim, 4, recompute=True)
    with monkeypatch.context() as m:  # 32-wide output tiles
        m.setattr(tiling, "MAX_OUTPUT_D_TILE_FP32", 32)
        m.setattr(tiling, "MAX_OUTPUT_D_TILE_FP32_TWO_WAY", 32)
        narrow = _launched_backward_flops(m, route, n, dim, torch.float32)
        assert narrow == tiling.backward_flops(route, n, n, dim, 4, recompute=True)
    # in units of the dense backward: (anchors-are-contrast / one-way / two-way) 1.00 / 1.33 / 2.00 at D = 128
    # (32-wide output tiles: 3.00 / 3.33 / 6.00), 5.67 / 3.33 / 11.33 at D = 1024 (32-wide: 21.67 / 22.00 / 43.33)
    expected = {128: {"anchors_are_contrast": (3.0, 1.0), "one_way": (10 / 3, 4 / 3), "two_way": (6.0, 2.0)},
                1024: {"anchors_are_contrast": (65 / 3, 17 / 3), "one_way": (22.0, 10 / 3), "two_way": (130 / 3, 34 / 3)}}  # fmt: skip
    assert (narrow / dense, launched / dense) == pytest.approx(expected[dim][route])


@pytest.mark.parametrize("route", ["anchors_are_contrast", "one_way", "two_way"])
def test_backward_uses_the_precision_the_forward_recorded(monkeypatch, route):
    """allow_tf32 flipped between forward and backward: every backward launch keeps the forward's precision
    (tf32x3 statistics with tf32 recomputed logits would give other probabilities), and the gradients are those of
    an unflipped step."""
    seen = []
    real_launch = launch._launch

    def spy(name, grid_of, leading, args, scalars, constexprs):
        seen.append((name, constexprs["INPUT_PRECISION"]))
        return real_launch(name, grid_of, leading, args, scalars, constexprs)

    monkeypatch.setattr(launch, "_launch", spy)
    torch.manual_seed(11)
    a = F.normalize(torch.randn(10, 8, device=DEVICE), dim=-1)
    c = F.normalize(torch.randn(10, 8, device=DEVICE), dim=-1)
    labels = torch.randint(0, 3, (10,), device=DEVICE)

    def step(flip):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        leaf_a = a.clone().requires_grad_()
        leaf_c = leaf_a if route == "anchors_are_contrast" else c.clone().requires_grad_()
        loss = contrastive_loss(
            leaf_a,  # the same object as leaf_c: the anchors are the contrast rows
            leaf_c,
            labels,
            labels,
            None,
            self_offset=0 if route == "anchors_are_contrast" else None,
            temperature=0.1,
            scale=1.0,
            backend="triton",
            two_way=route == "two_way",
        )
        if flip:
            monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
        loss.backward()
        return leaf_a.grad if route == "anchors_are_contrast" else torch.cat([leaf_a.grad, leaf_c.grad])

    expected = step(flip=False)
    seen.clear()
    got = step(flip=True)
    assert {name for name, _ in seen} >= {"fwd", "bwd_anchor"}
    assert all(precision == "tf32x3" for _, precision in seen), seen
    assert torch.equal(got, expected)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    seen.clear()
    step_tf32 = contrastive_loss(a, c, labels, labels, None, self_offset=None, temperature=0.1, scale=1.0,
                                 backend="triton")  # fmt: skip
    assert step_tf32.isfinite() and seen == [("fwd", "tf32")]


def test_recorded_precision_is_checked_against_the_dtype():
    x = torch.randn(6, 8, device=DEVICE)
    labels = torch.arange(6, device=DEVICE) % 2
    problem = Problem(x, x, labels, labels, None, None, 1.0, 1.0)
    with pytest.raises(ValueError, match="input_precision for torch.float32"):
        launch.triton_forward(problem, "one_way", "ieee")
    with pytest.raises(ValueError, match="input_precision for torch.bfloat16"):
        launch.triton_forward(problem._replace(anchor=x.bfloat16(), contrast=x.bfloat16()), "one_way", "tf32")


def test_transposed_mask_reuses_a_symmetric_mask_and_caches_the_copy(monkeypatch):
    monkeypatch.setattr(launch, "_transposed", [])
    gen = torch.Generator().manual_seed(4)
    m = torch.rand(7, 7, generator=gen)
    symmetric = (m + m.T).to(DEVICE)
    assert launch.transposed_mask(symmetric) is symmetric  # no copy: the reverse weights are the mask's own
    skew = m.to(DEVICE)
    first = launch.transposed_mask(skew)
    assert first is not skew and first.is_contiguous() and torch.equal(first, skew.T)
    assert launch.transposed_mask(skew) is first  # one copy across calls
    skew[0, 1] += 1.0  # an in-place edit is seen (the tensor's version)
    second = launch.transposed_mask(skew)
    assert second is not first and torch.equal(second, skew.T)
    column_major = symmetric.T.contiguous().T  # symmetric values, column stride 7: copied to unit column stride
    assert launch.transposed_mask(column_major).stride() == (7, 1)


def test_two_way_symmetric_mask_gradients_match_chunked():
    gen = torch.Generator().manual_seed(8)
    bsz, dim = 6, 8
    labels = torch.randint(0, 3, (bsz,), generator=gen)
    mask = (labels[:, None] == labels[None, :]).float()
    x = F.normalize(torch.randn(2 * bsz, dim, generator=gen), dim=-1)
    grads = {}
    for backend in ("triton", "chunked"):
        a, c = x[:bsz].to(DEVICE).requires_grad_(), x[bsz:].to(DEVICE).requires_grad_()
        loss = contrastive_loss(a, c, None, None, mask.to(DEVICE), self_offset=None, temperature=0.2, scale=1.0,
                                backend=backend, two_way=True)  # fmt: skip
        loss.backward()
        grads[backend] = torch.cat([a.grad, c.grad]).cpu()
    assert torch.allclose(grads["triton"], grads["chunked"], rtol=1e-4, atol=1e-6)


def test_named_size_positions_are_the_kernels_arguments():
    """``_LaunchArgs.sizes`` is passed positionally from ``n_anchor`` on; the positions a launch without the batch
    columns overrides name those arguments in every kernel."""
    kernels = (jit._contrastive_fwd_kernel, jit._contrastive_bwd_anchor_kernel, jit._contrastive_bwd_contrast_kernel)
    for kernel in kernels:
        names = kernel.arg_names
        first = names.index("n_anchor")
        assert names[first + launch._LaunchArgs.SIZE_N_CONTRAST] == "n_contrast"
        assert names[first + launch._LaunchArgs.SIZE_N_CONTRAST_BUCKET] == "n_contrast_bucket"
