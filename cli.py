"""`lorasched`: the command line. Thin: parse, call the library, turn its errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import torch
from tqdm import tqdm

from .calibration.embedders import DEFAULT_CLIP, DEFAULT_DINO, DEFAULT_EMBEDDER
from .merge import rules
from .merge.errors import LoraschedError
from .merge.schedule import REFERENCE_STEPS

DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Command(click.Command):
    """Every command turns our errors into `error: <file>: <problem>` on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LoraschedError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


def _bar(description: str):
    return lambda items: tqdm(items, desc=description, unit="layer", leave=False, disable=None)


def method_options(command):
    """Every registered method's options as click options (none has a click default, so a method can tell what
    was given; each applies its own defaults)."""
    for option in reversed(rules.all_options()):
        kind = click.Choice(option.type) if isinstance(option.type, tuple) else option.type
        shown = "" if option.default is None or "default" in option.help else f" (default: {option.default})"
        command = click.option(option.cli_flag, option.name, type=kind, help=option.help + shown)(command)
    return command


def _rule_options(given: dict) -> rules.RuleOptions:
    """The options given on the command line, parsed where a method's option reads text (`a,b` lists)."""
    parsed = {option.name: option for option in rules.all_options()}
    return rules.RuleOptions(**{name: parsed[name].parse(value, parsed[name].cli_flag) if parsed[name].parse else value
                                for name, value in given.items() if value is not None})


