"""The error types the library raises for bad input; the CLI turns them into one line and exit code 2.

Defined in `schema.py`, the light module the node pack and the WebUI extension carry a copy of, so that reading a
file raises the same types everywhere.
"""

from .schema import FormatError, LoraschedError

__all__ = ["FormatError", "LoraschedError"]
