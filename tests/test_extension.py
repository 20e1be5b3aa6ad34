"""The gather ops of fastcl._C (torch.ops.fastcl.*) against their pure-PyTorch statement in fastcl._extension."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fastcl import _extension

needs_extension = pytest.mark.skipif(not _extension.extension_available(), reason="fastcl._C is not built")


def _cuda_kernels() -> bool:
    return (
        _extension.extension_available()
        and torch.cuda.is_available()
        and torch._C._dispatch_has_kernel_for_dispatch_key("fastcl::compact_segments", "CUDA")
    )


DEVICES = ["cpu"] + (["cuda"] if _cuda_kernels() else [])

# (counts per segment, padded rows per segment): uneven, empty segments, one segment, all empty
LAYOUTS = [([2, 0, 3], 4), ([5], 5), ([0, 0], 1), ([1, 4, 4, 2], 4), ([0, 3], 3)]
# trailing shapes x dtypes: row sizes of 1, 2, 3, 5, 8, 16, ... bytes, so every copy width is exercised
ROWS = [
    ((3,), torch.float32),
    ((4, 2), torch.float64),
    ((5,), torch.float16),
    ((7,), torch.bfloat16),
    ((1,), torch.int64),
    ((3,), torch.uint8),
    ((2, 3), torch.bool),
    ((), torch.int32),
]


def _values(n, trailing, dtype):
    if dtype == torch.bool:
        return torch.rand(n, *trailing) > 0.5
    if dtype.is_floating_point:
        return torch.randn(n, *trailing).to(dtype)
    return torch.randint(0, 100, (n, *trailing)).to(dtype)


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counts,padded_rows", LAYOUTS)
@pytest.mark.parametrize("trailing,dtype", ROWS)
def test_compiled_ops_equal_the_pytorch_statement(counts, padded_rows, trailing, dtype, device):
    rows = _values(sum(counts), trailing, dtype).to(device)
    padded = torch.ops.fastcl.pad_segments(rows, counts, padded_rows)
    assert torch.equal(padded, _extension.pad_segments_torch(rows, counts, padded_rows))
    assert padded.shape == (len(counts) * padded_rows, *trailing)
    back = torch.ops.fastcl.compact_segments(padded, counts)
    assert torch.equal(back, rows)  # compact inverts pad
    garbage = _values(len(counts) * padded_rows, trailing, dtype).to(device)  # padding rows hold anything
    assert torch.equal(torch.ops.fastcl.compact_segments(garbage, counts), _extension.compact_segments_torch(garbage, counts))
    for repeats in (1, 3):
        ours = torch.ops.fastcl.repeat_segments(rows, counts, repeats)
        assert torch.equal(ours, _extension.repeat_segments_torch(rows, counts, repeats))


def test_pytorch_statement_by_hand():
    rows = torch.arange(5)
    assert _extension.pad_segments_torch(rows, [2, 0, 3], 3).tolist() == [0, 1, 0, 0, 0, 0, 2, 3, 4]
    assert _extension.compact_segments_torch(torch.arange(9), [2, 0, 3]).tolist() == [0, 1, 6, 7, 8]
    assert _extension.repeat_segments_torch(rows, [2, 0, 3], 2).tolist() == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4]


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_offset_input(device):
    padded = torch.randn(4, 6, device=device)[:, ::2]  # [4, 3], strided
    assert torch.equal(torch.ops.fastcl.compact_segments(padded, [1, 2]), _extension.compact_segments_torch(padded, [1, 2]))
    padded = torch.randn(9, 4, device=device)[1:]  # a storage offset of 16 bytes: narrower copy words
    assert torch.equal(torch.ops.fastcl.compact_segments(padded, [1, 2]), _extension.compact_segments_torch(padded, [1, 2]))


@needs_extension
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "op,args",
    [
        ("compact_segments", lambda: (torch.randn(9, 3, dtype=torch.float64, requires_grad=True), [2, 0, 3])),
        ("pad_segments", lambda: (torch.randn(5, 2, dtype=torch.float64, requires_grad=True), [2, 0, 3], 4)),
        ("repeat_segments", lambda: (torch.randn(5, 2, dtype=torch.float64, requires_grad=True), [2, 0, 3], 3)),
        ("repeat_segments", lambda: (torch.arange(5), [2, 0, 3], 2)),
    ],
    ids=["compact", "pad", "repeat", "repeat-int64"],
)
def test_opcheck(op, args, device):
    inputs = [a.to(device).detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in args()]
    torch.library.opcheck(getattr(torch.ops.fastcl, op), tuple(inputs))


@pytest.mark.parametrize("use_extension", [True, False], ids=["compiled", "fallback"])
def test_gradients(use_extension, monkeypatch):
    if use_extension and not _extension.extension_available():
        pytest.skip("fastcl._C is not built")
    if not use_extension:
        monkeypatch.setattr(_extension, "_LOAD_ERROR", "forced by the test")
        monkeypatch.setattr(_extension, "_WARNED", True)
    x = torch.randn(9, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _extension.compact_segments(t, [2, 0, 3]), (x,))
    y = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: _extension.pad_segments(t, [2, 0, 3], 4), (y,))
    torch.autograd.gradcheck(lambda t: _extension.repeat_segments(t, [2, 0, 3], 3), (y,))


@needs_extension
def test_torch_compile_traces_the_ops():
    def step(x):
        padded = _extension.pad_segments(x * 2, [2, 0, 3], 4)
        return _extension.compact_segments(padded, [2, 0, 3]).sum() + _extension.repeat_segments(x, [2, 0, 3], 2).sum()

    x = torch.randn(5, 3, requires_grad=True)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.backward()
    assert torch.allclose(out, step(x.detach()))
    assert torch.allclose(x.grad, torch.full_like(x, 4.0))


def test_torch_compile_with_the_extension_unavailable(monkeypatch):
    """fullgraph tracing where the compiled ops failed to load and their one-time warning is still due (after
    load_extension(), as before torch.compile): the graph runs the PyTorch fallback, the next eager call warns."""
    monkeypatch.setattr(_extension, "_RESOLVED", True)
    monkeypatch.setattr(_extension, "_LOAD_ERROR", "ImportError: no C++ compiler found")
    monkeypatch.setattr(_extension, "_WARNED", False)

    def step(x):
        padded = _extension.pad_segments(x, [2, 0, 3], 3)
        return padded, _extension.compact_segments(padded, [2, 0, 3]), _extension.repeat_segments(x, [2, 0, 3], 2)

    x = torch.arange(5.0).reshape(5, 1)
    torch._dynamo.reset()
    padded, compact, repeated = torch.compile(step, backend="eager", fullgraph=True)(x)
    assert padded.flatten().tolist() == [0, 1, 0, 0, 0, 0, 2, 3, 4]
    assert compact.flatten().tolist() == [0, 1, 2, 3, 4]
    assert repeated.flatten().tolist() == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match="fastcl._C is not available"):
        _extension.compact_segments(padded, [2, 0, 3])


@needs_extension
def test_torch_compile_on_a_device_without_kernels(monkeypatch):
    """A device type the library has no kernels for (CUDA in a CPU-only build; here the CPU, by the table the
    loader fills): traced, the PyTorch fallback without a warning; the next eager call warns once."""
    monkeypatch.setattr(_extension, "_KERNEL_DEVICES", {"meta"})
    monkeypatch.setattr(_extension, "_NO_KERNEL_WARNED", set())
    x = torch.arange(5.0).reshape(5, 1)
    torch._dynamo.reset()
    padded = torch.compile(lambda t: _extension.pad_segments(t, [2, 0, 3], 3), backend="eager", fullgraph=True)(x)
    assert padded.flatten().tolist() == [0, 1, 0, 0, 0, 0, 2, 3, 4]
    with pytest.warns(RuntimeWarning, match="built without CPU kernels"):
        assert _extension.repeat_segments(x, [2, 0, 3], 2).flatten().tolist() == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4]


@needs_extension
def test_errors_name_the_shapes():
    with pytest.raises(RuntimeError, match=r"counts \[2, 0, 3\] exceed the 2 padded rows"):
        torch.ops.fastcl.compact_segments(torch.randn(6, 2), [2, 0, 3])
    with pytest.raises(RuntimeError, match="sum to 5"):
        torch.ops.fastcl.pad_segments(torch.randn(4, 2), [2, 0, 3], 3)
    with pytest.raises(RuntimeError, match=r"padded_rows \(2\) must be >= max\(counts\) = 3"):
        torch.ops.fastcl.pad_segments(torch.randn(5, 2), [2, 0, 3], 2)


@pytest.mark.parametrize("use_extension", [True, False], ids=["compiled", "fallback"])
@pytest.mark.parametrize(
    "op,args",
    [("compact_segments", ([1],)), ("pad_segments", ([1], 1)), ("repeat_segments", ([1], 2))],
    ids=["compact", "pad", "repeat"],
)
def test_zero_dim_input_is_named(op, args, use_extension):
    if use_extension and not _extension.extension_available():
        pytest.skip("fastcl._C is not built")
    fn = getattr(torch.ops.fastcl, op) if use_extension else getattr(_extension, f"{op}_torch")
    with pytest.raises(RuntimeError, match=r"input must have at least 1 dimension, got shape (\(\)|\[\])"):
        fn(torch.tensor(3.0), *args)


def test_missing_library_warns_once_and_falls_back():
    code = (
        "import sys, warnings, torch; sys.modules['fastcl._C'] = None\n"  # makes `from fastcl import _C` fail
        "from fastcl import _extension\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    a = _extension.compact_segments(torch.arange(9.), [2, 0, 3])\n"
        "    b = _extension.pad_segments(a, [2, 0, 3], 3)\n"
        "print(_extension.extension_available(), a.tolist(), len(seen))\n"
        "print(seen[0].message)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "False [0.0, 1.0, 6.0, 7.0, 8.0] 1"
    assert "fastcl._C is not available" in message and "pure-PyTorch fallback" in message
