"""The one base class of the errors that are the user's or the environment's to fix (bad
input, missing or corrupt files, a run directory in use): the CLI prints them as one line
and exits non-zero; anything else is a bug and keeps its traceback."""


class IncubationError(Exception):
    """An expected failure whose message says what is wrong and where."""
