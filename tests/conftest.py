"""Test configuration: run the Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is imported, so it is decided here from the environment only.
"""

import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest
import torch

from fastcl.ops.dispatch import triton_available

TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not TRITON_ON_CPU else "cpu"


def triton_usable() -> bool:
    return triton_available() and (torch.cuda.is_available() or TRITON_ON_CPU)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="Triton backend needs a CUDA GPU or TRITON_INTERPRET=1 with triton installed")
    if not triton_usable():
        for item in items:
            if "triton" in item.keywords:
                item.add_marker(skip)
