"""reForge: replay a lorasched file given as `<lora:NAME:S>` with the ComfyUI node's mechanism on reForge's
ComfyUI-derived patcher (`ldm_patched`).

The built-in Lora extension loads the file as a plain LoRA (its static mix) onto `forge_objects.unet`. Before every
sampling run (`process_before_every_sampling`, hires pass included) the denoiser is swapped for a clone in which
each of the file's plain patches is replaced, in place, by a `ScheduledLoRA` over the same layer (same strength,
same position in the layer's patch list), so the model loads with the first phase's sources. At every model
evaluation (`on_cfg_denoiser`) the clock puts each switching layer on its phase and rewrites only the weights whose
sources changed, from the patcher's exact backup of the original.

The patches and the writes at a switch are the ComfyUI node's own code (`patching.py`, a verbatim copy of
comfyui-lorasched/patching.py made by `make packs`) with reForge's `ldm_patched` modules handed in (`HOST`); this
module adds what is reForge's: finding the files, the plain patches, and the clock from the CFG denoiser.
"""

from __future__ import annotations

import functools
import os
import sys
import uuid
import weakref

import ldm_patched.float
import ldm_patched.modules.lora
import ldm_patched.modules.model_management
import ldm_patched.modules.model_patcher
import ldm_patched.modules.model_sampling
import ldm_patched.modules.utils
import torch
from ldm_patched.modules.weight_adapter.base import WeightAdapterBase
from ldm_patched.modules.weight_adapter.lora import LoRAAdapter

from .library import warn
from .patching import Host, Switcher, noise_levels, patch_class, scheduled_patches, weight_key
from .runs import progress
from .schema import KEY_VERSION, PEFT_TO_HOOK, FormatError, Layer, ScheduledFile, read

HOST = Host(float=ldm_patched.float, lora=ldm_patched.modules.lora,
            model_management=ldm_patched.modules.model_management, model_patcher=ldm_patched.modules.model_patcher,
            model_sampling=ldm_patched.modules.model_sampling, utils=ldm_patched.modules.utils)
ScheduledLoRA = patch_class(WeightAdapterBase)
# A file's (down, up) factor names as the Lora extension reads them: kohya, and diffusers/PEFT (`lora_A`, `lora_B`).
FACTOR_NAMES = ((".lora_down.weight", ".lora_up.weight"), (PEFT_TO_HOOK[0][0], PEFT_TO_HOOK[1][0]))

_CLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # switching patch -> its file's Switcher
_found: tuple[uuid.UUID, tuple[Switcher, ...]] | None = None  # the last patch set scanned for replays, and them
_built: tuple[tuple, object, list[str], list[str]] | None = None  # (input key, replayed unet, console lines,
# replayed files) of the last call


def setup() -> None:
    """Once, when the Script loads: the clock, on reForge's CFG-denoiser callback."""
    from modules import script_callbacks

    script_callbacks.remove_callbacks_for_function(on_cfg_denoiser)
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="lorasched")


def unload() -> None:
    """Undo `setup` (for `on_script_unloaded`)."""
    from modules import script_callbacks

    script_callbacks.remove_callbacks_for_function(on_cfg_denoiser)


def process_batch(p) -> None:
    """Nothing to check before the text encoders run: a file that cannot be replayed is left out of the denoiser
    in `process_before_every_sampling`."""


def process_before_every_sampling(p) -> list[str]:
    """Script hook, before every sampling run (the hires pass too): replay every lorasched file the Lora extension
    loaded for this prompt on `p.sd_model.forge_objects.unet`. A prompt without one is left untouched; a file
    that cannot be replayed is reported in one console line (once per generation) and left out of the denoiser.
    Returns the files replayed."""
    networks = sys.modules.get("networks")  # reForge's built-in Lora extension, imported by its script at start
    if networks is None:
        return []
    paths = list(dict.fromkeys(net.network_on_disk.filename for net in networks.loaded_networks
                               if KEY_VERSION in (net.network_on_disk.metadata or {})))
    if not paths:
        return []
    global _built
    forge_objects = p.sd_model.forge_objects
    unet = forge_objects.unet
    key = (unet, unet.patches_uuid, tuple((path, os.path.getmtime(path)) for path in paths))
    if _built is None or _built[0] != key:  # the same prompt again (the hires pass, a rerun) reuses the clone
        _built = (key, *_replayed(unet, paths, networks.load_lora_state_dict))
    reported = vars(p).setdefault("lorasched_reported", set())
    for message in _built[2]:
        if message not in reported:
            warn(message)
            reported.add(message)
    forge_objects.unet = _built[1]
    return _built[3]


def on_cfg_denoiser(params) -> None:
    """`script_callbacks.on_cfg_denoiser`, once per model evaluation before its cond/uncond batch: bring the
    scheduled layers of the model being sampled to this evaluation's step (progress) or noise level."""
    denoiser = params.denoiser
    unet = denoiser.inner_model.inner_model.forge_objects.unet
    for replay in _replays(unet):
        if replay.axis == "progress":
            time = progress(denoiser)
        else:
            time = noise_levels(HOST, replay.path, params.sigma.reshape(-1)[:1],
                                unet.get_model_object("model_sampling"))[0]
        replay.advance(unet, time)


