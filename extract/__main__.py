"""``python -m extract``: the extract stage command (see ``extract.cli``)."""

from extract.cli import main

if __name__ == "__main__":
    main(prog_name="python -m extract")
