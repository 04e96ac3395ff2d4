"""``python -m qtorch``: the same as the ``qtorch`` command."""

import sys

from .cli import main

sys.exit(main())
