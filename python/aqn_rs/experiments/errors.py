"""The one error type of the experiment layer: its message is the one line the CLI prints."""


class ExperimentError(Exception):
    """A run cannot start (unknown preset, unreadable data, missing model package, too few
    GPUs, bad option). The message says what was wrong and what to do."""
