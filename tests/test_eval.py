"""`lorasched eval`: the metric definitions on fixed embeddings, the DINO embedding, and the command end to end on
the tiny pipeline with two files, checked against an independent computation."""

import csv
import json
import math

import pytest
import torch
from conftest import run
from lorasched.evaluation.metrics import (
    Fidelity,
    Judge,
    References,
    arithmetic_mean,
    cosine_matrix,
    harmonic_mean,
    mean_cosine,
)
from lorasched.calibration.probes import embed, evaluation_crop, load_embedder
from lorasched.merge.replay import attach
from PIL import Image

SIZE = 32
PROMPTS = ("a photo of sks dog", "a red house by the sea")


def test_cosines_and_means_match_hand_computed_values():
    outputs = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # pairs: (1,0)·(1,0) = 1, (1,0)·(1,1)/√2 = 1/√2, (0,1)·(1,0) = 0, (0,1)·(1,1)/√2 = 1/√2
    expected = [[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]
    torch.testing.assert_close(cosine_matrix(outputs, references), torch.tensor(expected, dtype=torch.float64))
    assert mean_cosine(outputs, references) == pytest.approx((1 + 2 / math.sqrt(2)) / 4)
    assert arithmetic_mean(0.5, 0.25) == 0.375
    assert harmonic_mean(0.5, 0.25) == pytest.approx(1 / 3)  # 2·0.5·0.25 / 0.75
    assert harmonic_mean(0.9, -0.1) == 0.0 and harmonic_mean(0.0, 0.8) == 0.0
    one = Fidelity(subject_clip=0.8, subject_dino=0.6, style_clip=0.4, style_dino=0.2, text_clip=0.3)
    two = Fidelity(subject_clip=0.6, subject_dino=0.4, style_clip=0.6, style_dino=0.4, text_clip=0.1)
    mean = Fidelity.mean([one, two])
    assert (mean.subject_clip, mean.style_clip, mean.text_clip) == pytest.approx((0.7, 0.5, 0.2))
    assert one.harmonic_clip == pytest.approx(2 * 0.8 * 0.4 / 1.2) and one.mean_dino == pytest.approx(0.4)
    assert set(one.as_dict()) == {"subject_clip", "subject_dino", "style_clip", "style_dino", "text_clip",
                                  "mean_clip", "harmonic_clip", "mean_dino", "harmonic_dino"}


class ColourEmbedder:
    """An image's embedding is its mean RGB colour (and every text embeds as `text`): cosines known by hand."""

    def __init__(self, text=(1.0, 0.0, 0.0)):
        self.text = torch.tensor([text])

    def images(self, images):
        return torch.stack([torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) for image in images])

    def texts(self, texts):
        return self.text.repeat(len(texts), 1)


def solid(rgb):
    return Image.new("RGB", (8, 8), rgb)


def test_judge_scores_each_side_against_its_own_references_and_the_prompt():
    subject = References([solid((255, 0, 0)), solid((255, 255, 0))], ["red.png", "yellow.png"], "s")
    style = References([solid((0, 0, 255))], ["blue.png"], "t")
    judge = Judge(ColourEmbedder(), ColourEmbedder(), subject, style)
    scores = judge.score(solid((255, 0, 0)), "a red thing")
    assert scores.subject_clip == pytest.approx((1 + 1 / math.sqrt(2)) / 2)  # red·red = 1, red·yellow = 1/√2
    assert scores.subject_dino == pytest.approx(scores.subject_clip)
    assert scores.style_clip == pytest.approx(0.0) and scores.harmonic_clip == 0.0  # the style is lost entirely
    assert scores.text_clip == pytest.approx(1.0)  # the text embeds as red
    purple = judge.score(solid((255, 0, 255)), "x")
    assert purple.style_clip == pytest.approx(1 / math.sqrt(2)) and purple.subject_clip == pytest.approx(
        (1 / math.sqrt(2) + 0.5) / 2)


def test_dino_embedding_is_the_cls_token_of_the_evaluation_crop(tiny_embedders):
    processor, model = load_embedder(str(tiny_embedders[1]), "cpu")
    wide = Image.new("RGB", (64, 32))
    wide.paste((250, 0, 0), (0, 0, 32, 32))
    crop = evaluation_crop(wide, 32)
    assert crop.size == (32, 32)  # short side 32 → 37 (= 32·256/224), wide side 74, then the centre 32 × 32
    assert crop.getpixel((0, 0))[0] > 200 and crop.getpixel((31, 0))[0] < 50
    vector = embed(processor, model, [wide])
    inputs = processor(images=[crop], return_tensors="pt", do_resize=False)
    with torch.no_grad():
        out = model(**inputs)
    torch.testing.assert_close(vector, out.last_hidden_state[:, 0])  # not the (untrained) pooler of DINO files
    assert not torch.allclose(vector, out.pooler_output)


