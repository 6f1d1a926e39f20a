"""Runnable entry point: ``python -m workers.router ...`` is ``streamrnn router ...``
(:mod:`streamrnn.cli.router`). Not installed; Docker and the docs start it from the repo."""

import sys

from streamrnn.cli.router import main

if __name__ == "__main__":
    sys.exit(main())
