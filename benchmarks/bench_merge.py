"""Merge time and peak memory at full size: an SDXL-size kohya pair (722 modules, fp16) and a FLUX.1-size
diffusers/PEFT pair (19 double + 38 single blocks, 418 modules, bf16), written by this script into a temporary
folder that is removed at the end. Each merge runs as `lorasched merge` in a child process, so its peak RSS is its
own; the import baseline is a child that imports exactly the modules that merge ended up with, and nothing else.

    python -m benchmarks.bench_merge [--sdxl-rank 64] [--flux-ranks 16,64] [--device auto|cpu|cuda] [--threads N]
                                     [--profile]

`--threads` sets the children's torch threads (OMP_NUM_THREADS; default: torch's own, one per core): on a machine
whose cores other work keeps busy, one thread avoids OpenMP barriers that wait for a descheduled thread.
`--profile` runs each K-LoRA merge under cProfile as well and prints where its time goes.
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

from benchmarks import flux_like, sdxl_like  # noqa: E402

# Runs a command in this interpreter; as it exits, prints its peak RSS (MiB) to stderr and writes the names of the
# modules it imported to the file named by LORASCHED_BENCH_MODULES. The peak is VmHWM, the high-water mark of this
# program's own memory: getrusage's ru_maxrss would also count the forked parent's RSS from before the exec.
MEASURED = (
    "import atexit, json, os, re, sys\n"
    "def _report():\n"
    "    peak = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) / 1024\n"
    "    print('PEAK_RSS_MIB', peak, file=sys.stderr)\n"
    "    if os.environ.get('LORASCHED_BENCH_MODULES'):\n"
    "        open(os.environ['LORASCHED_BENCH_MODULES'], 'w').write(json.dumps(sorted(sys.modules)))\n"
    "atexit.register(_report)\n"
)
MERGE = "from lorasched.cli import main\nmain()\n"
THREADS: dict[str, str] = {}  # OMP_NUM_THREADS for the children, when --threads is given
IMPORTS = (  # the baseline: import every module a merge had, in name order (packages before their modules)
    "import importlib, json, sys\n"
    "for name in json.load(open(sys.argv[1])):\n"
    "    try:\n"
    "        importlib.import_module(name)\n"
    "    except Exception:\n"
    "        pass\n"
)
PROFILE = (
    "import cProfile, pstats, sys\n"
    "from lorasched.cli import main\n"
    "profile = cProfile.Profile()\n"
    "profile.runcall(main, sys.argv[1:], standalone_mode=False)\n"
    "stats = pstats.Stats(profile, stream=sys.stdout)\n"
    "phases = {'read': ('lora_io.py', 'read_pair'), 'rule': ('rules/__init__.py', 'build'),\n"
    "          'export': ('export.py', 'export')}\n"
    "print('seconds in', {phase: round(stats.stats[key][3], 2) for phase, (file, function) in phases.items()\n"
    "                     for key in stats.stats if key[0].endswith(file) and key[2] == function})\n"
    "stats.sort_stats('tottime').print_stats(14)\n"
)


def run_measured(code: str, *args: str, modules: Path | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, stdout) of `python -c code args` in a child process."""
    env = {**os.environ, "LORASCHED_BENCH_MODULES": str(modules or ""), **THREADS}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", MEASURED + code, *args], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    seconds = time.perf_counter() - start
    peaks = [line.split()[1] for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_MIB")]
    if result.returncode or not peaks:
        sys.exit(result.stderr)
    return seconds, float(peaks[-1]), result.stdout


def write_pair(folder: Path, architecture: str, rank: int) -> tuple[Path, dict[str, Path]]:
    """The base configs and a subject/style pair of the given rank."""
    base = folder / architecture
    if architecture == "sdxl":
        from diffusers import UNet2DConditionModel

        if not base.exists():
            sdxl_like.save_base_configs(base, width=1.0)
        with torch.device("meta"):
            targets = sdxl_like.lora_targets(UNet2DConditionModel(**sdxl_like.unet_config(1.0)))
        make = sdxl_like.random_kohya
    else:
        if not base.exists():
            flux_like.save_base_configs(base)
        targets, make = flux_like.lora_targets(), flux_like.random_peft
    paths = {}
    for role, seed in (("subject", 1), ("style", 2)):
        paths[role] = folder / f"{architecture}-{rank}-{role}.safetensors"
        save_file(make(targets, rank, seed), paths[role])
    return base, paths


def bench(folder: Path, architecture: str, rank: int, device: str, profile: bool) -> list[str]:
    base, paths = write_pair(folder, architecture, rank)
    inputs = sum(p.stat().st_size for p in paths.values()) / 2**20
    rows, modules = [], folder / "modules.json"
    for method, extra in (("klora", []), ("est", ["--beta", "0.5"]), ("direct", [])):
        output = folder / f"{architecture}-{rank}-{method}.safetensors"
        args = ["merge", "--base", str(base), "--subject", str(paths["subject"]), "--style", str(paths["style"]),
                "--method", method, "--device", device, "--output", str(output), *extra]
        seconds, peak, _ = run_measured(MERGE, *args, modules=modules)
        _, baseline, _ = run_measured(IMPORTS, str(modules))
        rows.append(f"{architecture:<6} {rank:>4} {inputs:>7.0f} {method:<7} {seconds:>8.1f} {peak:>9.0f} {baseline:>9.0f} "
                    f"{peak - baseline:>9.0f} {peak / inputs:>7.2f} {(peak - baseline) / inputs:>9.2f}")
        output.unlink()
        if profile and method == "klora":
            print(f"\n{architecture} rank {rank} klora under cProfile:")
            print(run_measured(PROFILE, *args)[2])
            output.unlink()
    for path in paths.values():
        path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdxl-rank", type=int, default=64)
    parser.add_argument("--flux-ranks", default="16,64", help="comma-separated; empty for no FLUX rows")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
    cases = [("sdxl", args.sdxl_rank)] + [("flux", int(r)) for r in args.flux_ranks.split(",") if r.strip()]
    threads = args.threads or torch.get_num_threads()
    print(f"device {args.device} ({'cuda' if torch.cuda.is_available() else 'no cuda'}), {os.cpu_count()} CPUs, "
          f"torch threads {threads}; RSS in MiB; baseline = a child importing exactly the merge's modules")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as folder:
        for architecture, rank in cases:
            rows += bench(Path(folder), architecture, rank, args.device, args.profile)
    print(f"\n{'arch':<6} {'rank':>4} {'inputs':>7} {'method':<7} {'seconds':>8} {'peak RSS':>9} {'baseline':>9} "
          f"{'over base':>9} {'peak/in':>7} {'over/in':>9}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
