"""The two ways a ``fastcl-pretrain`` run stops with a message instead of a traceback."""

__all__ = ["ConfigError", "RunError"]


class ConfigError(Exception):
    """A configuration problem found before or while setting up: one line on stderr, exit status 2."""


class RunError(Exception):
    """A failure of the run itself (diverged training, a checkpoint that cannot be written): one line on stderr,
    exit status 1; whatever could be kept (checkpoint, summary) is kept."""
