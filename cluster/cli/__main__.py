"""``python -m splitserve.cluster.cli``: the ``splitserve`` command, where
the console script is not on PATH (a virtual environment not activated)."""

import sys

from splitserve.cluster.cli.main import main

sys.exit(main())
