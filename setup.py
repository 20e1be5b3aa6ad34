"""Build script.

Packages ``fastcl`` and maps the top-level ``kernels/`` folder to the ``fastcl.kernels`` subpackage, so the
installed distribution adds no generic ``kernels`` name to users' environments. When ``csrc/`` holds C++/CUDA
sources they are built as the optional ``fastcl._C`` extension; the losses work without it.
"""

import glob
import os

from setuptools import setup

PACKAGES = ["fastcl", "fastcl.kernels", "fastcl.examples", "fastcl.train"]
PACKAGE_DIR = {"fastcl": "fastcl", "fastcl.kernels": "kernels"}


def _extensions():
    """The optional compiled extension: ``csrc/*.cpp`` always, ``csrc/cuda/*.cu`` where torch has CUDA and nvcc."""
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp_sources or os.environ.get("FASTCL_NO_EXTENSION") == "1":
        return [], {}
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and os.environ.get("FASTCL_NO_CUDA") != "1"
    if use_cuda:
        ext = cpp_extension.CUDAExtension("fastcl._C", cpp_sources + cuda_sources, define_macros=[("FASTCL_WITH_CUDA", None)])
    else:
        ext = cpp_extension.CppExtension("fastcl._C", cpp_sources)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
