"""The peers the sigmoid loss is checked against, loaded by file path (their packages do not import here:
open_clip needs torchvision, siglip_kernel asserts a GPU). None where a package is not installed."""

from __future__ import annotations

import importlib.util
import sysconfig
from pathlib import Path


def _load(relative: str, name: str):
    path = Path(sysconfig.get_paths()["purelib"]) / relative
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def open_clip_loss():
    """``open_clip/loss.py`` (torch only) or None."""
    return _load("open_clip/loss.py", "open_clip_loss_by_path")


def siglip_kernel_reference():
    """``siglip_kernel/reference.py`` (torch only) or None."""
    return _load("siglip_kernel/reference.py", "siglip_kernel_reference_by_path")
