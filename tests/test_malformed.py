"""Fuzz: malformed lorasched files (header, metadata, factors) and malformed input LoRAs (factors, alphas).

Every case ends the same way: the CLI exits 2 with one line that names the file, `attach` raises
`LoraschedError` and leaves the pipeline as it was, and no traceback or builtin exception gets through.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from lorasched import LoraschedError, attach
from lorasched.cli import main
from lorasched.convert import merge
from lorasched.merge import fileformat
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
KEYS = ("lorasched.method", "lorasched.params", "lorasched.sources", "lorasched.schedule", "lorasched.modules")


@pytest.fixture(scope="module")
def good(tiny_base, kohya_pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "good.safetensors"
    merge(str(tiny_base), *map(str, kohya_pair), str(out), "klora", steps=10)
    with safe_open(str(out), "pt") as handle:
        metadata = dict(handle.metadata())
    return out, load_file(str(out)), metadata


def _json_edits(metadata: dict[str, str]) -> dict[str, dict[str, str]]:
    """Named metadata variants: each lorasched key missing, not JSON, of the wrong type, and semantic breaks."""
    modules, schedule = json.loads(metadata["lorasched.modules"]), json.loads(metadata["lorasched.schedule"])
    params, sources = json.loads(metadata["lorasched.params"]), json.loads(metadata["lorasched.sources"])
    name = sorted(schedule["layers"])[0]
    cases: dict[str, dict[str, str]] = {}

    def case(label: str, **changes) -> None:
        edited = dict(metadata)
        for key, value in changes.items():
            key = "lorasched." + key
            if value is None:
                edited.pop(key)
            else:
                edited[key] = value if isinstance(value, str) else json.dumps(value)
        cases[label] = edited

    for key in KEYS:
        short = key.removeprefix("lorasched.")
        case(f"{short}-missing", **{short: None})
        if short != "method":
            case(f"{short}-not-json", **{short: "{not json"})
            case(f"{short}-a-list", **{short: [1, 2]})
    case("version-3", format_version="3")
    case("method-unknown", method="magic")
    for field in ("alpha", "beta", "gamma"):
        case(f"params-no-{field}", params={k: v for k, v in params.items() if k != field})
        case(f"params-{field}-string", params={**params, field: "1.0"})
    case("params-steps-zero", params={**params, "steps": 0})
    case("params-calibration-empty", params={**params, "calibration": {}})
    case("sources-no-style", sources=[sources[0]])
    case("sources-not-objects", sources=[3, 3])
    case("sources-same-file-twice", sources=[sources[0], {**sources[0], "role": "style"}])
    case("sources-unknown-role", sources=[sources[0], {**sources[1], "role": "lighting"}])
    case("sources-format-1-object", sources={"subject": sources[0], "style": sources[1]})
    case("tensor-format-unknown", tensor_format="onnx")
    case("sources-style-no-sha", sources=[sources[0], {"file": "x", "role": "style"}])

    def layers(phases):
        return {**schedule, "layers": {**schedule["layers"], name: phases}}

    case("schedule-unknown-source", schedule=layers([[0.0, [7]]]))
    case("schedule-source-by-name", schedule=layers([[0.0, "subject"]]))
    case("schedule-selection-unsorted", schedule=layers([[0.0, [1, 0]]]))
    case("schedule-selection-twice", schedule=layers([[0.0, [1, 1]]]))
    case("schedule-unsorted", schedule=layers([[0.0, [0]], [0.7, [1]], [0.3, [0]]]))
    case("schedule-late-start", schedule=layers([[0.2, [0]]]))
    case("schedule-past-one", schedule=layers([[0.0, [0]], [1.5, [1]]]))
    case("schedule-no-phases", schedule=layers([]))
    case("schedule-start-string", schedule=layers([["0", [0]]]))
    case("schedule-start-bool", schedule=layers([[False, [0]]]))
    case("schedule-phase-not-pair", schedule=layers([[0.0]]))
    case("schedule-bad-axis", schedule={**schedule, "axis": "sigma"})
    case("schedule-no-layers", schedule={"axis": "progress", "layers": {}})
    case("schedule-agreement-without-bins", schedule={**schedule, "agreement": {name: [1.0]}})
    case("schedule-extra-layer", schedule={**schedule, "layers": {**schedule["layers"], "unet.x": [[0.0, [0]]]}})
    record = modules[name]
    for label, changed in (("ranks-negative", {"ranks": [-1, record["ranks"][1]]}),
                           ("ranks-strings", {"ranks": ["4", "8"]}), ("ranks-zero", {"ranks": [0, 0]}),
                           ("ranks-three", {"ranks": record["ranks"] + [0]}),
                           ("scores-one", {"scores": [1.0]}),
                           ("static-nan", {"static": [float("nan"), 0.5]}), ("static-two", {"static": [2.0, 0.5]}),
                           ("static-zero-with-rank", {"static": [0.0, record["static"][1]]}),
                           ("no-key", {"key": None}),
                           ("ranks-wrong", {"ranks": [record["ranks"][0] + 1, record["ranks"][1]]})):
        case(f"modules-{label}", modules={**modules, name: {**record, **changed}})
    case("modules-empty", modules={})
    case("modules-not-objects", modules={name: 3})
    return cases


def _write(path, tensors, metadata) -> None:
    """Save with the tensor hash recomputed, so that only the check under test can refuse the file."""
    save_file(tensors, path, metadata={**metadata, fileformat.KEY_TENSOR_HASH: fileformat.tensor_sha256(tensors)})


def _tensor_edits(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    down = sorted(k for k in tensors if k.endswith("lora_down.weight"))[0]
    up = down.replace("lora_down", "lora_up")
    nan = dict(tensors)
    nan[up] = tensors[up].clone()
    nan[up][0, 0] = float("inf")
    return {
        "factor-missing": {k: v for k, v in tensors.items() if k != up},
        "factor-rank-cut": {**tensors, down: tensors[down][:-1].contiguous()},
        "factor-1d": {**tensors, up: tensors[up].flatten().contiguous()},
        "factor-inf": nan,
    }


def _header_edits(raw: bytes) -> dict[str, bytes]:
    size = struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(0)
    flipped = bytearray(raw)
    for index in rng.sample(range(8, 8 + size), 12):
        flipped[index] = rng.randrange(256)
    return {
        "header-truncated": raw[: 8 + size // 2],
        "header-size-huge": struct.pack("<Q", 1 << 40) + raw[8:],
        "header-not-json": raw[:8] + b"!" * size + raw[8 + size:],
        "header-bytes-flipped": bytes(flipped),
        "data-truncated": raw[: len(raw) - 7],
        "empty": b"",
    }


@pytest.fixture(scope="module")
def malformed(good, tmp_path_factory) -> dict[str, object]:
    path, tensors, metadata = good
    folder = tmp_path_factory.mktemp("malformed")
    files = {}
    for label, edited in _json_edits(metadata).items():
        files[label] = folder / f"{label}.safetensors"
        _write(files[label], tensors, edited)
    for label, edited in _tensor_edits(tensors).items():
        files[label] = folder / f"{label}.safetensors"
        _write(files[label], edited, metadata)
    for label, data in _header_edits(path.read_bytes()).items():
        files[label] = folder / f"{label}.safetensors"
        files[label].write_bytes(data)
    files["tampered"] = folder / "tampered.safetensors"
    save_file({**tensors, next(iter(tensors)): next(iter(tensors.values())) * 2}, files["tampered"], metadata=metadata)
    return files


def _one_line_exit_2(result, path) -> str:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
    return lines[0]


def test_the_fuzz_covers_many_cases(malformed):
    assert len(malformed) >= 60


def test_inspect_refuses_each_malformed_file_in_one_line(malformed):
    runner = CliRunner()
    for label, path in malformed.items():
        if label in ("factor-inf", "tampered"):
            continue  # inspect reads the header only (metadata and shapes): these are the hook's to refuse
        _one_line_exit_2(runner.invoke(main, ["inspect", str(path)]), path)


def test_attach_refuses_each_malformed_file_and_changes_nothing(malformed, pipe64):
    """attach reads with the hosts' reader: a file whose schedule is sound replays whatever its method and params
    say (CONVERTER_ONLY); every other case is refused before the pipeline changes."""
    state = {k: v.clone() for k, v in pipe64.unet.state_dict().items()}
    for label, path in malformed.items():
        if label in CONVERTER_ONLY:
            attach(pipe64, path).detach()
            continue
        with pytest.raises(LoraschedError) as error:
            attach(pipe64, path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), label
    assert all(torch.equal(v, state[k]) for k, v in pipe64.unet.state_dict().items())
    assert not pipe64.get_list_adapters() or not any(pipe64.get_list_adapters().values())


PACK_READERS = ("comfyui-lorasched/schema.py", "sd-webui-lorasched/lorasched_webui/schema.py")
# What only the converter checks (fileformat.read: the method and its parameters): a host replays the schedule and
# never reads them, so its reader takes these files.
CONVERTER_ONLY = {"method-unknown", "params-no-alpha", "params-alpha-string", "params-no-beta", "params-beta-string",
                  "params-no-gamma", "params-gamma-string", "params-steps-zero", "params-calibration-empty"}


@pytest.mark.parametrize("copy", PACK_READERS)
def test_each_pack_reader_refuses_each_malformed_file_in_one_line(malformed, copy, monkeypatch):
    """The ComfyUI node and the WebUI extension (every host) read a file through their copy of merge/schema.py
    as `read(path, with_tensors=True)` before touching a model: each case is one FormatError line naming the file.
    The header-only read (the extension's library listing) refuses all but the value checks."""
    spec = importlib.util.spec_from_file_location(f"pack_schema_{len(copy)}", REPO / copy)
    schema = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, schema)  # as a package import registers it (dataclasses need it)
    spec.loader.exec_module(schema)
    assert CONVERTER_ONLY < set(malformed)
    for label, path in malformed.items():
        if label in CONVERTER_ONLY:
            assert schema.read(path, with_tensors=True).schedule.layers, label
            continue
        with pytest.raises(schema.FormatError) as error:
            schema.read(path, with_tensors=True)
        assert str(path) in str(error.value) and "\n" not in str(error.value), label
        if label not in ("factor-inf", "tampered"):
            with pytest.raises(schema.FormatError):
                schema.read(path)


