"""The fused Triton backend against the float64 formulas (on CPU through TRITON_INTERPRET=1, or on a GPU)."""

import pytest
import torch
import torch.nn.functional as F
from autotune_timing import host_timer
from conftest import DEVICE
from float64_reference import info_nce_float64, supcon_float64

from fastcl import functional as FF

pytestmark = pytest.mark.triton

# fp32 in the interpreter is exact fp32; on a GPU the dot may use tf32 if the user allows it.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _check_supcon(bsz, n_views, dim, contrast_mode, positives, dtype=torch.float32, temperature=0.2, base=0.15):
    features = F.normalize(torch.randn(bsz, n_views, dim), dim=-1)
    labels = torch.randint(0, 3, (bsz,))
    mask = torch.rand(bsz, bsz) * (torch.rand(bsz, bsz) < 0.4) if positives == "mask" else None
    kwargs = dict(labels=labels if positives == "labels" else None, mask=mask)
    x = features.to(DEVICE, dtype).requires_grad_()
    device_kwargs = {k: (v.to(DEVICE) if v is not None else None) for k, v in kwargs.items()}
    loss = FF.supcon_loss(
        x,
        **device_kwargs,
        temperature=temperature,
        contrast_mode=contrast_mode,
        base_temperature=base,
        backend="triton",
    )
    (loss * 1.3).backward()
    ref_x = x.detach().cpu().double().requires_grad_()
    ref = supcon_float64(ref_x, **kwargs, temperature=temperature, contrast_mode=contrast_mode, base_temperature=base)
    (ref * 1.3).backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= TOLERANCE[dtype] * max(1.0, abs(ref.item()))
    assert _rel(x.grad.cpu(), ref_x.grad) < 5 * TOLERANCE[dtype]


@pytest.mark.parametrize("contrast_mode", ["all", "one"])
@pytest.mark.parametrize("positives", ["labels", "mask", "simclr"])
@pytest.mark.parametrize("n_views,dim", [(1, 3), (2, 20), (3, 7)])
def test_supcon_fp32(contrast_mode, positives, n_views, dim):
    _check_supcon(11, n_views, dim, contrast_mode, positives)  # N = 11..33, tiles of 16 in the interpreter


def test_supcon_feature_dim_beyond_one_tile():
    _check_supcon(9, 2, 300, "all", "labels")  # D > 256: looped logits tiles, one 512-wide output tile in backward


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_supcon_half_precision(dtype):
    _check_supcon(13, 2, 32, "all", "labels", dtype=dtype, temperature=0.5, base=0.5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce(symmetric):
    query, key = torch.randn(18, 12), torch.randn(18 if symmetric else 29, 12)
    labels = None if symmetric else torch.randint(0, 29, (18,))
    q, k = query.to(DEVICE).requires_grad_(), key.to(DEVICE).requires_grad_()
    loss = FF.info_nce_loss(
        q, k, None if labels is None else labels.to(DEVICE), temperature=0.1, symmetric=symmetric, backend="triton"
    )
    loss.backward()
    rq, rk = query.detach().double().requires_grad_(), key.detach().double().requires_grad_()
    ref = info_nce_float64(F.normalize(rq, dim=-1), F.normalize(rk, dim=-1), labels, 0.1, symmetric)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
    assert _rel(q.grad.cpu(), rq.grad) < 1e-4 and _rel(k.grad.cpu(), rk.grad) < 1e-4


def test_triton_agrees_with_chunked_nt_xent():
    z_a, z_b = torch.randn(21, 16, device=DEVICE), torch.randn(21, 16, device=DEVICE)
    a = FF.nt_xent_loss(z_a, z_b, backend="triton")
    b = FF.nt_xent_loss(z_a, z_b, backend="chunked")
    assert abs(a.item() - b.item()) < 1e-5


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # the interpreter's log2(0) = -inf
def test_zero_positive_anchors_and_single_column():
    features = F.normalize(torch.randn(5, 1, 4), dim=-1).to(DEVICE)
    labels = torch.tensor([0, 0, 1, 2, 3], device=DEVICE)
    loss = FF.supcon_loss(features, labels, backend="triton")
    assert abs(loss.item() - supcon_float64(features.cpu(), labels.cpu()).item()) < 1e-5
    assert FF.supcon_loss(torch.randn(1, 1, 4, device=DEVICE), backend="triton").item() == 0.0


def test_nan_in_gives_nan_out():
    features = torch.randn(6, 2, 4, device=DEVICE)
    features[4, 1, 3] = float("nan")
    x = features.requires_grad_()
    loss = FF.supcon_loss(x, torch.randint(0, 2, (6,), device=DEVICE), backend="triton")
    assert torch.isnan(loss)
    single = torch.randn(6, 1, 4, device=DEVICE)
    single[2, 0, 0] = float("nan")
    assert torch.isnan(FF.supcon_loss(single, backend="triton"))


def test_non_contiguous_features():
    base = torch.randn(10, 8, 2, device=DEVICE)
    features = base.transpose(1, 2)  # [10, 2, 8], non-contiguous
    labels = torch.randint(0, 3, (10,), device=DEVICE)
    a = FF.supcon_loss(features, labels, backend="triton", normalize=True)
    b = FF.supcon_loss(features.contiguous(), labels, backend="chunked", normalize=True)
    assert abs(a.item() - b.item()) < 1e-5


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only: on a GPU the autotuned configs run anyway")
@pytest.mark.parametrize("block_m,block_n", [(64, 128), (128, 32)])
def test_gpu_sized_tiles_in_the_interpreter(monkeypatch, block_m, block_n):
    """The tile sizes GPUs use (not only the interpreter's 16 x 16), with N and D off the tile grid."""
    import triton

    from fastcl.kernels import launch

    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}))
    monkeypatch.setattr(launch, "_tuned", {})
    _check_supcon(75, 2, 130, "all", "labels")  # N = 150, D = 130 -> BLOCK_D = 256
    _check_supcon(40, 3, 300, "one", "mask")  # D = 300: looped feature tiles