@click.group()
def main() -> None:
    """Fuse subject and style LoRAs into one scheduled LoRA file, and inspect such files."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before a command first imports transformers


@main.command(cls=Command)
@click.option("--base", required=True, help="Base pipeline: a diffusers folder or a hub id (only configs are read).")
@click.option("--subject", "subjects", multiple=True, metavar="PATH[:STRENGTH]",
              help="Subject (content) LoRA .safetensors (repeatable); `:0.8` multiplies its delta.")
@click.option("--style", "styles", multiple=True, metavar="PATH[:STRENGTH]", help="Style LoRA (repeatable).")
@click.option("--lora", "others", multiple=True, metavar="[ROLE=]PATH[:STRENGTH]",
              help="A LoRA with a role (subject, style, or static, the default: kept at weight 1 in every layer it "
                   "adapts, never switched off). Repeatable.")
@click.option("--method", type=click.Choice(rules.names()), default="klora", show_default=True,
              help="; ".join(f"{name}: {rules.get(name).summary}" for name in rules.names()))
@method_options
@click.option("--steps", type=int, default=REFERENCE_STEPS, show_default=True,
              help="Weight-only rules: reference step count for `inspect` and switch's --period (the file replays "
                   "at any count). "
                   "feature-kl and est probes: denoising steps of each calibration pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="dtype of the written factors (auto: the inputs').")
@click.option("--output", "-o", required=True, help="Scheduled LoRA .safetensors to write.")
@click.option("--prompts", multiple=True,
              help="Calibration prompt, or a .txt file with one per line (repeatable; default: trigger words).")
@click.option("--seeds", default="0,1,2,3", show_default=True, help="Calibration seeds, comma-separated.")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="Calibration guidance scale.")
@click.option("--resolution", type=int, help="Calibration image size in pixels (default: the pipeline's).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Prompts per calibration pass.")
@click.option("--log", "log_path", help="Calibration log to write or resume (default: OUTPUT.calibration.jsonl).")
@click.option("--min-run", type=int, default=1, show_default=True,
              help="feature-kl: suppress switches that last fewer than this many time bins.")
@click.option("--embedder", default=DEFAULT_EMBEDDER, show_default=True,
              help="est probes: image model (folder or hub id) that embeds the two probe images.")
@click.option("--format", "tensor_format", type=click.Choice(["auto", "kohya", "diffusers"]), default="auto",
              show_default=True, help="Tensor names of the output: kohya (lora_unet_…) or diffusers (PEFT lora_A/B); "
                                      "auto: kohya for SD1.x/SDXL, diffusers for FLUX/SD3.")
@click.option("--allow-pickle", is_flag=True, help="Read pickled .bin/.pt inputs with torch.load(weights_only=True).")
@click.option("--rank", "rank", help="Output rank: each source's delta per layer re-factorised by truncated SVD to at "
                                     "most R (`32`), or to the fewest singular values holding a share of its energy "
                                     "(`energy:0.99`); layers already within it are kept exactly.")
@click.option("--max-error", type=float, help="With --rank: refuse a layer whose relative error would exceed this.")
@click.option("--balance", type=click.Choice(["off", "auto"]), default="off", show_default=True,
              help="auto: search β and the γ scale (feature-kl: the γ scale) on probe generations over --prompts × "
                   "--seeds at --steps, keep the best harmonic mean of subject and style fidelity.")
@click.option("--subject-images", help="--balance auto: subject reference image(s), a folder or one file.")
@click.option("--style-images", help="--balance auto: style reference image(s), a folder or one file.")
@click.option("--balance-betas", help="--balance auto: β grid, comma-separated (default: β − 0.25, β, β + 0.25).")
@click.option("--balance-gamma-scales", help="--balance auto: γ scale grid, comma-separated (default: 0.5,1,2).")
@click.option("--clip", default=DEFAULT_CLIP, show_default=True, help="--balance auto: CLIP model (folder or hub id).")
@click.option("--dino", default=DEFAULT_DINO, show_default=True, help="--balance auto: DINO model (folder or hub id).")
def merge(**params) -> None:
    """Merge subject and style LoRAs (and static ones) into one scheduled LoRA file."""
    result = _merge(**params)
    if result is None:  # a process of a launch other than the main one: the main one reports
        return
    click.echo(_wrote(result))
    if result.search is not None:
        click.echo(_searched(result.search))


def _merge(base, subjects, styles, others, method, steps, device, dtype, output, prompts, seeds, guidance,
           resolution, batch_size, log_path, min_run, embedder, tensor_format, allow_pickle, rank, max_error, balance,
           subject_images, style_images, balance_betas, balance_gamma_scales, clip, dino, group=None,
           **method_options):
    """The merge command's work from its parsed options (shared by `merge` and each row of `merge-many`);
    `method_options`: every method's options as parsed (None where not given)."""
    from .convert import Balance, Calibration, MergeRequest, merge_loras
    from .merge.checks import parse_floats, parse_lora, parse_seeds
    from .merge.lora import STYLE, SUBJECT
    from .merge.rank import RankRequest

    loras = [parse_lora(text, SUBJECT, "--subject") for text in subjects] + \
        [parse_lora(text, STYLE, "--style") for text in styles] + [parse_lora(text) for text in others]
    searched = None
    if balance == "auto":
        searched = Balance(subject_images, style_images, parse_floats(balance_betas, "--balance-betas"),
                           parse_floats(balance_gamma_scales, "--balance-gamma-scales"), clip, dino)
    elif subject_images or style_images or balance_betas or balance_gamma_scales:
        raise LoraschedError("--subject-images, --style-images and the --balance-… grids need --balance auto")
    calibration = Calibration(
        prompts=prompts, seeds=parse_seeds(seeds), guidance=guidance, size=resolution, batch_size=batch_size,
        log=log_path, min_run=min_run, embedder=embedder,
    )
    request = MergeRequest(
        base, tuple(loras), output, method, _rule_options(method_options), steps=steps, device=device,
        dtype=DTYPES[dtype], tensor_format=None if tensor_format == "auto" else tensor_format,
        allow_pickle=allow_pickle, calibration=calibration, balance=searched,
        rank=None if rank is None else RankRequest.parse(rank), max_error=max_error,
    )
    return merge_loras(
        request, progress=_bar("scoring"), group=group,
        bar=lambda total: tqdm(total=total, desc="calibrating", unit="step", disable=None),
        search_bar=lambda total: tqdm(total=total, desc="balancing", unit="image", disable=None),
    )


