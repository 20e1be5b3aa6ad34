"""The data movement of the cross-rank gather: ``torch.ops.fastcl.*`` when ``fastcl._C`` is built, PyTorch otherwise.

A gathered batch is made of W segments, one per rank, of ``counts[r]`` rows each (rows are whatever trails dim 0).
Ranks may hold different numbers of rows, so the collectives move a padded buffer of ``M >= max(counts)`` rows per
rank, and three row maps convert between the layouts:

* :func:`compact_segments`: padded ``[W * M, ...]`` (segment r in rows ``r*M .. r*M + counts[r]``) -> the global
  batch ``[sum(counts), ...]``, segments in rank order. Its gradient is :func:`pad_segments`.
* :func:`pad_segments`: ``[sum(counts), ...]`` -> ``[W * M, ...]`` with zero rows after each segment (the inverse,
  used for the gradient before the reduce-scatter). :func:`pack_rows` is the one-segment case: a rank's rows
  padded to the all-gather buffer's ``M`` rows.
* :func:`repeat_segments`: ``[sum(counts), ...]`` -> ``[V * sum(counts), ...]`` with each segment's rows repeated V
  times in a row: the labels (or sample ids) of the gathered view-major blocks ``[V * counts[r], D]``.

The compiled ops (``csrc/ops.cpp``, CPU; ``csrc/cuda/segments.cu``, CUDA) are declared with ``TORCH_LIBRARY``; this
module adds their fake (shape) functions and autograd formulas, so ``torch.compile`` traces through them.

Loading (on first use, never at import): ``FASTCL_NO_EXTENSION=1`` -> PyTorch only; else an ahead-of-time build
``fastcl._C`` (``FASTCL_BUILD_EXTENSION=1`` at install) when present; else the sources shipped in ``fastcl._csrc``
are compiled for the running torch with ``torch.utils.cpp_extension.load`` and ninja into :func:`cache_dir` (one
message on stderr while it compiles; later processes reuse the build). When no compiler is found, or the build
fails, every function here runs the same math in PyTorch (same results, bit for bit) and a one-time warning says
why.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys
import warnings
from typing import List, Optional, Sequence

import torch

__all__ = [
    "extension_available",
    "load_extension",
    "cache_dir",
    "compact_segments",
    "pad_segments",
    "pack_rows",
    "repeat_segments",
    "compact_segments_torch",
    "pad_segments_torch",
    "repeat_segments_torch",
]


def _source_dir() -> Optional[str]:
    """The folder of ``ops.cpp``: the installed ``fastcl._csrc`` package data, else a source checkout's ``csrc/``."""
    try:
        spec = importlib.util.find_spec("fastcl._csrc")
    except (ImportError, ValueError):
        spec = None
    candidates = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc"))
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "ops.cpp")):
            return folder
    return None


def cache_dir() -> str:
    """Where the run-time build goes: ``$FASTCL_EXTENSION_DIR`` (default ``~/.cache/fastcl``, honouring
    ``XDG_CACHE_HOME``), in a subfolder per torch version, CUDA version and Python version, since a build only loads
    with the torch it was compiled against."""
    root = os.environ.get("FASTCL_EXTENSION_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fastcl"
    )
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    key = f"torch{torch.__version__.replace('+', '-')}-{cuda}-py{sys.version_info[0]}{sys.version_info[1]}"
    return os.path.join(root, key)


