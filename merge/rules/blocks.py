"""A static block prior: layers in named blocks run only the subjects or only the styles, every other decided
layer runs both (as `direct`).

Defaults, per architecture (docs/methods.md): SDXL, B-LoRA's content and style blocks (Frenkel et al., ECCV 2024):
`up_blocks.0.attentions.0` and `up_blocks.0.attentions.1`; FLUX, SplitFlux's split of the single-stream blocks
(Yang et al., arXiv 2511.15258): early single blocks carry content, later ones style. SD1.x, SD2.x and SD3 have no
established split: give `--blocks subject=<glob>,style=<glob>`.
"""

from __future__ import annotations

import fnmatch

from ..errors import LoraschedError
from ..lora import STYLE, SUBJECT, LoraSet
from ..schedule import REFERENCE_STEPS
from .direct import DirectRule, fixed_from_file
from .method import Method, Option, RuleOptions

DEFAULT_BLOCKS = {
    "StableDiffusionXLPipeline": {SUBJECT: ("unet.up_blocks.0.attentions.0.*",),
                                  STYLE: ("unet.up_blocks.0.attentions.1.*",)},
    "FluxPipeline": {SUBJECT: ("transformer.single_transformer_blocks.[0-9].*",),
                     STYLE: ("transformer.single_transformer_blocks.[1-3][0-9].*",)},
}


def parse_blocks(text: str) -> dict[str, tuple[str, ...]]:
    """`subject=<glob>,style=<glob>[,…]` (a role may be named more than once) -> {role: globs}."""
    globs: dict[str, list[str]] = {SUBJECT: [], STYLE: []}
    for part in filter(None, (part.strip() for part in text.split(","))):
        role, sep, pattern = part.partition("=")
        if not sep or role not in globs or not pattern:
            raise LoraschedError(f"--blocks {text!r}: give subject=<glob>,style=<glob> (module name globs)")
        globs[role].append(pattern)
    if not globs[SUBJECT] and not globs[STYLE]:
        raise LoraschedError(f"--blocks {text!r}: names no block")
    return {role: tuple(patterns) for role, patterns in globs.items()}


def block_globs(loras: LoraSet, text: str | None) -> dict[str, tuple[str, ...]]:
    if text is not None:
        return parse_blocks(text)
    if loras.pipeline_class not in DEFAULT_BLOCKS:
        raise LoraschedError(f"--method blocks: {loras.pipeline_class} has no established content/style block split; "
                             "give --blocks subject=<glob>,style=<glob>")
    return DEFAULT_BLOCKS[loras.pipeline_class]


def select(loras: LoraSet, globs: dict[str, tuple[str, ...]]) -> DirectRule:
    """Each decided layer's static selection: the role whose globs match its name, or both roles."""
    active, matched = {}, set()
    for name in loras.decided:
        roles = [role for role, patterns in globs.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if len(roles) > 1:
            raise LoraschedError(f"--blocks: {name} matches both the subject and the style globs")
        keep = set(roles) or {SUBJECT, STYLE}
        active[name] = tuple(i for i in loras.switched(name) if loras.sources[i].role in keep)
        matched.update(roles)
    for role, patterns in globs.items():
        if patterns and role not in matched:
            raise LoraschedError(f"--blocks: {role}={','.join(patterns)} matches no layer a subject and a style both "
                                 f"adapt (names look like {loras.decided[0]})")
    return DirectRule(active)


class BlocksMethod(Method):
    name = "blocks"
    summary = "A static block prior: named blocks run only the subjects or only the styles (B-LoRA, SplitFlux)."
    options = (Option("blocks", str, "blocks: `subject=<glob>,style=<glob>` module globs (default: the "
                      "architecture's, see docs/methods.md).", problem=lambda text: parse_blocks(text) and None),)

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[DirectRule, dict]:
        globs = block_globs(loras, self.settings(options).blocks)
        return select(loras, globs), {role: list(patterns) for role, patterns in globs.items()}

    def rule_from_file(self, scheduled) -> DirectRule:
        return fixed_from_file(scheduled)


METHOD = BlocksMethod()
