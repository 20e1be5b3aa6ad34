"""Contrastive losses over the global batch of all ranks, with the gradients of one big batch.

With ``gather_distributed=True`` (``SupConLoss``, ``NTXentLoss``, ``InfoNCELoss`` and their functional forms) each
rank scores its own rows (the anchors) against the rows of every rank (the contrast set), on ``torch.distributed``
(gloo on CPU, NCCL on GPUs, as started by ``torchrun``). :func:`all_gather_with_grad` is the differentiable gather
underneath, also public.

How the numbers match one process on the concatenated batch. Rank r holds ``b_r`` samples (any count, 0 included)
with V views; its rows, view-major, are the block ``[V * b_r, D]`` that starts at row ``V * sum_{r' < r} b_r'`` of
the global contrast set (the blocks of all ranks in rank order; the losses are sums over contrast columns, so this
order gives the single-process values). Rank r's anchors are its own block, passed as its own tensor, so their
gradient stays local; the gathered copy carries the contrast-side gradient, which the backward of the gather sums
over ranks (a reduce-scatter). With ``Na_r`` anchors on rank r out of ``Na`` in all, rank r returns::

    loss_r = W * (Na_r / Na) * mean_{i on rank r} loss_i

so ``mean_r loss_r`` is the single-process loss, and ``sum_r loss_r = W * loss``: after DDP averages the parameter
gradients over the W ranks they equal the single-process gradients, for uneven shards too. A rank with no samples
returns a zero that stays connected to the gathered tensor, so it still takes part in the backward reduce-scatter.

Communication per training step (W ranks, element size s bytes, M = the most rows any rank sends; shards are
padded to M rows for the collectives and compacted by :mod:`fastcl._extension`):

* forward: one all-gather of a ``[24]`` int64 vector per rank (row counts, dtype, shape, flags: every rank checks
  that the others agree, and raises the same clear error otherwise, before any large transfer); one all-gather of
  the features into a ``[W * M, D]`` buffer, ``(W - 1) * M * D * s`` bytes received (and, in a ring, sent) per
  rank; with labels, one all-gather of ``(W - 1) * max_r b_r * 8`` bytes per rank.
* backward: one reduce-scatter of the ``[W * M, D]`` padded gradient, again ``(W - 1) * M * D * s`` bytes per
  rank. (A backend without reduce-scatter would get an all-reduce of the same buffer instead, about twice the
  bytes and W times the output; gloo and NCCL have reduce-scatter.)

For SupCon ``M = V * max_r b_r``; symmetric InfoNCE gathers query and key together as one ``[b_r, 2D]`` block
(``M = max_r b_r``, 2D columns); one-directional InfoNCE gathers only the keys.
"""

from __future__ import annotations

import zlib
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastcl import _extension, _layout
from fastcl import _sigmoid_inputs as SI
from fastcl import _validation as V
from fastcl.ops.dispatch import contrastive_loss
from fastcl.ops.sigmoid.dispatch import sigmoid_loss_op

__all__ = [
    "all_gather_with_grad",
    "supcon_loss_distributed",
    "nt_xent_loss_distributed",
    "info_nce_loss_distributed",
    "sigmoid_loss_distributed",
]

_META_LEN = 24  # int64 entries per rank in the metadata all-gather (fixed, so it never depends on the input)
_MAX_TRAILING_DIMS = 8  # all_gather_with_grad: x may have up to 1 + 8 dims
_OP_GATHER, _OP_SUPCON, _OP_INFONCE = 1, 2, 3


# ----------------------------------------------------------------------------------------------------------------
# Process group helpers
# ----------------------------------------------------------------------------------------------------------------


def _rank_and_world(group) -> Tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``(0, 1)`` without torch.distributed or an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")
    return rank, world


def _nccl_only(group) -> bool:
    backend = str(dist.get_backend(group)).lower()
    return "nccl" in backend and "gloo" not in backend


def _meta_device(group) -> torch.device:
    """Where the small metadata tensors live: the current GPU for NCCL, else the CPU."""
    if _nccl_only(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_device(name: str, x: torch.Tensor, group) -> None:
    if _nccl_only(group) and not x.is_cuda:
        raise ValueError(f"{name} is on {x.device}, but the process group's backend is NCCL, which needs CUDA tensors")


def _all_gather_flat(out: torch.Tensor, local: torch.Tensor, group) -> None:
    """``out [W * n, ...]`` <- every rank's ``local [n, ...]`` in rank order."""
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, local, group=group)


