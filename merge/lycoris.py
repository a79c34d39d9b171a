"""LyCORIS inputs as plain LoRA factors: LoKr and LoHa (linear, conv, Tucker) converted exactly, the kinds that
are no fixed low-rank delta refused by name.

Each module's delta is the one ComfyUI's weight adapters (`comfy/weight_adapter/lokr.py`, `loha.py`) apply, scale
included, written as `up · down` with `down` over the layer's flattened input (in · kh · kw):

- a factor `W = A·B` is the LoRA (A, B); a full factor W (o × i) is (W, I) or (I, W), whichever rank is smaller; a
  Tucker factor (`t`, `a` of r × out, `b` of r × in) is (aᵀ, t ×₂ bᵀ), rank r;
- LoKr: kron(U₁·D₁, U₂·D₂) = kron(U₁, U₂) · kron(D₁, D₂), rank r₁·r₂, scale alpha / (w2_b rows, else w1_b rows; 1
  without either);
- LoHa: (U₁·D₁) ∘ (U₂·D₂) = (U₁ ⊙ U₂) · (D₁ ⊙ D₂), the row-wise and column-wise Khatri–Rao products, rank r₁·r₂,
  scale alpha / (w1_b rows);
- LoCon with a Tucker core (`lora_mid`): the core folded into the 1×1 down, `down'[a, c] = Σ_b mid[a, b] down[b, c]`,
  same rank and alpha (plain LoCon and kohya conv LoRAs need nothing: they are LoRAs).

The factors are computed in float32 (products of two float16 or bfloat16 values are exact there) and written as
kohya `lora_down` / `lora_up` with `alpha = scale · rank`, so every later step reads them as any kohya LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import LoraschedError

LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# (key marker, kind, why its delta is not a fixed low-rank product)
REFUSED = (
    ("dora_scale", "DoRA", "it rescales each column of the base weight plus delta to a learned norm, so its delta "
     "depends on the base weights"),
    ("lora_magnitude_vector", "DoRA (PEFT)", "it rescales each column of the base weight plus delta to a learned "
     "norm, so its delta depends on the base weights"),
    ("oft_blocks", "OFT/BOFT", "it rotates the base weight, so its delta depends on the base weights"),
    (".on_input", "(IA)³", "it scales the base weight's rows or columns, so its delta depends on the base weights"),
    (".a1.weight", "GLoRA", "its delta has a term that multiplies the base weight"),
    (".diff", "a full-weight difference", "it is a dense delta, not low-rank factors; extract a LoRA from it first"),
    (".w_norm", "a norm-layer difference", "it sets normalisation weights, which a LoRA does not carry"),
)


def kind(keys) -> str | None:
    """'LoKr' or 'LoHa' for a file of that family, else None; a refused kind raises its one-line reason (without
    the path: the caller prefixes it)."""
    keys = list(keys)
    for marker, name, why in REFUSED:
        if any(marker in key for key in keys):
            raise LoraschedError(f"{name} weights (`…{marker}…`) cannot be merged: {why}")
    if any(f".{part}" in key for key in keys for part in ("lokr_w1", "lokr_w2")):
        return "LoKr"
    if any(".hada_w" in key for key in keys):
        return "LoHa"
    if any(key.endswith(".lora_mid.weight") for key in keys):
        return "LoCon-Tucker"
    return None


def _factor(tensors: Mapping[str, torch.Tensor], prefix: str, full: str, a: str, b: str,
            tucker: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of one factor of a module, 2-D, down over the flattened input (float32)."""
    def get(name: str) -> torch.Tensor | None:
        key = f"{prefix}.{name}"
        return tensors[key].to(torch.float32) if key in tensors else None

    whole = get(full) if full else None
    if whole is not None:
        matrix = whole.flatten(1)
        rows, cols = matrix.shape
        if rows <= cols:
            return torch.eye(rows), matrix
        return matrix, torch.eye(cols)
    up, down, core = get(a), get(b), get(tucker) if tucker else None
    if up is None or down is None:
        raise LoraschedError(f"{prefix}: has neither {full or 'a full factor'} nor both {a} and {b}")
    if core is not None:  # Tucker: W[p, r, k, l] = Σ a[i, p] t[i, j, k, l] b[j, r]
        inner = torch.einsum("ijkl,jr->irkl", core, down)
        return up.T.contiguous(), inner.flatten(1)
    return up.flatten(1), down.flatten(1)


