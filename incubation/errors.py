"""The one base class of the errors that are the user's or the environment's to fix (bad
input, missing or corrupt files, a run directory in use): the CLI prints them as one line
and exits non-zero; anything else is a bug and keeps its traceback."""


class IncubationError(Exception):
    """An expected failure whose message says what is wrong and where."""


class UsageError(IncubationError, ValueError):
    """A combination of options that a parser cannot check by itself (the pipeline finds it once
    it knows K, the preset, ...): the CLI reports it like an argparse error of the subcommand
    (usage line, exit 2), naming the option as `argument --x: ...`."""