def test_shared_tiles_routes(monkeypatch):
    """SupCon 'all': one backward kernel; 'one': two; symmetric InfoNCE: both directions from the same tiles."""
    from fastcl.kernels import launch

    launched = []
    original = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda name, *args: launched.append(name) or original(name, *args))
    features = F.normalize(torch.randn(9, 2, 8, device=DEVICE), dim=-1).requires_grad_()
    labels = torch.randint(0, 3, (9,), device=DEVICE)
    FF.supcon_loss(features, labels, backend="triton").backward()
    assert launched == ["fwd", "bwd_anchor"]
    launched.clear()
    FF.supcon_loss(features, labels, contrast_mode="one", backend="triton").backward()
    assert launched == ["fwd", "bwd_anchor", "bwd_contrast"]
    launched.clear()
    query, key = (
        torch.randn(7, 8, device=DEVICE, requires_grad=True),
        torch.randn(7, 8, device=DEVICE, requires_grad=True),
    )
    FF.info_nce_loss(query, key, backend="triton").backward()
    assert launched == ["fwd", "fwd", "bwd_anchor", "bwd_contrast"]


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only: on a GPU the real autotuner runs")
def test_autotuned_launch_path_with_pruning(monkeypatch):
    """The autotuner wrapper (keys, pruning, launch grid from the chosen config), timed on the host."""
    import triton

    from fastcl.kernels import launch, tiling

    configs = [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 512, "BLOCK_N": 512}, num_warps=1, num_stages=4),  # pruned: cannot fit
    ]
    assert not tiling.keep_config(configs[2], 16, 4)
    monkeypatch.setattr(launch, "tuning_configs", lambda: configs)
    monkeypatch.setattr(launch, "AUTOTUNE_DO_BENCH", host_timer)
    monkeypatch.setattr(launch, "_tuned", {})
    # fp16: fp32 inputs keep only the spill-free FP32_CONFIGS (GPU-sized tiles), so its pruning would drop both
    _check_supcon(21, 2, 8, "one", "labels", dtype=torch.float16)
    assert set(launch._tuned) == {"fwd", "bwd_anchor", "bwd_contrast"}
    for kernel in launch._tuned.values():
        assert kernel.best_config in configs[:2]


def _max_rel(grad, ref):
    """max |grad - ref| / max |ref| (one bad entry is not averaged away)."""
    return ((grad.double() - ref).abs().max() / ref.abs().max()).item()


def test_non_contiguous_labels_and_mask():
    """Labels and masks are read with their strides (``pairs[:, 1]`` gave 11.37 against 6.52)."""
    query, key = torch.randn(10, 8), torch.randn(17, 8)
    pairs = torch.randint(0, 17, (10, 2))
    labels = pairs[:, 1]
    assert not labels.is_contiguous()
    q, k = query.to(DEVICE).requires_grad_(), key.to(DEVICE).requires_grad_()
    loss = FF.info_nce_loss(q, k, pairs.to(DEVICE)[:, 1], symmetric=False, backend="triton")
    loss.backward()
    rq, rk = query.detach().double().requires_grad_(), key.detach().double().requires_grad_()
    ref = info_nce_float64(F.normalize(rq, dim=-1), F.normalize(rk, dim=-1), labels, 0.07, False)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert _rel(q.grad.cpu(), rq.grad) < 1e-4 and _rel(k.grad.cpu(), rk.grad) < 1e-4

    bsz = 9
    weights = torch.rand(bsz, bsz) * (torch.rand(bsz, bsz) < 0.5)
    mask_t = weights.T.contiguous().T  # the same values, column-major
    features = F.normalize(torch.randn(bsz, 2, 12), dim=-1)
    x = features.to(DEVICE).requires_grad_()
    loss = FF.supcon_loss(x, mask=mask_t.to(DEVICE), temperature=0.3, backend="triton")
    loss.backward()
    ref_x = features.detach().double().requires_grad_()
    ref = supcon_float64(ref_x, mask=weights, temperature=0.3)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert _rel(x.grad.cpu(), ref_x.grad) < 1e-4


