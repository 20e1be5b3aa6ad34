"""Build script: a pure-Python distribution by default.

Packages ``fastcl``, maps the top-level ``kernels/`` folder to ``fastcl.kernels`` (so the installed distribution adds
no generic ``kernels`` name to users' environments) and ships the C++/CUDA sources of the gather ops (``csrc/``) as
package data of ``fastcl._csrc``. Nothing here imports torch or needs a compiler: the wheel installs wherever torch
is installed, under build isolation, and is never tied to one torch ABI. The gather ops are compiled on first use,
for the running torch, by :mod:`fastcl._extension` (``torch.utils.cpp_extension.load``, cached).

Ahead-of-time build (opt-in, for clusters that forbid compiling at run time)::

    FASTCL_BUILD_EXTENSION=1 pip install --no-build-isolation .

compiles ``fastcl._C`` here against the torch of the build environment (hence ``--no-build-isolation``); such a
build only loads with that torch. ``FASTCL_NO_CUDA=1`` leaves the CUDA kernels out of it.
"""

import glob
import os

from setuptools import find_packages, setup

# every package under fastcl/, plus the two folders mapped into it (kernels/ -> fastcl.kernels, csrc/ -> fastcl._csrc)
PACKAGES = sorted(set(find_packages(include=["fastcl", "fastcl.*"])) | {"fastcl.kernels", "fastcl._csrc"})
PACKAGE_DIR = {"fastcl": "fastcl", "fastcl.kernels": "kernels", "fastcl._csrc": "csrc"}
PACKAGE_DATA = {"fastcl._csrc": ["*.cpp", "*.h", "cuda/*.cu"]}


def _ahead_of_time_extension():
    """``fastcl._C`` when ``FASTCL_BUILD_EXTENSION=1``: ``csrc/*.cpp``, plus ``csrc/cuda/*.cu`` where torch has CUDA."""
    if os.environ.get("FASTCL_BUILD_EXTENSION") != "1":
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        raise SystemExit(
            "FASTCL_BUILD_EXTENSION=1 compiles fastcl._C against the installed torch, but torch is not importable in "
            "the build environment: install with `pip install --no-build-isolation .` (torch installed first), or "
            "drop FASTCL_BUILD_EXTENSION to get the pure-Python wheel (the ops then compile on first use)."
        ) from None
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and os.environ.get("FASTCL_NO_CUDA") != "1"
    if use_cuda:
        macros = [("FASTCL_WITH_CUDA", None)]
        ext = cpp_extension.CUDAExtension("fastcl._C", cpp_sources + cuda_sources, define_macros=macros)
    else:
        ext = cpp_extension.CppExtension("fastcl._C", cpp_sources)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _ahead_of_time_extension()
setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data=PACKAGE_DATA,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
