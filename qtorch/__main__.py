"""``python -m qtorch``: the same as the ``qtorch`` command."""

from .cli import entry

entry()
