"""C++/CUDA sources of the gather ops (``torch.ops.fastcl.*``), installed as the package data of ``fastcl._csrc``.

:mod:`fastcl._extension` compiles them on first use for the running torch; nothing here is imported for that.
"""
