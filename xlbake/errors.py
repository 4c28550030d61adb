"""Error types. Library code raises these; only the CLI turns them into one line and exit code 1."""


class XlbakeError(Exception):
    """A known, user-facing failure: its message is one line naming the file/key and what to do."""


class ConfigError(XlbakeError):
    """A config file or override is invalid (all problems collected into one message)."""


class InputError(XlbakeError):
    """An input file (checkpoint, LoRA, image, caption, dataset folder) cannot be used."""


class OutputError(XlbakeError):
    """An output cannot be written: it exists without --force, or its folder is not writable."""


class TrainingError(XlbakeError):
    """Training cannot go on (non-finite loss, resume mismatch, plan that cannot fit)."""
