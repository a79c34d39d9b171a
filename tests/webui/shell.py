"""What every host world stubs of the WebUI shell alike (each keeps its own host's option values)."""

from __future__ import annotations


class Options(dict):
    """`shared.opts`: attribute access over a host's option values; an option not listed is missing, as
    `getattr(opts, x, default)` expects."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value
