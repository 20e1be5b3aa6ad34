"""The Triton kernels of fastcl, installed as the ``fastcl.kernels`` subpackage (see setup.py).

- :mod:`.jit`: the ``@triton.jit`` kernels (forward row statistics, the two backward kernels);
- :mod:`.tiling`: the tiling and resource model, the config lists and ``keep_config``;
- :mod:`.launch`: argument preparation, config choice and the launches, on a :class:`fastcl.ops.problem.Problem`.

Called by the Triton backend :mod:`fastcl.ops.triton`; imports only the row math of :mod:`fastcl.ops.problem`.
Importing this package imports no Triton: the modules are loaded on first use.
"""
