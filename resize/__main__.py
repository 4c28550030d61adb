"""``python -m resize``: the resize stage command (see ``resize.cli``)."""

from resize.cli import main

if __name__ == "__main__":
    main(prog_name="python -m resize")
