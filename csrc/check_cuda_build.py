"""Compile the CUDA sources of fastcl._C with nvcc for sm_80 and sm_90, without a GPU; exit 1 if any fails.

    python csrc/check_cuda_build.py [--arch 80 --arch 90] [--nvcc PATH] [--keep DIR]

Each ``csrc/cuda/*.cu`` is compiled (one nvcc call, one cubin per arch) to an object file against the headers of
the installed torch (a CPU wheel ships the c10/ATen core headers the .cu uses), with the flags torch's own
extension builder would pass, so a compile error in the CUDA kernels shows up on a CPU-only CI machine;
``cuobjdump`` (when found beside nvcc) then confirms the object holds code for every arch. Nothing is linked or
run.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


def _command(nvcc: str, source: str, archs: list, obj: str) -> list:
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [
        nvcc,
        "-c",
        source,
        "-o",
        obj,
        *includes,
        *[f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs],
        "-std=c++17",
        "-O2",
        "--expt-relaxed-constexpr",
        "-Xcompiler",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DFASTCL_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", action="append", help="SM versions (default: 80 and 90)")
    parser.add_argument("--nvcc", help="nvcc to use (default: $CUDA_HOME/bin/nvcc, then PATH)")
    parser.add_argument("--keep", help="write the object files here instead of a temporary folder")
    args = parser.parse_args(argv)
    archs = args.arch or ["80", "90"]
    sources = sorted(glob.glob(os.path.join(HERE, "cuda", "*.cu")))
    nvcc = _find_nvcc(args.nvcc)
    if not sources:
        print("no csrc/cuda/*.cu sources")
        return 1
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 1
    out_dir = args.keep or tempfile.mkdtemp(prefix="fastcl_nvcc_")
    os.makedirs(out_dir, exist_ok=True)
    failed = 0
    cuobjdump = os.path.join(os.path.dirname(os.path.realpath(shutil.which(nvcc) or nvcc)), "cuobjdump")
    try:
        for source in sources:
            # One nvcc call for all archs: the host side (torch's headers, most of the time) is compiled once.
            obj = os.path.join(out_dir, os.path.splitext(os.path.basename(source))[0] + ".o")
            name = os.path.relpath(source, os.path.dirname(HERE))
            start = time.perf_counter()
            result = subprocess.run(_command(nvcc, source, archs, obj), capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if result.returncode != 0 or not os.path.exists(obj):
                failed += 1
                print(f"FAIL  {name} (exit {result.returncode})\n{result.stdout}{result.stderr}")
                continue
            found, note = archs, " (no cuobjdump beside nvcc: archs not listed back)"
            if os.path.exists(cuobjdump):  # check that the object really holds code for every arch
                note = ""
                listing = subprocess.run([cuobjdump, "--list-elf", obj], capture_output=True, text=True).stdout
                found = [arch for arch in archs if f"sm_{arch}" in listing]
            missing = sorted(set(archs) - set(found))
            if missing:
                failed += 1
                print(f"FAIL  {name}: no code for sm_{', sm_'.join(missing)} in the object file")
            else:
                print(f"ok    {name} sm_{', sm_'.join(archs)} ({os.path.getsize(obj)} bytes, {seconds:.1f} s){note}")
    finally:
        if not args.keep:
            shutil.rmtree(out_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
