"""``python -m finetune``: the finetune stage command (see ``finetune.cli``)."""

from finetune.cli import main

if __name__ == "__main__":
    main(prog_name="python -m finetune")
