"""The tiling and resource model of the Triton kernels, and the config lists every launch chooses from.

Feature dims up to 256 (fp32: 16) are one tile. Beyond, the logits loop over feature tiles of 128 (fp32: 32), and
each backward program owns the gradient columns of one output tile of up to 512 (fp32: 256, two-way kernels 128;
:func:`output_block_d_for`), loaded after the logits loop: every output tile recomputes the whole logits product,
so the tile is as wide as the registers allow (a ``[32, 512]`` fp32 accumulator). At D = 1024 the logits are
recomputed twice (fp32: 4 times, two-way 8; D = 128 once), and the anchors-are-contrast route costs the dense
formulation's FLOPs (:func:`backward_flops`).

Every config a launch can use (autotuned, fixed, deterministic, fallback) passes :func:`keep_config`, whose shared
memory and register estimates were calibrated on sm_80 / sm_90 lowerings (``python -m fastcl.aot``; the sweep is
summarised in ``docs/triton-configs.md``). Plain Python: imports no kernel, and is read by the launchers
(:mod:`fastcl.kernels.launch`, :mod:`fastcl.kernels.sigmoid_launch`) and :mod:`fastcl.aot`.
"""

from __future__ import annotations

import torch
import triton

from fastcl.ops.problem import ANCHORS_ARE_CONTRAST, ONE_WAY, TWO_WAY

MAX_SINGLE_D_TILE = 256  # feature dims up to this are held in one tile; larger ones are looped in tiles of 128
# fp32 (tf32x3: three tensor-core products on hi/lo split operands) holds the split feature tiles in registers:
# with feature tiles of 64 or 128, or one tile of 32, every two-way backward config spilled on sm_80 (README, "GPU
# resources"), so fp32 keeps one tile up to D = 16 and loops tiles of 32 beyond (the backward's output tiles are
# wider, MAX_OUTPUT_D_TILE_FP32).
MAX_SINGLE_D_TILE_FP32 = 16
D_TILE_FP32 = 32
# Larger dims: the logits loop over feature tiles of LOOPED_D_TILE (fp32: D_TILE_FP32), and each backward program
# accumulates an output tile of up to MAX_OUTPUT_D_TILE gradient columns (output_block_d_for). Module constants so
# that tests can shrink them to the interpreter's 16 x 16 blocks.
LOOPED_D_TILE = 128
MAX_OUTPUT_D_TILE = 512
# fp32 (tf32x3, tf32): the logits loop keeps feature tiles of 32 (the split tf32x3 operands are what spilled), but the
# output tile is up to 256 wide (one-way kernels) or 128 (two-way: twice the dS values; every two-way config tried
# at 256 spilled 8-320 B, README "GPU resources"): D = 128 recomputes the logits once, D = 1024 four / eight times.
MAX_OUTPUT_D_TILE_FP32 = 256
MAX_OUTPUT_D_TILE_FP32_TWO_WAY = 128


