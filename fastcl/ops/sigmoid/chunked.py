"""The chunked sigmoid op: the loss and every gradient from one pass over row blocks, on any device.

Per block of ``r`` images the logits ``l = s Y X_r^T + b`` (stored transposed, ``[M, r]``, as the softmax op's
chunked passes do: on MKL the products then run unstrided) are formed by one product, turned in place into
``dL/dl`` (``sigmoid(l)`` for a negative pair, ``-sigmoid(-l)`` for a positive one: no normalisation across a row,
so nothing waits for other blocks) and consumed by two more products, ``dX_r = s dL/dl^T Y`` and
``dY += dL/dl (s X_r)``. ``ds = sum_ij dL/dl_ij x_i . y_j = sum_i x_i . (dL/dl^T Y)_i`` reuses the ``dX`` product
(``O(r D)`` more) and ``db = sum_ij dL/dl_ij`` is one reduction. That is ``6 N M D`` flops, as many as the dense
forward and backward together, in ``O(N D + r M)`` memory, and nothing is recomputed: the backward only scales the
stored gradients by ``grad_output``.

The default pairing (image i with text ``i + pair_offset``) touches only the block's diagonal: its ``r`` positive
logits are negated in place, so the block holds ``t = -z l`` and one ``softplus`` / ``sigmoid`` pass serves every
pair; a positive's loss and gradient never come from a difference of large terms. With labels the block's positive
mask is formed from the ids (a few more elementwise passes, :func:`~fastcl.ops.sigmoid.problem.pair_terms`), and
SigLIP+ weights apply there.
Half-precision inputs are computed in fp32, float64 stays float64.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from fastcl.ops.sigmoid.problem import SigmoidProblem, compute_dtype, pair_terms, softplus_threshold

Tensor = torch.Tensor

# Bytes of one [M, r] logits buffer (two are kept: logits and their softplus). 8 MiB per intra-op thread (up to 4),
# as the softmax op's chunked passes measured best on a 2-core EPYC (L2 512 KiB / core, L3 8-32 MiB); 256 MiB on
# accelerators. FASTCL_SIGMOID_CHUNK_BYTES overrides it.
_ENV_BYTES = os.environ.get("FASTCL_SIGMOID_CHUNK_BYTES")
_BYTES_PER_THREAD = 8 * 1024 * 1024
_MIN_BLOCK_ROWS = 64  # at very large M the byte budget alone would give products too thin to run fast
_ZERO = {dtype: torch.zeros((), dtype=dtype) for dtype in (torch.float32, torch.float64)}  # a beta=0 addmm's input


def block_rows(n_image: int, n_text: int, device: torch.device) -> int:
    """Rows of images per block: the logits budget over ``4 * M`` bytes, at least 64 (and at most N)."""
    if _ENV_BYTES:
        budget = int(_ENV_BYTES)
    elif device.type == "cpu":
        budget = _BYTES_PER_THREAD * min(torch.get_num_threads(), 4)
    else:
        budget = 256 * 1024 * 1024
    return max(1, min(n_image, max(_MIN_BLOCK_ROWS, budget // (4 * max(n_text, 1)))))


# Largest default-pairing problem (pairs) that :func:`autograd_small_loss` takes: N = M = 128
SMALL_PROBLEM_PAIRS = 128 * 128


def takes_small_problem(problem: SigmoidProblem) -> bool:
    """Whether :func:`autograd_small_loss` serves ``problem``: the default pairing with at most
    :data:`SMALL_PROBLEM_PAIRS` pairs."""
    n_image, n_text = problem.image.shape[0], problem.text.shape[0]
    return problem.image_ids is None and 0 < n_image * n_text <= SMALL_PROBLEM_PAIRS


def autograd_small_loss(problem: SigmoidProblem) -> Tensor:
    """The loss of a small default-pairing problem (:func:`takes_small_problem`) as six native ops under PyTorch's
    own autograd: ``softplus(-z (s X Y^T + b))`` summed, ``-z`` a cached sign block. At this size the fixed cost of
    a custom autograd function (about 30 us for its forward and backward on one CPU thread) is as large as the work
    itself, and autograd's own nodes cost a few microseconds each: these ops alone run 1.3-1.5x faster than
    open_clip's dense graph at N = 64-128 (benches/RESULTS.md). Its ``[N, M]`` intermediates are at most 64 KiB
    each."""
    dtype = compute_dtype(problem.text)
    x, y = _as(problem.image, dtype), _as(problem.text, dtype)
    scale, bias = _as(problem.logit_scale, dtype), _as(problem.logit_bias, dtype)
    logits = torch.addmm(bias, x * scale, y.t())
    signed = logits * _pair_signs(x.shape[0], y.shape[0], problem.pair_offset, dtype, x.device)
    return torch.nn.functional.softplus(signed, threshold=softplus_threshold(dtype)).sum() * (1.0 / problem.norm)


@functools.lru_cache(maxsize=16)
def _pair_signs(n_image: int, n_text: int, pair_offset: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``-z [N, M]``: 1 for a negative pair, -1 for image i with text ``i + pair_offset`` (one cached tensor per
    shape; made outside inference mode so autograd may save it)."""
    with torch.inference_mode(False):
        signs = torch.ones(n_image, n_text, dtype=dtype, device=device)
        signs.diagonal(pair_offset).fill_(-1.0)
    return signs


