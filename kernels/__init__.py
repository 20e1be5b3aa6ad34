"""Triton kernels of fastcl, installed as the ``fastcl.kernels`` subpackage (see setup.py).

Importing this package imports no Triton: kernels live in submodules loaded on first use.
"""
