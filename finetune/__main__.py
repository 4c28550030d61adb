"""`python -m finetune`: the finetune stage command."""

from finetune.cli import main

main(prog_name="python -m finetune")
