"""Building the exported tensors: per module, every source concatenated along the rank, in kohya or diffusers format.

lora_down = [c_0·σ_0·A_0 ; c_1·σ_1·A_1 ; …], lora_up = [B_0 | B_1 | …], scale 1, where c_k is the static weight
(time-average of the schedule) and σ_k the source's scale times its strength. A plain loader thus applies
Σ c_k·ΔW_k; the replay hook divides c_k back out. A source's block is dropped where its static weight is 0.

No `.alpha` keys are written: every loader reads a missing alpha as alpha = rank (scale 1), while explicit
per-module alphas that differ are mis-scaled by diffusers 0.42 (see lora_io.kohya_folds).

Formats: `kohya` (`lora_unet_…`/`lora_te…` `.lora_down/.lora_up`, what A1111/Forge/ComfyUI read) for UNet pipelines;
`diffusers` (the pipeline's PEFT keys `<component>.<module>.lora_A/.lora_B`, what `load_lora_weights` and
ComfyUI's diffusers map read) everywhere. With no alphas, diffusers mirrors each module's rank into its alpha, so
per-module ranks load at scale 1 in both. FLUX and SD3 default to `diffusers`: diffusers reads FLUX kohya files
only at full FLUX.1 width (its qkv split hard-codes 3072) and SD3 kohya files not at all.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import fileformat
from .errors import LoraschedError
from .lora import LoraModule, LoraSet
from .names import SgmLayout, kohya_key
from .schedule import Schedule

KOHYA, DIFFUSERS = "kohya", "diffusers"
FORMATS = (KOHYA, DIFFUSERS)
KOHYA_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
BASE_VERSIONS = {  # pipeline class -> (ss_base_model_version, modelspec.architecture)
    "StableDiffusionPipeline": ("sd_v1", "stable-diffusion-v1/lora"),
    "StableDiffusionXLPipeline": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "FluxPipeline": ("flux1", "flux-1-dev/lora"),
    "StableDiffusion3Pipeline": ("sd3", "stable-diffusion-v3-medium/lora"),
}


def resolve_format(requested: str | None, pipeline_class: str) -> str:
    """`None` (auto): kohya for UNet pipelines, diffusers for FLUX/SD3. The other way round is refused: each
    architecture gets the one naming every loader maps (ComfyUI 0.3's diffusers map knows SD UNet attention only
    under old attention-processor names; diffusers reads FLUX kohya files only at full width)."""
    if requested is None:
        return KOHYA if pipeline_class in KOHYA_PIPELINES else DIFFUSERS
    if requested not in FORMATS:
        raise LoraschedError(f"--format {requested}: choose one of {', '.join(FORMATS)}")
    if requested == KOHYA and pipeline_class not in KOHYA_PIPELINES:
        raise LoraschedError(f"--format kohya: diffusers cannot load kohya files for {pipeline_class} at every size; "
                             "use --format diffusers (ComfyUI maps those names too)")
    if requested == DIFFUSERS and pipeline_class in KOHYA_PIPELINES:
        raise LoraschedError(f"--format diffusers: ComfyUI, A1111 and kohya map no PEFT-named {pipeline_class} "
                             "attention layer; use --format kohya (the default), which diffusers loads too")
    return requested


def factor_names(name: str, tensor_format: str, single_text_encoder: bool,
                 sgm: SgmLayout | None = None) -> tuple[str, str, str]:
    """(record key, down tensor name, up tensor name) of a module in the given format."""
    if tensor_format == DIFFUSERS:
        return name, f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    key = kohya_key(name, single_text_encoder, sgm)
    return key, f"{key}.lora_down.weight", f"{key}.lora_up.weight"


def export_dtype(loras: LoraSet) -> torch.dtype:
    return functools.reduce(torch.promote_types, (source.lora.dtype for source in loras.sources))


def _down(parts: list[tuple[LoraModule, float]], dtype: torch.dtype) -> torch.Tensor:
    """[c_0·σ_0·A_0 ; c_1·σ_1·A_1 ; …], scaled in float32."""
    return torch.cat([module.down.to(torch.float32) * (weight * module.scale) for module, weight in parts], 0) \
        .to(dtype).contiguous()


def _up(parts: list[tuple[LoraModule, float]], dtype: torch.dtype) -> torch.Tensor:
    """[B_0 | B_1 | …]."""
    return torch.cat([module.up.to(torch.float32) for module, _ in parts], 1).to(dtype).contiguous()


def plan_tensors(
    loras: LoraSet,
    schedule: Schedule,
    dtype: torch.dtype | None = None,
    tensor_format: str = KOHYA,
) -> tuple[list[fileformat.TensorSpec], dict]:
    """Every module's two tensors in `tensor_format`, as specs whose values are made when written (so a merge
    holds one module's factors at a time), and the per-module record (key, rank split, static weights)."""
    dtype = dtype or export_dtype(loras)
    specs: list[fileformat.TensorSpec] = []
    records: dict[str, dict] = {}
    for name in sorted(schedule.layers):  # a layer no LoRA is ever active in is not in the schedule
        weights = schedule.static_weights(name, len(loras.sources))
        parts, ranks = [], []
        for source, weight in zip(loras.sources, weights):
            module = source.lora.modules.get(name)
            if module is None or weight == 0.0:
                ranks.append(0)
                continue
            parts.append((module, weight))
            ranks.append(module.rank)
        key, down_name, up_name = factor_names(name, tensor_format, loras.single_text_encoder, loras.sgm)
        first = parts[0][0]
        down_shape = (sum(ranks), *first.down_shape[1:])
        up_shape = (first.up_shape[0], sum(ranks), *first.up_shape[2:])
        specs.append(fileformat.TensorSpec(down_name, dtype, down_shape, functools.partial(_down, parts, dtype)))
        specs.append(fileformat.TensorSpec(up_name, dtype, up_shape, functools.partial(_up, parts, dtype)))
        records[name] = {"key": key, "ranks": ranks, "static": list(weights)}
    return specs, records


