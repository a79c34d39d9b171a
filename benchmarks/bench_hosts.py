"""Sampling time with a lorasched file replayed against the same file as each host's plain LoRA (its static mix), on
the tiny SD1 model, in every host the extension and the node run in: A1111 1.10, Forge, reForge (the vendored
hosts in ../shared/vendor, through the test worlds of tests/webui) and ComfyUI (the node against LoraLoader, the
table of tests/comfyui/overhead.py). The goal is replay / plain <= 1.05.

Each WebUI host installs its own `modules` package, so each is measured in a process of its own; the hosts need the
ComfyUI venv (`make .venv-comfy/.installed`):

    .venv-comfy/bin/python -m benchmarks.bench_hosts            # Euler, 20 steps, fastest of 5 runs per mode
    .venv-comfy/bin/python -m benchmarks.bench_hosts --steps 50 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEBUI_TESTS = REPO / "tests" / "webui"
# host -> (world module, the call that returns its measurement; each world times the sampler run differently, see
# its `measure` docstring: A1111 and Forge the sampler run, reForge the whole generation)
HOSTS = {
    "A1111 1.10": ("a1111_world", "measure(steps={steps}, repeats={repeats})", "replay_step_s", "plain_step_s"),
    "Forge": ("forge_world", "measure(steps={steps}, repeats={repeats})", None, None),
    "reForge": ("reforge_world", "measure(steps={steps}, repeats={repeats})", "replayed_s", "plain_s"),
}


def measure(host: str, steps: int, repeats: int) -> tuple[float, float]:
    """(replayed, plain) seconds per step in `host`, measured in a fresh interpreter."""
    module, call, replayed_key, plain_key = HOSTS[host]
    code = (f"import json, sys; sys.path.insert(0, {str(WEBUI_TESTS)!r}); import {module}; "
            f"print('RESULT ' + json.dumps({module}.{call.format(steps=steps, repeats=repeats)}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{host}: the measurement failed:\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if replayed_key is None:  # Forge reports seconds per step already
        return result["seconds_per_step"]["replay"], result["seconds_per_step"]["plain_lora"]
    return result[replayed_key] / steps, result[plain_key] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"tiny SD1 model, Euler, {args.steps} steps, fastest of {args.repeats} runs per mode")
    print(f"{'host':<12} {'replayed ms/step':>16} {'plain LoRA ms/step':>18} {'replayed / plain':>16}")
    for host in HOSTS:
        replayed, plain = measure(host, args.steps, args.repeats)
        print(f"{host:<12} {1e3 * replayed:>16.2f} {1e3 * plain:>18.2f} {replayed / plain:>16.3f}", flush=True)
    print("\nComfyUI, the node against LoraLoader (tests/comfyui/overhead.py):", flush=True)
    subprocess.run([sys.executable, str(REPO / "tests" / "comfyui" / "overhead.py")], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
