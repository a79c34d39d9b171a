"""Subject and style fidelity as the fusion papers measure them (EST-LoRA's scoring scripts; docs/methods.md).

Every score is a cosine similarity of image embeddings averaged over all output × reference pairs:
- subject fidelity: CLIP ViT-B/32 image embeddings, and DINO ViT-S/16 CLS tokens, of each output against each
  subject reference image;
- style fidelity: the same against the style reference image(s);
- text alignment: the CLIP image embedding of each output against the CLIP text embedding of its own prompt.
The arithmetic and harmonic means of subject and style fidelity summarise the balance (as NP-LoRA reports them):
the harmonic mean is high only when neither side is lost.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..calibration.probes import embed, load_embedder, unloadable
from ..merge.errors import LoraschedError
from ..merge.quiet import collected_loading_messages

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` with every row of `b` (float64)."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs (a row of `a`, a row of `b`): EST-LoRA's folder-to-folder similarity."""
    return float(cosine_matrix(a, b).mean())


def arithmetic_mean(x: float, y: float) -> float:
    return (x + y) / 2


def harmonic_mean(x: float, y: float) -> float:
    """2xy / (x + y); 0 when either side is 0 or below (a lost side cannot be made up by the other)."""
    return 0.0 if x <= 0 or y <= 0 else 2 * x * y / (x + y)


@dataclass(frozen=True)
class Fidelity:
    """The scores of one output image, or their means over a set of outputs."""

    subject_clip: float
    subject_dino: float
    style_clip: float
    style_dino: float
    text_clip: float

    @property
    def mean_clip(self) -> float:
        return arithmetic_mean(self.subject_clip, self.style_clip)

    @property
    def harmonic_clip(self) -> float:
        return harmonic_mean(self.subject_clip, self.style_clip)

    @property
    def mean_dino(self) -> float:
        return arithmetic_mean(self.subject_dino, self.style_dino)

    @property
    def harmonic_dino(self) -> float:
        return harmonic_mean(self.subject_dino, self.style_dino)

    def as_dict(self) -> dict[str, float]:
        """Measured and derived scores by name (the derived ones computed from the measured)."""
        return {**asdict(self), **{name: getattr(self, name) for name in DERIVED}}

    @classmethod
    def mean(cls, scores: list[Fidelity]) -> Fidelity:
        """Per-image scores averaged: each output has every reference, so this is the mean over all pairs."""
        return cls(**{f.name: sum(getattr(s, f.name) for s in scores) / len(scores) for f in fields(cls)})


DERIVED = ("mean_clip", "harmonic_clip", "mean_dino", "harmonic_dino")
LABELS = {
    "subject_clip": "subject CLIP", "subject_dino": "subject DINO", "style_clip": "style CLIP",
    "style_dino": "style DINO", "text_clip": "text CLIP", "mean_clip": "mean CLIP", "harmonic_clip": "harmonic CLIP",
    "mean_dino": "mean DINO", "harmonic_dino": "harmonic DINO",
}


class Clip:
    """CLIP's projected image and text embeddings (what OpenAI's `encode_image` / `encode_text` return)."""

    def __init__(self, name: str, device: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.name = name
        try:
            with collected_loading_messages():
                self.processor = CLIPProcessor.from_pretrained(name)
                self.model = CLIPModel.from_pretrained(name).to(device).eval()
        except Exception as exc:  # missing folder, no network, not a CLIP model
            raise unloadable(name, "--clip", exc, "a CLIP model") from exc

    @staticmethod
    def _features(out) -> torch.Tensor:
        """transformers 4 returns the projected tensor, 5 an output whose pooler_output holds it."""
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.model.device)
        with torch.no_grad():
            return self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))

    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            return self._features(self.model.get_text_features(**inputs.to(self.model.device)))


class Dino:
    """DINO's image embedding: the CLS token in DINO's evaluation view (calibration/probes.py, EST's β too)."""

    def __init__(self, name: str, device: str) -> None:
        self.name = name
        self.processor, self.model = load_embedder(name, device, "--dino")

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        return embed(self.processor, self.model, images)


@dataclass(frozen=True)
class References:
    """Reference images of one side, and a digest of their files (a search log is only resumed for the same)."""

    images: list[Image.Image]
    names: list[str]
    sha256: str


def read_images(path: str, option: str) -> References:
    """The images of a folder (sorted by name; .png, .jpg, .jpeg, .webp, .bmp) or one image file, as RGB."""
    given = Path(path)
    if given.is_dir():
        files = sorted(p for p in given.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif given.is_file():
        files = [given]
    else:
        raise LoraschedError(f"{path}: {option}: no such folder or image file")
    if not files:
        raise LoraschedError(f"{path}: {option}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    digest, images = hashlib.sha256(), []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise LoraschedError(f"{file}: {option}: not a readable image ({exc})") from None
        digest.update(file.read_bytes())
    return References(images=images, names=[file.name for file in files], sha256=digest.hexdigest())


class Judge:
    """Scores outputs against fixed subject and style references, embedded once.

    Images are embedded one at a time, so an image's embedding does not depend on what it is batched with: the
    same image always gets the same scores (a resumed search compares like with like).
    """

    def __init__(self, clip: Clip, dino: Dino, subject: References, style: References) -> None:
        self.clip, self.dino, self.subject, self.style = clip, dino, subject, style
        self.references = {side: (self._each(clip.images, refs.images), self._each(dino.images, refs.images))
                           for side, refs in (("subject", subject), ("style", style))}

    @staticmethod
    def _each(embedder, images: list[Image.Image]) -> torch.Tensor:
        return torch.cat([embedder([image]) for image in images])

    def score(self, image: Image.Image, prompt: str) -> Fidelity:
        clip, dino = self.clip.images([image]), self.dino.images([image])
        (subject_clip, subject_dino), (style_clip, style_dino) = self.references["subject"], self.references["style"]
        return Fidelity(
            subject_clip=mean_cosine(clip, subject_clip),
            subject_dino=mean_cosine(dino, subject_dino),
            style_clip=mean_cosine(clip, style_clip),
            style_dino=mean_cosine(dino, style_dino),
            text_clip=mean_cosine(clip, self.clip.texts([prompt])),
        )


def load_judge(clip: str, dino: str, subject_images: str, style_images: str, device: str) -> Judge:
    """Read the references and load both embedders (checked before any generation starts)."""
    subject = read_images(subject_images, "--subject-images")
    style = read_images(style_images, "--style-images")
    return Judge(Clip(clip, device), Dino(dino, device), subject, style)
