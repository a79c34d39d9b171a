"""Building the exported tensors: per module, both sources concatenated along the rank, in kohya format.

lora_down = [c_c·σ_c·A_c ; c_s·σ_s·A_s], lora_up = [B_c | B_s], scale 1, where c_k is the static weight
(time-average of the schedule). A plain loader thus applies c_c·ΔW_c + c_s·ΔW_s; the replay hook divides c_k
back out. A source's block is dropped where its static weight is 0.

No `.alpha` keys are written: every loader reads a missing alpha as alpha = rank (scale 1), while explicit
per-module alphas that differ are mis-scaled by diffusers 0.42 (see lora_io.fold_kohya_alphas).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya

from . import fileformat
from .lora import SOURCES, LoraPair
from .schedule import Schedule

BASE_VERSIONS = {  # pipeline class -> (ss_base_model_version, modelspec.architecture)
    "StableDiffusionPipeline": ("sd_v1", "stable-diffusion-v1/lora"),
    "StableDiffusionXLPipeline": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
}


def kohya_key(name: str, single_text_encoder: bool) -> str:
    """The kohya prefix of a module (`lora_unet_…`, `lora_te_…`), via diffusers' own PEFT→kohya converter."""
    probe = {f"{name}.lora_A.weight": torch.zeros(1, 1)}
    key = next(iter(convert_state_dict_to_kohya(probe))).split(".")[0]
    if single_text_encoder and key.startswith("lora_te1_"):
        key = "lora_te_" + key.removeprefix("lora_te1_")
    return key


def export_dtype(pair: LoraPair) -> torch.dtype:
    return torch.promote_types(pair.subject.dtype, pair.style.dtype)


def build_tensors(
    pair: LoraPair, schedule: Schedule, single_text_encoder: bool, dtype: torch.dtype | None = None
) -> tuple[dict, dict]:
    """Kohya tensors for every module, and the per-module record (key, rank split, static weights)."""
    dtype = dtype or export_dtype(pair)
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for name in pair.module_names:
        weights = schedule.static_weights(name)
        downs, ups, ranks = [], [], []
        for source, weight in zip(SOURCES, weights):
            module = pair.source(source).modules.get(name)
            if module is None or weight == 0.0:
                ranks.append(0)
                continue
            downs.append(module.down.to(torch.float32) * (weight * module.scale))
            ups.append(module.up.to(torch.float32))
            ranks.append(module.rank)
        key = kohya_key(name, single_text_encoder)
        tensors[f"{key}.lora_down.weight"] = torch.cat(downs, 0).to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = torch.cat(ups, 1).to(dtype).contiguous()
        records[name] = {"key": key, "ranks": ranks, "static": list(weights)}
    return tensors, records


def compatibility_metadata(pipeline_class: str, title: str, sources: dict, max_rank: int) -> dict[str, str]:
    """The `ss_*` / `modelspec.*` keys UIs read to recognise and label a LoRA."""
    base_version, architecture = BASE_VERSIONS.get(pipeline_class, ("unknown", "unknown/lora"))
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max_rank),
        "ss_network_alpha": "Dynamic",
        "ss_base_model_version": base_version,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": title,
        "modelspec.merged_from": ", ".join(s["file"] for s in sources.values()),
        "modelspec.usage_hint": (
            "Plain loading applies a fixed mix of both LoRAs. To replay the per-layer timestep schedule, "
            "use lorasched: merge.replay.attach(pipe, this_file)."
        ),
    }


def export(
    path,
    pair: LoraPair,
    schedule: Schedule,
    *,
    method: str,
    params: dict,
    scores: dict[str, tuple[float, float]],
    dtype: torch.dtype | None = None,
) -> None:
    """Write the scheduled LoRA file (atomic, deterministic); dtype None keeps the inputs' (promoted) dtype."""
    tensors, records = build_tensors(pair, schedule, pair.single_text_encoder, dtype)
    for name, score in scores.items():
        records[name]["scores"] = list(score)
    sources = {
        source: {"file": Path(lora.path).name, "sha256": lora.sha256, "dtype": str(lora.dtype).removeprefix("torch.")}
        for source, lora in ((s, pair.source(s)) for s in SOURCES)
    }
    metadata = {
        fileformat.KEY_METHOD: method,
        fileformat.KEY_PARAMS: json.dumps(params, sort_keys=True),
        fileformat.KEY_SOURCES: json.dumps(sources, sort_keys=True),
        fileformat.KEY_SCHEDULE: schedule.to_json(),
        fileformat.KEY_MODULES: json.dumps(records, sort_keys=True, separators=(",", ":")),
    }
    max_rank = max(sum(record["ranks"]) for record in records.values())
    title = Path(path).stem
    metadata.update(compatibility_metadata(pair.pipeline_class, title, sources, max_rank))
    fileformat.write(path, tensors, metadata)
