"""``python -m xlbake``: the umbrella command (see :mod:`xlbake.cli`)."""

from xlbake.cli import main

main(prog_name="python -m xlbake")
