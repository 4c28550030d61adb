"""``python -m extract``: see :mod:`extract.cli`."""

from extract.cli import main

main()
