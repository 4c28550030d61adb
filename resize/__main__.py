"""``python -m resize``: see ``resize.cli``."""

from resize.cli import main

if __name__ == "__main__":
    main()
