"""The training application built on the fastcl library: ``fastcl-pretrain`` and its pieces.

* :mod:`fastcl.train.pretrain`: the ``fastcl-pretrain`` command (also ``python -m fastcl.pretrain``).
* :mod:`fastcl.train.data`: datasets (the procedural default, CIFAR, folders, UrbanCars).
* :mod:`fastcl.train.augment`: batched, seeded image augmentations on the training device.
* :mod:`fastcl.train.gradcache`: gradient caching for micro-batches.
* :mod:`fastcl.train.optim`: LARS and the warm-up + cosine schedule.
* :mod:`fastcl.train.plots`: PNG plots of a run (optional matplotlib).
* :mod:`fastcl.train.demo`: a one-minute toy (``fastcl-demo``, ``python -m fastcl.demo``).

The loss library (``fastcl.losses``, ``fastcl.functional``, ...) does not import this subpackage.
"""
