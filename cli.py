"""`lorasched`: the command line. Thin: parse, call the library, turn its errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import click  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from merge import rules  # noqa: E402
from merge.errors import LoraschedError  # noqa: E402
from merge.fileformat import FormatError  # noqa: E402

DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Command(click.Command):
    """Every command turns our errors into `error: <file>: <problem>` on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (LoraschedError, FormatError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


def _bar(description: str):
    return lambda items: tqdm(items, desc=description, unit="layer", leave=False, disable=None)


@click.group()
def main() -> None:
    """Fuse a subject LoRA and a style LoRA into one scheduled LoRA file, and inspect such files."""


@main.command(cls=Command)
@click.option("--base", required=True, help="Base pipeline: a diffusers folder or a hub id (only configs are read).")
@click.option("--subject", required=True, help="Subject (content) LoRA .safetensors.")
@click.option("--style", required=True, help="Style LoRA .safetensors.")
@click.option("--method", type=click.Choice(rules.METHODS), default="klora", show_default=True)
@click.option("--pattern", type=click.Choice(["s", "s*"]), default="s", show_default=True, help="K-LoRA ramp.")
@click.option("--alpha", type=float, help="Ramp slope α (default: the method's published value).")
@click.option("--beta", type=float, help="Ramp offset β; for est, β = 1 − probe similarity (required).")
@click.option("--gamma", "gamma_mode", type=click.Choice(["trimmed", "global"]), default="trimmed", show_default=True,
              help="K-LoRA balance γ: trimmed mean of per-layer L1 ratios (code) or ratio of sums (paper).")
@click.option("--steps", type=int, default=30, show_default=True,
              help="Reference step count for the step numbers `inspect` shows; the file replays at any count.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="auto", show_default=True,
              help="dtype of the written factors (auto: the inputs').")
@click.option("--output", "-o", required=True, help="Scheduled LoRA .safetensors to write.")
def merge(base, subject, style, method, pattern, alpha, beta, gamma_mode, steps, device, dtype, output) -> None:
    """Merge two LoRAs into one scheduled LoRA file."""
    from merge.convert import merge as run_merge

    options = rules.RuleOptions(pattern=pattern, alpha=alpha, beta=beta, gamma=gamma_mode)
    result = run_merge(
        base, subject, style, output, method, options,
        steps=steps, device=device, dtype=DTYPES[dtype], progress=_bar("scoring"),
    )
    switching = sum(1 for phases in result.schedule.layers.values() if len(phases) > 1)
    click.echo(
        f"wrote {result.output}: {method}, {result.both_adapted} both-adapted layers "
        f"({switching} switch during denoising), {len(result.schedule.layers)} modules in all"
    )


@main.command(cls=Command)
@click.argument("path")
@click.option("--max-layers", type=int, help="Show at most this many layers in the table.")
def inspect(path, max_layers) -> None:
    """Print a scheduled file's sources, method, parameters and each layer's switch points."""
    from merge import fileformat, report
    from merge.lora_io import read_tensors
    from merge.schedule import Schedule

    read_tensors(path)  # one-line errors for a missing, truncated or non-safetensors file
    scheduled = fileformat.read(path)
    schedule = Schedule.from_json(scheduled.schedule_json)
    for line in report.summary_lines(scheduled, schedule) + [""] + report.table_lines(scheduled, schedule, max_layers):
        click.echo(line)


if __name__ == "__main__":
    main()