@pytest.mark.parametrize(
    "loss_name,temperature",
    [("info_nce_symmetric", 0.07), ("info_nce_one_way", 0.07), ("supcon_all", 0.01), ("supcon_one", 0.01)],
)
def test_gradients_at_large_logits(loss_name, temperature):
    """fp32, embeddings of norm 100: |logits| up to 1e5-1e6; gradients within 1e-5 (max-abs relative) of float64
    (the natural-log LSE round trip gave 3.4e-3 and 2.3e-2)."""
    if loss_name.startswith("info_nce"):
        symmetric = loss_name.endswith("symmetric")
        query = F.normalize(torch.randn(24, 16), dim=-1) * 100
        key = F.normalize(torch.randn(24 if symmetric else 37, 16), dim=-1) * 100
        q, k = query.to(DEVICE).requires_grad_(), key.to(DEVICE).requires_grad_()
        FF.info_nce_loss(q, k, temperature=temperature, symmetric=symmetric, normalize=False, backend="triton").backward()
        rq, rk = query.detach().double().requires_grad_(), key.detach().double().requires_grad_()
        info_nce_float64(rq, rk, None, temperature, symmetric).backward()
        assert _max_rel(q.grad.cpu(), rq.grad) < 1e-5
        assert _max_rel(k.grad.cpu(), rk.grad) < 1e-5
    else:
        mode = loss_name.split("_")[1]
        features = F.normalize(torch.randn(13, 2, 16), dim=-1) * 100
        labels = torch.randint(0, 3, (13,))
        x = features.to(DEVICE).requires_grad_()
        FF.supcon_loss(x, labels.to(DEVICE), temperature=temperature, contrast_mode=mode, backend="triton").backward()
        ref_x = features.detach().double().requires_grad_()
        supcon_float64(ref_x, labels, temperature=temperature, contrast_mode=mode).backward()
        assert _max_rel(x.grad.cpu(), ref_x.grad) < 1e-5


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter casts through numpy
@pytest.mark.parametrize("grad_scale", [2.0**16, 2.0**20])
@pytest.mark.parametrize("loss_name", ["supcon_all", "nt_xent", "info_nce_symmetric"])
def test_fp16_gradients_with_a_loss_scale(loss_name, grad_scale):
    """fp16 with a GradScaler-sized grad_output: the scale is applied to the fp32 accumulator, not to dS (which
    overflowed to inf/NaN); the scaled gradients still fit fp16 and match the chunked backend."""

    def grads(backend):
        torch.manual_seed(1)
        if loss_name == "supcon_all":
            x = F.normalize(torch.randn(16, 2, 64), dim=-1).to(DEVICE, torch.float16).requires_grad_()
            labels = torch.randint(0, 3, (16,)).to(DEVICE)
            loss = FF.supcon_loss(x, labels, temperature=0.5, base_temperature=0.5, backend=backend)
            leaves = [x]
        else:
            a = torch.randn(20, 64).to(DEVICE, torch.float16).requires_grad_()
            b = torch.randn(20, 64).to(DEVICE, torch.float16).requires_grad_()
            if loss_name == "nt_xent":
                loss = FF.nt_xent_loss(a, b, temperature=0.5, backend=backend)
            else:
                loss = FF.info_nce_loss(a, b, temperature=0.5, backend=backend)
            leaves = [a, b]
        (loss * grad_scale).backward()
        return [leaf.grad for leaf in leaves]

    for got, expected in zip(grads("triton"), grads("chunked")):
        assert torch.isfinite(got).all()
        assert torch.isfinite(expected).all()
        assert expected.abs().max() > 0.05 * grad_scale / 2**16  # a real gradient, not flushed to zero
        assert _rel(got.float(), expected.float()) < 1e-2


