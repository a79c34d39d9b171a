"""Random LoRAs written the way each trainer writes them, from a real pipeline's module tree (seeded).

The diffusers/PEFT layout is built from module paths; kohya files go through diffusers' own PEFT→kohya converter;
kohya sd-scripts' SDXL (SGM) names and the FLUX trainer layouts (kohya/BFL with fused qkv, XLabs) are written by
name here because they are the inputs under test — what lorasched reads them as is decided by diffusers' converters,
not by this file.
"""

from __future__ import annotations

import torch
from diffusers.utils import convert_state_dict_to_kohya
from lorasched.merge.names import SgmLayout

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _factors(module: torch.nn.Module, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """down (r, in[, kh, kw]) and up (out, r[, 1, 1]), with a per-module random magnitude to choose between."""
    magnitude = float(torch.empty(1).log_normal_(0.0, 0.6, generator=generator))
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * 0.1
        up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * magnitude * 0.3
    else:
        down = torch.randn(rank, module.in_features, generator=generator) * 0.1
        up = torch.randn(module.out_features, rank, generator=generator) * magnitude * 0.3
    return down, up


def targets_of(pipe, component: str, suffixes: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(suffixes)
    ]


def peft_lora(
    pipe,
    component: str,
    suffixes: tuple[str, ...] = DEFAULT_TARGETS,
    rank: int | dict[str, int] = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """diffusers/PEFT (and ai-toolkit/SimpleTuner FLUX) layout: `<component>.<module>.lora_A/B.weight`.

    `rank` may map a module-name suffix to its own rank (per-module ranks)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in targets_of(pipe, component, suffixes):
        r = rank if isinstance(rank, int) else next(v for k, v in rank.items() if name.endswith(k))
        down, up = _factors(module, r, generator)
        tensors[f"{component}.{name}.lora_A.weight"] = down.to(dtype)
        tensors[f"{component}.{name}.lora_B.weight"] = up.to(dtype)
    return tensors


def kohya_lora(peft: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """kohya layout through diffusers' converter; with `alpha`, each module gets a float32 `.alpha` = alpha, without
    it no `.alpha` keys at all (the converter writes alpha = rank as int64; sd-scripts files may have none)."""
    tensors = {k: v for k, v in convert_state_dict_to_kohya(dict(peft)).items() if not k.endswith(".alpha")}
    if alpha is not None:
        for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
            tensors[key.removesuffix(".lora_down.weight") + ".alpha"] = torch.tensor(alpha)
    return tensors


def sgm_kohya_lora(peft: dict[str, torch.Tensor], alpha: float, unet_config) -> dict[str, torch.Tensor]:
    """kohya sd-scripts SDXL layout: SGM block names (`lora_unet_input_blocks_4_1_…`), and `lora_te1_`/`lora_te2_`
    text-encoder names with the `text_model_` sd-scripts writes for both CLIPs."""
    layout = SgmLayout.of(unet_config)
    tensors = {}
    for key, tensor in peft.items():
        component, _, rest = key.partition(".")
        module, factor, _ = rest.rsplit(".", 2)
        if component == "unet":
            stem = "lora_unet_" + layout.path(module)
        else:
            stem = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[component]
            stem += module if module.startswith("text_model.") else "text_model." + module
        stem = stem.replace(".", "_")
        tensors[f"{stem}.{'lora_down' if factor == 'lora_A' else 'lora_up'}.weight"] = tensor
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    return tensors


def attn_procs_lora(pipe, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """The old diffusers attention-processor layout: `unet.<attn>.processor.to_q_lora.down.weight`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in targets_of(pipe, "unet", DEFAULT_TARGETS):
        attention, _, projection = name.partition(".to_")
        down, up = _factors(module, rank, generator)
        stem = f"unet.{attention}.processor.to_{projection.removesuffix('.0')}_lora"
        tensors[f"{stem}.down.weight"], tensors[f"{stem}.up.weight"] = down, up
    return tensors


def _fused(modules: list[torch.nn.Module], rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One shared down and a stacked up for a fused projection (qkv), as trainers of fused models write them."""
    down = torch.randn(rank, modules[0].in_features, generator=generator) * 0.1
    up = torch.cat([_factors(m, rank, generator)[1] for m in modules], 0)
    return down, up


def flux_kohya_lora(pipe, rank: int = 4, alpha: float | None = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """kohya sd-scripts / BFL names for FLUX double blocks (fused img/txt qkv, proj, mlp) and single-block linear2.

    Single-block `linear1` (fused qkv+mlp) is left out: diffusers 0.42 splits it at FLUX.1's full widths only."""
    generator = torch.Generator().manual_seed(seed)
    transformer = pipe.transformer
    tensors = {}

    def put(key, down, up):
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)

    for i, block in enumerate(transformer.transformer_blocks):
        attn = block.attn
        put(f"lora_unet_double_blocks_{i}_img_attn_qkv", *_fused([attn.to_q, attn.to_k, attn.to_v], rank, generator))
        put(f"lora_unet_double_blocks_{i}_txt_attn_qkv",
            *_fused([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], rank, generator))
        put(f"lora_unet_double_blocks_{i}_img_attn_proj", *_factors(attn.to_out[0], rank, generator))
        put(f"lora_unet_double_blocks_{i}_img_mlp_0", *_factors(block.ff.net[0].proj, rank, generator))
    for i, block in enumerate(transformer.single_transformer_blocks):
        put(f"lora_unet_single_blocks_{i}_linear2", *_factors(block.proj_out, rank, generator))
    return tensors


def xlabs_flux_lora(pipe, rank: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """XLabs layout: `double_blocks.<i>.processor.{qkv,proj}_lora{1,2}.{down,up}.weight` (no alphas)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, block in enumerate(pipe.transformer.transformer_blocks):
        attn = block.attn
        parts = {
            "qkv_lora1": _fused([attn.to_q, attn.to_k, attn.to_v], rank, generator),
            "proj_lora1": _factors(attn.to_out[0], rank, generator),
            "qkv_lora2": _fused([attn.add_q_proj, attn.add_k_proj, attn.add_v_proj], rank, generator),
            "proj_lora2": _factors(attn.to_add_out, rank, generator),
        }
        for name, (down, up) in parts.items():
            tensors[f"double_blocks.{i}.processor.{name}.down.weight"] = down
            tensors[f"double_blocks.{i}.processor.{name}.up.weight"] = up
    return tensors
