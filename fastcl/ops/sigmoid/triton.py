"""The sigmoid op's Triton backend: input checks, precision, and the launcher call behind ``fastcl::sigmoid_loss``.

The kernels and their launcher are :mod:`fastcl.kernels.sigmoid_jit` and :mod:`fastcl.kernels.sigmoid_launch`,
imported on first use (a machine without Triton still imports this module).
"""

from __future__ import annotations

import os

import torch

from fastcl.ops.sigmoid.problem import SigmoidProblem

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_status = []  # (ok, why), decided once per process


def kernels_status() -> tuple:
    """``(True, "")`` when the sigmoid kernels import, else ``(False, why)``."""
    if not _status:
        try:
            import fastcl.kernels.sigmoid_launch  # noqa: F401

            _status.append((True, ""))
        except Exception as exc:  # no triton, or one too old to build the kernels
            _status.append((False, f"the fastcl sigmoid Triton kernels do not import: {type(exc).__name__}: {exc}"))
    return _status[0]


def available() -> bool:
    return kernels_status()[0]


def check_inputs(problem: SigmoidProblem) -> None:
    """Raise ValueError / TypeError / RuntimeError for inputs the kernels cannot take."""
    ok, why = kernels_status()
    if not ok:
        raise RuntimeError(f"backend='triton': {why}")
    if problem.text.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes float32, float16 or bfloat16 features, got {problem.text.dtype}")
    if not problem.text.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def input_precision(dtype: torch.dtype) -> str:
    """The dots' input precision, as the softmax kernels choose it (``tf32x3`` for fp32 unless TF32 is allowed)."""
    from fastcl.kernels.launch import input_precision_for

    return input_precision_for(dtype)


def forward(problem: SigmoidProblem, precision: str, want_grad: bool):
    """``(loss, dX, dY, ds, db)`` (fp32; gradients None without ``want_grad``) from the kernels."""
    from fastcl.kernels.sigmoid_launch import sigmoid_forward

    return sigmoid_forward(problem, precision, want_grad)
