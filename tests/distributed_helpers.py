"""`python -m finetune` twice in the same launched processes: a run, then another that resumes its state.

    accelerate launch ... tests/distributed_helpers.py TRACE_A ARGS_A... --then TRACE_B ARGS_B...

Each run is the finetune CLI exactly as `-m finetune` calls it, with XLBAKE_TRACE_DIR set to its trace folder; the
second starts from fresh accelerate state (the first run's cleanup resets it; only the process group is kept) and
reads everything it resumes from the files. Starting the processes once instead of twice halves the cost of the
multi-process resume tests.
"""

from __future__ import annotations

import os
import sys

from finetune.cli import main
from finetune.distributed import TRACE_ENV

SEPARATOR = "--then"


def run(trace: str, args: list[str]) -> None:
    """One finetune CLI run (errors propagate: the process exits non-zero and the launcher stops the others)."""
    os.environ[TRACE_ENV] = trace
    main.main(args, prog_name="python -m finetune", standalone_mode=False)


if __name__ == "__main__":
    # accelerate then keeps the process group at the end of the first run (as after a fork launch), for the second
    os.environ["FORK_LAUNCHED"] = "1"
    argv = sys.argv[1:]
    cut = argv.index(SEPARATOR)
    first, second = argv[:cut], argv[cut + 1 :]
    run(first[0], first[1:])
    run(second[0], second[1:])
