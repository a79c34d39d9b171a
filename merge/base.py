"""The base model as a *skeleton*: the real pipeline class and module tree, with uninitialised weights.

Weight-only rules never need the base weights, only its module names and shapes (to check that a LoRA fits) and
its pipeline class (whose `load_lora_weights` converts every LoRA key format). Building the components on the
meta device and then `to_empty` gives real tensors that are never touched, so an SDXL skeleton costs address
space, not memory.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
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
    return torch.nn.Module.to(model, dtype=dtype).to_empty(device="cpu").eval()


def _component(library: str, class_name: str, folder: Path, is_scheduler: bool, dtype: torch.dtype):
    import transformers

    cls = getattr(importlib.import_module(library), class_name)
    if is_scheduler:
        return cls.from_pretrained(folder)
    if library == "diffusers" and hasattr(cls, "load_config"):
        return _empty(cls, cls.load_config(folder), dtype)
    if library == "transformers" and issubclass(cls, transformers.PreTrainedModel):
        return _empty(cls, transformers.AutoConfig.from_pretrained(os.fspath(folder)), dtype)
    return None


def load_skeleton(base: str, dtype: torch.dtype = torch.float32):
    """The base pipeline with untouched weights: right classes, names and shapes, fit for `load_lora_weights`.

    Only the components a LoRA can adapt (and the scheduler) are built; the others are None, so a component whose
    config names a class by a pipeline-relative library (SD1.5's `["stable_diffusion",
    "StableDiffusionSafetyChecker"]`) never needs resolving.

    `dtype` should be the LoRAs' own: PEFT casts adapter weights to the base layer's dtype, so a matching
    skeleton keeps the factors bit-exact and uncopied.
    """
    import diffusers

    root = resolve_base(base)
    index = model_index(root)
    pipeline_cls = getattr(diffusers, index["_class_name"], None)
    if pipeline_cls is None:
        raise LoraschedError(f"{base}: unknown pipeline class {index['_class_name']}")
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    components: dict[str, object] = {}
    wanted = set(getattr(pipeline_cls, "_lora_loadable_modules", ())) | {"scheduler"}
    for name, spec in index.items():
        if name not in accepted or not isinstance(spec, list):
            continue
        library, class_name = spec
        if class_name is None or name not in wanted:  # VAE, tokenizers, safety checker: no LoRA reaches them
            components[name] = None
            continue
        try:
            components[name] = _component(library, class_name, root / name, name == "scheduler", dtype)
        except Exception as exc:  # a broken or foreign config: one line naming the component
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise LoraschedError(f"{base}: cannot build its {name} from the config ({reason})") from exc
    if "requires_safety_checker" in accepted:
        components["requires_safety_checker"] = False
    return pipeline_cls(**components)
