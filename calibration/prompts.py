"""Calibration prompts: given as text or a file (one per line), or built from the LoRAs' trigger words."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..merge.errors import LoraschedError
from ..merge.lora import STYLE, SUBJECT, LoraFile, LoraSet


def read_prompts(given: tuple[str, ...]) -> list[str]:
    """Each value is a prompt file (one prompt per line, blank lines and `#` comments skipped) or a prompt."""
    prompts: list[str] = []
    for value in given:
        path = Path(value)
        if path.suffix == ".txt" or path.is_file():
            if not path.is_file():
                raise LoraschedError(f"{value}: prompt file does not exist")
            lines = [line.strip() for line in path.read_text(errors="replace").splitlines()]
            found = [line for line in lines if line and not line.startswith("#")]
            if not found:
                raise LoraschedError(f"{value}: prompt file holds no prompts")
            prompts += found
        elif value.strip():
            prompts.append(value.strip())
    return prompts


def trigger_word(lora: LoraFile) -> str | None:
    """The file's trigger phrase (`modelspec.trigger_phrase`), else its most frequent kohya training tag."""
    metadata = lora.metadata
    if metadata.get("modelspec.trigger_phrase", "").strip():
        return metadata["modelspec.trigger_phrase"].strip()
    try:
        frequencies = json.loads(metadata.get("ss_tag_frequency", "{}"))
    except json.JSONDecodeError:
        return None
    counts: Counter = Counter()
    for tags in frequencies.values() if isinstance(frequencies, dict) else ():
        if isinstance(tags, dict):
            counts.update({tag.strip(): n for tag, n in tags.items() if isinstance(n, int) and tag.strip()})
    return counts.most_common(1)[0][0] if counts else None


def trigger_prompts(loras: LoraSet) -> list[str]:
    """One prompt joining the subjects' and the styles' trigger words; an error when no file has any."""
    words = {role: [word for i in loras.indices(role) if (word := trigger_word(loras.sources[i].lora))]
             for role in (SUBJECT, STYLE)}
    if not words[SUBJECT] and not words[STYLE]:
        raise LoraschedError(
            f"{loras.sources[0].lora.path}: no calibration prompts given and no LoRA's metadata has trigger words; "
            "pass --prompts"
        )
    subject, style = (" and ".join(words[role]) for role in (SUBJECT, STYLE))
    parts = [f"a photo of {subject}" if subject else "a photo", f"in the style of {style}" if style else ""]
    return [" ".join(part for part in parts if part)]