def compatibility_metadata(pipeline_class: str, title: str, sources: list[dict], max_rank: int) -> dict[str, str]:
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
        "modelspec.merged_from": ", ".join(s["file"] for s in sources),
        "modelspec.usage_hint": (
            "Plain loading applies a fixed mix of the merged LoRAs. To replay the per-layer timestep schedule, "
            "use the lorasched replay hook: from lorasched import attach; attach(pipe, this_file)."
        ),
    }


def source_records(loras: LoraSet) -> list[dict]:
    """What the file says of each input, in order: file name, content hash, dtype, role and strength."""
    return [{"file": Path(source.lora.path).name, "sha256": source.lora.sha256,
             "dtype": str(source.lora.dtype).removeprefix("torch."), "role": source.role, "strength": source.strength}
            for source in loras.sources]


def export(
    path,
    loras: LoraSet,
    schedule: Schedule,
    *,
    method: str,
    params: dict,
    scores: dict[str, tuple[float | None, ...]],
    dtype: torch.dtype | None = None,
    tensor_format: str | None = None,
) -> None:
    """Write the scheduled LoRA file (atomic, deterministic, one module's tensors at a time); dtype None keeps the
    inputs' (promoted) dtype, tensor_format None the architecture's default (see `resolve_format`)."""
    tensor_format = resolve_format(tensor_format, loras.pipeline_class)
    specs, records = plan_tensors(loras, schedule, dtype, tensor_format)
    for name, score in scores.items():
        records[name]["scores"] = list(score)
    sources = source_records(loras)
    metadata = fileformat.pack(method, params, sources, schedule, records, tensor_format)
    max_rank = max(sum(record["ranks"]) for record in records.values())
    title = Path(path).stem
    metadata.update(compatibility_metadata(loras.pipeline_class, title, sources, max_rank))
    fileformat.write_stream(path, specs, metadata)
