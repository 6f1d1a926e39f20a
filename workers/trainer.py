"""Runnable entry point: ``python -m workers.trainer ...`` is ``streamrnn trainer ...``
(:mod:`streamrnn.cli.trainer`). Not installed; Docker and the docs start it from the repo."""

import sys

from streamrnn.cli.trainer import main

if __name__ == "__main__":
    sys.exit(main())
