"""Runnable entry point: ``python -m workers.worker ...`` is ``streamrnn worker ...``
(:mod:`streamrnn.cli.worker`). Not installed; Docker and the docs start it from the repo."""

import sys

from streamrnn.cli.worker import main

if __name__ == "__main__":
    sys.exit(main())
