"""`lorasched eval`: generate with each scheduled file (replayed by `attach`) and score the outputs the way the
papers do (evaluation/metrics.py), so files of any method can be compared side by side on the same prompts,
seeds and references. The report folder keeps the numbers (eval.json, eval.csv) and a contact sheet to look at.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from ..calibration.runner import seeded_generators
from ..merge import fileformat
from ..merge.replay import attach
from .metrics import DERIVED, LABELS, Fidelity, Judge


def render(pipe, prompt: str, seed: int, steps: int, guidance: float, size: int) -> tuple[Image.Image, float]:
    """One seeded image (the same latents on any device, as in calibration) and the seconds it took."""
    start = time.perf_counter()
    image = pipe(
        prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
        generator=seeded_generators(seed, 1), output_type="pil",
    ).images[0]
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return image, time.perf_counter() - start


@dataclass(frozen=True)
class FileScores:
    """One file's outputs: the mean scores, the scores of each (prompt, seed) and the time per image."""

    file: str
    method: str
    scores: Fidelity
    per_image: list[dict]
    seconds_per_image: float
    images: list[Image.Image] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return Path(self.file).name


@dataclass(frozen=True)
class EvalResult:
    """What `lorasched eval` measured, for every file on the same prompts, seeds and references."""

    files: list[FileScores]
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    size: int
    mode: str
    clip: str
    dino: str
    subject_references: list[str]
    style_references: list[str]

    @property
    def runs(self) -> list[tuple[str, int]]:
        return [(prompt, seed) for prompt in self.prompts for seed in self.seeds]

    def lines(self) -> list[str]:
        """The table `lorasched eval` prints: one column per file, one row per metric."""
        width = max(12, *(len(f.name) for f in self.files))
        rows = [f"{'metric':<14}" + "".join(f"  {f.name:>{width}}" for f in self.files)]
        for key, label in LABELS.items():
            rows.append(f"{label:<14}" + "".join(f"  {f.scores.as_dict()[key]:>{width}.4f}" for f in self.files))
        rows.append(f"{'s / image':<14}" + "".join(f"  {f.seconds_per_image:>{width}.3f}" for f in self.files))
        head = (f"eval        {len(self.files)} file(s), {len(self.prompts)} prompt(s) × seeds {self.seeds}, "
                f"{self.steps} steps, {self.size} px, guidance {self.guidance:g}, replay {self.mode}")
        refs = (f"references  {len(self.subject_references)} subject, {len(self.style_references)} style; "
                f"CLIP {self.clip}, DINO {self.dino}")
        return [head, refs, ""] + rows

    def to_json(self) -> dict:
        settings = {key: getattr(self, key) for key in ("prompts", "seeds", "steps", "guidance", "size", "mode", "clip",
                                                        "dino", "subject_references", "style_references")}
        files = [{"file": f.file, "method": f.method, "scores": f.scores.as_dict(),
                  "seconds_per_image": f.seconds_per_image, "images": f.per_image} for f in self.files]
        return {**settings, "files": files}

    def csv_rows(self) -> list[list]:
        keys = list(LABELS)
        rows = [["file", "method", *keys, "seconds_per_image"]]
        for f in self.files:
            scores = f.scores.as_dict()
            rows.append([f.file, f.method, *(f"{scores[k]:.6f}" for k in keys), f"{f.seconds_per_image:.4f}"])
        return rows


def evaluate(pipe, paths: list[str], judge: Judge, prompts: list[str], seeds: list[int], steps: int,
             guidance: float, size: int, mode: str = "fused", bar=None) -> EvalResult:
    """Generate every (prompt, seed) with each file attached and score it; `bar` advances once per image.

    The timed runs exclude attaching (fused mode merges weights once) and scoring; one short run first warms
    the pipeline up so the first file is not charged for it.
    """
    render(pipe, prompts[0], seeds[0], 1, guidance, size)
    results = []
    for path in paths:
        scheduled = fileformat.read(path)
        images, per_image, seconds = [], [], []
        with attach(pipe, path, mode=mode):
            for prompt in prompts:
                for seed in seeds:
                    image, took = render(pipe, prompt, seed, steps, guidance, size)
                    images.append(image)
                    seconds.append(took)
                    per_image.append({"prompt": prompt, "seed": seed, "seconds": took,
                                      "scores": judge.score(image, prompt).as_dict()})
                    if bar is not None:
                        bar.update(1)
        measured = [Fidelity(**{k: v for k, v in run["scores"].items() if k not in DERIVED}) for run in per_image]
        results.append(FileScores(file=str(path), method=scheduled.method, scores=Fidelity.mean(measured),
                                  per_image=per_image, seconds_per_image=sum(seconds) / len(seconds), images=images))
    return EvalResult(
        files=results, prompts=list(prompts), seeds=list(seeds), steps=steps, guidance=guidance, size=size, mode=mode,
        clip=judge.clip.name, dino=judge.dino.name,
        subject_references=judge.subject.names, style_references=judge.style.names,
    )


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(result: EvalResult, cell: int | None = None) -> Image.Image:
    """Rows = files, columns = prompt × seed, each labelled: the outputs at a glance."""
    cell = cell or min(256, max(128, result.size))
    font = ImageFont.load_default(size=13)
    label, header, line = 180, 40, 16
    runs = result.runs
    sheet = Image.new("RGB", (label + cell * len(runs), header + cell * len(result.files)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (prompt, seed) in enumerate(runs):
        x = label + column * cell + 4
        draw.text((x, 4), _fit(draw, prompt, cell - 8, font), fill="black", font=font)
        draw.text((x, 4 + line), f"seed {seed}", fill="black", font=font)
    for row, scored in enumerate(result.files):
        y = header + row * cell
        draw.text((4, y + cell // 2 - line), _fit(draw, scored.name, label - 8, font), fill="black", font=font)
        draw.text((4, y + cell // 2), f"HM CLIP {scored.scores.harmonic_clip:.3f}", fill="black", font=font)
        for column, image in enumerate(scored.images):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.LANCZOS), (label + column * cell, y))
    return sheet


def write_report(result: EvalResult, folder) -> list[Path]:
    """eval.json (settings, each file's mean and per-image scores, timing), eval.csv (the table, one row per
    file) and contact_sheet.png; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    paths = [folder / "eval.json", folder / "eval.csv", folder / "contact_sheet.png"]
    paths[0].write_text(json.dumps(result.to_json(), indent=1) + "\n")
    with open(paths[1], "w", newline="") as handle:
        csv.writer(handle).writerows(result.csv_rows())
    contact_sheet(result).save(paths[2])
    return paths