def chunked_forward(problem: SigmoidProblem, want_grad: bool):
    """``(loss, d_image, d_text, d_scale, d_bias)`` in the compute dtype; the four gradients (for grad_output = 1)
    are None without ``want_grad``. ``loss`` and the scalar gradients are 0-dim."""
    dtype = compute_dtype(problem.text)
    x, y = _as(problem.image, dtype), _as(problem.text, dtype)
    scale, bias = _as(problem.logit_scale, dtype), _as(problem.logit_bias, dtype)
    n_image, n_text = x.shape[0], y.shape[0]
    inv_norm = 1.0 / problem.norm
    rows = block_rows(n_image, n_text, x.device)
    if rows >= n_image and problem.image_ids is None and n_image > 0:
        return _single_block(x, y, scale, bias, inv_norm, problem.pair_offset, want_grad)
    x_scaled = x * scale
    state = _Accumulators(x, y, x * (scale * inv_norm) if want_grad else None)
    logits_buffer = x.new_empty(min(rows, n_image) * n_text)
    softplus_buffer = torch.empty_like(logits_buffer) if problem.image_ids is None else None
    for start in range(0, n_image, rows):
        stop = min(start + rows, n_image)
        logits = torch.addmm(bias, y, x_scaled[start:stop].T, out=_block(logits_buffer, n_text, stop - start))
        if problem.image_ids is None:
            grad = _paired_block(logits, softplus_buffer, start + problem.pair_offset, state, want_grad)
        else:
            grad = _labelled_block(logits, problem, start, stop, dtype, state)
        if want_grad:
            state.add_products(grad, start, stop)
    return state.result(inv_norm, scale)


def _single_block(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, inv_norm: float, offset: int, want_grad: bool):
    """The whole default-pairing problem as one ``[N, M]`` block (small N): the same math as the block loop in the
    fewest operations (each costs a few microseconds of dispatch at this size). On CPU the scale is read as a number
    (free there) and folded into the products' ``alpha``.

    The block holds ``t = -z l`` (the positive pairs' logits negated in place), so the loss is ``sum softplus(t)``
    and ``dL/dl = -z sigmoid(t)`` (the same negation again); the gradient is formed divided by the norm, so ``ds``
    and ``db`` come out of their reductions already normalised."""
    on_cpu = x.device.type == "cpu"
    if on_cpu:
        scale = scale.item()
        signed = torch.addmm(bias, x, y.t(), alpha=scale)
    else:
        signed = torch.addmm(bias, x * scale, y.t())
    positive = signed.diagonal(offset)
    positive.neg_()
    loss = torch._C._nn.softplus(signed, 1, softplus_threshold(signed.dtype)).sum().mul_(inv_norm)
    if not want_grad:
        return loss, None, None, None, None
    grad = signed.sigmoid_().mul_(inv_norm)  # sigmoid(-z l) / norm
    positive.neg_()  # -z sigmoid(-z l) / norm = dL/dl / norm
    grad_dot_text = torch.mm(grad, y)  # sum_j dL/dl_ij y_j / norm
    d_scale = torch.dot(grad_dot_text.view(-1), x.reshape(-1))
    d_bias = grad.sum()
    if on_cpu:
        d_text = torch.addmm(_ZERO[grad.dtype], grad.t(), x, beta=0, alpha=scale)
    else:
        d_text = torch.mm(grad.t(), x).mul_(scale)
    return loss, grad_dot_text.mul_(scale), d_text, d_scale, d_bias


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _block(buffer: Tensor, height: int, width: int) -> Tensor:
    """A contiguous ``[height, width]`` view at the start of a flat buffer (one allocation serves every block)."""
    return buffer[: height * width].view(height, width)