def _wrote(result) -> str:
    switching = sum(1 for phases in result.schedule.layers.values() if len(phases) > 1)
    return (f"wrote {result.output}: {result.method}, {result.decided} decided layers "
            f"({switching} switch during denoising), {len(result.schedule.layers)} modules in all")


def _searched(search) -> str:
    from .merge.report import knobs

    return (f"balance auto: {knobs(search.record()['chosen'])} of {len(search.scores)} candidates (best harmonic "
            f"mean of CLIP subject and style fidelity); {search.generated} probe images made, {search.resumed} "
            f"read from {search.log}")


def _merge_row(row):
    """One manifest row as its own single-process merge (module-level, so a process pool can run it)."""
    from .distributed import Group, current
    from .many import timed

    def run(row) -> str:
        try:
            params = merge.make_context("merge", row.merge_args()).params
        except click.ClickException as exc:
            raise LoraschedError(exc.format_message().splitlines()[0]) from None
        return _wrote(_merge(**params, group=Group(device=current().device)))

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # a spawned worker starts without the CLI's setting
    return timed(row, run)


@main.command("merge-many", cls=Command)
@click.argument("manifest")
@click.option("--base", help="Base pipeline for rows without a `base` column.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Local processes (weight-only rules on CPU); under `accelerate launch`, rows go to its processes.")
def merge_many(manifest, base, jobs) -> None:
    """Merge every row of a CSV manifest (subject, style, method, options, output[, base]) and print a summary;
    rows whose output is up to date are skipped, and a failing row does not stop the others."""
    from .distributed import current
    from .many import read_manifest, run_rows, table

    if jobs < 1:
        raise LoraschedError(f"--jobs {jobs}: need at least 1")
    outcomes = run_rows(read_manifest(manifest, base), _merge_row, jobs, current())
    if outcomes is None:
        return
    for line in table(outcomes):
        click.echo(line)
    if any(outcome.failed for outcome in outcomes):
        sys.exit(2)


@main.command(cls=Command)
@click.argument("path")
@click.option("--max-layers", type=int, help="Show at most this many layers in the table.")
@click.option("--png", "png_path", help="Also draw the schedule as a heatmap PNG (layers × steps).")
@click.option("--allow-pickle", is_flag=True, help="Read a pickled .bin/.pt LoRA with torch.load(weights_only=True).")
def inspect(path, max_layers, png_path, allow_pickle) -> None:
    """Print a scheduled file's sources, method, parameters and each layer's switch points;
    for any other LoRA file, its format, architecture, modules, ranks, alphas, dtypes and metadata keys."""
    from .merge import fileformat, report
    from .merge.lora_io import read_tensors

    read_tensors(path, allow_pickle)  # one-line errors for a missing, truncated or non-safetensors file
    if Path(path).suffix != ".safetensors" or not fileformat.is_scheduled(path):
        from .merge.anatomy import describe, inspect_lora

        if png_path:
            raise LoraschedError(f"{path}: not a lorasched file, so there is no schedule for --png to draw")
        for line in describe(inspect_lora(path, allow_pickle)):
            click.echo(line)
        return
    scheduled = fileformat.read(path)
    for line in report.summary_lines(scheduled) + [""] + report.table_lines(scheduled, max_layers):
        click.echo(line)
    if png_path:
        from .merge.heatmap import draw_schedule

        draw_schedule(scheduled, report.decided_layers(scheduled), int(scheduled.params.get("steps", REFERENCE_STEPS)), png_path)
        click.echo(f"wrote {png_path}")


@main.command(cls=Command)
@click.argument("path")
@click.option("--base", required=True, help="Base pipeline with weights: a diffusers folder or a hub id.")
@click.option("--prompts", multiple=True, required=True,
              help="Held-out prompt, or a .txt file with one per line (repeatable).")
