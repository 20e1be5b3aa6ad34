"""``python -m fastcl.pretrain``: the ``fastcl-pretrain`` command, kept at its documented path.

The application lives in :mod:`fastcl.train.pretrain`; this module re-exports it.
"""

import sys

from fastcl.train.pretrain import *  # noqa: F401,F403
from fastcl.train.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