def launch_dim(dim: int) -> int:
    """The feature dim the kernels see for embeddings of ``dim`` features: ``dim`` rounded up to a multiple of 16
    (the launchers pad other rows with zero columns, :func:`aligned_rows`), so every launch
    compiles the 16-divisible, vectorized variant of its tiling."""
    return -(-dim // 16) * 16


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels (both ops) are compiled for it: unit column stride, the feature dim and the row stride
    multiples of 16 elements and a 16-byte aligned base, so that every tile load is vectorized and every launch
    compiles one of the aligned variants :func:`keep_config` was calibrated on and ``python -m fastcl.aot`` lowers
    (element-wise loads of unaligned rows, D = 100 or 300, spilled 8-272 B in the same configs). Other embeddings
    are copied once into a zero-padded ``[N, launch_dim(D)]`` tensor (an O(N * D) copy next to the O(N^2 * D)
    loss; zero columns add nothing to the dots, and their gradient columns are dropped, :func:`trimmed_grad`)."""
    dim = x.shape[1]
    if x.stride(1) == 1 and dim == launch_dim(dim) and x.stride(0) % 16 == 0 and x.data_ptr() % 16 == 0:
        return x
    return torch.nn.functional.pad(x, (0, launch_dim(dim) - dim)).contiguous()


def trimmed_grad(grad, feature_dim: int):
    """The gradient of the caller's ``[N, D]`` rows from the kernels' padded ``[N, launch_dim(D)]`` one."""
    if grad is None or grad.shape[1] == feature_dim:
        return grad
    return grad[:, :feature_dim].contiguous()


def block_d_for(dim: int, element_size: int = 2) -> tuple[int, bool]:
    """``(BLOCK_D, SINGLE_D_TILE)``: the whole feature dim in one tile when it fits (up to 256, 16 for fp32),
    else the logits loop over tiles of :data:`LOOPED_D_TILE` (fp32: :data:`D_TILE_FP32`)."""
    if dim <= (MAX_SINGLE_D_TILE_FP32 if element_size == 4 else MAX_SINGLE_D_TILE):
        return max(16, triton.next_power_of_2(dim)), True
    return (D_TILE_FP32 if element_size == 4 else LOOPED_D_TILE), False


def output_block_d_for(dim: int, element_size: int = 2, two_way: bool = False) -> int:
    """``BLOCK_D_OUT``: the width of the gradient columns one backward program accumulates. The feature tile itself
    when the dim fits one tile, else the dim rounded up to a power of two, at most :data:`MAX_OUTPUT_D_TILE` (fp32:
    :data:`MAX_OUTPUT_D_TILE_FP32`, and :data:`MAX_OUTPUT_D_TILE_FP32_TWO_WAY` for the ``TWO_WAY`` kernels): each
    output tile recomputes the whole logits product, so wide tiles keep that recomputation rare
    (:func:`backward_flops`)."""
    block_d, single = block_d_for(dim, element_size)
    if single:
        return block_d
    if element_size == 4:
        widest = MAX_OUTPUT_D_TILE_FP32_TWO_WAY if two_way else MAX_OUTPUT_D_TILE_FP32
    else:
        widest = MAX_OUTPUT_D_TILE
    return max(block_d, min(widest, triton.next_power_of_2(dim)))


def backward_output_tiles(dim: int, element_size: int = 2, two_way: bool = False) -> int:
    """Programs per row block along the feature dim in the backward grid (each recomputes the logits once)."""
    return triton.cdiv(dim, output_block_d_for(dim, element_size, two_way))


def backward_flops(
    route: str, n_anchor: int, n_contrast: int, dim: int, element_size: int = 2, recompute: bool = False
) -> int:
    """Tensor-core FLOPs (2 per multiply-add, padded tile widths) of the backward launch for ``route`` (as in
    :func:`fastcl.kernels.launch.triton_route`), from the launcher's own tiling: every program of each of the
    :func:`backward_output_tiles` feature tiles recomputes the ``Na x Nc`` logits over the whole (padded) dim, twice
    with ``recompute`` (two-way tiles whose transposed dots are recomputed, ``launch.recompute_transposed``), then
    multiplies ``dS`` into its ``BLOCK_D_OUT`` gradient columns. ``ANCHORS_ARE_CONTRAST`` runs one kernel, the
    others two (``dA`` and ``dC``). Compare with :func:`dense_backward_flops`."""
    if route not in (ANCHORS_ARE_CONTRAST, ONE_WAY, TWO_WAY):
        raise ValueError(f"route must be one of {(ANCHORS_ARE_CONTRAST, ONE_WAY, TWO_WAY)}, got {route!r}")
    block_d, _ = block_d_for(dim, element_size)
    two_way = route != ONE_WAY
    tiles = backward_output_tiles(dim, element_size, two_way)
    logits_k = triton.cdiv(dim, block_d) * block_d
    logits_per_tile = 2 if recompute and two_way else 1
    block_d_out = output_block_d_for(dim, element_size, two_way)
    per_kernel = 2 * n_anchor * n_contrast * tiles * (logits_per_tile * logits_k + block_d_out)
    return per_kernel * (1 if route == ANCHORS_ARE_CONTRAST else 2)


def dense_backward_flops(n_anchor: int, n_contrast: int, dim: int) -> int:
    """FLOPs of the dense formulation, forward and backward (``6 Na Nc D``): the logits ``A C^T``, then ``dS C``
    and ``dS^T A``. The fused backward (:func:`backward_flops`) is compared with it: it recomputes the logits."""
    return 6 * n_anchor * n_contrast * dim


# ----------------------------------------------------------------------------------------------------------------
# Configs: autotuned, fixed (FASTCL_TRITON_AUTOTUNE=0), deterministic, fallback; every one passes keep_config
# ----------------------------------------------------------------------------------------------------------------

CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m in (64, 128)
    for block_n in (32, 64, 128)
    for warps in (4, 8)
    for stages in (2, 3)
]
# The fixed config (FASTCL_TRITON_AUTOTUNE=0, deterministic mode, and the fallback when pruning keeps nothing): the
# first of these that keep_config keeps for the kernel, the feature tile and the dtype. The last one fits every
# kernel at every BLOCK_D on every supported arch (``python -m fastcl.aot`` checks it).
FIXED_PREFERENCE = (
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
)
# Tried first by the backward kernels at looped feature dims (D > 256): the wide output tile (a 32 x BLOCK_D_OUT
# accumulator) against 64 streamed rows (bwd_contrast) or columns (bwd_anchor), one stage (see keep_config); the
# two-way variants (twice the dS values) keep 32 x 32.
LOOPED_FIXED_PREFERENCE = (
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1),
)
# Opt-in shared memory per block (bytes) of the archs fastcl is lowered for
# (``cudaDevAttrMaxSharedMemoryPerBlockOptin``).
SHARED_MEMORY_LIMITS = {80: 166_912, 90: 232_448}
SHARED_MEMORY_BUDGET = min(SHARED_MEMORY_LIMITS.values())
# The variants a launch compiles: the backward kernels with and without the reverse direction fused in.
KERNEL_VARIANTS = ("fwd", "bwd_anchor", "bwd_anchor[two_way]", "bwd_contrast", "bwd_contrast[two_way]")
REGISTER_BUDGET = 56  # fp32 tile values per thread the kernels may hold without spilling (see keep_config)
TILE_WEIGHT = 3  # live values per logits-tile element: dots, weights / validity, probabilities (register_estimate)
# The backward at looped feature dims: the [resident, BLOCK_D_OUT] accumulator dominates, and a second pipeline stage
# of the logits loop spills, so these configs run one stage (docs/triton-configs.md).
LOOPED_REGISTER_BUDGET = 88


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# fp32 inputs (tf32x3, and tf32 with allow_tf32): the configs that lower without spilling on sm_80 and sm_90, per
# kernel variant and feature tiling (one tile, D <= 16, or looped tiles of 32), preferred first (the first is the
# fixed config). What was swept and what spilled: docs/triton-configs.md; ``python -m fastcl.aot`` fails on any
# kept config that spills.
FP32_CONFIGS = {
    ("fwd", True): (_cfg(64, 32, 8, 2), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)),
    ("fwd", False): (_cfg(64, 32, 8, 2), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 2), _cfg(32, 32, 8, 2)),
    ("bwd_anchor", True): (_cfg(64, 32, 8, 1),),
    ("bwd_anchor", False): (_cfg(32, 32, 8, 2), _cfg(32, 32, 8, 1)),
    ("bwd_contrast", True): (_cfg(32, 64, 8, 2), _cfg(32, 64, 8, 1), _cfg(64, 32, 8, 1)),
    ("bwd_contrast", False): (_cfg(32, 32, 8, 2),),
    ("bwd_anchor[two_way]", True): (_cfg(32, 32, 8, 2),),
    ("bwd_anchor[two_way]", False): (_cfg(64, 32, 8, 2),),
    ("bwd_contrast[two_way]", True): (_cfg(64, 32, 8, 1), _cfg(32, 32, 8, 2)),
    ("bwd_contrast[two_way]", False): (_cfg(32, 64, 8, 1),),
}
# Per output-tile width (BLOCK_D_OUT, output_block_d_for) where the variant's looped configs above spill
# (docs/triton-configs.md).
FP32_CONFIGS_BY_OUTPUT_TILE = {
    ("bwd_contrast[two_way]", 64): (_cfg(32, 64, 8, 2),),
}


# The extra-column forms of a variant (the kernels with HAS_EXTRA or HAS_MARGIN, fastcl.kernels.jit: a second column
# range, or the margin's threshold, live next to the variant's values) launch the variant's configs except where
# those spill (``python -m fastcl.aot --full --extra-columns only``: 18 of 648 lowerings at D = 3, 64, 100, 256, 1000,
# 8-32 B): fp32 takes these lists where the variant's spilled, per feature tiling (one tile or looped), preferred
# first; the other dtypes leave out the configs of EXTRA_COLUMN_SPILLS.
FP32_EXTRA_COLUMN_CONFIGS = {
    ("fwd", True): (_cfg(64, 32, 8, 2), _cfg(64, 32, 8, 1), _cfg(32, 64, 8, 2)),  # 32 x 32 spilled 32 B (sm_90)
    ("bwd_anchor", True): (_cfg(64, 32, 8, 2), _cfg(32, 32, 8, 1)),  # 64 x 32, 1 stage spilled 8 B (sm_80, tf32)
    ("bwd_anchor", False): (_cfg(32, 32, 8, 1),),  # 2 stages spilled 16-24 B (sm_90, tf32)
    ("bwd_anchor[two_way]", False): (_cfg(64, 32, 8, 1), _cfg(32, 32, 8, 2)),  # 2 stages spilled 8 B (sm_90, tf32)
    ("bwd_contrast", False): (_cfg(32, 32, 8, 1), _cfg(32, 64, 8, 1)),  # 2 stages spilled 16 B (sm_90, tf32)
}
# bf16 / fp16 forward with the second column range, one feature tile: 64 x 32 with 8 warps spilled 8 B on sm_80
# (D = 100, 3 stages; D = 256, 2 stages).
EXTRA_COLUMN_SPILLS = {("fwd", True): frozenset({(64, 32, 8, 2), (64, 32, 8, 3)})}


# fp32 autotunes among its FP32_CONFIGS: those CONFIGS lacks are appended to it, autotuned for fp32 only.
_HALF_CANDIDATE_KEYS = frozenset((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in CONFIGS)
_FP32_ONLY = {
    (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
    for configs in (*FP32_CONFIGS.values(), *FP32_CONFIGS_BY_OUTPUT_TILE.values(), *FP32_EXTRA_COLUMN_CONFIGS.values())
    for c in configs
}
_FP32_ONLY = {key: c for key, c in _FP32_ONLY.items() if key not in _HALF_CANDIDATE_KEYS}
CONFIGS = CONFIGS + list(_FP32_ONLY.values())


def variant_name(kernel: str, two_way: bool = False) -> str:
    return f"{kernel}[two_way]" if two_way and kernel != "fwd" else kernel


def shared_memory_estimate(config: triton.Config, dim: int, element_size: int, kernel: str = "bwd_anchor") -> int:
    """Upper estimate of the shared memory (bytes) Triton allocates for ``kernel`` (a :data:`KERNEL_VARIANTS` name)
    in ``config`` at feature dim ``dim`` (only its tile, :func:`block_d_for`, matters).

    One feature tile: the tile that stays put (the anchor block of the forward and of ``bwd_anchor``, the contrast
    block of ``bwd_contrast``) is staged once and the streamed tile ``num_stages`` deep. Looped feature tiles
    (D > 256): both operands of the logits product stream, and the backward also stages its output-tile operand
    (``[streamed, BLOCK_D_OUT]``, :func:`output_block_d_for`). The backward kernels stage the ``[BLOCK_M,
    BLOCK_N]`` dS tile and layout-conversion scratch, and every kernel the fp32 tile of mask weights (with labels
    that memory goes unused: the estimate is an upper bound for both positive sources). fp32 tiles count twice
    (tf32x3 stages split operands). Calibrated against ``python -m fastcl.aot`` (its ``estim`` column).
    """
    block_d, single = block_d_for(dim, element_size)
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    stages = max(config.num_stages, 1)
    resident, streamed = (block_n, block_m) if kernel.startswith("bwd_contrast") else (block_m, block_n)
    if single:
        tiles = (resident + streamed * stages) * block_d * element_size
    else:
        tiles = (block_m + block_n) * block_d * element_size * stages
        if kernel != "fwd":
            tiles += streamed * output_block_d_for(dim, element_size, kernel.endswith("[two_way]")) * element_size
    if element_size == 4:
        tiles *= 2
    scratch = 0 if kernel == "fwd" else block_m * block_n * max(element_size, 2) * 2
    # a mask's fp32 weights tile passes through shared memory (pipelined num_stages deep with the streamed rows of
    # bwd_contrast and in the two-way kernels, which read mask and mask_t): 2.9-4.4x the labels-only figure at D = 3
    # and 16 (128 x 64 forward: 40,960 B)
    two_way = kernel.endswith("[two_way]")
    pipelined = two_way or kernel.startswith("bwd_contrast")
    mask_tiles = block_m * block_n * 4 * (stages if pipelined else 1) * (2 if two_way else 1)
    return tiles + scratch + mask_tiles + 1024


def register_estimate(config: triton.Config, dim: int, element_size: int, kernel: str = "bwd_anchor") -> float:
    """fp32 tile values per thread that ``kernel`` keeps live: :data:`TILE_WEIGHT` times the logits tile (twice
    with the reverse direction fused in), plus the gradient accumulator ``[resident rows, BLOCK_D_OUT]``
    (backward) or the anchor tile (forward; both operand tiles when the feature dim is looped). fp32 inputs count
    1.5x (tf32x3 splits operands).

    Calibrated on sm_80 / sm_90 lowerings of bf16 with a mask (the heavier positive source) and D = 3 and 16
    (``python -m fastcl.aot``, docs/triton-configs.md): the dots, the positive weights, the pair validity and the
    probabilities of a tile are live together, so a tile of 32 values per thread (128 x 64 / 8 warps, 64 x 64 / 4
    warps, two-way 64 x 32 / 4 warps) reached 255 registers and spilled 8-240 B in every kernel, 16 did not.
    bwd_contrast also counts its prefetched anchor tiles. fp32 does not go by this estimate: :func:`keep_config`
    keeps the :data:`FP32_CONFIGS` lowered spill-free.
    """
    block_d, single = block_d_for(dim, element_size)
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    threads = 32 * config.num_warps
    tile = TILE_WEIGHT * block_m * block_n * (2 if kernel.endswith("[two_way]") else 1)
    if kernel.startswith("bwd_contrast"):  # prefetched anchor tiles of later stages stay in registers
        tile += (config.num_stages - 1) * block_m * block_d * element_size / 4
    if kernel == "fwd":
        resident = (block_m if single else block_m + block_n) * block_d * element_size / 4
    else:  # the fp32 gradient accumulator
        resident = (block_n if kernel.startswith("bwd_contrast") else block_m) * output_block_d_for(
            dim, element_size, kernel.endswith("[two_way]")
        )
    return (tile + resident) / threads * (1.5 if element_size == 4 else 1.0)


def keep_config(
    config: triton.Config,
    dim: int,
    element_size: int,
    kernel: str = "bwd_anchor",
    shared_limit: int = SHARED_MEMORY_BUDGET,
    extra: bool = False,
) -> bool:
    """Whether ``config`` fits ``kernel`` (a :data:`KERNEL_VARIANTS` name) at feature dim ``dim``: its shared memory
    (:func:`shared_memory_estimate`) within ``shared_limit`` (default: the smallest of :data:`SHARED_MEMORY_LIMITS`)
    and its live fp32 tile values (:func:`register_estimate`) within :data:`REGISTER_BUDGET` per thread; fp32
    inputs: one of the spill-free :data:`FP32_CONFIGS` of the variant and feature tiling (output-tile width).
    ``extra``: the variant's extra-column form (:data:`FP32_EXTRA_COLUMN_CONFIGS`, :data:`EXTRA_COLUMN_SPILLS`)."""
    if shared_memory_estimate(config, dim, element_size, kernel) > shared_limit:
        return False
    if element_size == 4:
        return config_key(config) in {config_key(c) for c in _fp32_configs(kernel, dim, extra)}
    if extra and config_key(config) in EXTRA_COLUMN_SPILLS.get((kernel, block_d_for(dim, element_size)[1]), ()):
        return False
    if kernel.endswith("[two_way]") and min(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) >= 64:
        return False  # the exp reuse keeps p_ij live next to dS: 64x64 two-way tiles spilled 16-472 B (D = 16, 64)
    budget = REGISTER_BUDGET
    block_d, single = block_d_for(dim, element_size)
    if kernel == "fwd" and single and block_d == MAX_SINGLE_D_TILE and config.num_stages > 2:
        return False  # a third prefetched [BLOCK_N, 256] contrast tile: 64x32 / 8 warps spilled 8 B on sm_80
    if kernel != "fwd" and not single:
        if config.num_stages > 1:  # the wide accumulator leaves no registers for a second logits-loop stage
            return False
        budget = LOOPED_REGISTER_BUDGET
    return register_estimate(config, dim, element_size, kernel) <= budget


def _fp32_configs(kernel: str, dim: int, extra: bool = False) -> tuple:
    """The variant's :data:`FP32_CONFIGS` at this feature tiling (:data:`FP32_CONFIGS_BY_OUTPUT_TILE` first; its
    extra-column form's :data:`FP32_EXTRA_COLUMN_CONFIGS` before both)."""
    single = block_d_for(dim, 4)[1]
    if extra and (kernel, single) in FP32_EXTRA_COLUMN_CONFIGS:
        return FP32_EXTRA_COLUMN_CONFIGS[(kernel, single)]
    if kernel != "fwd" and not single:
        by_width = FP32_CONFIGS_BY_OUTPUT_TILE.get((kernel, output_block_d_for(dim, 4, kernel.endswith("[two_way]"))))
        if by_width:
            return by_width
    return FP32_CONFIGS[(kernel, single)]


def fixed_preference(kernel: str, dim: int, element_size: int) -> tuple:
    """:data:`FIXED_PREFERENCE`, after :data:`LOOPED_FIXED_PREFERENCE` for the backward kernels at looped dims."""
    if kernel != "fwd" and not block_d_for(dim, element_size)[1]:
        return LOOPED_FIXED_PREFERENCE + FIXED_PREFERENCE
    return FIXED_PREFERENCE


def fixed_config(kernel: str, dim: int, element_size: int, candidates=None, extra: bool = False) -> triton.Config:
    """The one config used without autotuning: the first of ``candidates`` (default :func:`fixed_preference`) that
    :func:`keep_config` keeps, else the last preference (the smallest, which fits everywhere). fp32: the first of
    the variant's :data:`FP32_CONFIGS` (whatever the candidates). ``extra``: of the variant's extra-column form."""
    if element_size == 4:
        return _fp32_configs(kernel, dim, extra)[0]
    for config in candidates if candidates is not None else fixed_preference(kernel, dim, element_size):
        if keep_config(config, dim, element_size, kernel, extra=extra):
            return config
    return FIXED_PREFERENCE[-1]


def autotune_configs(kernel: str, dim: int, element_size: int, configs=None, extra: bool = False) -> list:
    """The configs the autotuner times for this kernel variant (``extra``: its extra-column form), feature dim and
    dtype (never empty)."""
    configs = CONFIGS if configs is None else configs
    kept = [
        c
        for c in configs
        if keep_config(c, dim, element_size, kernel, extra=extra)
        and (element_size == 4 or config_key(c) not in _FP32_ONLY)
    ]
    return kept or [fixed_config(kernel, dim, element_size, extra=extra)]


def launchable_configs(kernel: str, dim: int, element_size: int, extra: bool = False) -> list:
    """Every config a GPU launch can use for this kernel variant (``extra``: its extra-column form) / feature dim /
    dtype: the autotuned set and the fixed (also deterministic and fallback) config. ``python -m fastcl.aot``
    lowers exactly these."""
    configs = autotune_configs(kernel, dim, element_size, extra=extra)
    fixed = fixed_config(kernel, dim, element_size, extra=extra)
    return configs + [fixed] if all(config_key(fixed) != config_key(c) for c in configs) else configs


def config_key(config: triton.Config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