@click.option("--seeds", default="100,101", show_default=True, help="Held-out seeds, comma-separated.")
@click.option("--steps", type=int, help="Denoising steps (default: the file's reference or calibration count).")
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--resolution", type=int, help="Image size in pixels (default: the pipeline's).")
@click.option("--mode", type=click.Choice(["unfused", "fused"]), default="unfused", show_default=True,
              help="Replay mode to check (unfused matches the online rule op for op).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--min-agreement", type=float, default=0.0, show_default=True,
              help="Exit with code 1 when the overall decision agreement is below this fraction.")
@click.option("--report", "report_dir", help="Folder to write report.json, schedule.png and agreement.png into.")
@click.option("--subject", "subjects", multiple=True,
              help="A subject LoRA the file was made from (repeatable; feature-kl files need every source).")
@click.option("--style", "styles", multiple=True, help="A style LoRA the file was made from (repeatable).")
def verify(path, base, prompts, seeds, steps, guidance, resolution, mode, device, min_agreement, report_dir,
           subjects, styles) -> None:
    """Run the online rule and the replay side by side on held-out prompts/seeds and report how they differ."""
    from .convert import verify_file
    from .merge.checks import parse_seeds

    result = verify_file(
        path, base, prompts, parse_seeds(seeds), steps, guidance, resolution, mode, device, report_dir,
        sources=[(path, "subject") for path in subjects] + [(path, "style") for path in styles],
        bar=lambda total: tqdm(total=total, desc="verifying", unit="image", disable=None),
    )
    if result is None:  # a process of a launch other than the main one: the main one reports
        return
    for line in result.lines():
        click.echo(line)
    if result.agreement < min_agreement:
        click.echo(f"error: {path}: agreement {result.agreement:.2%} is below --min-agreement "
                   f"{min_agreement:.2%}", err=True)
        sys.exit(1)


@main.command("eval", cls=Command)
@click.argument("paths", nargs=-1, required=True)
@click.option("--base", required=True, help="Base pipeline with weights: a diffusers folder or a hub id.")
@click.option("--subject-images", required=True, help="Subject reference image(s): a folder or one file.")
@click.option("--style-images", required=True, help="Style reference image(s): a folder or one file.")
@click.option("--prompts", multiple=True, required=True, help="Prompt, or a .txt file with one per line (repeatable).")
@click.option("--seeds", default="0,1", show_default=True, help="Seeds, comma-separated.")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--guidance", type=float, default=7.5, show_default=True)
@click.option("--resolution", type=int, help="Image size in pixels (default: the pipeline's).")
@click.option("--clip", default=DEFAULT_CLIP, show_default=True, help="CLIP model: a folder or a hub id.")
@click.option("--dino", default=DEFAULT_DINO, show_default=True, help="DINO model: a folder or a hub id.")
@click.option("--mode", type=click.Choice(["fused", "unfused"]), default="fused", show_default=True,
              help="Replay mode of `attach`.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--report", "report_dir", help="Folder to write eval.json, eval.csv and contact_sheet.png into.")
def eval_files(paths, base, subject_images, style_images, prompts, seeds, steps, guidance, resolution, clip, dino,
               mode, device, report_dir) -> None:
    """Generate with each scheduled file and print its subject fidelity, style fidelity, text alignment, their
    means and the time per image, side by side (CLIP and DINO cosines, as the papers measure them)."""
    from .convert import evaluate_files
    from .merge.checks import parse_seeds

    result = evaluate_files(
        paths, base, subject_images, style_images, prompts, parse_seeds(seeds), steps, guidance, resolution, clip,
        dino, mode, device, report_dir,
        bar=lambda total: tqdm(total=total, desc="generating", unit="image", disable=None),
    )
    for line in result.lines():
        click.echo(line)
    if report_dir:
        click.echo(f"wrote {report_dir}/eval.json, eval.csv and contact_sheet.png")


if __name__ == "__main__":
    main()