_NO_REDUCE_SCATTER = set()  # backends that answered "not supported"


def _reduce_scatter_flat(out: torch.Tensor, padded: torch.Tensor, group) -> None:
    """``out [n, ...]`` <- the sum over ranks of rows ``rank * n .. (rank + 1) * n`` of every rank's ``padded``."""
    backend = str(dist.get_backend(group))
    if backend not in _NO_REDUCE_SCATTER:
        reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            reduce_scatter_single(out, padded, group=group)
            return
        except (RuntimeError, NotImplementedError) as err:  # the same answer on every rank
            if "support" not in str(err).lower() and not isinstance(err, NotImplementedError):
                raise
            _NO_REDUCE_SCATTER.add(backend)
    # Fallback for a backend without reduce-scatter: an all-reduce of the whole buffer (W times the bytes).
    total = padded.clone()
    dist.all_reduce(total, group=group)
    rank = dist.get_rank(group)
    out.copy_(total.narrow(0, rank * out.shape[0], out.shape[0]))


# ----------------------------------------------------------------------------------------------------------------
# Metadata exchange: counts, and agreement of dtype / shape / options across ranks, before any large transfer
# ----------------------------------------------------------------------------------------------------------------


def _crc_code(dtype: torch.dtype) -> int:
    return zlib.crc32(str(dtype).encode()) & 0x7FFFFFFF


_DTYPE_CODES = {d: _crc_code(d) for d in vars(torch).values() if isinstance(d, torch.dtype)}
_DTYPE_NAMES = {code: str(d) for d, code in _DTYPE_CODES.items()}


def _dtype_code(dtype: torch.dtype) -> int:
    """A number for ``dtype``, the same in every process; a table lookup, so a compiled graph traces it."""
    code = _DTYPE_CODES.get(dtype)
    return _crc_code(dtype) if code is None else code


def _dtype_name(code: int) -> str:
    return _DTYPE_NAMES.get(code, "?").replace("torch.", "")


def _exchange(
    fields: Dict[str, int], error: Optional[BaseException], what: str, group, world: int
) -> List[Dict[str, int]]:
    """All-gather one small int64 vector per rank (an error flag, then ``fields``); one dict per rank.

    If any rank flagged a local input error, the messages are shared (``all_gather_object``, on this path only)
    and every rank raises the same error, naming the ranks: a TypeError when the first failing rank's error is one,
    else a ValueError; the process group stays usable.
    """
    values = [0 if error is None else 1] + [int(v) for v in fields.values()]
    if len(values) > _META_LEN:
        raise AssertionError("metadata does not fit")
    device = _meta_device(group)
    local = torch.full((_META_LEN,), -1, dtype=torch.int64, device=device)
    local[: len(values)] = torch.tensor(values, dtype=torch.int64)
    table = torch.empty(world * _META_LEN, dtype=torch.int64, device=device)
    _all_gather_flat(table, local, group)
    rows = table.view(world, _META_LEN).tolist()
    failed = [r for r, row in enumerate(rows) if row[0] != 0]
    if failed:
        messages: List[Optional[Tuple[bool, str]]] = [None] * world
        local_message = None if error is None else (isinstance(error, TypeError), f"{type(error).__name__}: {error}")
        dist.all_gather_object(messages, local_message, group=group)
        detail = "; ".join(f"rank {r}: {messages[r][1]}" for r in failed)
        message = f"{what}: invalid input on rank {', '.join(map(str, failed))} (raised on every rank): {detail}"
        kind = TypeError if messages[failed[0]][0] else ValueError
        if error is not None:
            raise kind(message) from error
        raise kind(message)
    return [dict(zip(fields, row[1 : 1 + len(fields)])) for row in rows]


def _require_agreement(
    rows: List[Dict[str, int]], keys: Sequence[str], what: str, rule: str, describe: Callable[[Dict[str, int]], str]
) -> None:
    """Raise the same ValueError on every rank if the ranks' ``keys`` differ, listing every rank's input."""
    first = [rows[0][k] for k in keys]
    if any([row[k] for k in keys] != first for row in rows[1:]):
        listing = "; ".join(f"rank {r}: {describe(row)}" for r, row in enumerate(rows))
        raise ValueError(f"{what}: {rule}; got {listing}")


def _checked(check: Callable[[], object]):
    """Run local input checks; ``(result, None)`` or ``(None, error)`` so the error is raised on every rank."""
    try:
        return check(), None
    except (TypeError, ValueError) as err:
        return None, err


