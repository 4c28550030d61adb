"""``python -m resize``: the resize stage command (see ``resize.cli``)."""

from xlbake.devices import prefer_huge_pages

prefer_huge_pages()  # before torch is imported

from resize.cli import main  # noqa: E402  (after prefer_huge_pages)

if __name__ == "__main__":
    main(prog_name="python -m resize")
