"""The one contrastive op every fused loss reduces to, with its backends side by side.

Anchors ``A [Na, D]`` are scored against a contrast set ``C [Nc, D]`` with logits ``s_ij = a_i . c_j / t``.
Positive weights ``w_ij`` come either from labels compared on the fly (``w_ij = [anchor_labels[i] ==
contrast_labels[j]]``) or from a ``[B, B]`` mask read at ``mask[i % B, j % B]``. With an integer
``self_offset`` anchor i is contrast row ``i + self_offset`` and that pair is dropped from numerator and
denominator (``None``: no self pairs, as in two-tower InfoNCE). Rank-local anchors against a gathered global
contrast set use the rank's row offset.
Per anchor, with ``W_i = sum_j w_ij`` and ``P_i = W_i`` (or 1 when ``W_i < 1e-6``)::

    loss_i = -scale / P_i * (sum_j w_ij s_ij - W_i * logsumexp_j s_ij)

and the op returns ``mean_i loss_i``. Its gradient with respect to the logits is
``dL/ds_ij = scale / (Na P_i) * (W_i softmax_ij - w_ij)``. The backends form the row statistics
``(pos_logit_sum, pos_weight, lse)``; the loss and the gradient coefficients come from the shared row math.

Modules, top to bottom (each imports only those below it):

- :mod:`.dispatch`: :func:`~fastcl.ops.dispatch.contrastive_loss`, the one dispatch point;
- :mod:`.custom_ops`: the ``torch.library`` custom ops (one node for ``torch.compile``) and their autograd;
- the backends: :mod:`.chunked` (blockwise PyTorch, with its eager autograd), :mod:`.triton` (the fused kernels of
  :mod:`fastcl.kernels`), and :mod:`.reference` (dense, float64-capable: the ground truth);
- :mod:`.problem`: the :class:`~fastcl.ops.problem.Problem` record and the row math every backend shares.
"""
