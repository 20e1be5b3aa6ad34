"""Functional forms of the fastcl losses.

Each validates its inputs, lays the embeddings out as anchors and a contrast set, and hands them to the one fused
op of :mod:`fastcl.ops` (:func:`fastcl.ops.dispatch.contrastive_loss`; or to the dense reference of
:mod:`fastcl.ops.reference` for ``backend='reference'``). All return an fp32 scalar
(float64 for float64 inputs); the fused backends never allocate anything ``N x N``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional, Union

import torch
import torch.nn.functional as F

from fastcl import _layout
from fastcl import _sigmoid_inputs as SI
from fastcl import _validation as V
from fastcl.ops.dispatch import contrastive_loss
from fastcl.ops.problem import autocast_off, compute_dtype, index_range
from fastcl.ops.reference import extra_columns_loss_reference, info_nce_loss_reference, supcon_loss_reference
from fastcl.ops.sigmoid.dispatch import sigmoid_loss_op
from fastcl.ops.sigmoid.reference import sigmoid_loss_reference

__all__ = ["supcon_loss", "nt_xent_loss", "info_nce_loss", "sigmoid_loss"]


def _without_autocast(loss_fn):
    """``loss_fn`` run with autocast off on its first argument's device when a caller's autocast region is active
    there (:func:`fastcl.ops.problem.autocast_off`, which the fused ops' dispatch points also take): the losses pick
    their compute dtypes themselves (fp32 for half-precision inputs, as autocast itself runs softmax and
    cross-entropy), and autocast's half-precision matrix products inside them would mix dtypes (the chunked
    backend's ops refuse that) or round the loss, the reference backend's too. The value is that of the same call
    outside autocast."""

    first_name = next(iter(inspect.signature(loss_fn).parameters))  # (features, z_a, query: passed either way)

    @functools.wraps(loss_fn)
    def loss_outside_autocast(*args, **kwargs):
        first = args[0] if args else kwargs.get(first_name)
        with autocast_off(first.device if isinstance(first, torch.Tensor) else torch.device("cpu")):
            return loss_fn(*args, **kwargs)

    return loss_outside_autocast


@_without_autocast
def supcon_loss(
    features: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor] = 0.07,
    contrast_mode: str = "all",
    base_temperature: Union[float, torch.Tensor] = 0.07,
    normalize: bool = False,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    negatives: Optional[torch.Tensor] = None,
    negative_labels: Optional[torch.Tensor] = None,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out), numerically the SupContrast ``SupConLoss``.

    Args:
        features: ``[bsz, n_views, ...]`` float (extra dims are flattened to ``dim``). The contrast set is all views
            stacked view-major (row ``v * bsz + i`` is view v of sample i).
        labels: ``[bsz]`` class labels, integer, bool or float (compared as SupContrast does, ``torch.eq``:
            samples with equal labels are positives).
        mask: ``[bsz, bsz]`` positive-pair mask (bool or non-negative float weights, may be asymmetric);
            ``mask[i, j]`` says whether sample j is a positive of anchor sample i. Negative weights raise
            ``ValueError`` (checked with one pass over the mask and, eagerly, one host sync). At most one of
            ``labels`` and ``mask``; neither gives SimCLR (the positives of a view are the other views of the same
            sample).
        temperature: softmax temperature ``t > 0``: a real number (``int``/``float``; ``bool`` and strings raise
            ``TypeError``), or a 0-dim floating tensor, with or without grad (a learnable temperature: the loss
            is differentiable in it on every backend, see :mod:`fastcl.ops.dispatch`). A tensor's value is checked
            eagerly on CPU; on an accelerator or while compiling a value that is not positive and finite gives
            a NaN loss instead (no host sync).
        contrast_mode: ``'all'`` (every view is an anchor) or ``'one'`` (view 0 only).
        base_temperature: the loss is scaled by ``t / base_temperature`` (with a tensor ``t`` the gradient includes
            this factor's); a number or a 0-dim tensor as ``temperature``.
        normalize: L2-normalise ``features`` along ``dim`` first (SupContrast expects normalised features).
        backend: ``'auto' | 'triton' | 'chunked' | 'reference'``.
        gather_distributed: this rank's samples are the anchors and every rank's samples (``torch.distributed``,
            ``group``) the contrast set, with the gradients of one big batch (:mod:`fastcl.distributed`); ``bsz``
            may differ between ranks and be 0; ``mask`` is an error (pass labels).
        group: the process group for ``gather_distributed`` (default: the world).
        negatives: ``[M, D]`` extra contrast rows that are never anchors (a memory queue / cross-batch memory, e.g.
            :attr:`fastcl.MemoryQueue.negatives`), same dtype, device and dim as ``features``; ``M = 0`` is fine.
        negative_labels: ``[M]`` their labels (:attr:`fastcl.MemoryQueue.labels`; needs ``labels``): an entry with
            the anchor's label is one of its positives (SupCon / PML ``CrossBatchMemory``). Without them every
            entry is a negative (MoCo). Not with ``mask`` (pass labels).
        false_negative_margin: refused (``ValueError``): the margin is measured from the anchor's one positive's
            score, and a SupCon anchor has several positives (use :func:`info_nce_loss`).

    Returns:
        Scalar: mean over anchors of ``-(t / base_t) * mean_{p in P(i)} log softmax_{j != i}(s_ij)[p]``; an anchor
        without positives contributes 0 and still counts in the mean.

    Example:
        >>> feats = torch.nn.functional.normalize(torch.randn(8, 2, 128), dim=-1)
        >>> loss = supcon_loss(feats, labels=torch.randint(0, 3, (8,)), temperature=0.1)
    """
    _refuse_margin("supcon_loss", false_negative_margin)
    same_temperatures = base_temperature is temperature
    temperature = _fp32_at_least(temperature)  # (before every route: the gathered one forms t / base_t too)
    base_temperature = temperature if same_temperatures else _fp32_at_least(base_temperature)
    if gather_distributed:
        from fastcl.distributed import supcon_loss_distributed

        return supcon_loss_distributed(
            features,
            labels,
            mask,
            temperature=temperature,
            contrast_mode=contrast_mode,
            base_temperature=base_temperature,
            normalize=normalize,
            backend=backend,
            group=group,
            negatives=negatives,
            negative_labels=negative_labels,
        )
    if negatives is not None or negative_labels is not None:
        settings = dict(contrast_mode=contrast_mode, normalize=normalize, backend=backend)
        return _supcon_with_negatives(features, labels, mask, negatives, negative_labels, temperature,
                                      base_temperature, **settings)  # fmt: skip
    same_temperatures = base_temperature is temperature  # (NT-Xent: scale exactly 1, no gradient through t / t)
    temperature = V.check_temperature("temperature", temperature)
    base_temperature = V.check_temperature("base_temperature", base_temperature)
    features, labels, mask = _checked_supcon_inputs(features, labels, mask, contrast_mode, backend)
    bsz, n_views = features.shape[0], features.shape[1]
    if backend == "reference":
        features = F.normalize(features, dim=-1) if normalize else features
        temperature, base_temperature = _nan_unless_positive(temperature), _nan_unless_positive(base_temperature)
        return supcon_loss_reference(features, labels, mask, temperature, contrast_mode, base_temperature)

    contrast = _layout.view_major(features)
    anchor = contrast[:bsz] if contrast_mode == "one" else contrast
    anchor_labels = contrast_labels = None
    if mask is None:
        sample_ids = labels if labels is not None else index_range(bsz, features.device)
        contrast_labels = _layout.view_major_labels(sample_ids, n_views)
        # 'all': the same label object on both sides (the anchors are the contrast rows; see fastcl.ops.triton.route)
        anchor_labels = contrast_labels if contrast_mode == "all" else contrast_labels[:bsz]
    return contrastive_loss(
        anchor,
        contrast,
        anchor_labels,
        contrast_labels,
        mask,
        self_offset=0,
        temperature=temperature,
        scale=1.0 if same_temperatures else temperature / base_temperature,
        backend=backend,
        normalize=normalize,  # (the fused backends fold it in where they can)
    )


def _refuse_margin(what: str, margin) -> None:
    if margin is not None:
        raise ValueError(
            f"{what}: false_negative_margin needs one positive per anchor (a column is dropped when it scores more "
            "than the positive's score + margin), and this loss has several positives per anchor, so 'the "
            "positive's score' is not defined; use info_nce_loss(..., false_negative_margin=m)"
        )


def _supcon_with_negatives(features, labels, mask, negatives, negative_labels, temperature, base_temperature, *,
                           contrast_mode, normalize, backend):  # fmt: skip
    """:func:`supcon_loss` with ``negatives [M, D]`` (and ``negative_labels [M]``) as extra contrast columns."""
    same_temperatures = base_temperature is temperature
    temperature = V.check_temperature("temperature", temperature)
    base_temperature = V.check_temperature("base_temperature", base_temperature)
    if mask is not None:
        raise ValueError("negatives with a mask: the mask has no entries for the extra rows; pass labels instead")
    if negative_labels is not None and labels is None:
        raise ValueError("negative_labels need labels (the classes they are compared with); pass labels [bsz]")
    raw_labels, raw_negative_labels = labels, negative_labels
    features, labels, _ = _checked_supcon_inputs(features, labels, None, contrast_mode, backend)
    bsz, n_views = features.shape[0], features.shape[1]
    contrast = _layout.view_major(features)
    negatives = V.check_negatives(negatives, contrast, "features")
    negative_labels = V.check_negative_labels(negative_labels, negatives, features.device, allow_float=True)
    if negative_labels is not None:
        labels, negative_labels = _joint_label_ids(raw_labels, labels, raw_negative_labels, negative_labels)
    sample_ids = labels if labels is not None else index_range(bsz, features.device)
    contrast_labels = _layout.view_major_labels(sample_ids, n_views)
    anchor = contrast[:bsz] if contrast_mode == "one" else contrast
    anchor_labels = contrast_labels if contrast_mode == "all" else contrast_labels[:bsz]
    scale = 1.0 if same_temperatures else temperature / base_temperature
    if backend == "reference":
        if normalize:
            contrast, negatives = F.normalize(contrast, dim=-1), F.normalize(negatives, dim=-1)
            anchor = contrast[:bsz] if contrast_mode == "one" else contrast
        t = _nan_unless_positive(temperature)
        return extra_columns_loss_reference(anchor, contrast, anchor_labels, contrast_labels, negatives,
                                            negative_labels, self_offset=0, temperature=t, scale=scale)  # fmt: skip
    return contrastive_loss(anchor, contrast, anchor_labels, contrast_labels, None, self_offset=0,
                            temperature=temperature, scale=scale, backend=backend, normalize=normalize,
                            negatives=negatives, negative_labels=negative_labels)  # fmt: skip


def _joint_label_ids(raw_labels, labels, raw_negative_labels, negative_labels):
    """``(labels, negative_labels)`` as ids of one space: floating-point labels on either side (made dense ids
    separately by :func:`fastcl._validation.check_labels`) are compared by value over both together."""
    if not (raw_labels.is_floating_point() or raw_negative_labels.is_floating_point()):
        return labels, negative_labels
    values = torch.cat([raw_labels.reshape(-1), raw_negative_labels.reshape(-1)])
    values = values.to(labels.device, torch.float64)
    ids = V.dense_label_ids(values)
    return ids[: labels.shape[0]], ids[labels.shape[0] :]


def _checked_supcon_inputs(features, labels, mask, contrast_mode, backend):
    """``(features, labels, mask)`` of :func:`supcon_loss` checked (raises on invalid input)."""
    V.check_contrast_mode(contrast_mode)
    V.check_backend(backend)
    features = V.check_features(features)
    bsz = features.shape[0]
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`: pass one of them (or neither for SimCLR)")
    if labels is not None:
        labels = V.check_labels("labels", labels, bsz, features.device, allow_float=True)
    if mask is not None:
        mask = V.check_mask(mask, bsz, features.device, compute_dtype(features))
    return features, labels, mask


@_without_autocast
def nt_xent_loss(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor] = 0.5,
    normalize: bool = True,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    negatives: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SimCLR's NT-Xent over two views: ``z_a``, ``z_b`` ``[B, D]`` -> scalar.

    Equal to :func:`supcon_loss` on ``stack([z_a, z_b], 1)`` with no labels and ``base_temperature =
    temperature``: each of the 2B embeddings has its other view as the positive and the 2B - 2 others as negatives.
    ``gather_distributed=True``: negatives from every rank's batch, as in :func:`supcon_loss`. ``temperature``:
    a number or a 0-dim tensor (learnable), as in :func:`supcon_loss`. ``negatives [M, D]``: extra rows in every
    anchor's denominator, never anchors, never positives (lightly's ``NTXentLoss(memory_bank_size=...)``: pass
    the bank's rows; normalised with the views when ``normalize``).
    """
    if gather_distributed:
        from fastcl.distributed import nt_xent_loss_distributed

        return nt_xent_loss_distributed(
            z_a, z_b, temperature=temperature, normalize=normalize, backend=backend, group=group, negatives=negatives
        )
    V.check_embeddings("z_a", z_a)
    V.check_embeddings("z_b", z_b)
    V.check_same_kind("z_a", z_a, "z_b", z_b)
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a and z_b must have the same shape [B, D], got {tuple(z_a.shape)} and {tuple(z_b.shape)}")
    temperature = V.check_temperature("temperature", temperature)
    return supcon_loss(
        torch.stack([z_a, z_b], dim=1),
        temperature=temperature,
        base_temperature=temperature,
        normalize=normalize,
        backend=backend,
        negatives=negatives,
    )


@_without_autocast
def info_nce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: Union[float, torch.Tensor, None] = None,
    symmetric: bool = True,
    normalize: bool = True,
    backend: str = "auto",
    gather_distributed: bool = False,
    group=None,
    logit_scale: Union[float, torch.Tensor, None] = None,
    negatives: Optional[torch.Tensor] = None,
    in_batch_negatives: bool = True,
    false_negative_margin: Optional[float] = None,
) -> torch.Tensor:
    """Two-tower (CLIP-style) InfoNCE.

    Args:
        query: ``[B, D]``; key: ``[M, D]`` (same dtype and device).
        labels: ``[B]`` integer index of each query's positive key (default ``arange(B)``).
        symmetric: average the query->key and key->query cross-entropies, as CLIP does (needs ``M == B`` and the
            default pairing).
        temperature: ``t > 0`` (default 0.07): a number or a 0-dim tensor, with or without grad (as in
            :func:`supcon_loss`).
        logit_scale: open_clip's / CLIP's form instead: the multiplier ``1 / t`` of the logits, a number or a 0-dim
            tensor (``model.logit_scale.exp()``); giving both ``temperature`` and ``logit_scale`` is an error.
        normalize: L2-normalise query and key first (open_clip's ``ClipLoss`` takes normalised features:
            pass ``normalize=False`` for its numbers; :class:`fastcl.ClipLoss` does).
        gather_distributed: this rank's queries against the keys of every rank (``torch.distributed``, ``group``),
            with the gradients of one big batch (:mod:`fastcl.distributed`). Row counts may differ between ranks
            (0 included); the default positive of local query i is local key i, and ``labels`` index the global
            key set (all ranks' keys in rank order).
        group: the process group for ``gather_distributed`` (default: the world).
        negatives: ``[M, D]`` extra keys in every query's denominator, never positives (a MoCo queue,
            :attr:`fastcl.MemoryQueue.negatives`, or MNRL's hard-negative documents, which get their gradient when
            they require grad); the query -> key direction only (``symmetric=False``). Same dtype, device and dim.
        in_batch_negatives: ``True``: each query's denominator has all keys plus ``negatives`` (sentence-transformers'
            MNRL); ``False``: its own positive key plus ``negatives`` only (MoCo, lightly's memory bank); then
            ``symmetric=False``.
        false_negative_margin: ``m``: drop key (or negative) j from query i's denominator when
            ``sim_ij > sim_i,pos + m``, ``sim`` the similarity before the temperature (Qwen3-Embedding: m = 0.1); the
            mask is a constant of the gradient. ``symmetric=False``.

    Returns:
        Scalar ``mean_i -log softmax_j(q_i . k_j / t)[labels[i]]`` (averaged with the key->query term when symmetric).

    Example:
        >>> logit_scale = torch.nn.Parameter(torch.tensor(2.659)).exp()     # CLIP's learnable scale
        >>> loss = info_nce_loss(img, txt, logit_scale=logit_scale, normalize=False)
    """
    temperature = _temperature_of(temperature, logit_scale)
    if gather_distributed:
        from fastcl.distributed import info_nce_loss_distributed

        return info_nce_loss_distributed(
            query,
            key,
            labels,
            temperature=temperature,
            symmetric=symmetric,
            normalize=normalize,
            backend=backend,
            group=group,
            negatives=negatives,
            in_batch_negatives=in_batch_negatives,
            false_negative_margin=false_negative_margin,
        )
    extra = negatives is not None or not in_batch_negatives or false_negative_margin is not None
    if extra:
        if symmetric:
            raise ValueError(
                "negatives / in_batch_negatives=False / false_negative_margin are columns of the query -> key "
                "direction only: pass symmetric=False"
            )
        return _info_nce_with_negatives(query, key, labels, temperature, negatives, in_batch_negatives,
                                        false_negative_margin, normalize=normalize, backend=backend)  # fmt: skip
    labels, temperature = _checked_info_nce_inputs(query, key, labels, temperature, symmetric, backend)
    n_query, n_key = query.shape[0], key.shape[0]
    if backend == "reference":
        if normalize:
            query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        return info_nce_loss_reference(query, key, labels, _nan_unless_positive(temperature), symmetric)

    key_ids = index_range(n_key, query.device)
    query_labels = labels if labels is not None else key_ids[:n_query]

    return contrastive_loss(
        query,
        key,
        query_labels,
        key_ids,
        None,
        self_offset=None,
        temperature=temperature,
        scale=1.0,
        backend=backend,
        two_way=symmetric,  # key -> query as well, from the same similarity tiles
        normalize=normalize,
    )


def _info_nce_with_negatives(query, key, labels, temperature, negatives, in_batch, margin, *, normalize, backend):
    """:func:`info_nce_loss` (one way) with extra keys, the MoCo row form, or the false-negative margin."""
    labels, temperature = _checked_info_nce_inputs(query, key, labels, temperature, False, backend)
    negatives = V.check_negatives(negatives, query, "query")
    margin = V.check_margin(margin)
    if not isinstance(in_batch, bool):
        raise TypeError(f"in_batch_negatives must be a bool, got {type(in_batch).__name__}")
    key_ids = index_range(key.shape[0], query.device)
    query_labels = labels if labels is not None else key_ids[: query.shape[0]]
    if backend == "reference":
        if normalize:
            query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
            negatives = None if negatives is None else F.normalize(negatives, dim=-1)
        return extra_columns_loss_reference(query, key, query_labels, key_ids, negatives, in_batch=in_batch,
                                            false_negative_margin=margin,
                                            temperature=_nan_unless_positive(temperature))  # fmt: skip
    return contrastive_loss(query, key, query_labels, key_ids, None, self_offset=None, temperature=temperature,
                            scale=1.0, backend=backend, normalize=normalize, negatives=negatives, in_batch=in_batch,
                            false_negative_margin=margin)  # fmt: skip


def _nan_unless_positive(temperature):
    """A tensor temperature as it is where positive and finite, else NaN (decided on its device, no host sync; the
    fused backends do the same, :func:`fastcl.ops.dispatch.inverse_temperature`); a number as it is (checked)."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    return torch.where(torch.isfinite(temperature) & (temperature > 0), temperature, float("nan"))


def _fp32_at_least(temperature):
    """A half-precision tensor temperature (a learnable one of an fp16 / bf16 model) as fp32, differentiably (its
    value is exact in fp32): the loss is computed in fp32, and a ``t / base_t`` or ``1 / logit_scale`` rounded to
    half precision would shift it by up to half an ulp of that dtype. Anything else as it is."""
    if isinstance(temperature, torch.Tensor) and temperature.dtype in (torch.float16, torch.bfloat16):
        return temperature.float()
    return temperature


def _temperature_of(temperature, logit_scale):
    """The temperature of :func:`info_nce_loss` from its ``temperature`` / ``logit_scale`` arguments (checked)."""
    if logit_scale is None:
        return 0.07 if temperature is None else _fp32_at_least(V.check_temperature("temperature", temperature))
    if temperature is not None:
        raise ValueError("pass either temperature or logit_scale (= 1 / temperature), not both")
    logit_scale = _fp32_at_least(V.check_temperature("logit_scale", logit_scale))
    return torch.reciprocal(logit_scale) if isinstance(logit_scale, torch.Tensor) else 1.0 / logit_scale


def _checked_info_nce_inputs(query, key, labels, temperature, symmetric, backend):
    """``(labels, temperature)`` of :func:`info_nce_loss` checked, with its other inputs (raises on invalid input)."""
    V.check_embeddings("query", query)
    V.check_embeddings("key", key)
    V.check_same_kind("query", query, "key", key)
    temperature = V.check_temperature("temperature", temperature)
    V.check_backend(backend)
    n_query, n_key = query.shape[0], key.shape[0]
    if symmetric:
        if n_key != n_query:
            raise ValueError(
                f"symmetric=True needs as many keys as queries (key [M, D] with M == B), got B={n_query}, M={n_key}; "
                "pass symmetric=False for a one-directional loss"
            )
        if labels is not None:
            raise ValueError("symmetric=True uses the default pairing (query i <-> key i): pass labels=None")
    if labels is not None:
        return V.check_label_indices(labels, n_query, n_key, query.device), temperature
    if n_key < n_query:
        raise ValueError(
            f"the default pairing (query i <-> key i) needs key [M, D] with M >= B, got B={n_query}, M={n_key}; "
            "pass labels [B] with each query's key index"
        )
    return None, temperature


# ----------------------------------------------------------------------------------------------------------------
# The sigmoid (SigLIP) loss
# ----------------------------------------------------------------------------------------------------------------


@_without_autocast
def sigmoid_loss(
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
    gather_distributed: bool = False,
    group=None,
) -> torch.Tensor:
    """SigLIP's sigmoid loss in open_clip's convention: ``-sum_ij w_ij log sigmoid(z_ij (s x_i . y_j + b)) / N``.

    ``z_ij = +1`` for a positive pair and ``-1`` otherwise; every pair weighs ``w_ij = 1`` unless ``weighting`` says
    otherwise. Loss and all gradients come from one pass (``6 N M D`` flops, no ``N x M`` matrix on the fused
    backends); the backward only scales them by ``grad_output``.

    Args:
        image: ``[N, D]`` image features; text: ``[M, D]`` text features (same dtype and device).
        logit_scale: ``s > 0``, a 0-dim tensor (learnable: it gets a gradient) or a real number; open_clip passes
            ``logit_scale.exp()``.
        logit_bias: ``b``, a 0-dim tensor (learnable) or a real number; None is 0.
        labels: ``[N]`` integer labels. Alone (needs ``M == N``) they label both towers: every pair with equal labels
            is positive (multi-positive). None with ``text_labels`` None: image i's positive is text i (``M == N``).
        text_labels: ``[M]`` integer labels of the texts (a rectangular batch, several captions per image); then
            ``labels`` are the images' and pair ``(i, j)`` is positive when ``labels[i] == text_labels[j]``.
        weighting: ``'uniform'`` (SigLIP), ``'siglip_plus'`` or ``'siglip_plus_asymmetric'``: SigLIP+'s soft
            weighting (siglip-kernel's ``fused_siglip_plus_loss``, ``symmetric=True`` / ``False``): a positive
            ``(i, j)`` weighs ``alpha / k_i + beta / k'_j`` (``k_i`` positives of image i, ``k'_j`` of text j,
            ``(alpha, beta) = (1/2, 1/2)`` or ``(1, 0)``). siglip-kernel divides by ``N * M``: its value is this
            loss divided by ``M``.
        normalize: L2-normalise both towers first (default False, as open_clip's ``SigLipLoss``: the raw gradients).
        backend: ``'auto'`` (Triton on CUDA, chunked elsewhere), ``'triton'``, ``'chunked'`` or ``'reference'``.
        gather_distributed: this rank's images against the texts of every rank (:mod:`fastcl.distributed`), with
            the gradients of one big batch; shards may be uneven or empty. Labels then relate samples across ranks.
        group: the process group for ``gather_distributed`` (default: the world).

    Returns:
        0-dim fp32 tensor (float64 for float64 inputs).

    Example:
        >>> logit_scale = torch.nn.Parameter(torch.tensor(10.0).log())
        >>> logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        >>> loss = sigmoid_loss(img, txt, logit_scale.exp(), logit_bias)
    """
    if gather_distributed:
        from fastcl.distributed import sigmoid_loss_distributed

        return sigmoid_loss_distributed(
            image,
            text,
            logit_scale,
            logit_bias,
            labels,
            text_labels=text_labels,
            weighting=weighting,
            normalize=normalize,
            backend=backend,
            group=group,
        )
    V.check_backend(backend)
    SI.check_weighting(weighting)
    inputs = SI.check_inputs(image, text, logit_scale, logit_bias, labels, text_labels)
    problem = SI.make_problem(inputs, weighting, norm=image.shape[0])
    if backend == "reference":
        if normalize:
            problem = problem._replace(image=F.normalize(problem.image, dim=-1), text=F.normalize(problem.text, dim=-1))
        return sigmoid_loss_reference(problem)
    return sigmoid_loss_op(problem, backend, normalize)