def test_route_is_decided_before_copies(monkeypatch):
    """A non-contiguous tensor passed as both anchor and contrast keeps the one-kernel route: the route is decided
    before the contiguous copy (after it, ``anchor is contrast`` would no longer hold)."""
    from fastcl.kernels import launch
    from fastcl.ops.dispatch import contrastive_loss
    from fastcl.ops.problem import Problem

    launched = []
    original = launch._launch
    monkeypatch.setattr(launch, "_launch", lambda name, *args: launched.append(name) or original(name, *args))
    base = F.normalize(torch.randn(11, 14), dim=-1).T.contiguous()  # [14, 11]
    x = base.T.to(DEVICE).requires_grad_()  # [11, 14], column-major
    labels = torch.randint(0, 3, (11,), device=DEVICE)
    assert not x.is_contiguous()
    assert launch.triton_route(Problem(None, x, labels, labels, None, 0, 1 / 0.2, 1.0)) == launch.ANCHORS_ARE_CONTRAST
    loss = contrastive_loss(x, x, labels, labels, None, self_offset=0, temperature=0.2, scale=1.0, backend="triton")
    loss.backward()
    assert launched == ["fwd", "bwd_anchor"]
    ref_x = x.detach().cpu().double().requires_grad_()
    ref = supcon_float64(ref_x[:, None], labels.cpu(), temperature=0.2, base_temperature=0.2)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert _rel(x.grad.cpu(), ref_x.grad) < 1e-4


# Tile constants shrunk to the interpreter's 16 x 16 blocks: dims over 32 loop the logits in tiles of 32 and the
# backward accumulates output tiles of up to 128 columns, so D = 257 / 300 have 3 output tiles and 513 has 5.
SMALL_D_TILES = dict(MAX_SINGLE_D_TILE=32, MAX_SINGLE_D_TILE_FP32=32, LOOPED_D_TILE=32, MAX_OUTPUT_D_TILE=128,
                     MAX_OUTPUT_D_TILE_FP32=128, MAX_OUTPUT_D_TILE_FP32_TWO_WAY=128)  # fmt: skip


