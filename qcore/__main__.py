"""``python -m qcore quantize INPUT OUTPUT ...``: the ``qcore`` command line (see :mod:`qcore.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