def _paired_block(logits: Tensor, softplus_buffer: Tensor, first_pair: int, state, want_grad: bool) -> Optional[Tensor]:
    """Default pairing: the loss of a ``[M, r]`` block whose image c pairs with text ``first_pair + c``, and (with
    ``want_grad``) ``dL/dl`` in place of the logits. The positive entries are negated in place first, so the block
    holds ``t = -z l``: the loss is ``softplus(t)`` and ``dL/dl = -z sigmoid(t)`` (the positives negated again)."""
    positive = logits[first_pair:].diagonal()
    positive.neg_()
    threshold = softplus_threshold(logits.dtype)
    state.add_loss(torch._C._nn.softplus(logits, 1, threshold, out=_block(softplus_buffer, *logits.shape)).sum())
    if not want_grad:
        return None
    grad = logits.sigmoid_()
    positive.neg_()
    return grad


def _labelled_block(logits: Tensor, problem: SigmoidProblem, start: int, stop: int, dtype, state) -> Tensor:
    """Labels (and SigLIP+ weights): the block's positive mask from the ids, then :func:`pair_terms`."""
    positive = problem.text_ids[:, None] == problem.image_ids[None, start:stop]
    weight = None
    if problem.row_weight is not None:
        weight = problem.col_weight.to(dtype)[:, None] + problem.row_weight.to(dtype)[None, start:stop]
    loss, grad = pair_terms(logits, positive, weight)
    state.add_loss(loss.sum())
    return grad


class _Accumulators:
    """The running sums of one :func:`chunked_forward` call: the loss and, with ``x_grad_scaled = x s / norm``
    (None: no gradients), ``dX``, ``dY`` and the unnormalised ``ds``, ``db``."""

    def __init__(self, x: Tensor, y: Tensor, x_grad_scaled: Optional[Tensor]):
        self.x, self.y, self.x_grad_scaled = x, y, x_grad_scaled
        self.loss = self.d_scale = self.d_bias = self.d_text = None
        if x_grad_scaled is not None:
            self.d_image = torch.empty_like(x)

    def add_loss(self, block_sum: Tensor) -> None:
        self.loss = block_sum if self.loss is None else self.loss + block_sum

    def add_products(self, grad: Tensor, start: int, stop: int) -> None:
        """``grad [M, r] = dL/dl`` of images ``start:stop``: ``dX_r`` (unscaled), ``dY``, ``ds``, ``db``."""
        d_bias = grad.sum()
        grad_dot_text = torch.mm(grad.T, self.y, out=self.d_image[start:stop])  # [r, D]: sum_j dL/dl_ij y_j
        d_scale = torch.linalg.vecdot(grad_dot_text, self.x[start:stop]).sum()
        if self.d_text is None:
            self.d_text = torch.mm(grad, self.x_grad_scaled[start:stop])
            self.d_scale, self.d_bias = d_scale, d_bias
        else:
            self.d_text.addmm_(grad, self.x_grad_scaled[start:stop])
            self.d_scale, self.d_bias = self.d_scale + d_scale, self.d_bias + d_bias

    def result(self, inv_norm: float, scale: Tensor):
        loss = self.x.new_zeros(()) if self.loss is None else self.loss * inv_norm
        if self.x_grad_scaled is None:
            return loss, None, None, None, None
        if self.d_text is None:  # no image rows
            self.d_text = torch.zeros_like(self.y)
            self.d_scale = self.d_bias = self.x.new_zeros(())
        self.d_image.mul_(scale * inv_norm)
        return loss, self.d_image, self.d_text, self.d_scale * inv_norm, self.d_bias * inv_norm
