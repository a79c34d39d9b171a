"""Merge time and peak memory for an SDXL-size kohya pair (full width, 722 modules, rank 64, fp16), files
written by this script. Each merge runs as `lorasched merge` in a child process, so its peak RSS is its own.

    python -m benchmarks.bench_merge [--rank 64] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from benchmarks.sdxl_like import lora_targets, random_kohya, save_base_configs, unet_config  # noqa: E402

# Runs a command in this interpreter and prints its own peak RSS (MiB) to stderr as it exits.
MEASURED = (
    "import atexit, resource, sys; "
    "atexit.register(lambda: print('PEAK_RSS_MIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
    "file=sys.stderr)); "
)


def run_measured(code: str, *args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stderr) of `python -c code args` in a child process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED + code, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peaks = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_MIB")]
    if result.returncode or not peaks:
        sys.exit(result.stderr)
    return seconds, float(peaks[-1]), result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    folder = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    save_base_configs(folder / "sdxl", width=1.0)
    with torch.device("meta"):
        targets = lora_targets(UNet2DConditionModel(**unet_config(1.0)))
    paths = {}
    for role, seed in (("subject", 1), ("style", 2)):
        paths[role] = folder / f"{role}.safetensors"
        save_file(random_kohya(targets, args.rank, seed), paths[role])
    input_mb = sum(p.stat().st_size for p in paths.values()) / 2**20
    _, baseline_mb, _ = run_measured("import cli, diffusers, transformers, peft, diffusers.pipelines")
    print(f"SDXL-size kohya pair: {len(targets)} modules, rank {args.rank}, fp16; inputs {input_mb:.0f} MiB in all; "
          f"device {args.device}; a child that only imports the stack peaks at {baseline_mb:.0f} MiB RSS")
    print(f"\n{'method':<8} {'seconds':>8} {'peak RSS MiB':>13} {'÷ inputs':>9} {'(peak − imports) ÷ inputs':>27}")
    for method, extra in (("klora", []), ("est", ["--beta", "0.5"]), ("direct", [])):
        output = folder / f"{method}.safetensors"
        seconds, peak, _ = run_measured(
            "import cli; cli.main()", "merge", "--base", str(folder / "sdxl"), "--subject", str(paths["subject"]),
            "--style", str(paths["style"]), "--method", method, "--device", args.device, "--output", str(output),
            *extra,
        )
        print(f"{method:<8} {seconds:>8.1f} {peak:>13.0f} {peak / input_mb:>9.2f} {(peak - baseline_mb) / input_mb:>27.2f}")


if __name__ == "__main__":
    main()