def _record_launched_tiles(monkeypatch, launch) -> list:
    """Patch ``launch._launch`` to record ``(kernel name, programs along the feature axis)`` of every launch it makes."""
    tiles = []
    original = launch._launch
    monkeypatch.setattr(
        launch, "_launch", lambda name, grid_of, *a: tiles.append((name, grid_of({"BLOCK_M": 16, "BLOCK_N": 16})[1]))
        or original(name, grid_of, *a),
    )  # fmt: skip
    return tiles


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only: shrinks the feature tiles to the 16 x 16 blocks")
@pytest.mark.parametrize(
    "route,dim,dtype",
    [
        ("supcon_all_labels", 257, torch.float32),
        ("supcon_all_mask", 300, torch.float16),
        ("nt_xent", 513, torch.float32),
        ("supcon_one_mask", 300, torch.float32),
        ("info_nce_one_way", 257, torch.float16),
        ("info_nce_symmetric", 300, torch.float32),
        ("info_nce_symmetric", 513, torch.float16),
    ],
)
def test_several_output_feature_tiles_match_float64(monkeypatch, route, dim, dtype):
    """Backward programs that each own one output feature tile (several per row block, the last one partial) and
    recompute the logits over the whole looped dim: every route against float64 at odd N and D."""
    import triton

    from fastcl.kernels import launch, tiling

    for name, value in SMALL_D_TILES.items():
        monkeypatch.setattr(tiling, name, value)
    tiles = _record_launched_tiles(monkeypatch, launch)
    expected_tiles = triton.cdiv(dim, 128)
    assert tiling.backward_output_tiles(dim, torch.tensor([], dtype=dtype).element_size()) == expected_tiles >= 3
    tol = TOLERANCE[dtype]
    torch.manual_seed(11)
    if route.startswith("supcon") or route == "nt_xent":
        bsz = 9
        features = F.normalize(torch.randn(bsz, 2, dim), dim=-1)
        labels = torch.randint(0, 3, (bsz,))
        mask = torch.rand(bsz, bsz) * (torch.rand(bsz, bsz) < 0.4) if route.endswith("mask") else None
        mode = "one" if "one" in route else "all"
        t = 0.5 if route == "nt_xent" else 0.2
        x = features.to(DEVICE, dtype).requires_grad_()
        if route == "nt_xent":
            loss = FF.nt_xent_loss(x[:, 0], x[:, 1], temperature=t, backend="triton")
            kwargs = dict(labels=None, mask=None)
        else:
            kwargs = dict(labels=labels if mask is None else None, mask=mask)
            device_kwargs = {k: (v.to(DEVICE) if v is not None else None) for k, v in kwargs.items()}
            loss = FF.supcon_loss(x, **device_kwargs, temperature=t, contrast_mode=mode, backend="triton")
        (loss * 1.3).backward()
        ref_x = x.detach().cpu().double().requires_grad_()
        ref_in = F.normalize(ref_x, dim=-1) if route == "nt_xent" else ref_x  # nt_xent_loss normalizes
        ref = supcon_float64(ref_in, **kwargs, temperature=t, contrast_mode=mode,
                             base_temperature=t if route == "nt_xent" else 0.07)  # fmt: skip
        (ref * 1.3).backward()
        grads, ref_grads = [x.grad], [ref_x.grad]
    else:
        symmetric = route == "info_nce_symmetric"
        query, key = torch.randn(11, dim), torch.randn(11 if symmetric else 19, dim)
        labels = None if symmetric else torch.randint(0, 19, (11,))
        q, k = query.to(DEVICE, dtype).requires_grad_(), key.to(DEVICE, dtype).requires_grad_()
        loss = FF.info_nce_loss(q, k, None if labels is None else labels.to(DEVICE), temperature=0.1,
                                symmetric=symmetric, backend="triton")  # fmt: skip
        (loss * 1.3).backward()
        rq, rk = q.detach().cpu().double().requires_grad_(), k.detach().cpu().double().requires_grad_()
        ref = info_nce_float64(F.normalize(rq, dim=-1), F.normalize(rk, dim=-1), labels, 0.1, symmetric)
        (ref * 1.3).backward()
        grads, ref_grads = [q.grad, k.grad], [rq.grad, rk.grad]
    backward = [n for n, _ in tiles if n != "fwd"]
    assert backward and all(t == expected_tiles for n, t in tiles if n != "fwd"), tiles
    if route in ("supcon_all_labels", "supcon_all_mask", "nt_xent"):
        assert backward == ["bwd_anchor"]  # the one-kernel (self) route
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert _max_rel(g.cpu(), r) < 5 * tol, (route, _max_rel(g.cpu(), r))


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter-only: on a GPU the fixed configs run anyway")
@pytest.mark.parametrize(
    "route,dim,dtype,block_m,block_n",
    [("supcon_all", 1024, torch.float16, 32, 64), ("info_nce_symmetric", 600, torch.float32, 64, 32)],
)
def test_looped_dim_fixed_configs_in_the_interpreter(monkeypatch, route, dim, dtype, block_m, block_n):
    """The real tile constants with the block shapes of the looped-dim fixed configs (32 x 64 for the one-way dA,
    64 x 32 for the one-way dC and for fp32's two-way dA; the interpreter runs every kernel in the one config):
    D = 1024 fp16 has two 512-wide output tiles, D = 600 fp32 (symmetric InfoNCE: the two-way kernels) five
    128-wide ones (the last one partial; one-way fp32 kernels would have three 256-wide ones)."""
    import triton

    from fastcl.kernels import launch, tiling

    monkeypatch.setattr(launch, "INTERPRETER_CONFIG", triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}))
    monkeypatch.setattr(launch, "_tuned", {})
    element_size = torch.tensor([], dtype=dtype).element_size()
    for two_way in (False, True):
        width = tiling.output_block_d_for(dim, element_size, two_way)
        assert tiling.backward_output_tiles(dim, element_size, two_way) == triton.cdiv(dim, width)
    assert tiling.backward_output_tiles(dim, element_size, two_way=True) == (2 if dim == 1024 else 5)
    assert tiling.backward_output_tiles(dim, element_size) == (2 if dim == 1024 else 3)
    assert not tiling.block_d_for(dim, element_size)[1]
    tiles = _record_launched_tiles(monkeypatch, launch)
    if route == "supcon_all":
        _check_supcon(37, 2, dim, "all", "labels", dtype=dtype, temperature=0.5, base=0.5)
        return
    torch.manual_seed(4)
    query, key = torch.randn(45, dim), torch.randn(45, dim)
    q, k = query.to(DEVICE, dtype).requires_grad_(), key.to(DEVICE, dtype).requires_grad_()
    loss = FF.info_nce_loss(q, k, temperature=0.1, symmetric=True, backend="triton")
    loss.backward()
    rq, rk = q.detach().cpu().double().requires_grad_(), k.detach().cpu().double().requires_grad_()
    ref = info_nce_float64(F.normalize(rq, dim=-1), F.normalize(rk, dim=-1), None, 0.1, True)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
    assert _max_rel(q.grad.cpu(), rq.grad) < 1e-4 and _max_rel(k.grad.cpu(), rk.grad) < 1e-4
    assert [t for t in tiles if t[0] != "fwd"] == [("bwd_anchor", 5), ("bwd_contrast", 5)], tiles


# ----------------------------------------------------------------------------------------------------------------
# TWO_WAY: the reverse direction's probabilities rescaled from this direction's (one exp per pair, not two), and
# the reverse mask weights read from a contiguous transposed copy.
# ----------------------------------------------------------------------------------------------------------------


def _exact_embeddings(n, dim, step, generator):
    """Embeddings whose dot products are exact in fp32 (small multiples of ``step``, a power of two): every
    summation order gives the same x_ij, so x_ij == x_ji bitwise also in the interpreter (whose numpy matmul is not
    symmetric in general), as tensor-core fp16/bf16 products are on a GPU."""
    return torch.randint(-3, 4, (n, dim), generator=generator).float() * step


