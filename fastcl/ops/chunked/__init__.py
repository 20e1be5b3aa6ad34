"""The chunked backend: blockwise PyTorch on any device (:mod:`.passes`) and its eager autograd (:mod:`.autograd`).

The custom op ``fastcl::contrastive_chunked`` (:mod:`fastcl.ops.custom_ops`) wraps the same passes for
``torch.compile``.
"""
