"""Golden merges: every method (two LoRAs and N, weight-only and calibrated) on fixed inputs writes the same bytes
it wrote when tests/golden/merges.json was recorded. A refactor of how methods are routed must not change a file.

The input factors are small multiples of powers of two (and their alphas give dyadic scales), so the rules'
sums of products are exact in float32 whatever order a CPU's kernels add them in; the calibrated method's
decisions come from tiny denoising passes. `LORASCHED_GOLDEN_WRITE=1 pytest tests/test_golden.py` records the
digests anew (only when a change of output is intended, and said so in its commit).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from lorasched.convert import Calibration, MergeRequest, merge_loras
from lorasched.merge import rules
from lorasched.merge.checks import LoraSpec
from lorasched.tiny import random_kohya_lora
from safetensors.torch import save_file

GOLDEN = Path(__file__).parent / "golden" / "merges.json"
PAIR = ("subject", "style")
MANY = ("subject", "subject2", "style", "static")
# case -> (method, the LoRAs by name, options); every method with two LoRAs, every one that takes N with four
CASES = {
    "klora": ("klora", PAIR, {}),
    "klora-s*-global": ("klora", PAIR, {"pattern": "s*", "gamma_mode": "global"}),
    "est": ("est", PAIR, {"beta": 0.3}),
    "direct": ("direct", PAIR, {}),
    "np-lora": ("np-lora", PAIR, {}),
    "switch": ("switch", PAIR, {"period": 3}),
    "windows": ("windows", PAIR, {}),
    "blocks": ("blocks", PAIR, {"blocks": "subject=unet.down_blocks.*,style=unet.up_blocks.*"}),
    "feature-kl": ("feature-kl", PAIR, {}),
    "klora-n": ("klora", MANY, {}),
    "est-n": ("est", MANY, {"beta": 0.3, "gamma_scale": 1.5}),
    "direct-n": ("direct", MANY, {}),
    "np-lora-n": ("np-lora", MANY, {"mu": 1.0}),
    "switch-n": ("switch", MANY, {"period": 2}),
    "windows-n": ("windows", MANY, {"windows": (0.6, 0.4)}),
    "blocks-n": ("blocks", MANY, {"blocks": "subject=unet.down_blocks.*,subject=unet.mid_block.*,style=unet.up_blocks.*"}),
    "feature-kl-n": ("feature-kl", ("subject", "subject2", "style"), {"temperature": 2.0}),
}


def _dyadic(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same LoRA with every factor entry a multiple of 1/8 in [-1, 1] (alphas as they are)."""
    generator = torch.Generator().manual_seed(seed)
    return {key: value if key.endswith(".alpha") else
            torch.randint(-8, 9, value.shape, generator=generator).float() / 8 * (1 + len(key) % 3)
            for key, value in sorted(tensors.items())}


@pytest.fixture(scope="module")
def loras(tiny_base, tmp_path_factory) -> dict[str, Path]:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    folder = tmp_path_factory.mktemp("golden")
    made = {
        "subject": random_kohya_lora(pipe, 4, 2.0, seed=1, text_encoder=True),
        "subject2": random_kohya_lora(pipe, 2, 1.0, seed=3, targets=("to_q", "to_v", "ff.net.2")),
        "style": random_kohya_lora(pipe, 8, 3.0, seed=2, targets=("to_q", "to_k", "to_v", "ff.net.2"),
                                   text_encoder=True),
        "static": random_kohya_lora(pipe, 2, 2.0, seed=4, targets=("to_k", "to_out.0")),
    }
    paths = {}
    for index, (name, tensors) in enumerate(made.items()):
        paths[name] = folder / f"{name}.safetensors"
        save_file(_dyadic(tensors, 10 + index), paths[name])
    return paths


def _merge(case: str, base: Path, loras: dict[str, Path], folder: Path) -> Path:
    method, names, options = CASES[case]
    specs = [LoraSpec(str(loras[name]), name.rstrip("2")) for name in names]
    output = folder / f"{case}.safetensors"
    calibration = Calibration(prompts=("a photo of sks dog",), seeds=(0,), size=32, log=str(folder / f"{case}.log"))
    merge_loras(MergeRequest(str(base), tuple(specs), str(output), method, rules.RuleOptions(**options), steps=6,
                             device="cpu", calibration=calibration))
    return output


def test_the_cases_cover_every_method():
    assert {method for method, _, _ in CASES.values()} == set(rules.names())


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_writes_the_recorded_bytes(case, tiny_base, loras, tmp_path):
    digest = hashlib.sha256(_merge(case, tiny_base, loras, tmp_path).read_bytes()).hexdigest()
    if os.environ.get("LORASCHED_GOLDEN_WRITE") == "1":
        recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({**recorded, case: digest}, indent=1, sort_keys=True) + "\n")
    assert json.loads(GOLDEN.read_text())[case] == digest
