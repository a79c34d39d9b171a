"""Loading LoRAs into a pipeline on our own behalf, with diffusers', PEFT's and transformers' chatter collected.

diffusers 0.42 warns on every UNet-only LoRA that the text encoder got no keys, PEFT warns when a second
adapter is added or an active one deleted, and transformers 5 prints a full "LOAD REPORT" for any text-encoder
adapter. When lorasched itself loads adapters those are expected, so they are collected instead of printed;
the caller turns the ones that matter (keys that match no module) into an error.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

KEY_PROBLEMS = ("unexpected keys", "missing adapter keys")


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def collected_loading_messages():
    """Yield a list that receives the warnings logged or warned while loading; print none of them (nor
    diffusers' and transformers' loading progress bars)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in bars:
        lib.disable_progress_bar()
    messages: list[str] = []
    diffusers_log = logging.getLogger("diffusers")
    transformers_log = logging.getLogger("transformers")
    handlers, propagate = diffusers_log.handlers[:], diffusers_log.propagate
    levels = diffusers_log.level, transformers_log.level
    diffusers_log.handlers = [_Collect(messages)]
    diffusers_log.propagate = False
    diffusers_log.setLevel(logging.WARNING)
    transformers_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        diffusers_log.handlers = handlers
        diffusers_log.propagate = propagate
        diffusers_log.setLevel(levels[0])
        transformers_log.setLevel(levels[1])
        for lib, enabled in bars:
            if enabled:
                lib.enable_progress_bar()


def key_problems(messages: list[str]) -> list[str]:
    return [m for m in messages if any(problem in m for problem in KEY_PROBLEMS)]