def test_verify_refuses_a_schedule_naming_an_unknown_source(malformed, tiny_base):
    path = malformed["schedule-unknown-source"]
    line = _one_line_exit_2(CliRunner().invoke(main, ["verify", str(path), "--base", str(tiny_base), "--prompts",
                                                      "x", "--seeds", "1", "--resolution", "32"]), path)
    assert "lorasched.schedule" in line and "[7]" in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", ["--alpha", "--beta"])
def test_non_finite_parameters_are_refused_before_anything_is_written(tiny_base, kohya_pair, tmp_path, option,
                                                                      value):
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(main, ["merge", "--base", str(tiny_base), "--subject", str(kohya_pair[0]),
                                       "--style", str(kohya_pair[1]), "--method", "klora", option, value,
                                       "-o", str(out)])
    assert result.exit_code == 2 and "finite" in result.stderr and not out.exists()


def _input_edits(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Malformed input LoRAs: alphas and factors as a broken trainer or a hand edit could leave them."""
    alpha = sorted(k for k in tensors if k.endswith(".alpha"))[0]
    down = alpha.replace(".alpha", ".lora_down.weight")
    up = alpha.replace(".alpha", ".lora_up.weight")
    return {
        "alpha-nan": {**tensors, alpha: torch.tensor(float("nan"))},
        "alpha-vector": {**tensors, alpha: torch.ones(3)},
        "alpha-int-matrix": {**tensors, alpha: torch.ones(2, 2, dtype=torch.int64)},
        "alpha-orphan": {**tensors, "lora_unet_nowhere.alpha": torch.tensor(1.0)},
        "up-without-down": {k: v for k, v in tensors.items() if k != down},
        "ranks-disagree": {**tensors, up: tensors[up][:, :-1].contiguous()},
        "down-1d": {**tensors, down: tensors[down].flatten().contiguous()},
        "factor-int": {**tensors, down: tensors[down].to(torch.int32)},
        "only-alphas": {k: v for k, v in tensors.items() if k.endswith(".alpha")},
    }


@pytest.mark.parametrize("label", ["alpha-nan", "alpha-vector", "alpha-int-matrix", "alpha-orphan",
                                   "up-without-down", "ranks-disagree", "down-1d", "factor-int", "only-alphas"])
def test_a_malformed_input_lora_is_one_line_exit_2(tiny_base, kohya_pair, tmp_path, label):
    bad = tmp_path / f"{label}.safetensors"
    save_file(_input_edits(load_file(str(kohya_pair[0])))[label], bad)
    out = tmp_path / "out.safetensors"
    runner = CliRunner()
    _one_line_exit_2(runner.invoke(main, ["merge", "--base", str(tiny_base), "--subject", str(bad), "--style",
                                          str(kohya_pair[1]), "-o", str(out)]), bad)
    assert not out.exists()
    inspected = runner.invoke(main, ["inspect", str(bad)])
    assert inspected.exit_code in (0, 2) and (inspected.exception is None or isinstance(inspected.exception,
                                                                                        SystemExit))