def _compiler_problem(cuda: bool) -> Optional[str]:
    """Why the run-time build cannot run here (no C++ compiler, no ninja), or None."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension invokes
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (CXX={cxx!r} is not on PATH)"
    cc = os.environ.get("CC")
    if cc and shutil.which(cc) is None:
        return f"no C compiler found (CC={cc!r} is not on PATH)"
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


def _jit_build() -> None:
    """Compile ``csrc/`` for the running torch into :func:`cache_dir` (reused when up to date) and load it."""
    from torch.utils import cpp_extension

    folder = _source_dir()
    if folder is None:
        raise ImportError("the C++ sources (fastcl/_csrc/ops.cpp) are not installed")
    sources = sorted(glob.glob(os.path.join(folder, "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(folder, "cuda", "*.cu")))
    cuda = bool(
        cuda_sources
        and torch.version.cuda
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("FASTCL_NO_CUDA") != "1"
    )
    problem = _compiler_problem(cuda)
    if problem is not None:
        raise ImportError(problem)
    build_dir = cache_dir()
    os.makedirs(build_dir, exist_ok=True)
    library = os.path.join(build_dir, f"{_JIT_NAME}.so")
    all_sources = sources + (cuda_sources if cuda else []) + glob.glob(os.path.join(folder, "*.h"))
    fresh = os.path.exists(library) and os.path.getmtime(library) >= max(os.path.getmtime(s) for s in all_sources)
    if not fresh:  # a cached, up-to-date build loads without a word
        print(
            f"fastcl: compiling the gather ops (torch.ops.fastcl) for torch {torch.__version__}"
            f"{' with CUDA kernels' if cuda else ''} into {build_dir}; this happens once per torch version "
            "(FASTCL_NO_EXTENSION=1 skips it and uses the PyTorch fallback)",
            file=sys.stderr,
            flush=True,
        )
    flags = ["-O3", "-std=c++17"] + (["-DFASTCL_WITH_CUDA"] if cuda else [])
    cpp_extension.load(
        name=_JIT_NAME,
        sources=sources + (cuda_sources if cuda else []),
        extra_cflags=flags,
        extra_cuda_cflags=(["-O3", "-DFASTCL_WITH_CUDA"] if cuda else None),
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("FASTCL_VERBOSE_BUILD") == "1",
    )


def _load() -> Optional[str]:
    """Make ``torch.ops.fastcl.*`` available; the reason they are unusable, or None.

    In order: ``FASTCL_NO_EXTENSION=1`` (never), an ahead-of-time build (``fastcl._C``), the run-time build.
    """
    if os.environ.get("FASTCL_NO_EXTENSION") == "1":
        return "FASTCL_NO_EXTENSION=1"
    if "fastcl._C" in sys.modules and sys.modules["fastcl._C"] is None:  # Python's convention for a blocked import
        return "ImportError: import of fastcl._C halted; None in sys.modules"
    try:
        if not _own_ahead_of_time_build():
            raise ImportError("no ahead-of-time build beside this fastcl")
        from fastcl import _C  # noqa: F401  (an ahead-of-time build; loading it registers torch.ops.fastcl.*)
    except (ImportError, OSError):
        try:
            _jit_build()
        except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback, and say why
            return f"{type(err).__name__}: {_first_lines(str(err))}"
    if not hasattr(torch.ops.fastcl, "compact_segments"):
        return "the compiled library registered no torch.ops.fastcl ops"
    _register_python_parts()
    try:  # CUDA kernels: built only where torch had CUDA and nvcc was found
        if torch._C._dispatch_has_kernel_for_dispatch_key("fastcl::compact_segments", "CUDA"):
            _KERNEL_DEVICES.add("cuda")
    except RuntimeError:
        pass
    return None


def _own_ahead_of_time_build() -> bool:
    """Whether ``fastcl._C`` resolves to a library in this package's own folder (an ahead-of-time build of this
    install), not to one that another installation's import hook would supply."""
    try:
        spec = importlib.util.find_spec("fastcl._C")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    package_folder = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))  # fastcl/, where _C is built
    return os.path.dirname(os.path.realpath(spec.origin)) == package_folder


def _first_lines(text: str, n: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[:n]) + (" ..." if len(lines) > n else "")


_JIT_NAME = "fastcl_gather_ops"
_RESOLVED = False
_LOAD_ERROR: Optional[str] = None
_WARNED = False
_KERNEL_DEVICES = {"cpu", "meta"}  # device types the loaded library serves
_NO_KERNEL_WARNED = set()  # device types the library was built without, already reported


def _resolve() -> None:
    global _RESOLVED, _LOAD_ERROR
    if not _RESOLVED:
        _RESOLVED = True
        _LOAD_ERROR = _load()


def load_extension() -> bool:
    """Load (building on first use, for the running torch) the compiled gather ops; whether they are available.

    Called lazily by the gather functions; call it yourself before ``torch.compile`` so that the compiled graph
    uses the compiled ops (a first call while compiling keeps the PyTorch fallback for that graph).
    """
    _resolve()
    return _LOAD_ERROR is None


