"""Runnable examples: ``torchrun --nproc_per_node=2 -m fastcl.examples.ddp_supcon``."""
