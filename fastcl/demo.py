"""``python -m fastcl.demo``: the one-minute toy, kept at its documented path (it lives in :mod:`fastcl.train.demo`)."""

import sys

from fastcl.train.demo import *  # noqa: F401,F403
from fastcl.train.demo import main

if __name__ == "__main__":
    sys.exit(main())
