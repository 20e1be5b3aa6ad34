"""Installs the way users install: sdist and wheel built from a clean clone with build isolation, each installed into a
fresh virtual environment; the gather ops compiled on first use and cached; the fallback without a compiler.

Slow (a few minutes: isolated builds fetch setuptools, one C++ build) and needs the network for setuptools, so it
runs only with ``FASTCL_TEST_INSTALL=1`` (``.ci/run`` runs it once)::

    FASTCL_TEST_INSTALL=1 python -m pytest tests/test_install.py -q

The fresh environments are created with ``--system-site-packages`` so they find the torch already installed (as a
user's environment would) instead of downloading one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.install,
    pytest.mark.skipif(
        os.environ.get("FASTCL_TEST_INSTALL") != "1", reason="slow install checks: set FASTCL_TEST_INSTALL=1"
    ),
]

# Runs in the fresh environment, from a folder that is not the source tree: import, one loss forward and backward
# on each path, and where the package and the compiled ops came from.
PROBE = r"""
import json, os, sys, warnings
import torch
import fastcl
from fastcl import _extension
torch.manual_seed(0)
features = torch.nn.functional.normalize(torch.randn(6, 2, 8), dim=-1).requires_grad_()
loss = fastcl.SupConLoss(temperature=0.1)(features, torch.tensor([0, 1, 0, 1, 2, 2]))
loss.backward()
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    available = _extension.load_extension()
    gathered = _extension.compact_segments(torch.arange(9.0), [2, 0, 3])