def _khatri_rao_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri–Rao: row i is kron(a[i], b[i])."""
    return (a[:, :, None] * b[:, None, :]).flatten(1)


def _module(tensors: Mapping[str, torch.Tensor], prefix: str, family: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, scale) of one module."""
    alpha_key = f"{prefix}.alpha"
    alpha = float(tensors[alpha_key]) if alpha_key in tensors else None
    if family == "LoKr":
        up1, down1 = _factor(tensors, prefix, "lokr_w1", "lokr_w1_a", "lokr_w1_b", None)
        up2, down2 = _factor(tensors, prefix, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        dim = next((tensors[f"{prefix}.{name}"].shape[0] for name in ("lokr_w2_b", "lokr_w1_b")
                    if f"{prefix}.{name}" in tensors), None)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return torch.kron(up1, up2), torch.kron(down1, down2), scale
    up1, down1 = _factor(tensors, prefix, "", "hada_w1_a", "hada_w1_b", "hada_t1")
    up2, down2 = _factor(tensors, prefix, "", "hada_w2_a", "hada_w2_b", "hada_t2")
    scale = alpha / tensors[f"{prefix}.hada_w1_b"].shape[0] if alpha is not None else 1.0
    return _khatri_rao_rows(up1, up2), _khatri_rao_rows(down1.T, down2.T).T.contiguous(), scale


def _conv_shape(tensors: Mapping[str, torch.Tensor], prefix: str) -> tuple[int, ...] | None:
    """The kernel size of a conv module ((kh, kw)), from its 4-D factors; None for a linear one."""
    for name in ("lokr_w2", "lokr_t2", "hada_t1", "lokr_w2_b", "hada_w1_b"):
        key = f"{prefix}.{name}"
        if key in tensors and tensors[key].dim() == 4:
            return tuple(tensors[key].shape[2:])
    return None


def _fold_mid(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoCon's Tucker cores folded into their downs; every other key as it is."""
    out = {key: tensors[key] for key in tensors if not key.endswith(".lora_mid.weight")}
    for key in [key for key in tensors if key.endswith(".lora_mid.weight")]:
        down_key = key.replace(".lora_mid.weight", ".lora_down.weight")
        down, mid = tensors[down_key].to(torch.float32), tensors[key].to(torch.float32)
        out[down_key] = torch.einsum("abkl,bc->ackl", mid, down.flatten(1)).contiguous()
        up_key = key.replace(".lora_mid.weight", ".lora_up.weight")
        out[up_key] = tensors[up_key].to(torch.float32)
    return out


def to_lora(tensors: Mapping[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """The kohya LoRA (`lora_down`, `lora_up`, `alpha` per module) of a LoKr, LoHa or Tucker LoCon state dict; keys
    of other modules (plain LoRA modules beside them) pass through."""
    if family == "LoCon-Tucker":
        try:
            return _fold_mid(tensors)
        except (KeyError, RuntimeError) as exc:
            raise LoraschedError(f"LoCon Tucker core without its down and up factors ({exc})") from None
    markers = LOKR if family == "LoKr" else LOHA
    prefixes = sorted({key.rsplit(".", 1)[0] for key in tensors if key.rsplit(".", 1)[-1] in markers})
    converted = set(prefixes)
    out = {key: tensors[key] for key in tensors if key.rsplit(".", 1)[0] not in converted}
    for prefix in prefixes:
        try:
            up, down, scale = _module(tensors, prefix, family)
        except (RuntimeError, ValueError, IndexError) as exc:  # factors whose shapes do not compose
            raise LoraschedError(f"{family} module {prefix}: its factors do not compose "
                                 f"({str(exc).splitlines()[0][:120]})") from None
        rank = down.shape[0]
        kernel = _conv_shape(tensors, prefix)  # None also for a conv stored flat: the base's layer reshapes it
        if kernel is not None:
            size = kernel[0] * kernel[1]
            down = down.reshape(rank, down.shape[1] // size, *kernel)
            up = up.reshape(*up.shape, 1, 1)
        out[f"{prefix}.lora_down.weight"] = down.contiguous()
        out[f"{prefix}.lora_up.weight"] = up.contiguous()
        out[f"{prefix}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out
