"""The one error type the library raises for bad input; the CLI turns it into one line and exit code 2."""


class LoraschedError(Exception):
    """A problem with the user's input, worded for the user: it names the file and what is wrong."""