class _Agreement(NamedTuple):
    """What every rank must agree on in a :func:`_handshake`: the metadata ``fields`` (their defaults when the local
    check failed) and, of those, the ``keys`` that must be equal on all ranks; ``rule`` and ``describe`` (one rank's
    row in words) make the error message."""

    fields: Dict[str, int]
    keys: Sequence[str]
    rule: str
    describe: Callable[[Dict[str, int]], str]


def _handshake(
    check: Callable[[], object],
    fields_of: Callable[[object], Dict[str, int]],
    agreement: _Agreement,
    what: str,
    group,
    world: int,
):
    """Check -> exchange -> agree, before any large transfer: run the local ``check``, all-gather every rank's
    metadata (``fields_of`` its result), and raise the same error on every rank if any check failed or the ranks
    disagree. ``(checked, rows)``: the local result and one metadata dict per rank (just this rank's with one)."""
    checked, error = _checked(check)
    if world == 1 and error is not None:
        raise error
    fields = dict(agreement.fields)
    if error is None:
        fields.update(fields_of(checked))
    rows = [fields] if world == 1 else _exchange(fields, error, what, group, world)
    _require_agreement(rows, agreement.keys, what, agreement.rule, agreement.describe)
    return checked, rows


# ----------------------------------------------------------------------------------------------------------------
# The differentiable gather of rows with known per-rank counts
# ----------------------------------------------------------------------------------------------------------------


def _gather_rows(x: torch.Tensor, counts: Sequence[int], group) -> torch.Tensor:
    """``[sum(counts), ...]``: every rank's ``x [counts[r], ...]`` in rank order (no autograd)."""
    world, padded_rows = len(counts), max(counts)
    if padded_rows == 0:
        return x.new_empty((0, *x.shape[1:]))
    local = _extension.pack_rows(x.contiguous(), padded_rows)
    gathered = x.new_empty((world * padded_rows, *x.shape[1:]))
    _all_gather_flat(gathered, local, group)
    return _extension.compact_segments(gathered, counts)