print(json.dumps({
    "fastcl": fastcl.__file__,
    "loss": loss.item(),
    "grad_finite": bool(features.grad.isfinite().all()),
    "available": available,
    "error": _extension._LOAD_ERROR,
    "gathered": gathered.tolist(),
    "warnings": [str(w.message) for w in seen],
    "cache": _extension.cache_dir(),
}))
"""


def _run(cmd, cwd, env=None, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    command = " ".join(map(str, cmd))
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env(**extra):
    dropped = ("PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTCL_") and k not in dropped}
    env.update(extra)
    return env


def _venv(path):
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], cwd=str(path.parent))
    return str(path / "bin" / "python")


def _probe(python, workdir, **env):
    import json

    result = _run([python, "-c", PROBE], cwd=str(workdir), env=_clean_env(**env))
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """``(sdist, wheel, clone)``: ``python -m build`` (isolated) on a clean clone; the wheel is built from the sdist."""
    pytest.importorskip("build", reason="python -m build is needed (pip install build)")
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")) and not os.path.isfile(
        os.path.join(REPO, ".git")
    ):
        pytest.skip("needs git and a git checkout")
    root = tmp_path_factory.mktemp("install")
    clone = root / "clone"
    _run(["git", "clone", "--quiet", REPO, str(clone)], cwd=str(root))
    # build isolation on (the default): the isolated build environment has setuptools only, no torch, no compiler use
    _run([sys.executable, "-m", "build", "--outdir", str(root / "dist"), str(clone)], cwd=str(root), env=_clean_env())
    sdist = next((root / "dist").glob("fastcl-*.tar.gz"))
    wheel = next((root / "dist").glob("fastcl-*.whl"))
    return sdist, wheel, clone


def test_wheel_is_pure_python_and_carries_the_sources(dists):
    _, wheel, _ = dists
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # no ABI tag: not tied to one torch or Python
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "fastcl/_csrc/ops.cpp",
        "fastcl/_csrc/segments.h",
        "fastcl/_csrc/cuda/segments.cu",
        "fastcl/kernels/jit.py",
        "fastcl/kernels/launch.py",
        "fastcl/kernels/tiling.py",
        "fastcl/ops/dispatch.py",
        "fastcl/ops/chunked/passes.py",
        "fastcl/_extension.py",
        "fastcl/models/heads.py",
        "fastcl/evaluation/lle.py",
        "fastcl/train/checkpoint.py",
        "fastcl/train/data/loader.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    assert not [n for n in names if n.startswith("kernels/")]  # no generic top-level name
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Dist: torch>=2.4" in metadata


def test_sdist_is_complete(dists):
    sdist, _, _ = dists
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for needed in ("csrc/ops.cpp", "csrc/segments.h", "csrc/cuda/segments.cu", "csrc/check_cuda_build.py",
                   "kernels/jit.py", "kernels/launch.py", "kernels/tiling.py", "setup.py", "pyproject.toml",
                   "README.md"):  # fmt: skip
        assert needed in names, needed


def test_sdist_installs_with_isolation_and_builds_the_ops_once(dists, tmp_path):
    """Fresh venv, ``pip install fastcl-*.tar.gz`` (isolated build); the first use compiles, the second reuses."""
    sdist, _, _ = dists
    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--quiet", str(sdist)], cwd=str(tmp_path), env=_clean_env())
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    cache = tmp_path / "ext-cache"
    first, stderr = _probe(python, workdir, FASTCL_EXTENSION_DIR=str(cache))
    assert first["fastcl"].startswith(str(tmp_path / "venv")), first["fastcl"]  # the installed copy, not the clone
    assert first["grad_finite"] and first["loss"] > 0
    assert first["available"], first["error"]
    assert first["gathered"] == [0.0, 1.0, 6.0, 7.0, 8.0] and first["warnings"] == []
    assert stderr.count("fastcl: compiling the gather ops") == 1, stderr  # one clear message while compiling
    assert first["cache"].startswith(str(cache)) and "torch" in os.path.basename(first["cache"])
    built = [f for f in os.listdir(first["cache"]) if f.endswith(".so")]
    assert built, os.listdir(first["cache"])
    stamp = os.path.getmtime(os.path.join(first["cache"], built[0]))

    start = time.perf_counter()
    second, stderr = _probe(python, workdir, FASTCL_EXTENSION_DIR=str(cache))
    assert second["available"] and "compiling" not in stderr, stderr  # reused: no message, no rebuild
    assert os.path.getmtime(os.path.join(first["cache"], built[0])) == stamp
    assert second["loss"] == first["loss"]
    assert time.perf_counter() - start < 60


def test_wheel_installs_and_falls_back_without_a_compiler(dists, tmp_path):
    """Fresh venv, ``pip install fastcl-*.whl``; with CC/CXX pointing at no compiler: PyTorch fallback, one warning."""
    _, wheel, _ = dists
    python = _venv(tmp_path / "venv")
    _run([python, "-m", "pip", "install", "--quiet", str(wheel)], cwd=str(tmp_path), env=_clean_env())
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    missing = str(tmp_path / "no-such-compiler")
    result, stderr = _probe(
        python, workdir, FASTCL_EXTENSION_DIR=str(tmp_path / "ext-cache"), CC=missing + "/cc", CXX=missing + "/c++"
    )
    assert result["fastcl"].startswith(str(tmp_path / "venv")), result["fastcl"]
    assert result["grad_finite"] and result["loss"] > 0
    assert not result["available"] and "no C++ compiler" in result["error"], result["error"]
    assert result["gathered"] == [0.0, 1.0, 6.0, 7.0, 8.0]  # same result from the fallback
    assert len(result["warnings"]) == 1 and "pure-PyTorch fallback" in result["warnings"][0], result["warnings"]
    assert "compiling" not in stderr
    assert not os.path.exists(os.path.join(result["cache"], "fastcl_gather_ops.so"))

    # FASTCL_NO_EXTENSION=1: the fallback without compiling or warning
    quiet, _ = _probe(python, workdir, FASTCL_NO_EXTENSION="1", FASTCL_EXTENSION_DIR=str(tmp_path / "ext-2"))
    assert not quiet["available"] and quiet["warnings"] == [] and quiet["loss"] == result["loss"]


def test_ahead_of_time_build(dists, tmp_path):
    """``FASTCL_BUILD_EXTENSION=1 pip install --no-build-isolation``: fastcl._C is built at install and used as is."""
    _, _, clone = dists
    python = _venv(tmp_path / "venv")
    # without isolation the build requirements are the user's to install (a 3.11 venv ships setuptools 65 only)
    _run([python, "-m", "pip", "install", "--quiet", "setuptools>=64", "wheel"], cwd=str(tmp_path), env=_clean_env())
    _run(
        [python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", str(clone)],
        cwd=str(tmp_path),
        env=_clean_env(FASTCL_BUILD_EXTENSION="1", FASTCL_NO_CUDA="1"),
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    cache = tmp_path / "ext-cache"
    result, stderr = _probe(python, workdir, FASTCL_EXTENSION_DIR=str(cache))
    assert result["available"] and "compiling" not in stderr, stderr
    assert not cache.exists()  # nothing compiled at run time
    code = "import fastcl._C, os; print(os.path.basename(fastcl._C.__file__))"
    out = _run([python, "-c", code], cwd=str(workdir), env=_clean_env()).stdout
    assert out.startswith("_C.") and out.strip().endswith(".so")
