"""What loading a LoRA would adapt, found without building a single adapter layer.

The base pipeline's own `load_lora_weights` (its diffusers loader mixin) runs as in a real load: `lora_state_dict`
converts the key format (kohya with diffusers or SGM names, old attention processors, PEFT, the FLUX trainers'
layouts) and the keys are routed to the denoiser and the text encoders. Only the last step differs: where diffusers
would hand each component's keys to PEFT to inject adapter layers, `_Routed` keeps them. From there this module does
what that load does before and instead of injecting, each step as diffusers and PEFT do it:

- per component: the key prefix filtered off, the PEFT key names, the ranks, and the `LoraConfig` diffusers builds
  (`_create_lora_config`: rank and alpha patterns from the ranks, the network alphas or the file's saved config);
- per module: PEFT's rank and alpha for it (`rank_pattern`/`alpha_pattern` matched as PEFT matches them) and its
  scaling alpha / r (alpha / √r with rsLoRA);
- the check a load makes: the module exists in the skeleton, is a Linear or a convolution, and the factors have
  the shapes of a LoRA layer of that rank on it.

The factors come back as the loader was handed them (stand-ins or tensors; see lora_io), with the dtype a load
casts them to: their base layer's.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .base import Skeleton
from .errors import LoraschedError
from .names import canonical_name

TEXT_ENCODER_RANKED = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # diffusers' rank dict for CLIP
FACTORS = ("A.weight", "B.weight")  # PEFT's `<module>.lora_A.weight`, `<module>.lora_B.weight`


@dataclass(frozen=True)
class Adapted:
    """One module a load would adapt: its canonical name, its factors, PEFT's scaling and the dtype they load in."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    dtype: torch.dtype


@dataclass(frozen=True)
class _Handed:
    """What `load_lora_weights` handed one component's loader."""

    component: torch.nn.Module | None
    prefix: str
    state_dict: dict
    network_alphas: dict | None
    metadata: dict | None
    text_encoder: bool


class _Routed:
    """Put before a diffusers loader mixin: its `load_lora_weights` converts and routes as usual, and the calls that
    would inject adapters into a component record what they were handed instead."""

    def __init__(self, components: dict[str, torch.nn.Module | None], metadata: dict | None) -> None:
        self.__dict__.update(components)
        self.handed: list[_Handed] = []
        self._metadata = metadata  # a file's saved LoraConfig; diffusers reads it only from a path

    def _hand(self, component, prefix, state_dict, network_alphas, metadata, text_encoder) -> None:
        metadata = self._metadata if metadata is None else metadata
        self.handed.append(_Handed(component, prefix, state_dict, network_alphas, metadata, text_encoder))

    def load_lora_into_unet(self, state_dict, network_alphas=None, unet=None, metadata=None, **_) -> None:
        self._hand(unet, self.unet_name, state_dict, network_alphas, metadata, False)

    def load_lora_into_transformer(self, state_dict, network_alphas=None, transformer=None, metadata=None,
                                   **_) -> None:
        self._hand(transformer, "transformer", state_dict, network_alphas, metadata, False)  # load_lora_adapter's

    def load_lora_into_text_encoder(self, state_dict, network_alphas=None, text_encoder=None, prefix=None,
                                    metadata=None, **_) -> None:
        self._hand(text_encoder, prefix or self.text_encoder_name, state_dict, network_alphas, metadata, True)


def adapted(skeleton: Skeleton, state_dict: dict, metadata: dict | None, adapter: str, source: str,
            prefix: str | None) -> list[Adapted]:
    """Every module loading `state_dict` onto `skeleton` would adapt, in model order per component.

    A file whose keys reach no component at pipeline level holds keys relative to the denoiser alone (saved from
    the bare UNet/transformer, `prefix` is what they start with): it is read as the denoiser's model-level
    `load_lora_adapter` reads it.
    """
    loadable = {name: skeleton.components.get(name) for name in skeleton.loader._lora_loadable_modules}
    routed = type(f"Routed{skeleton.loader.__name__}", (_Routed, skeleton.loader), {})(loadable, metadata)
    routed.load_lora_weights(state_dict, adapter_name=adapter)
    found = [module for handed in routed.handed for module in _component(skeleton, handed, source)]
    if found:
        return found
    denoiser = skeleton.unet if "unet" in skeleton.components else skeleton.transformer
    return _component(skeleton, _Handed(denoiser, prefix, state_dict, None, metadata, False), source)


def _component(skeleton: Skeleton, handed: _Handed, source: str) -> list[Adapted]:
    prepared = (_text_encoder_keys if handed.text_encoder else _denoiser_keys)(handed, source)
    if prepared is None:
        return []
    state_dict, config = prepared
    if config.use_dora:
        raise LoraschedError(f"{source}: DoRA weights are not supported (plain LoRA only)")
    if config.lora_bias:
        raise LoraschedError(f"{source}: LoRA bias terms are not supported")
    name = next(n for n, model in skeleton.components.items() if model is handed.component)
    order = {path: index for index, (path, _) in enumerate(handed.component.named_modules())}
    factors = _factor_pairs(state_dict, order, source)
    return [_module(name, handed.component, path, down, up, config, source)
            for path, (down, up) in sorted(factors.items(), key=lambda item: order[item[0]])]