class _AllGatherRows(torch.autograd.Function):
    """Forward: all-gather (padded, then compacted). Backward: each rank gets the sum over ranks of its rows'
    gradient, by one reduce-scatter of the padded global gradient; the reduce-scatter is not recorded by autograd,
    so a second backward through it raises."""

    @staticmethod
    def forward(ctx, x, counts, rank, group):
        ctx.counts, ctx.rank, ctx.group = counts, rank, group
        return _gather_rows(x, counts, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        counts, rank = ctx.counts, ctx.rank
        padded_rows = max(counts)
        if padded_rows == 0:
            return grad.new_zeros((0, *grad.shape[1:])), None, None, None
        padded = _extension.pad_segments(grad.contiguous(), counts, padded_rows)
        mine = grad.new_empty((padded_rows, *grad.shape[1:]))
        _reduce_scatter_flat(mine, padded, ctx.group)
        return mine.narrow(0, 0, counts[rank]), None, None, None


def _needs_grad(*tensors: Optional[torch.Tensor]) -> int:
    """The handshake's ``grad`` field: 1 if autograd records an op on any of ``tensors`` here, else 0."""
    return int(torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _gather_with_grad(x: torch.Tensor, counts: Sequence[int], rank: int, group, rows) -> torch.Tensor:
    """:class:`_AllGatherRows` of ``x``; ``rows``: the handshake's rows, whose ``grad`` fields say whether the
    gathered tensor requires grad on some rank. It then requires grad on every rank (x that does not stands in as a
    detached leaf): each rank's loss holds a share of the other ranks' gradients, and the backward reduce-scatter
    needs every rank."""
    if len(counts) == 1:
        return x
    if not x.requires_grad and torch.is_grad_enabled() and any(row["grad"] for row in rows):
        x = x.detach().requires_grad_()
    return _AllGatherRows.apply(x, tuple(counts), rank, group)


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order, with the gradient of one big tensor.

    Args:
        x: ``[n_r, ...]`` on each rank; ``n_r`` may differ between ranks (0 included), the other dims and the dtype
            must agree (otherwise every rank raises a ValueError naming the ranks and their shapes; nothing hangs).
        group: the ``torch.distributed`` process group (default: the world).

    Returns:
        ``[sum_r n_r, ...]``. Backward gives each rank the sum over all ranks of the gradient of its own rows (one
        reduce-scatter). It requires grad on every rank when ``x`` does on any rank (a rank's loss also holds the
        other ranks' gradients, and the backward needs every rank). Without an initialised process group, or with
        one rank, ``x`` itself.

    Example:
        >>> z = all_gather_with_grad(encoder(x_local))      # [global_batch, D], differentiable
    """
    rank, world = _rank_and_world(group)
    if world == 1:
        return x

    def check():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not 1 <= x.dim() <= 1 + _MAX_TRAILING_DIMS:
            raise ValueError(f"x must have 1 to {1 + _MAX_TRAILING_DIMS} dimensions, got shape {tuple(x.shape)}")
        _check_device("x", x, group)

    def fields_of(_):
        dims = {f"d{i}": size for i, size in enumerate(x.shape[1:])}
        return dict(dtype=_dtype_code(x.dtype), ndim=x.dim(), rows=x.shape[0], grad=_needs_grad(x), **dims)

    _, rows = _handshake(check, fields_of, _GATHER_AGREEMENT, "all_gather_with_grad", group, world)
    return _gather_with_grad(x, [row["rows"] for row in rows], rank, group, rows)


def _describe_gather(row):
    if row["op"] != _OP_GATHER:
        return "a different fastcl collective"
    dims = [row["rows"]] + [row[f"d{i}"] for i in range(row["ndim"] - 1)]
    return f"x {dims} {_dtype_name(row['dtype'])}"


_GATHER_AGREEMENT = _Agreement(
    {
        "op": _OP_GATHER,
        "dtype": -1,
        "ndim": -1,
        **{f"d{i}": -1 for i in range(_MAX_TRAILING_DIMS)},
        "rows": -1,
        "grad": 0,
    },  # fmt: skip
    ["op", "dtype", "ndim"] + [f"d{i}" for i in range(_MAX_TRAILING_DIMS)],
    "every rank must pass x of shape [n_r, *same dims] with the same dtype (n_r may differ, 0 included)",
    _describe_gather,
)


# ----------------------------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------------------------


def _connected_zero(gathered: torch.Tensor, *local) -> torch.Tensor:
    """An exact 0 whose backward still reaches ``gathered`` (a rank without anchors joins the reduce-scatter) and
    this rank's inputs, tensor temperatures included (they get zero gradients, so every parameter upstream has
    one, as DDP expects); non-tensors in ``local`` are skipped."""
    local = [t.reshape(-1) for t in local if isinstance(t, torch.Tensor)]
    zero = sum((t.narrow(0, 0, 0).sum() for t in local), gathered.narrow(0, 0, 0).sum())
    return zero.to(torch.float64 if gathered.dtype == torch.float64 else torch.float32)


def _rank_share(loss: torch.Tensor, world: int, n_local: int, n_total: int) -> torch.Tensor:
    """``loss * W * Na_r / Na``: the rank-mean of the results is the single-process loss, and DDP's gradient
    average over ranks gives the single-process gradient."""
    factor = world * n_local / n_total
    return loss if factor == 1.0 else loss * factor


def _check_no_reference(backend: str) -> None:
    if backend == "reference":
        raise ValueError(
            "backend='reference' (the dense single-process formulation) has no distributed form; "
            "use 'auto', 'chunked' or 'triton' with gather_distributed=True"
        )


def supcon_loss_distributed(
    features: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor] = 0.07,
    contrast_mode: str = "all",
    base_temperature: Union[float, torch.Tensor] = 0.07,
    normalize: bool = False,
    backend: str = "auto",
    group=None,
    negatives: Optional[torch.Tensor] = None,
    negative_labels: Optional[torch.Tensor] = None,
    _error: Optional[BaseException] = None,
    _what: str = "supcon_loss(gather_distributed=True)",
) -> torch.Tensor:
    """:func:`fastcl.functional.supcon_loss` with this rank's rows as anchors and all ranks' rows as contrast set.

    ``features [b_r, n_views, ...]`` and ``labels [b_r]`` are this rank's; ``b_r`` may differ between ranks and be 0.
    Without labels (SimCLR) samples get globally unique ids. ``mask`` is an error (it relates only one rank's
    samples: pass labels). See the module docstring for the scaling of the returned loss.

    ``negatives [M, D]`` (``negative_labels [M]``) are extra columns shared by every rank (a queue that holds the
    same rows on every rank, :class:`fastcl.MemoryQueue` with ``gather_distributed=True``; every rank must pass
    the same M): each rank scores its anchors against all ranks' rows plus these, so with the scaling below the
    mean over ranks is still the single-process loss. Negatives that require grad (computed on every rank from
    the same inputs) get, on rank r, ``dloss_r/dQ = (W / Na) sum_{i on rank r} dloss_i/dQ``: their average over
    ranks (DDP's) is the single-process gradient, their sum W times it.
    """
    rank, world = _rank_and_world(group)

    def check():
        if _error is not None:
            raise _error
        if mask is not None:
            raise ValueError(
                "mask cannot be used with gather_distributed=True: a [bsz, bsz] mask relates only this rank's "
                "samples; pass labels instead (equal labels are positives across ranks), or neither for SimCLR"
            )
        V.check_temperature("temperature", temperature)
        V.check_temperature("base_temperature", base_temperature)
        V.check_contrast_mode(contrast_mode)
        V.check_backend(backend)
        _check_no_reference(backend)
        feats = V.check_features(features, allow_empty=True)
        if world > 1:
            _check_device("features", feats, group)
        lab = None if labels is None else V.check_labels("labels", labels, feats.shape[0], feats.device)
        return (feats, lab) + _checked_shared_negatives(negatives, negative_labels, labels, feats)

    def fields_of(checked):
        feats, lab, neg, neg_lab = checked
        bsz, views, dim = feats.shape[0], feats.shape[1], feats.shape[2]
        fields = dict(dtype=_dtype_code(feats.dtype), views=views, dim=dim, labels=int(lab is not None))
        fields.update(negatives=-1 if neg is None else neg.shape[0], negative_labels=int(neg_lab is not None))
        return dict(fields, mode=int(contrast_mode == "one"), bsz=bsz, grad=_needs_grad(feats))

    (feats, lab, neg, neg_lab), rows = _handshake(check, fields_of, _SUPCON_AGREEMENT, _what, group, world)
    counts = [row["bsz"] for row in rows]  # samples per rank
    n_views, bsz = feats.shape[1], feats.shape[0]
    if normalize:
        feats = F.normalize(feats, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
    local = _layout.view_major(feats)  # row v * b_r + i is view v of sample i
    contrast = _gather_with_grad(local, [n_views * c for c in counts], rank, group, rows)
    if lab is not None:
        sample_ids = lab if world == 1 else _gather_rows(lab, counts, group)
    else:  # SimCLR: the global sample index
        sample_ids = torch.arange(sum(counts), device=local.device)
    contrast_labels = _layout.view_major_labels(sample_ids, n_views, counts)
    n_anchor = _layout.anchor_count(contrast_mode, bsz, n_views)
    if n_anchor == 0:
        return _connected_zero(contrast, temperature, base_temperature, neg)
    row_offset = n_views * sum(counts[:rank])  # this rank's block in the contrast set; anchor i is row offset + i
    loss = contrastive_loss(
        local.narrow(0, 0, n_anchor),
        contrast,
        contrast_labels.narrow(0, row_offset, n_anchor),
        contrast_labels,
        None,
        self_offset=row_offset,
        temperature=temperature,
        scale=1.0 if base_temperature is temperature else temperature / base_temperature,  # (NT-Xent: exactly 1)
        backend=backend,
        negatives=neg,
        negative_labels=neg_lab,
    )
    return _rank_share(loss, world, n_anchor, _layout.anchor_count(contrast_mode, sum(counts), n_views))


def _checked_shared_negatives(negatives, negative_labels, labels, feats):
    """``(negatives, negative_labels)`` of :func:`supcon_loss_distributed` checked against ``feats [b, v, D]``."""
    if negative_labels is not None and labels is None:
        raise ValueError("negative_labels need labels (the classes they are compared with); pass labels [bsz]")
    neg = V.check_negatives(negatives, feats[:, 0], "features")
    return neg, V.check_negative_labels(negative_labels, neg, feats.device)


def _describe_supcon(row):
    if row["op"] != _OP_SUPCON:
        return "a different fastcl loss"
    return (
        f"features [{row['bsz']}, {row['views']}, {row['dim']}] {_dtype_name(row['dtype'])}, "
        f"labels={'given' if row['labels'] else 'None'}, contrast_mode={'one' if row['mode'] else 'all'!r}"
    )


_SUPCON_AGREEMENT = _Agreement(
    {
        "op": _OP_SUPCON,
        "dtype": -1,
        "views": -1,
        "dim": -1,
        "labels": -1,
        "mode": -1,
        "bsz": -1,
        "negatives": -1,
        "negative_labels": -1,
        "grad": 0,
    },  # fmt: skip
    ["op", "dtype", "views", "dim", "labels", "mode", "negatives", "negative_labels"],
    "every rank must pass features [b_r, n_views, dim] with the same n_views, dim and dtype (b_r may differ, "
    "0 included), labels on all ranks or on none, the same contrast_mode, and the same number of negatives "
    "(the shared queue) with labels on all ranks or on none",
    _describe_supcon,
)


def nt_xent_loss_distributed(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor] = 0.5,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    negatives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`fastcl.functional.nt_xent_loss` over the global batch: ``z_a, z_b [b_r, D]`` per rank (b_r may be 0)."""

    def check():
        V.check_embeddings("z_a", z_a, allow_empty=True)
        V.check_embeddings("z_b", z_b, allow_empty=True)
        V.check_same_kind("z_a", z_a, "z_b", z_b)
        if z_a.shape != z_b.shape:
            raise ValueError(
                f"z_a and z_b must have the same shape [B, D], got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
            )
        return torch.stack([z_a, z_b], dim=1)

    features, error = _checked(check)
    return supcon_loss_distributed(
        features if error is None else None,
        temperature=temperature,
        base_temperature=temperature,
        normalize=normalize,
        backend=backend,
        group=group,
        negatives=negatives,
        _error=error,
        _what="nt_xent_loss(gather_distributed=True)",
    )


def info_nce_loss_distributed(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor] = 0.07,
    symmetric: bool = True,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    _contrast_grad: bool = True,
    negatives: Optional[torch.Tensor] = None,
    in_batch_negatives: bool = True,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """:func:`fastcl.functional.info_nce_loss` with this rank's queries against the keys of all ranks.

    ``query [b_r, D]``, ``key [m_r, D]`` per rank (counts may differ between ranks, 0 included). The positive of
    local query i is, by default, local key i (global key ``sum_{r' < r} m_r' + i``; needs ``m_r >= b_r``);
    ``labels [b_r]`` index the global key set (all ranks' keys in rank order). ``symmetric=True`` (``m_r == b_r``,
    default pairing) adds this rank's keys against the queries of all ranks; query and key then travel in one
    all-gather. ``_contrast_grad=False`` (open_clip's ``local_loss=True, gather_with_grad=False``): the gathered
    rows are constants, so each rank's gradient comes from its own anchors only.

    ``negatives`` / ``in_batch_negatives`` / ``false_negative_margin`` (``symmetric=False``): extra keys shared by
    every rank (the same M rows on every rank, a global queue), the batch columns being all ranks' keys; the
    scaling and the gradient of negatives that require grad are those of :func:`supcon_loss_distributed`.
    """
    rank, world = _rank_and_world(group)
    what = "info_nce_loss(gather_distributed=True)"
    extra = negatives is not None or not in_batch_negatives or false_negative_margin is not None

    def check():
        lab = _checked_info_nce_inputs(query, key, labels, temperature, symmetric, backend, group, world)
        return (lab,) + _checked_extra_columns(query, symmetric, extra, negatives, false_negative_margin)

    def fields_of(checked):
        return _info_nce_fields(query, key, symmetric, *checked[:2])

    (lab, neg, margin), rows = _handshake(check, fields_of, _INFONCE_AGREEMENT, what, group, world)
    query_counts, key_counts = [row["queries"] for row in rows], [row["keys"] for row in rows]
    n_keys = sum(key_counts)
    if lab is not None and torch.compiler.is_compiling():  # (one process: collectives do not trace) in-graph
        torch._assert_async(((lab >= 0) & (lab < n_keys)).all(), "labels must index the global key set")
    out_of_range = [r for r, row in enumerate(rows) if row["label_max"] >= n_keys or row["label_min"] < 0]
    if out_of_range:
        listing = "; ".join(f"rank {r}: [{rows[r]['label_min']}, {rows[r]['label_max']}]" for r in out_of_range)
        raise ValueError(f"{what}: labels must index the global key set [0, {n_keys}), got values in {listing}")

    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        neg = None if neg is None else F.normalize(neg, dim=-1)
    n_query, n_query_total, dim = query.shape[0], sum(query_counts), query.shape[1]
    key_offset = sum(key_counts[:rank])
    if symmetric:  # one all-gather for both towers
        both = _gather_with_grad(torch.cat([query, key], dim=1), query_counts, rank, group, rows)
        all_queries, all_keys = both[:, :dim].contiguous(), both[:, dim:].contiguous()
        gathered = both
    else:
        all_keys = gathered = _gather_with_grad(key, key_counts, rank, group, rows)
    if not _contrast_grad:
        all_keys, gathered = all_keys.detach(), gathered.detach()
        all_queries = all_queries.detach() if symmetric else None
    if n_query == 0:
        return _connected_zero(gathered, query, key, temperature, neg)
    device = query.device
    query_labels = lab if lab is not None else torch.arange(key_offset, key_offset + n_query, device=device)

    common = dict(self_offset=None, temperature=temperature, scale=1.0, backend=backend)
    extra_columns = dict(negatives=neg, in_batch=in_batch_negatives, false_negative_margin=margin)
    all_key_ids = torch.arange(n_keys, device=device)
    loss = contrastive_loss(query, all_keys, query_labels, all_key_ids, None, **common, **extra_columns)
    if symmetric:  # local keys against all queries; key j's positive is query key_offset + j (b_r == m_r)
        key_labels = torch.arange(key_offset, key_offset + n_query, device=device)
        all_query_ids = torch.arange(n_query_total, device=device)
        loss = 0.5 * (loss + contrastive_loss(key, all_queries, key_labels, all_query_ids, None, **common))
    return _rank_share(loss, world, n_query, n_query_total)


def _info_nce_fields(query, key, symmetric, lab, neg):
    """This rank's metadata row of :func:`info_nce_loss_distributed`'s handshake."""
    fields = dict(dtype=_dtype_code(query.dtype), dim=query.shape[1], symmetric=int(symmetric))
    fields.update(labels=int(lab is not None), negatives=-1 if neg is None else neg.shape[0])
    fields.update(queries=query.shape[0], keys=key.shape[0], grad=_needs_grad(key, query if symmetric else None))
    if lab is not None and lab.numel() and not torch.compiler.is_compiling():  # (traced: an in-graph assert)
        fields.update(label_min=int(lab.min()), label_max=int(lab.max()))
    return fields


def _checked_extra_columns(query, symmetric, extra, negatives, margin):
    """``(negatives, margin)`` of :func:`info_nce_loss_distributed` checked (one-way only)."""
    if extra and symmetric:
        raise ValueError(
            "negatives / in_batch_negatives=False / false_negative_margin are columns of the query -> key "
            "direction only: pass symmetric=False"
        )
    return V.check_negatives(negatives, query, "query"), V.check_margin(margin)


def _checked_info_nce_inputs(query, key, labels, temperature, symmetric, backend, group, world):
    """This rank's checked ``labels`` of :func:`info_nce_loss_distributed` (None: the default pairing); raises
    TypeError / ValueError on invalid local input."""
    V.check_embeddings("query", query, allow_empty=True)
    V.check_embeddings("key", key, allow_empty=True)
    V.check_same_kind("query", query, "key", key)
    V.check_temperature("temperature", temperature)
    V.check_backend(backend)
    _check_no_reference(backend)
    if world > 1:
        _check_device("query", query, group)
    n_query, n_key = query.shape[0], key.shape[0]
    if symmetric and (n_key != n_query or labels is not None):
        raise ValueError(
            "symmetric=True needs as many keys as queries on every rank and the default pairing (labels=None), "
            f"got query {tuple(query.shape)}, key {tuple(key.shape)}, labels "
            f"{'given' if labels is not None else 'None'}; pass symmetric=False for a one-directional loss"
        )
    if labels is None and n_key < n_query:
        raise ValueError(
            f"the default pairing (local query i <-> local key i) needs key [m_r, D] with m_r >= b_r, got "
            f"b_r={n_query}, m_r={n_key}; pass labels [b_r] indexing the global key set"
        )
    return None if labels is None else V.check_labels("labels", labels, n_query, query.device)


def _describe_info_nce(row):
    if row["op"] != _OP_INFONCE:
        return "a different fastcl loss"
    return (
        f"query [{row['queries']}, {row['dim']}], key [{row['keys']}, {row['dim']}] {_dtype_name(row['dtype'])}, "
        f"labels={'given' if row['labels'] else 'None'}, symmetric={bool(row['symmetric'])}"
    )


_INFONCE_AGREEMENT = _Agreement(
    dict(
        op=_OP_INFONCE,
        dtype=-1,
        dim=-1,
        symmetric=-1,
        labels=-1,
        queries=-1,
        keys=-1,
        label_min=0,
        label_max=-1,
        negatives=-1,
        grad=0,
    ),  # fmt: skip
    ["op", "dtype", "dim", "symmetric", "labels", "negatives"],
    "every rank must pass query and key with the same dim and dtype (row counts may differ, 0 included), "
    "labels on all ranks or on none, the same symmetric flag, and the same number of negatives (or none)",
    _describe_info_nce,
)


# ----------------------------------------------------------------------------------------------------------------
# The sigmoid (SigLIP) loss
# ----------------------------------------------------------------------------------------------------------------

_OP_SIGMOID = 7


def sigmoid_loss_distributed(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    logit_bias=None,
    labels: Optional[torch.Tensor] = None,
    *,
    text_labels: Optional[torch.Tensor] = None,
    weighting: str = "uniform",
    normalize: bool = False,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """:func:`fastcl.functional.sigmoid_loss` with this rank's images against the texts of all ranks.

    ``image [b_r, D]``, ``text [m_r, D]`` per rank (counts may differ between ranks, 0 included). Without labels
    image i of rank r pairs with text i of rank r (``m_r == b_r``); ``labels`` (``[b_r]``, alone: ``m_r == b_r``)
    and ``text_labels`` (``[m_r]``) relate samples across ranks. The texts travel in one all-gather (backward: one
    reduce-scatter); labels in one more, and SigLIP+ weights also gather the image labels (their group counts are
    global). ``logit_scale`` and ``logit_bias`` are each rank's replica (DDP averages their gradients). Rank r
    returns ``W * (sum over its images' pairs) / B``, ``B = sum_r b_r``: the rank mean is the one-process loss on
    the concatenated batch and DDP's averaged gradients are its gradients.
    """
    rank, world = _rank_and_world(group)
    what = "sigmoid_loss(gather_distributed=True)"

    def check():
        V.check_backend(backend)
        _check_no_reference(backend)
        SI.check_weighting(weighting)
        inputs = SI.check_inputs(image, text, logit_scale, logit_bias, labels, text_labels, allow_empty=True)
        if world > 1:
            _check_device("image_features", image, group)
        return inputs

    def fields_of(inputs):
        fields = dict(dtype=_dtype_code(image.dtype), dim=image.shape[1], labels=int(inputs.image_labels is not None))
        fields.update(weighting=SI.WEIGHTINGS.index(weighting), grad=_needs_grad(inputs.text))
        return dict(fields, images=image.shape[0], texts=text.shape[0])

    inputs, rows = _handshake(check, fields_of, _SIGMOID_AGREEMENT, what, group, world)
    image_counts, text_counts = [row["images"] for row in rows], [row["texts"] for row in rows]
    if normalize:
        inputs = inputs._replace(image=F.normalize(inputs.image, dim=-1), text=F.normalize(inputs.text, dim=-1))
    all_text = _gather_with_grad(inputs.text, text_counts, rank, group, rows)
    all_image_labels = None
    if inputs.image_labels is not None:  # (every rank joins these collectives, one without images too)
        all_text_labels = inputs.text_labels if world == 1 else _gather_rows(inputs.text_labels, text_counts, group)
        if weighting != "uniform" and world > 1:
            all_image_labels = _gather_rows(inputs.image_labels, image_counts, group)
        inputs = inputs._replace(text_labels=all_text_labels)
    n_image, n_total = inputs.image.shape[0], sum(image_counts)
    if n_image == 0:
        params = [t.reshape(1) for t in (inputs.logit_scale, inputs.logit_bias)]
        return _connected_zero(all_text, inputs.image, inputs.text, *params)
    inputs = inputs._replace(text=all_text)
    problem = SI.make_problem(
        inputs,
        weighting,
        norm=n_total / world,
        pair_offset=sum(text_counts[:rank]),
        all_image_labels=all_image_labels,
        image_offset=sum(image_counts[:rank]) if all_image_labels is not None else 0,
    )
    return sigmoid_loss_op(problem, backend)


def _describe_sigmoid(row):
    if row["op"] != _OP_SIGMOID:
        return "a different fastcl loss"
    return (
        f"image_features [{row['images']}, {row['dim']}], text_features [{row['texts']}, {row['dim']}] "
        f"{_dtype_name(row['dtype'])}, labels={'given' if row['labels'] else 'None'}, weighting #{row['weighting']}"
    )


_SIGMOID_AGREEMENT = _Agreement(
    dict(op=_OP_SIGMOID, dtype=-1, dim=-1, labels=-1, weighting=-1, images=-1, texts=-1, grad=0),
    ["op", "dtype", "dim", "labels", "weighting"],
    "every rank must pass image and text features with the same dim and dtype (row counts may differ, 0 included), "
    "labels on all ranks or on none, and the same weighting",
    _describe_sigmoid,
)
