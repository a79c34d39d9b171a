"""The error types the library raises for bad input; the CLI turns them into one line and exit code 2."""


class LoraschedError(Exception):
    """A problem with the user's input, worded for the user: it names the file and what is wrong."""


class FormatError(LoraschedError, ValueError):
    """The file is not a lorasched file, its metadata breaks the schema, or its weights no longer match it."""