def extension_available() -> bool:
    """Whether the compiled ``torch.ops.fastcl`` ops are loaded (loading or building them first if needed)."""
    return load_extension()


def _use_extension(x: torch.Tensor) -> bool:
    """Whether the compiled op serves ``x``'s device; says once why not, otherwise (at an eager call: tracing
    reads only Python state, no warnings)."""
    global _WARNED
    compiling = torch.compiler.is_compiling()
    if not _RESOLVED:
        if compiling:
            return False  # no build while tracing: this graph keeps the PyTorch fallback (see load_extension)
        _resolve()
    if _LOAD_ERROR is not None:
        if not _WARNED and _LOAD_ERROR != "FASTCL_NO_EXTENSION=1" and not compiling:
            _WARNED = True
            warnings.warn(
                f"fastcl: the compiled extension fastcl._C is not available ({_LOAD_ERROR}); the cross-rank gather "
                "uses its pure-PyTorch fallback (same results). It is compiled on first use when a C++ compiler and "
                "ninja are present; FASTCL_NO_EXTENSION=1 silences this.",
                RuntimeWarning,
                stacklevel=3,
            )
        return False
    if x.device.type in _KERNEL_DEVICES:
        return True
    key = x.device.type.upper()
    if key not in _NO_KERNEL_WARNED and not compiling:
        _NO_KERNEL_WARNED.add(key)
        warnings.warn(
            f"fastcl: fastcl._C was built without {key} kernels (no nvcc or no CUDA torch at install time); the "
            f"cross-rank gather uses its pure-PyTorch fallback on {key} tensors (same results).",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _check_rows(x: torch.Tensor) -> None:
    if x.dim() < 1:
        raise RuntimeError(f"input must have at least 1 dimension, got shape {tuple(x.shape)}")


def _counts(counts: Sequence[int]) -> List[int]:
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 0:
        raise RuntimeError(f"counts must name at least one segment and be >= 0, got {counts}")
    return counts


# ----------------------------------------------------------------------------------------------------------------
# Pure PyTorch: the fallback, and the statement of what the compiled ops compute
# ----------------------------------------------------------------------------------------------------------------


def compact_segments_torch(padded: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    counts = _counts(counts)
    _check_rows(padded)
    n_segments = len(counts)
    if padded.shape[0] % n_segments:
        raise RuntimeError(f"padded rows ({tuple(padded.shape)}) must be a multiple of the {n_segments} segments")
    rows = padded.shape[0] // n_segments
    if max(counts) > rows:
        raise RuntimeError(f"counts {counts} exceed the {rows} padded rows per segment")
    return torch.cat([padded.narrow(0, r * rows, c) for r, c in enumerate(counts)])


def pad_segments_torch(rows: torch.Tensor, counts: Sequence[int], padded_rows: int) -> torch.Tensor:
    counts = _counts(counts)
    _check_rows(rows)
    if rows.shape[0] != sum(counts):
        raise RuntimeError(f"input has shape {tuple(rows.shape)} but counts {counts} sum to {sum(counts)}")
    if padded_rows < max(counts):
        raise RuntimeError(f"padded_rows ({padded_rows}) must be >= max(counts) = {max(counts)}")
    pieces = []
    for piece, c in zip(rows.split(counts), counts):
        pieces += [piece, rows.new_zeros((padded_rows - c, *rows.shape[1:]))]
    return torch.cat(pieces)


def repeat_segments_torch(values: torch.Tensor, counts: Sequence[int], repeats: int) -> torch.Tensor:
    counts = _counts(counts)
    _check_rows(values)
    if values.shape[0] != sum(counts):
        raise RuntimeError(f"input has shape {tuple(values.shape)} but counts {counts} sum to {sum(counts)}")
    if repeats < 1:
        raise RuntimeError(f"repeats must be >= 1, got {repeats}")
    ones = [1] * (values.dim() - 1)
    return torch.cat([piece.repeat(repeats, *ones) for piece in values.split(counts)])


# ----------------------------------------------------------------------------------------------------------------
# Public entry points: the compiled op when loaded, else the code above
# ----------------------------------------------------------------------------------------------------------------


def compact_segments(padded: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Padded all-gather buffer ``[W * M, ...]`` -> the global batch ``[sum(counts), ...]`` in rank order."""
    if _use_extension(padded):
        return torch.ops.fastcl.compact_segments(padded, [int(c) for c in counts])
    return compact_segments_torch(padded, counts)


def pad_segments(rows: torch.Tensor, counts: Sequence[int], padded_rows: int) -> torch.Tensor:
    """Global batch ``[sum(counts), ...]`` -> ``[W * padded_rows, ...]``, each segment followed by zero rows."""
    if _use_extension(rows):
        return torch.ops.fastcl.pad_segments(rows, [int(c) for c in counts], int(padded_rows))
    return pad_segments_torch(rows, counts, padded_rows)


def pack_rows(x: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """A rank's rows ``[n, ...]`` zero-padded to the all-gather buffer's ``[padded_rows, ...]``."""
    return pad_segments(x, [x.shape[0]], padded_rows)


def repeat_segments(values: torch.Tensor, counts: Sequence[int], repeats: int) -> torch.Tensor:
    """``[sum(counts), ...]`` -> ``[repeats * sum(counts), ...]``, each segment's rows repeated ``repeats`` times."""
    if _use_extension(values):
        return torch.ops.fastcl.repeat_segments(values, [int(c) for c in counts], int(repeats))
    return repeat_segments_torch(values, counts, repeats)


# ----------------------------------------------------------------------------------------------------------------
# Fake functions and autograd formulas of the compiled ops
# ----------------------------------------------------------------------------------------------------------------


def _register_python_parts() -> None:
    """Fake (shape) functions and autograd formulas of the compiled ops, once they are loaded."""

    @torch.library.register_fake("fastcl::compact_segments")
    def _compact_segments_fake(padded, counts):
        torch._check(len(counts) >= 1, lambda: "counts must name at least one segment")
        torch._check(padded.dim() >= 1, lambda: "padded must have at least 1 dimension")
        return padded.new_empty((sum(counts), *padded.shape[1:]))

    @torch.library.register_fake("fastcl::pad_segments")
    def _pad_segments_fake(rows, counts, padded_rows):
        torch._check(len(counts) >= 1, lambda: "counts must name at least one segment")
        torch._check(rows.dim() >= 1, lambda: "rows must have at least 1 dimension")
        return rows.new_empty((len(counts) * padded_rows, *rows.shape[1:]))

    @torch.library.register_fake("fastcl::repeat_segments")
    def _repeat_segments_fake(values, counts, repeats):
        torch._check(len(counts) >= 1, lambda: "counts must name at least one segment")
        torch._check(values.dim() >= 1, lambda: "values must have at least 1 dimension")
        return values.new_empty((repeats * values.shape[0], *values.shape[1:]))

    def _compact_setup(ctx, inputs, output):
        padded, counts = inputs
        ctx.counts = list(counts)
        ctx.padded_rows = padded.shape[0] // len(counts)

    def _compact_backward(ctx, grad):
        return torch.ops.fastcl.pad_segments(grad, ctx.counts, ctx.padded_rows), None

    def _pad_setup(ctx, inputs, output):
        ctx.counts = list(inputs[1])

    def _pad_backward(ctx, grad):
        return torch.ops.fastcl.compact_segments(grad, ctx.counts), None, None

    def _repeat_setup(ctx, inputs, output):
        ctx.counts, ctx.repeats = list(inputs[1]), inputs[2]

    def _repeat_backward(ctx, grad):
        # Segment r of the output is [repeats, counts[r], ...]: its gradient sums over the repeats.
        pieces = grad.split([ctx.repeats * c for c in ctx.counts])
        summed = [p.reshape(ctx.repeats, c, *grad.shape[1:]).sum(0) for p, c in zip(pieces, ctx.counts)]
        return torch.cat(summed), None, None

    torch.library.register_autograd("fastcl::compact_segments", _compact_backward, setup_context=_compact_setup)
    torch.library.register_autograd("fastcl::pad_segments", _pad_backward, setup_context=_pad_setup)
    torch.library.register_autograd("fastcl::repeat_segments", _repeat_backward, setup_context=_repeat_setup)
