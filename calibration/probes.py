"""EST-LoRA's β from probe images: β = 1 − cos(embedding of a subject-only image, of a style-only image).

Both probes use the same prompt and seed 0, so the similarity measures how close the two LoRAs already are:
similar LoRAs (β near 0) hand over to the style later, dissimilar ones sooner.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from lorasched.merge.errors import LoraschedError
from lorasched.merge.lora import STYLE, SUBJECT, LoraPair
from lorasched.merge.rules.direct import DirectRule

from .online import OnlineRule

DEFAULT_EMBEDDER = "facebook/dino-vits16"


def load_embedder(name: str, device: str):
    """(image processor, model) loadable by transformers from a local folder or a hub id."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        processor = AutoImageProcessor.from_pretrained(name)
        model = AutoModel.from_pretrained(name).to(device).eval()
    except Exception as exc:  # missing folder, no network, not an image model
        where = "cannot load an image model from this folder" if Path(name).exists() else (
            "no such folder, and not loadable as a hub id")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LoraschedError(f"{name}: --embedder: {where} ({reason})") from exc
    return processor, model


def embed(processor, model, images) -> torch.Tensor:
    """One vector per image: the pooled output when the model has one, else the first (CLS) token."""
    inputs = processor(images=images, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model(**inputs)
    pooled = getattr(out, "pooler_output", None)
    return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()


def solo(pair: LoraPair, source: str) -> LoraPair:
    """The pair with the other LoRA emptied: every module then runs `source` alone (nothing left to decide)."""
    other = STYLE if source == SUBJECT else SUBJECT
    return replace(pair, **{other: replace(pair.source(other), modules={})})


def probe_beta(pipe, pair: LoraPair, prompt: str, embedder: str, steps: int, guidance: float, size: int) -> dict:
    """β and its provenance: the embedder, prompt, seed, steps and the cosine similarity measured."""
    processor, model = load_embedder(embedder, pipe.device.type)
    images = []
    for source in (SUBJECT, STYLE):
        with OnlineRule(pipe, solo(pair, source), DirectRule()):
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
