"""The sigmoid (SigLIP) op: ``sum_ij w_ij * softplus(-z_ij * (s * x_i . y_j + b)) / n``, ``z = +1`` on positive
pairs and ``-1`` elsewhere, with gradients for both towers, ``s`` and ``b``.

No normalisation runs across a row, so a pair's gradient is known as soon as its logit is: every backend forms the
loss and all gradients in one forward pass and the backward only scales them by ``grad_output``.

* :mod:`~fastcl.ops.sigmoid.problem`: the record of one call and the row math every backend shares (the bottom);
* :mod:`~fastcl.ops.sigmoid.reference`: the dense formula (autograd through an ``N x M`` logits matrix);
* :mod:`~fastcl.ops.sigmoid.chunked`: row blocks of logits on any device, ``O(block x M)`` memory;
* :mod:`~fastcl.ops.sigmoid.triton`: the Triton kernels' glue (``fastcl.kernels.sigmoid_launch``);
* :mod:`~fastcl.ops.sigmoid.autograd`: the eager ``torch.autograd.Function`` (the custom op for ``torch.compile``
  lives in :mod:`fastcl.ops.custom_ops`);
* :mod:`~fastcl.ops.sigmoid.dispatch`: the one dispatch point (backend, ``normalize``).
"""
