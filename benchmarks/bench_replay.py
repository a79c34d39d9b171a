"""Time one denoising step of an SDXL-topology UNet: base, plain LoRA (unfused / fused), lorasched replay
(each mode, of a pair and of four LoRAs: two subjects, two styles), K-LoRA run online the way the published code runs it (dense B·A and two top-K per layer per
call), and the feature-kl rule run online (two low-rank LoRA passes and two KL divergences per layer per
call). All in one process, same inputs; configurations run round-robin, median of the per-step times over
several full runs after a warm-up round.

    python -m benchmarks.bench_replay                  # CPU defaults: --width 0.2 --resolution 256
    python -m benchmarks.bench_replay --width 1 --resolution 1024 --dtype fp16   # full SDXL, on a GPU
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from lorasched.calibration.online import OnlineRule  # noqa: E402
from lorasched.merge import rules  # noqa: E402
from lorasched.merge.export import export  # noqa: E402
from lorasched.merge.lora import LoraFile, LoraModule, LoraSet, Source  # noqa: E402
from lorasched.merge.quiet import collected_loading_messages  # noqa: E402
from lorasched.merge.replay import attach  # noqa: E402
from lorasched.merge.rules.feature_kl import FeatureKLRule  # noqa: E402
from lorasched.merge.schedule import from_rule  # noqa: E402

from benchmarks.sdxl_like import build_unet, lora_targets, random_kohya  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def tiny_sdxl_pipeline(unet):
    """The SDXL pipeline class around the benchmark UNet; text encoders and VAE are tiny (never run here)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from lorasched.tiny import tiny_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, vocab_size=128)
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(block_out_channels=[32], norm_num_groups=16, latent_channels=4),
        text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=32)),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    )


def as_set(loras: list[dict], roles: tuple[str, ...]) -> LoraSet:
    def modules(tensors):
        out = {}
        for key in [k for k in tensors if k.endswith(".lora_down.weight")]:
            stem = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].float(), tensors[f"{stem}.lora_up.weight"].float()
            out["unet." + NAMES[stem]] = LoraModule(down, up, float(tensors[f"{stem}.alpha"]) / down.shape[0])
        return out

    sources = tuple(Source(LoraFile(path=f"{role}{i}.safetensors", sha256=f"{i:064d}", dtype=torch.float16,
                                    modules=modules(t)), role) for i, (role, t) in enumerate(zip(roles, loras)))
    return LoraSet(sources, denoiser="unet", pipeline_class="StableDiffusionXLPipeline", single_text_encoder=False)


def scheduled_file(loras: LoraSet, path: Path):
    """The K-LoRA file of `loras` at `path`; returns its rule and schedule."""
    rule, params = rules.build("klora", loras, rules.RuleOptions())
    schedule = from_rule(rule, loras)
    export(path, loras, schedule, method="klora", params=params, scores=rule.scores)
    return rule, schedule


class PublishedKLora:
    """K-LoRA's decision the way the public code computes it: dense ΔW and top-K for both LoRAs on every call."""

    reads_features = False  # decides from weights and time, as every weight-only rule

    def __init__(self, pair: LoraSet, rule) -> None:
        self.pair, self.rule = pair, rule

    @property
    def layers(self) -> list[str]:
        return self.rule.layers

    def choose(self, name: str, p: float) -> tuple[int, ...]:
        subject, style = self.pair.subject.modules[name], self.pair.style.modules[name]
        k = subject.rank * style.rank
        device = "cuda" if torch.cuda.is_available() else "cpu"
        score_c = float(subject.delta(torch.float32, device).abs_().flatten().topk(k).values.sum())
        score_s = float(style.delta(torch.float32, device).abs_().flatten().topk(k).values.sum())
        return (0,) if score_c / self.rule.gamma > score_s * self.rule.ramp(p) else (1,)