@pytest.fixture(scope="module")
def two_files(tiny_base, kohya_pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    files = []
    for method in ("klora", "direct"):
        files.append(folder / f"{method}.safetensors")
        merged = run("merge", "--base", tiny_base, "--subject", kohya_pair[0], "--style", kohya_pair[1], "-o",
                     files[-1], "--method", method, "--steps", 4)
        assert merged.exit_code == 0, merged.output
    return files


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One subject and two style reference images (seeded noise at two sizes: the processors resize)."""
    folder = tmp_path_factory.mktemp("refs")
    generator = torch.Generator().manual_seed(3)
    for side, sizes in (("subject", (32,)), ("style", (32, 48))):
        (folder / side).mkdir()
        for i, size in enumerate(sizes):
            pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / side / f"{i}.png")
    (folder / "style" / "notes.txt").write_text("not an image: skipped")
    return folder / "subject", folder / "style"


def test_eval_prints_the_table_and_writes_the_report_for_two_files(tiny_base, two_files, references, tiny_embedders,
                                                                   tmp_path):
    report = tmp_path / "report"
    result = run("eval", *two_files, "--base", tiny_base, "--subject-images", references[0], "--style-images",
                 references[1], "--prompts", PROMPTS[0], "--prompts", PROMPTS[1], "--seeds", "0,1", "--steps", 3,
                 "--resolution", SIZE, "--clip", tiny_embedders[0], "--dino", tiny_embedders[1], "--report", report)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert "klora.safetensors" in header and "direct.safetensors" in header
    for label in ("subject CLIP", "subject DINO", "style CLIP", "style DINO", "text CLIP", "mean CLIP",
                  "harmonic CLIP", "mean DINO", "harmonic DINO", "s / image"):
        row = next(line for line in lines if line.startswith(label))
        assert len(row.split()) == len(label.split()) + 2, row  # one number per file
    numbers = json.loads((report / "eval.json").read_text())
    assert numbers["seeds"] == [0, 1] and numbers["steps"] == 3 and numbers["style_references"] == ["0.png", "1.png"]
    assert [f["method"] for f in numbers["files"]] == ["klora", "direct"]
    for scored in numbers["files"]:
        assert len(scored["images"]) == 4 and scored["seconds_per_image"] > 0
        scores = scored["scores"]
        assert scores["harmonic_clip"] == pytest.approx(harmonic_mean(scores["subject_clip"], scores["style_clip"]))
        assert scores["subject_clip"] == pytest.approx(
            sum(image["scores"]["subject_clip"] for image in scored["images"]) / 4)
    rows = list(csv.reader((report / "eval.csv").open()))
    assert rows[0][:3] == ["file", "method", "subject_clip"] and len(rows) == 3
    assert float(rows[1][rows[0].index("style_dino")]) == pytest.approx(numbers["files"][0]["scores"]["style_dino"],
                                                                         abs=1e-6)
    sheet = Image.open(report / "contact_sheet.png")
    assert sheet.size == (180 + 4 * 128, 40 + 2 * 128)  # label column + prompt × seed columns; header + file rows

    # Independent check of one number: the klora file's outputs, generated here with attach and embedded with
    # transformers' CLIPModel directly, against the style references, mean over all pairs.
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPProcessor

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base)
    pipe.set_progress_bar_config(disable=True)
    with attach(pipe, two_files[0]):
        outputs = [pipe(prompt, num_inference_steps=3, height=SIZE, width=SIZE,
                        generator=[torch.Generator().manual_seed(seed)]).images[0]
                   for prompt in PROMPTS for seed in (0, 1)]
    clip, processor = CLIPModel.from_pretrained(tiny_embedders[0]), CLIPProcessor.from_pretrained(tiny_embedders[0])
    styles = [Image.open(path).convert("RGB") for path in sorted(references[1].glob("*.png"))]

    def features(images):
        with torch.no_grad():
            out = clip.get_image_features(**processor(images=images, return_tensors="pt"))
        vectors = out if isinstance(out, torch.Tensor) else out.pooler_output
        return vectors / vectors.norm(dim=-1, keepdim=True)

    expected = float((features(outputs) @ features(styles).T).mean())
    assert numbers["files"][0]["scores"]["style_clip"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--subject-images": "no/such/folder"}, "--subject-images: no such folder"),
        ({"--style-images": "EMPTY"}, "--style-images: the folder holds no images"),
        ({"--clip": "no/such/clip"}, "--clip: no such folder"),
        ({"--dino": "CLIPFOLDER"}, "--dino: CLIPModel is not an image-only model"),
        ({"--steps": "0"}, "--steps 0"),
        ({"--report": "no/such/parent/report"}, "does not exist"),
        ({"FILE": "PLAIN"}, "not a lorasched file"),
    ],
)
def test_bad_eval_input_is_one_line_exit_2(tiny_base, kohya_pair, two_files, references, tiny_embedders, tmp_path,
                                           change, message):
    (tmp_path / "empty").mkdir()
    options = {"--base": tiny_base, "--subject-images": references[0], "--style-images": references[1],
               "--prompts": "x", "--steps": "2", "--resolution": SIZE, "--clip": tiny_embedders[0],
               "--dino": tiny_embedders[1]}
    substitutes = {"EMPTY": tmp_path / "empty", "CLIPFOLDER": tiny_embedders[0], "PLAIN": kohya_pair[0]}
    options.update({key: substitutes.get(value, value) for key, value in change.items()})
    file = options.pop("FILE", two_files[0])
    result = run("eval", file, *[item for pair in options.items() for item in pair])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