def _lse_span_log2(logits):
    """The spread of both directions' log-sum-exps in log2 units (what EXP_REUSE_MAX_SPAN bounds per tile)."""
    lse = torch.cat([torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)])
    return ((lse.max() - lse.min()) / torch.log(torch.tensor(2.0, dtype=torch.float64))).item()


def _two_way_grads(monkeypatch, reuse, query, key, temperature, labels=None):
    """Gradients of symmetric InfoNCE (route 'two_way') or, with ``labels``, SupCon 'all' (route 'anchors_are_contrast'), with the
    transposed dots reused (not recomputed) and the exp reuse on or off."""
    from fastcl.kernels import launch

    monkeypatch.setattr(launch, "recompute_transposed", lambda dtype: False)
    monkeypatch.setattr(launch, "TRANSPOSED_EXP_REUSE", reuse)
    if labels is None:
        q, k = query.to(DEVICE, copy=True).requires_grad_(), key.to(DEVICE, copy=True).requires_grad_()
        FF.info_nce_loss(q, k, temperature=temperature, normalize=False, backend="triton").backward()
        return q.grad.cpu(), k.grad.cpu()
    x = torch.stack([query, key], 1).to(DEVICE).requires_grad_()
    FF.supcon_loss(x, labels.to(DEVICE), temperature=temperature, base_temperature=temperature, backend="triton").backward()
    return (x.grad.cpu(),)


@pytest.mark.skipif(DEVICE == "cuda", reason="forces the interpreter's transposed-dots choice")
@pytest.mark.parametrize("route", ["two_way", "anchors_are_contrast"])
@pytest.mark.parametrize(
    "regime,step,temperature",
    [("moderate", 0.25, 1.0), ("large_factors", 0.25, 0.1), ("extreme", 4.0, 0.01)],
)
def test_two_way_exp_reuse_against_float64(monkeypatch, route, regime, step, temperature):
    """p'_ji = p_ij * r_i * q_j where the tile's log-sum-exps are within EXP_REUSE_MAX_SPAN (log2 units) of each
    other, the direct exp elsewhere. 'extreme' (|logits| ~ 1e4, spread in the thousands): the factors would overflow
    and p_ij underflows to 0 where p'_ji ~ 1, so every tile must fall back, giving bitwise the direct result."""
    from fastcl.kernels import jit

    gen = torch.Generator().manual_seed(7)
    n, dim = 13, 16
    query, key = _exact_embeddings(n, dim, step, gen), _exact_embeddings(n, dim, step, gen)
    labels = torch.randint(0, 3, (n,), generator=gen) if route == "anchors_are_contrast" else None
    rq, rk = query.double().requires_grad_(), key.double().requires_grad_()
    if route == "two_way":
        logits = rq @ rk.T / temperature
        info_nce_float64(rq, rk, None, temperature, True).backward()
        expected = (rq.grad, rk.grad)
    else:
        x = torch.stack([rq, rk], 1)
        flat = torch.cat([rq, rk])
        logits = (flat @ flat.T / temperature).fill_diagonal_(float("-inf"))
        supcon_float64(x, labels, temperature=temperature, base_temperature=temperature).backward()
        expected = (torch.stack([rq.grad, rk.grad], 1),)
    span = _lse_span_log2(logits.detach())
    limit = jit.EXP_REUSE_MAX_SPAN.value
    assert (span > limit) if regime == "extreme" else (span < limit), span  # the regime the case is meant to test
    if regime == "large_factors":
        assert span > limit / 4, span  # factors far from 1 (up to 2**(span / 2))

    reused = _two_way_grads(monkeypatch, True, query, key, temperature, labels)
    direct = _two_way_grads(monkeypatch, False, query, key, temperature, labels)
    # extreme 'anchors_are_contrast': ties between small-integer logits ~ 1e4 leave both paths at the fp32 LSE's resolution
    # (logit_scale * ulp(lse_raw) ~ 1e-4), identically
    tolerance = 2e-3 if regime == "extreme" else 1e-5
    for got, plain, ref in zip(reused, direct, expected):
        assert torch.isfinite(got).all()
        assert _max_rel(got, ref) < tolerance
        assert _max_rel(plain, ref) < tolerance
        if regime == "extreme":
            assert torch.equal(got, plain)  # the guard sent the tile to the direct exp
        else:
            assert not torch.equal(got, plain)  # the rescaled probabilities were used (they round differently)


