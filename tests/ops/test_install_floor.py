"""The install floor: ``triton_available()`` means "the kernels import"; a Triton the kernels cannot run on sends
``backend='auto'`` to the chunked path with one warning saying why, and an explicit ``backend='triton'`` raises."""

import sys
import types
import warnings

import pytest
import torch

from fastcl.ops import dispatch
from fastcl.ops import triton as triton_backend

pytest.importorskip("triton")


@pytest.fixture
def fresh_status(monkeypatch):
    """A status decided afresh in the test (the process's own is restored afterwards)."""
    monkeypatch.setattr(triton_backend, "_status", [])  # decided afresh here, the real one restored afterwards
    monkeypatch.setattr(dispatch, "_warned_fallback", [])


def _cuda_like():
    return types.SimpleNamespace(is_cuda=True, dtype=torch.float16)


def test_kernels_import_with_the_installed_triton(fresh_status):
    assert triton_backend.kernels_status() == (True, "")
    assert dispatch.triton_available()


def test_kernel_import_failure_falls_back_with_one_warning(fresh_status, monkeypatch):
    # a Triton whose jit() lacks a keyword the kernels pass (3.0 / 3.1: do_not_specialize_on_alignment)
    import triton

    real_jit = triton.jit

    def old_jit(fn=None, **kwargs):
        if "do_not_specialize_on_alignment" in kwargs:
            raise TypeError("jit() got an unexpected keyword argument 'do_not_specialize_on_alignment'")
        return real_jit(fn, **kwargs) if fn is not None else real_jit(**kwargs)

    monkeypatch.setattr(triton, "jit", old_jit)
    for name in ("fastcl.kernels.jit", "fastcl.kernels.launch"):  # imported afresh, restored afterwards
        monkeypatch.delitem(sys.modules, name, raising=False)
    ok, why = triton_backend.kernels_status()
    assert not ok
    assert why == (
        f"the fastcl Triton kernels do not import with triton {triton.__version__}: TypeError: jit() got an "
        "unexpected keyword argument 'do_not_specialize_on_alignment'"
    )
    assert not dispatch.triton_available()
    with pytest.warns(RuntimeWarning, match="uses 'chunked' on CUDA: the fastcl Triton kernels do not import"):
        assert dispatch.resolve_backend("auto", _cuda_like()) == "chunked"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        assert dispatch.resolve_backend("auto", _cuda_like()) == "chunked"
        assert dispatch.resolve_backend("auto", torch.zeros(2, 2)) == "chunked"  # CPU: no warning
    assert dispatch.resolve_backend("triton", _cuda_like()) == "triton"  # explicit: checked at the call
    x = torch.randn(8, 4)
    labels = torch.arange(8) % 2
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable: the fastcl Triton kernels do not"):
        dispatch.contrastive_loss(
            x, x, labels, labels, None, self_offset=0, temperature=0.1, scale=1.0, backend="triton"
        )


def test_too_old_triton_is_reported_by_version(fresh_status, monkeypatch):
    import triton

    monkeypatch.setattr(triton, "__version__", "3.1.0")
    ok, why = triton_backend.kernels_status()
    assert not ok and why == "triton 3.1.0 is older than 3.3, the oldest the fastcl kernels run on"
    with pytest.warns(RuntimeWarning, match="triton 3.1.0 is older than 3.3"):
        assert dispatch.resolve_backend("auto", _cuda_like()) == "chunked"


def test_missing_triton_is_reported(fresh_status, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    ok, why = triton_backend.kernels_status()
    assert not ok and why.startswith("the triton package is not importable")


@pytest.mark.parametrize("version, expected", [("3.3.0", (3, 3)), ("3.10.1+git1234", (3, 10)), ("3.2", (3, 2))])
def test_version_parsing(version, expected):
    assert triton_backend._version_tuple(version) == expected
