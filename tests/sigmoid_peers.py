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


def siglip_kernel_plus_on_cpu():
    """siglip-kernel's ``fused_siglip_plus`` module (its Triton kernel runs on CPU tensors under TRITON_INTERPRET=1),
    imported as a submodule of a stand-in package so that the package's ``__init__`` (which queries the GPU) does not
    run; its GPU-dependent block-size choices are replaced by the interpreter's 16 / 1 warp. None if not installed."""
    import importlib
    import sys
    import types

    folder = Path(sysconfig.get_paths()["purelib"]) / "siglip_kernel"
    if not (folder / "fused_siglip_plus.py").exists():
        return None
    name = "siglip_kernel_by_path"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    module = importlib.import_module(f"{name}.fused_siglip_plus")
    module._select_block_size = lambda n_text: 16
    module._select_num_warps = lambda block: 1
    return module