@pytest.mark.skipif(DEVICE == "cuda", reason="forces the interpreter's transposed-dots choice")
def test_two_way_exp_reuse_half_precision_and_nan(monkeypatch):
    """bf16 (the dtype the reuse is for on a GPU) agrees with the direct exp; NaN in -> NaN out through the
    reuse path (NaN statistics fail the guard, NaN dots give NaN probabilities)."""
    gen = torch.Generator().manual_seed(11)
    query, key = _exact_embeddings(10, 16, 0.25, gen), _exact_embeddings(10, 16, 0.25, gen)
    reused = _two_way_grads(monkeypatch, True, query.bfloat16(), key.bfloat16(), 0.5)
    direct = _two_way_grads(monkeypatch, False, query.bfloat16(), key.bfloat16(), 0.5)
    for got, plain in zip(reused, direct):
        assert torch.isfinite(got).all() and got.abs().max() > 0
        assert _rel(got.float(), plain.float()) < 1e-2
    query[3, 5] = float("nan")
    for grad in _two_way_grads(monkeypatch, True, query, key, 0.5):
        assert grad.isnan().any()


def _two_way_masked_float64(anchor, contrast, mask, temperature):
    """Mean of both directions with positive weights ``mask[i % B, j % B]`` for anchor row i over contrast row j
    and ``mask[j % B, i % B]`` for the reverse direction (contrast row j over anchor row i); no self exclusion."""
    a, c, m = anchor.double(), contrast.double(), mask.double()

    def direction(x, y):
        b = m.shape[0]
        losses = []
        for i in range(x.shape[0]):
            logits = y @ x[i] / temperature
            w = torch.stack([m[i % b, j % b] for j in range(y.shape[0])])
            total = w.sum()
            divisor = total if total >= 1e-6 else torch.ones((), dtype=torch.float64)
            losses.append(-(w * (logits - torch.logsumexp(logits, 0))).sum() / divisor)
        return torch.stack(losses).mean()

    return 0.5 * (direction(a, c) + direction(c, a))


def test_two_way_mask_reads_the_transposed_copy():
    """Route 'two_way' with a non-symmetric mask whose period divides N: the reverse direction's weights are
    ``mask[j % B, i % B]``, read from ``mask_t = mask.T.contiguous()`` at ``[i % B, j % B]``; equals float64 and the
    chunked backend."""
    from fastcl.ops.dispatch import contrastive_loss

    gen = torch.Generator().manual_seed(5)
    bsz, n, dim = 5, 15, 12
    mask = torch.rand(bsz, bsz, generator=gen) * (torch.rand(bsz, bsz, generator=gen) < 0.6)
    mask[0, 1], mask[1, 0] = 1.0, 0.0  # certainly not symmetric
    anchor = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    contrast = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    results = {}
    for backend in ("triton", "chunked"):
        a, c = anchor.to(DEVICE, copy=True).requires_grad_(), contrast.to(DEVICE, copy=True).requires_grad_()
        loss = contrastive_loss(
            a, c, None, None, mask.to(DEVICE), self_offset=None, temperature=0.3, scale=1.0, backend=backend,
            two_way=True,
        )  # fmt: skip
        loss.backward()
        results[backend] = (loss.item(), a.grad.cpu(), c.grad.cpu())
    ra, rc = anchor.double().requires_grad_(), contrast.double().requires_grad_()
    ref = _two_way_masked_float64(ra, rc, mask, 0.3)
    ref.backward()
    wrong = _two_way_masked_float64(ra.detach(), rc.detach(), mask.T, 0.3)  # a transposed read gone wrong
    assert abs(wrong.item() - ref.item()) > 1e-3
    loss, grad_a, grad_c = results["triton"]
    assert abs(loss - ref.item()) < 1e-5 * abs(ref.item())
    assert _rel(grad_a, ra.grad) < 1e-4 and _rel(grad_c, rc.grad) < 1e-4
    assert _rel(grad_a, results["chunked"][1]) < 1e-4 and _rel(grad_c, results["chunked"][2]) < 1e-4