def _denoiser_keys(handed: _Handed, source: str):
    """The keys and config the denoiser's `load_lora_adapter` would inject (diffusers `loaders/peft.py`)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config

    prefix, network_alphas, metadata = handed.prefix, handed.network_alphas, handed.metadata
    if network_alphas is not None and prefix is None:
        raise ValueError("`network_alphas` cannot be None when `prefix` is None.")
    if network_alphas and metadata:
        raise ValueError("Both `network_alphas` and `metadata` cannot be specified.")
    state_dict = handed.state_dict
    if prefix is not None:
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if metadata is not None:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    if not state_dict:
        return None
    _check_present(handed, source)
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    rank = {f"^{key}": value.shape[1] for key, value in state_dict.items() if "lora_B" in key and value.ndim > 1}
    if network_alphas is not None and len(network_alphas) >= 1:
        network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                          if k.startswith(f"{prefix}.")}
    return state_dict, _create_lora_config(state_dict, network_alphas, metadata, rank)


OLD_ATTENTION = ("to_q", "to_k", "to_v", "to_out")  # diffusers' old attention LoRA names: `to_q_lora.down`


def _text_encoder_keys(handed: _Handed, source: str):
    """The keys and config a text encoder's load would inject (diffusers `_load_lora_into_text_encoder`)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import StateDictType

    prefix, network_alphas, metadata = handed.prefix, handed.network_alphas, handed.metadata
    if network_alphas and metadata:
        raise ValueError("`network_alphas` and `metadata` cannot be specified both at the same time.")
    state_dict = {k.removeprefix(f"{prefix}."): v for k, v in handed.state_dict.items() if k.startswith(f"{prefix}.")}
    if metadata is not None:
        metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    if not state_dict:
        return None
    _check_present(handed, source)
    # diffusers names a kohya file's attention keys the old way (`to_q_lora`) and its MLP keys the new way, and
    # infers the old format only from a `to_out_lora` key: a file without out_proj is then misread. Tell it.
    old = StateDictType.DIFFUSERS_OLD if any(f"{p}_lora." in key for key in state_dict for p in OLD_ATTENTION) else None
    state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict, original_type=old))
    if not hasattr(handed.component, "text_model"):  # a flattened CLIP (transformers 5)
        state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    rank = {}
    for name, _ in handed.component.named_modules():
        if name.endswith(TEXT_ENCODER_RANKED) and f"{name}.lora_B.weight" in state_dict:
            rank[f"{name}.lora_B.weight"] = state_dict[f"{name}.lora_B.weight"].shape[1]
    if network_alphas is not None:
        network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                          if k.startswith(prefix) and k.split(".")[0] == prefix}
    return state_dict, _create_lora_config(state_dict, network_alphas, metadata, rank, is_unet=False)


def _check_present(handed: _Handed, source: str) -> None:
    if handed.component is None:
        raise LoraschedError(f"{source}: does not fit this base model (it has no {handed.prefix} for its keys)")


def _factor_pairs(state_dict: dict, modules: dict, source: str) -> dict[str, tuple]:
    """module path -> (lora_A, lora_B), every key accounted for (a key PEFT would leave unloaded is an error)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        path, _, factor = key.rpartition(".lora_")
        if factor not in FACTORS or path not in modules:
            raise LoraschedError(f"{source}: keys that match no module of this base ({key})")
        pairs.setdefault(path, {})[factor] = value
    for path, found in pairs.items():
        if len(found) == 1:
            present, absent = ("lora_A", "lora_B") if FACTORS[0] in found else ("lora_B", "lora_A")
            raise LoraschedError(f"{source}: module {path} has a {present} factor and no {absent}")
    return {path: (found[FACTORS[0]], found[FACTORS[1]]) for path, found in pairs.items()}


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's per-module value (`get_pattern_key`): the first pattern that matches the end of the path."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", path):
            return patterns[pattern]
    return patterns.get(path, default)


def _module(component: str, model: torch.nn.Module, path: str, down: torch.Tensor, up: torch.Tensor, config,
            source: str) -> Adapted:
    """The module at `path` with the rank, scaling and factor shapes PEFT would give it, checked."""
    layer = model.get_submodule(path)
    rank = _pattern_value(config.rank_pattern, path, config.r)
    alpha = _pattern_value(config.alpha_pattern, path, config.lora_alpha)
    if isinstance(layer, torch.nn.Linear):
        shapes = (rank, layer.in_features), (layer.out_features, rank)
    elif isinstance(layer, torch.nn.modules.conv._ConvNd):
        kernel = tuple(layer.kernel_size)
        shapes = (rank, layer.in_channels, *kernel), (layer.out_channels, rank, *(1,) * len(kernel))
        if down.dim() == 2 and tuple(down.shape) == (rank, math.prod(shapes[0][1:])) and up.dim() == 2:
            down, up = down.reshape(shapes[0]), up.reshape(shapes[1])  # LyCORIS keeps a conv kernel in its columns
    else:
        raise LoraschedError(f"{source}: does not fit this base model ({component}.{path} is a "
                             f"{type(layer).__name__}, not a Linear or convolution a LoRA can adapt)")
    if (tuple(down.shape), tuple(up.shape)) != shapes:
        raise LoraschedError(
            f"{source}: does not fit this base model (size mismatch for {component}.{path}: factors "
            f"{tuple(down.shape)} and {tuple(up.shape)}, where a rank-{rank} LoRA of it has {shapes[0]} and "
            f"{shapes[1]})")
    scale = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    return Adapted(canonical_name(component, model, path), down, up, float(scale), layer.weight.dtype)
