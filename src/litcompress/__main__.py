"""``python -m litcompress ...``: the ``litcompress`` command, where its script is not on PATH (a venv not
activated)."""

import sys

from litcompress.cli import main

sys.exit(main())
