"""LyCORIS files made by LyCORIS' own module classes (the `lycoris-lora` package), over a tiny pipeline's layers,
named as LyCORIS' kohya network names them (`lora_unet_<path>`, `lora_te_<path>`), with random weights (LyCORIS
initialises one factor to zero, which would hide every mistake)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

# variant -> (LyCORIS module class name, its options)
VARIANTS = {
    "lokr": ("LokrModule", {"factor": 4}),  # a full w1, w2 decomposed where it pays (full for the small conv)
    "lokr-both": ("LokrModule", {"factor": 2, "decompose_both": True}),
    "lokr-tucker": ("LokrModule", {"factor": 2, "decompose_both": True, "use_tucker": True}),
    "lokr-full": ("LokrModule", {"full_matrix": True}),
    "loha": ("LohaModule", {}),
    "loha-tucker": ("LohaModule", {"use_tucker": True}),
    "locon": ("LoConModule", {}),
    "locon-tucker": ("LoConModule", {"use_tucker": True}),
    "dora": ("LoConModule", {"weight_decompose": True}),
}
# UNet layers of every kind the variants treat differently: attention linears, 3x3 convs, 1x1 proj convs
TARGETS = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.2", "resnets.0.conv1", "resnets.1.conv2",
           "proj_in", "conv_shortcut")


def lycoris_state_dict(pipe, variant: str, seed: int, rank: int = 4, alpha: float = 2.0,
                       text_encoder: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the file's tensors, each module's delta as LyCORIS itself computes it, float64)."""
    from lycoris.modules import loha, locon, lokr

    classes = {"LokrModule": lokr.LokrModule, "LohaModule": loha.LohaModule, "LoConModule": locon.LoConModule}
    name, options = VARIANTS[variant]
    generator = torch.Generator().manual_seed(seed)
    parts = [("lora_unet_", pipe.unet, TARGETS)]
    if text_encoder:
        parts.append(("lora_te_", pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")))
    state, deltas = {}, {}
    for prefix, model, targets in parts:
        for path, layer in model.named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or not path.endswith(targets):
                continue
            if prefix == "lora_te_" and not path.startswith("text_model."):
                path = "text_model." + path
            key = prefix + path.replace(".", "_")
            module = classes[name](key, layer, 1.0, rank, alpha, **options).double()
            values = {part: value if part in ("alpha", "dora_scale") else
                      (torch.randn(value.shape, generator=generator) * 0.2).double()
                      for part, value in module.state_dict().items()}
            module.load_state_dict(values)
            state.update({f"{key}.{part}": value.float() for part, value in values.items()})
            if "dora_scale" not in values:  # LoKr/LoHa's get_weight is already scaled (their get_diff_weight,
                # in lycoris-lora 4.1.3, scales it once more); LoCon's make_weight is not
                delta = module.get_weight(layer.weight.shape) if name != "LoConModule" else \
                    module.get_diff_weight(shape=layer.weight.shape)[0]
                deltas[key] = delta.detach().reshape(layer.weight.shape)
    return state, deltas


def save_lycoris(pipe, variant: str, path: Path, seed: int, **kwargs) -> dict[str, torch.Tensor]:
    """Write the file; returns LyCORIS' own delta of each module (float64, from the float32 values written)."""
    state, deltas = lycoris_state_dict(pipe, variant, seed, **kwargs)
    save_file(state, path)
    return deltas
