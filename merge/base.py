"""The base model as a *skeleton*: the real module tree of every LoRA-loadable component, on the meta device.

Weight-only rules never need the base weights, only its module names and shapes (to check that a LoRA fits) and
its pipeline's LoRA loader (whose `load_lora_weights` converts every LoRA key format). Components built on the
meta device have real classes, names and shapes and no storage, so an SDXL skeleton costs next to nothing.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import LoraschedError

_CONFIG_PATTERNS = ["model_index.json", "*/config.json", "scheduler/*.json"]


def resolve_base(base: str) -> Path:
    """A local diffusers folder as is; a hub id by downloading its configs only (no weights)."""
    path = Path(base)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LoraschedError(f"{base}: not a diffusers pipeline folder (no model_index.json)")
        return path
    if path.exists() or base.count("/") != 1:
        raise LoraschedError(f"{base}: neither a diffusers pipeline folder nor a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=_CONFIG_PATTERNS))
    except Exception as exc:  # network, auth or missing repo: one line for the user
        raise LoraschedError(f"{base}: cannot fetch the pipeline configs from the hub ({type(exc).__name__})") from exc


def model_index(base: Path) -> dict:
    return json.loads((base / "model_index.json").read_text())


def _empty(cls, config, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    # nn.Module.to: a dtype change on meta tensors, without diffusers' keep-in-fp32 warning for real weights
    return torch.nn.Module.to(model, dtype=dtype).eval()


def _component(library: str, class_name: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module | None:
    import transformers

    cls = getattr(importlib.import_module(library), class_name)
    if library == "diffusers" and hasattr(cls, "load_config"):
        return _empty(cls, cls.load_config(folder), dtype)
    if library == "transformers" and issubclass(cls, transformers.PreTrainedModel):
        return _empty(cls, transformers.AutoConfig.from_pretrained(os.fspath(folder)), dtype)
    return None


@dataclass(frozen=True)
class Skeleton:
    """The base as LoRA loading sees it: the pipeline's class name, the diffusers loader mixin whose
    `load_lora_weights` converts every LoRA key format for it, and each LoRA-loadable component on the meta device
    (its real module tree, names and shapes; no storage at all). Components read as attributes (`skeleton.unet`).
    """

    pipeline_class: str
    loader: type
    components: dict[str, torch.nn.Module]

    def __getattr__(self, name: str) -> torch.nn.Module:
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(name)

    @property
    def _lora_loadable_modules(self) -> list[str]:
        """The components built, in the loader's order (denoiser first), under diffusers' own attribute name."""
        return list(self.components)


# The loader mixins of the pipelines lorasched knows, so that reading a LoRA does not import the pipeline module
# (its VAE, image processors and every autoencoder class); tests check the table against the pipelines' own MRO.
KNOWN_LOADERS = {
    "StableDiffusionPipeline": "StableDiffusionLoraLoaderMixin",
    "StableDiffusionXLPipeline": "StableDiffusionXLLoraLoaderMixin",
    "FluxPipeline": "FluxLoraLoaderMixin",
    "StableDiffusion3Pipeline": "SD3LoraLoaderMixin",
}


def lora_loader(pipeline_class: str, base: str) -> type:
    """The diffusers mixin whose `load_lora_weights` the pipeline class uses (and with it `lora_state_dict` and
    the component names a LoRA can reach)."""
    if pipeline_class in KNOWN_LOADERS:
        from diffusers.loaders import lora_pipeline

        return getattr(lora_pipeline, KNOWN_LOADERS[pipeline_class])
    import diffusers
    from diffusers.loaders.lora_base import LoraBaseMixin

    pipeline_cls = getattr(diffusers, pipeline_class, None)
    if pipeline_cls is None:
        raise LoraschedError(f"{base}: unknown pipeline class {pipeline_class}")
    for cls in pipeline_cls.__mro__:
        if "load_lora_weights" in vars(cls) and issubclass(cls, LoraBaseMixin):
            return cls
    raise LoraschedError(f"{base}: {pipeline_class} has no LoRA loader in diffusers")


def load_skeleton(base: str, dtype: torch.dtype = torch.float32) -> Skeleton:
    """The base's LoRA-loadable components built from their configs on the meta device (see `Skeleton`).

    Only those components are built, so a component whose config names a class by a pipeline-relative library
    (SD1.5's `["stable_diffusion", "StableDiffusionSafetyChecker"]`) never needs resolving.

    `dtype` should be the LoRAs' own (promoted): a load casts adapter weights to their base layer's dtype, so it is
    the dtype of the factors read onto this skeleton.
    """
    root = resolve_base(base)
    index = model_index(root)
    loader = lora_loader(index["_class_name"], base)
    components: dict[str, torch.nn.Module] = {}
    for name in loader._lora_loadable_modules:
        spec = index.get(name)
        if not isinstance(spec, list) or None in spec:
            continue
        try:
            component = _component(*spec, root / name, dtype)
        except Exception as exc:  # a broken or foreign config: one line naming the component
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LoraschedError(f"{base}: cannot build its {name} from the config ({reason})") from exc
        if component is not None:
            components[name] = component
    return Skeleton(index["_class_name"], loader, components)