def time_run(pipe, inputs, steps: int) -> list[float]:
    """Seconds per UNet call over one full run of `steps` timesteps (after one untimed call at the first)."""
    pipe.scheduler.set_timesteps(steps)
    with torch.no_grad():
        pipe.unet(inputs["sample"], pipe.scheduler.timesteps[0], **inputs["kwargs"])
    times = []
    for t in pipe.scheduler.timesteps:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            pipe.unet(inputs["sample"], t, **inputs["kwargs"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def configurations(pipe, path, pair, rule, subject, four):
    """name -> (set up, tear down); each set-up installs one way of running the LoRA pair (or, `four`, the file of
    four LoRAs)."""

    def plain(fuse: bool):
        def setup():
            with collected_loading_messages():
                pipe.load_lora_weights({k: v.to(pipe.unet.dtype) for k, v in subject.items()}, adapter_name="plain")
            if fuse:
                pipe.fuse_lora()

        def teardown():
            if fuse:
                pipe.unfuse_lora()
            pipe.unload_lora_weights()

        return setup, teardown

    def replay(mode: str, file=path):
        handles = []
        return (lambda: handles.append(attach(pipe, file, mode=mode))), (lambda: handles.pop().detach())

    online = OnlineRule(pipe, pair, PublishedKLora(pair, rule))
    feature = OnlineRule(pipe, pair, FeatureKLRule(gamma=1.0), samples=1)  # batch 2 = [uncond; cond] of one prompt
    return {
        "base, no LoRA": (lambda: None, lambda: None),
        "plain LoRA, unfused (PEFT)": plain(False),
        "plain LoRA, fused": plain(True),
        "lorasched replay, unfused": replay("unfused"),
        "lorasched replay, fused": replay("fused"),
        "replay of 4 LoRAs, unfused": replay("unfused", four),
        "replay of 4 LoRAs, fused": replay("fused", four),
        "online K-LoRA (published style)": (online.__enter__, lambda: online.__exit__(None, None, None)),
        "online feature-kl": (feature.__enter__, lambda: feature.__exit__(None, None, None)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--width", type=float, default=1.0 if gpu else 0.2, help="channel scale (1 = SDXL)")
    parser.add_argument("--resolution", type=int, default=1024 if gpu else 256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16" if gpu else "fp32")
    args = parser.parse_args()
    device, dtype = ("cuda" if gpu else "cpu"), DTYPES[args.dtype]

    unet = build_unet(args.width, dtype, device)
    pipe = tiny_sdxl_pipeline(unet).to(device)
    targets = lora_targets(pipe.unet)
    global NAMES
    NAMES = {"lora_unet_" + name.replace(".", "_"): name for name, _ in targets}
    loras = [random_kohya(targets, args.rank, seed=seed) for seed in (1, 2, 3, 4)]
    pair = as_set(loras[:2], ("subject", "style"))
    folder = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, folder, True)
    path, four = folder / "scheduled.safetensors", folder / "four.safetensors"
    rule, schedule = scheduled_file(pair, path)
    scheduled_file(as_set(loras, ("subject", "subject", "style", "style")), four)

    side = args.resolution // 8
    config = pipe.unet.config
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, side, side, generator=generator).to(device, dtype),
        "kwargs": {
            "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim, generator=generator).to(device, dtype),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(2, config.projection_class_embeddings_input_dim - 1536, generator=generator).to(device, dtype),
                "time_ids": torch.tensor([[args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]] * 2).to(device, dtype),
            },
        },
    }
    switching = sum(len(p) > 1 for p in schedule.layers.values())
    print(f"SDXL-topology UNet, width {args.width} (channels {config.block_out_channels}), {args.resolution}px, "
          f"batch 2 (CFG), {args.dtype} on {device}; {len(targets)} LoRA modules, rank {args.rank}; "
          f"{args.steps} steps; K-LoRA schedule: {switching} switching layers")

    configs = configurations(pipe, path, pair, rule, loras[0], four)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.repeats + 1):  # round-robin, so drift in machine speed hits every row alike
        for name, (setup, teardown) in configs.items():
            setup()
            run = time_run(pipe, inputs, args.steps)
            teardown()
            if round_:
                times[name] += run
    rows = {name: (statistics.median(t), statistics.fmean(t)) for name, t in times.items()}

    plain_unfused, plain_fused = rows["plain LoRA, unfused (PEFT)"][0], rows["plain LoRA, fused"][0]
    print(f"\n{'configuration':<34} {'median ms':>10} {'mean ms':>9} {'÷ plain unfused':>16} {'÷ plain fused':>14}")
    for name, (median, mean) in rows.items():
        print(f"{name:<34} {median * 1e3:>10.1f} {mean * 1e3:>9.1f} {median / plain_unfused:>16.3f} "
              f"{median / plain_fused:>14.3f}")
    print()
    for online_name in ("online K-LoRA (published style)", "online feature-kl"):
        online = rows[online_name][0]
        for mode, plain in (("unfused", plain_unfused), ("fused", plain_fused)):
            removed = (online - rows[f"lorasched replay, {mode}"][0]) / (online - plain)
            print(f"replay ({mode}) removes {100 * removed:.1f} % of {online_name}'s overhead over a plain {mode} "
                  f"LoRA step")


if __name__ == "__main__":
    main()