def _replays(unet) -> tuple[Switcher, ...]:
    """The replays whose patches the patcher carries: the clock follows the patches through every clone."""
    global _found
    if _found is None or _found[0] != unet.patches_uuid:
        replays = {}
        for entries in unet.patches.values():
            for entry in entries:
                replay = _CLOCKS.get(entry[1]) if isinstance(entry[1], ScheduledLoRA) else None
                if replay is not None:
                    replays[id(replay)] = replay
        _found = (unet.patches_uuid, tuple(replays.values()))
    return _found[1]


def _replayed(unet, paths: list[str], load_state_dict) -> tuple[object, list[str], list[str]]:
    """A clone of `unet` with each file's plain patches replaced by scheduled ones (or removed when the file
    cannot be replayed), the console lines for those, and the files replayed."""
    clone = unet.clone()
    messages, replayed = [], []
    for path in paths:
        plain = _plain_entries(clone, load_state_dict(path))
        try:
            _replace(clone, *_read(path), plain)
            replayed.append(path)
        except FormatError as exc:
            messages.append(f"{exc}; generating without it")
            _remove(clone, plain)
    clone.patches_uuid = uuid.uuid4()  # the patch lists changed: the loader must patch this clone anew
    return clone, messages, replayed


def _plain_entries(patcher, lora: dict[str, torch.Tensor]) -> dict[object, tuple[str, list[int]]]:
    """Where the Lora extension's plain load of a file sits: key-map target -> (weight key, indices in its patch
    list), found by the factors it was loaded from (the same tensors while the extension's cache holds the file)."""
    key_map = HOST.lora.model_lora_keys_unet(patcher.model, {})
    found = {}
    for down_suffix, up_suffix in FACTOR_NAMES:
        for name, up in lora.items():
            target = key_map.get(name[:-len(up_suffix)]) if name.endswith(up_suffix) else None
            down = lora.get(name[:-len(up_suffix)] + down_suffix)
            if target is None or down is None:
                continue
            key = weight_key(target)
            indices = [index for index, entry in enumerate(patcher.patches.get(key, []))
                       if isinstance(entry[1], LoRAAdapter) and _same(entry[1].weights[0], up)
                       and _same(entry[1].weights[1], down)]
            if indices:
                found[target] = (key, indices)
    return found


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


def _replace(patcher, scheduled: ScheduledFile, layers: dict[str, Layer],
             plain: dict[object, tuple[str, list[int]]]) -> None:
    """Put a ScheduledLoRA where each plain patch of the file is, keeping its strength and slot. The file is
    checked against the model first, so one the extension could not load either is reported too."""
    patches = scheduled_patches(HOST, ScheduledLoRA, scheduled, layers, patcher.model,
                                patcher.get_model_object("model_sampling"))
    if not plain:  # unet strength 0: the extension loaded nothing into the denoiser
        return
    if any(len(indices) > 1 for _, indices in plain.values()):
        raise FormatError(f"{scheduled.path}: the prompt names the file more than once; name it once")
    missing = [patch.module.key for target, patch in patches.items() if target not in plain]
    if missing:
        raise FormatError(f"{scheduled.path}: {len(missing)} of {len(patches)} layers were not loaded by the Lora "
                          f"extension, e.g. {missing[0]}; the file does not fit this model")
    switching = []
    for target, patch in patches.items():
        key, (index,) = plain[target]
        entry = patcher.patches[key][index]
        patcher.patches[key][index] = (entry[0], patch, *entry[2:])
        if patch.module.switches:
            switching.append(patch)
    if switching:  # a schedule without switches (`direct`) needs no clock
        replay = Switcher(HOST, scheduled.path, scheduled.axis, switching)
        for patch in switching:
            _CLOCKS[patch] = replay


def _remove(patcher, plain: dict[object, tuple[str, list[int]]]) -> None:
    """Drop a file's plain patches: the denoiser samples as if the prompt did not name it."""
    dropped: dict[str, set[int]] = {}
    for key, indices in plain.values():  # several targets can share a weight (slices of a fused one)
        dropped.setdefault(key, set()).update(indices)
    for key, indices in dropped.items():
        kept = [entry for index, entry in enumerate(patcher.patches[key]) if index not in indices]
        if kept:
            patcher.patches[key] = kept
        else:
            del patcher.patches[key]


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, mtime: float) -> tuple[ScheduledFile, dict[str, Layer]]:
    scheduled = read(path, with_tensors=True)
    return scheduled, scheduled.layers()


def _read(path: str) -> tuple[ScheduledFile, dict[str, Layer]]:
    """Parse (and hash-check) a file once per version of it."""
    return _read_cached(path, os.path.getmtime(path))
