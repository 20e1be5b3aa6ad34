"""The applications built on the fastcl library: ``fastcl-pretrain``, ``fastcl-shortcuts``, ``fastcl-demo``.

``fastcl-pretrain``, split by concern:

* :mod:`fastcl.train.pretrain`: the command (``main``; ``python -m fastcl.train.pretrain``), the run stage by stage;
* :mod:`fastcl.train.cli`: the argument parser and the checks of the arguments;
* :mod:`fastcl.train.stages`: the stages of a run up to the end of training (the training loop);
* :mod:`fastcl.train.evaluate`: embedding, the probes of h and z, the summary;
* :mod:`fastcl.train.checkpoint`: the run directory's files: atomic writes, checkpoints, resuming;
* :mod:`fastcl.train.runtime`: distributed set-up, device, threads, autocast;
* :mod:`fastcl.train.factory`: the model and the loss from the arguments;
* :mod:`fastcl.train.moco`: ``--queue-size`` (MoCo v2): the key model, its EMA update, the queue and its loss;
* :mod:`fastcl.train.progress`, :mod:`fastcl.train.errors`: the progress bar; the two errors a run reports;
* :mod:`fastcl.train.data`: datasets (the procedural default, CIFAR, folders, UrbanCars) and the batch loaders;
* :mod:`fastcl.train.augment`, :mod:`fastcl.train.gradcache`, :mod:`fastcl.train.optim`, :mod:`fastcl.train.plots`:
  batched augmentations on the training device, gradient caching, LARS and the schedule, PNG plots.

:mod:`fastcl.train.shortcuts` (``fastcl-shortcuts``) is the Whac-A-Mole study on frozen features, with its
augmentations in :mod:`fastcl.train.shortcut_augment`; :mod:`fastcl.train.demo` (``fastcl-demo``) a one-minute toy.

The library (``fastcl.losses``, ``fastcl.models``, ``fastcl.evaluation``, ...) does not import this subpackage.
"""