@pytest.mark.parametrize("route", ["two_way", "anchors_are_contrast", "one_way"])
def test_two_way_backward_reads_its_weights_from_mask_t(monkeypatch, route):
    """The reverse weights come from ``_LaunchArgs.mask_t`` and nowhere else: poisoned with NaN there, the two-way
    and anchors-are-contrast routes' gradients turn NaN while the forward (which never reads it) and one-way gradients stay finite.
    The copy itself is the contiguous transpose, made only for backward launches that add the reverse direction."""
    from fastcl.kernels import launch

    prepared = []
    original = launch._LaunchArgs.__init__

    def poisoned(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.has_mask:
            prepared.append((args[0].mask, self.mask_t, self.mask_t_strides))
            if self.mask_t is not args[0].mask:
                self.mask_t = torch.full_like(self.mask_t, float("nan"))

    monkeypatch.setattr(launch._LaunchArgs, "__init__", poisoned)
    gen = torch.Generator().manual_seed(2)
    bsz = 6
    mask = (torch.rand(bsz, bsz, generator=gen) < 0.5).float().T  # non-contiguous, not symmetric
    x = F.normalize(torch.randn(bsz, 2, 8, generator=gen), dim=-1).to(DEVICE).requires_grad_()
    if route == "anchors_are_contrast":
        loss = FF.supcon_loss(x, mask=mask.to(DEVICE), backend="triton")
    else:
        from fastcl.ops.dispatch import contrastive_loss

        flat = x.transpose(0, 1).reshape(2 * bsz, 8)
        loss = contrastive_loss(
            flat[:bsz], flat[bsz:], None, None, mask.to(DEVICE), self_offset=None, temperature=0.2, scale=1.0,
            backend="triton", two_way=route == "two_way",
        )  # fmt: skip
    assert torch.isfinite(loss)
    loss.backward()
    assert x.grad.isnan().any() == (route != "one_way")
    backward = prepared[-1]
    if route == "one_way":
        assert backward[1] is backward[0]  # no copy for one-way launches
    else:
        given, mask_t, strides = backward
        assert mask_t is not given and mask_t.is_contiguous() and strides == (bsz, 1)
    assert all(p[1] is p[0] for p in prepared[:-1])  # forward launches: no copy


def test_odd_feature_dims_launch_on_zero_padded_aligned_rows(monkeypatch):
    """D = 100: the kernels see rows of launch_dim(100) = 112 (vectorized, as AOT lowers them); the loss and the
    gradients (contiguous, [N, 100]) are float64's. Aligned rows are passed as they are."""
    from fastcl.kernels import launch, tiling

    dims = []
    real_launch = launch._launch

    def spy(name, grid_of, leading, args, scalars, constexprs):
        dims.append((args.dim, args.anchor.shape[1], args.anchor.stride(0)))
        return real_launch(name, grid_of, leading, args, scalars, constexprs)

    monkeypatch.setattr(launch, "_launch", spy)
    assert tiling.launch_dim(100) == 112 and tiling.launch_dim(3) == 16 and tiling.launch_dim(128) == 128
    aligned = torch.randn(5, 32, device=DEVICE)
    assert launch.aligned_rows(aligned) is aligned
    padded = launch.aligned_rows(aligned[:, 1:17])  # 16 columns, row stride 32, base 4 bytes off: copied
    assert padded.shape == (5, 16) and padded.data_ptr() % 16 == 0 and torch.equal(padded, aligned[:, 1:17])
    odd = launch.aligned_rows(aligned[:, :3])
    assert odd.shape == (5, 16) and torch.equal(odd[:, :3], aligned[:, :3]) and not odd[:, 3:].any()

    gen = torch.Generator().manual_seed(6)
    query, key = torch.randn(18, 100, generator=gen), torch.randn(18, 100, generator=gen)
    q, k = query.to(DEVICE, copy=True).requires_grad_(), key.to(DEVICE, copy=True).requires_grad_()
    loss = FF.info_nce_loss(q, k, None, temperature=0.1, symmetric=True, backend="triton")
    loss.backward()
    assert dims and all(d == (112, 112, 112) for d in dims)
    assert q.grad.shape == (18, 100) and q.grad.is_contiguous() and k.grad.is_contiguous()
    rq, rk = query.double().requires_grad_(), key.double().requires_grad_()
    ref = info_nce_float64(F.normalize(rq, dim=-1), F.normalize(rk, dim=-1), None, 0.1, True)
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
    assert _rel(q.grad.cpu(), rq.grad) < 1e-4 and _rel(k.grad.cpu(), rk.grad) < 1e-4


def test_two_way_forward_pads_each_input_once(monkeypatch):
    """Symmetric InfoNCE at D = 100: the forward's reverse direction reads the rows the forward direction already
    padded, so each of query and key is copied once (the padded copies, not the inputs, are the reverse's rows)."""
    from fastcl.kernels import launch

    copies = []
    real_aligned_rows = launch.aligned_rows

    def spy(x):
        out = real_aligned_rows(x)
        if out is not x:
            copies.append(tuple(x.shape))
        return out

    monkeypatch.setattr(launch, "aligned_rows", spy)
    gen = torch.Generator().manual_seed(7)
    query, key = torch.randn(9, 100, generator=gen).to(DEVICE), torch.randn(9, 100, generator=gen).to(DEVICE)
    with torch.no_grad():
        loss = FF.info_nce_loss(query, key, None, temperature=0.1, symmetric=True, backend="triton")
    assert copies == [(9, 100), (9, 100)], copies
    ref = info_nce_float64(F.normalize(query.double().cpu(), dim=-1), F.normalize(key.double().cpu(), dim=-1), None,
                           0.1, True)
    assert abs(loss.item() - ref.item()) < 1e-4 * abs(ref.item())
