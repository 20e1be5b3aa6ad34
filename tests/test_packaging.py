"""Packaging: kernels/ installs as fastcl.kernels, no generic top-level name, and importing is cheap."""

import os
import subprocess
import sys
import tempfile


def _run(code: str) -> str:
    with tempfile.TemporaryDirectory() as cwd:  # away from the source tree, so sys.path[0] is not the repo
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=True
        ).stdout.strip()


def test_kernels_is_a_fastcl_subpackage_only():
    out = _run(
        "import importlib.util, fastcl.kernels, os;"
        "print(importlib.util.find_spec('kernels') is None, os.path.basename(os.path.dirname(fastcl.kernels.__file__)))"
    )
    found_top_level, folder = out.split()
    assert found_top_level == "True"
    assert folder == "kernels"


def test_import_does_not_import_triton():
    assert _run("import sys, fastcl; print('triton' in sys.modules)") == "False"
