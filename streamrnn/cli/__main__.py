"""``python -m streamrnn.cli``: the same as the ``streamrnn`` command."""

import sys

from streamrnn.cli.main import main

sys.exit(main())
