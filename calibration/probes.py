"""EST-LoRA's β from probe images: β = 1 − cos(embedding of a subject-only image, of a style-only image).

Both probes use the same prompt and seed 0, so the similarity measures how close the two LoRAs already are:
similar LoRAs (β near 0) hand over to the style later, dissimilar ones sooner.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from ..merge.errors import LoraschedError
from ..merge.lora import STYLE, SUBJECT, LoraSet
from ..merge.quiet import collected_loading_messages
from ..merge.rules.direct import DirectRule
from .embedders import DEFAULT_EMBEDDER
from .online import OnlineRule


def load_embedder(name: str, device: str, option: str = "--embedder"):
    """(image processor, model) loadable by transformers from a local folder or a hub id."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        with collected_loading_messages():
            processor = AutoImageProcessor.from_pretrained(name)
            model = AutoModel.from_pretrained(name).to(device).eval()
    except Exception as exc:  # missing folder, no network, not an image model
        raise unloadable(name, option, exc, "an image model") from exc
    if model.main_input_name != "pixel_values":  # e.g. a whole CLIP, which also needs text
        raise LoraschedError(f"{name}: {option}: {type(model).__name__} is not an image-only model "
                             f"(it takes {model.main_input_name}); give an image model such as {DEFAULT_EMBEDDER}")
    return processor, model


def unloadable(name: str, option: str, exc: Exception, kind: str) -> LoraschedError:
    """The one-line error for a model transformers cannot load from `name` (given as `option`)."""
    where = f"cannot load {kind} from this folder" if Path(name).exists() else (
        "no such folder, and not loadable as a hub id")
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return LoraschedError(f"{name}: {option}: {where} ({reason})")


def evaluation_crop(image: Image.Image, size: int) -> Image.Image:
    """DINO's evaluation view, which EST-LoRA's scripts use: the short side resized to size·256/224 (bilinear),
    then the centre size × size crop (256 → 224 at DINO's own size)."""
    image = image.convert("RGB")
    short = round(size * 256 / 224)
    scale = short / min(image.size)
    width, height = max(short, round(image.width * scale)), max(short, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def embed(processor, model, images: list[Image.Image]) -> torch.Tensor:
    """One vector per image: the last layer's CLS token for transformers (ViT, DINO), else the pooled output.

    The CLS token is DINO's image embedding and what EST-LoRA compares; the `pooler` transformers puts on a
    `ViTModel` is not part of DINO checkpoints (it would be freshly random). Models with a fixed input size see
    the evaluation crop; the processor then only rescales and normalises.
    """
    size = getattr(model.config, "image_size", None)
    if isinstance(size, int):
        images = [evaluation_crop(image, size) for image in images]
        inputs = processor(images=images, return_tensors="pt", do_resize=False)
    else:
        inputs = processor(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs.to(model.device))
    hidden = out.last_hidden_state
    return (hidden[:, 0] if hidden.dim() == 3 else out.pooler_output.flatten(1)).float()


def solo(pair: LoraSet, source: str) -> LoraSet:
    """The pair with the other LoRA emptied: every module then runs `source` alone (nothing left to decide)."""
    (keep,) = pair.selection(source)
    return replace(pair, sources=tuple(s if i == keep else replace(s, lora=replace(s.lora, modules={}))
                                       for i, s in enumerate(pair.sources)))


def probe_beta(pipe, pair: LoraSet, prompt: str, embedder: str, steps: int, guidance: float, size: int) -> dict:
    """β and its provenance: the embedder, prompt, seed, steps and the cosine similarity measured."""
    processor, model = load_embedder(embedder, pipe.device.type)
    images = []
    for source in (SUBJECT, STYLE):
        alone = solo(pair, source)
        with OnlineRule(pipe, alone, DirectRule.of(alone)):
            images += pipe(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="pil",
            ).images
    vectors = embed(processor, model, images)
    similarity = float(torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0))
    return {"beta": 1.0 - similarity, "similarity": similarity, "embedder": embedder, "prompt": prompt, "seed": 0,
            "steps": steps}
