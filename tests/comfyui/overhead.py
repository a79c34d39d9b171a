"""What the node costs on the tiny SD model, against the same file loaded by LoraLoader (its static mix: weights
patched once at load, nothing per step) and against the bare model.

Run from the repository root: `.venv-comfy/bin/python tests/comfyui/overhead.py`. Each model is its own ComfyUI
model (no run pays for ComfyUI swapping patches between clones) and is warmed up once; the three are then timed
in turns, keeping each one's fastest run (a shared host adds noise, never speed). The node's runs include its
switch writes and, from the second run on, the reset to the first step's sources. `in node` is the time spent
inside the node's PREDICT_NOISE wrapper (clock and rewrites), measured around it, per sampling step; `per write`
the node's rewrite of one switching weight from ComfyUI's backup.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest  # noqa: E402  (the vendored ComfyUI on sys.path, CPU, one thread)
import folder_paths  # noqa: E402
import nodes  # noqa: E402
import torch  # noqa: E402
from comfy.patcher_extension import WrappersMP  # noqa: E402
from reference import sample  # noqa: E402
from worlds import comfy_unet, make_sd_world, sd_conditioning  # noqa: E402

ROUNDS = 7


def _replay(model):
    return model.wrappers[WrappersMP.PREDICT_NOISE]["lorasched"][0].__self__


def _time_inside_node(model) -> list[float]:
    """Wrap the node's PREDICT_NOISE wrapper in two timers (one outside, one inside it); returns the list that
    collects, per model evaluation, the seconds spent in the node's wrapper itself."""
    spent: list[float] = []
    marks: dict[str, float] = {}

    def outer(executor, *args):
        start = time.perf_counter()
        out = executor(*args)
        spent.append(time.perf_counter() - start - marks["inner"])
        return out

    def inner(executor, *args):
        start = time.perf_counter()
        out = executor(*args)
        marks["inner"] = time.perf_counter() - start
        return out

    wrappers = model.wrappers[WrappersMP.PREDICT_NOISE]
    model.wrappers[WrappersMP.PREDICT_NOISE] = {"timer outside": [outer], **wrappers, "timer inside": [inner]}
    return spent


def main() -> None:
    logging.disable(logging.WARNING)  # LoraLoaderModelOnly lists the file's text-encoder keys as not loaded
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conds = sd_conditioning(0)
    with tempfile.TemporaryDirectory() as folder:
        world = make_sd_world(Path(folder))
        folder_paths.add_model_folder_path("loras", str(world.folder))
        assert asyncio.run(nodes.load_custom_node(str(conftest.NODE_PACK)))
        node = nodes.NODE_CLASS_MAPPINGS["LoraschedLoadScheduledLora"]
        rewrite = functools.partial(conftest.pack_module("patching").rewrite, conftest.pack_module("replay").HOST)
        print(f"{'file':<10} {'steps':>5} {'bare':>7} {'LoraLoader':>10} {'node':>7} {'node/LoraLoader':>15} "
              f"{'in node':>9} {'per write':>9}")
        for name in ("klora-s", "klora-s*", "feature-kl"):
            path = world.files[name]
            bare = comfy_unet(world.pipe.unet)
            static = nodes.LoraLoaderModelOnly().load_lora_model_only(comfy_unet(world.pipe.unet), path.name, 1.0)[0]
            scheduled = node.execute(comfy_unet(world.pipe.unet), None, path.name, 1.0, 0.0).result[0]
            spent = _time_inside_node(scheduled)
            for steps in (20, 50):
                best = {}
                for model in (bare, static, scheduled) * (ROUNDS + 1):  # the first round warms up
                    start = time.perf_counter()
                    sample(model, noise, conds, steps, "euler", cfg=5.0)
                    best.setdefault(id(model), []).append(time.perf_counter() - start)
                t_bare, t_static, t_node = (min(best[id(model)][1:]) for model in (bare, static, scheduled))
                in_node = sum(spent[-ROUNDS * steps:]) / (ROUNDS * steps)
                keys = sorted({patch.key for patch in _replay(scheduled).patches})
                start = time.perf_counter()
                for key in keys * ROUNDS:
                    rewrite(scheduled, key)
                per_write = (time.perf_counter() - start) / (len(keys) * ROUNDS)
                print(f"{name:<10} {steps:>5} {t_bare:>6.3f}s {t_static:>9.3f}s {t_node:>6.3f}s "
                      f"{t_node / t_static:>15.3f} {1e6 * in_node:>7.0f}µs {1e6 * per_write:>7.0f}µs")


if __name__ == "__main__":
    main()
