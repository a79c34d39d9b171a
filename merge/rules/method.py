"""What a fusion method is to the rest of lorasched: one `Method` object per method (the `METHOD` of its rule
module), resolved once from its name by the registry (`rules/__init__.py`) and asked, never re-tested, from there
on: the options it takes, whether it schedules from weights or is calibrated from denoising runs, the params it
writes in `lorasched.params` and how a reader checks them, the rule `verify` rebuilds from a file, and the line
`inspect` prints for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import LoraschedError
from ..lora import STATIC, LoraSet, Selection
from ..schedule import REFERENCE_STEPS


def finite(value) -> bool:
    """A JSON number that is not a bool, NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count(value) -> bool:
    """A positive whole JSON number."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Option:
    """A method option: its name (the `RuleOptions` key), the CLI flag, the value type the CLI parses (a click
    type name: float, int, str, or choices), the default when not given, the help text, and `problem(value)`, what
    is wrong with a value (None: nothing)."""

    name: str
    type: type | tuple[str, ...]
    help: str
    default: Any = None
    problem: Callable[[Any], str | None] = lambda value: None
    parse: Callable[[str, str], Any] | None = None  # the CLI's text -> value (for `a,b` lists), given the flag
    flag: str = ""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


class RuleOptions(Mapping):
    """What the user set, by option name; an option left out takes its method's default (`Method.settings`)."""

    def __init__(self, **values: Any) -> None:
        self._values = {name: value for name, value in values.items() if value is not None}

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RuleOptions({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def replace(self, **changes: Any) -> RuleOptions:
        return RuleOptions(**{**self._values, **changes})


class Settings:
    """A method's options with its defaults filled in, read as attributes (`settings.mu`)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


class ParamsCheck:
    """What a method's `check_params` reports through: `fail(problem)` raises the one-line FormatError naming the
    file and the params key (see fileformat.read)."""

    def __init__(self, fail: Callable[[str], None]) -> None:
        self.fail = fail

    def numbers(self, params: dict, names: tuple[str, ...], method: str) -> None:
        for name in names:
            if not finite(params.get(name)):
                self.fail(f"needs a finite number {name!r} for {method} (has {params.get(name)!r})")


class Method:
    """The interface every method implements; the defaults fit a weight-only method without a balance knob."""

    name: str = ""
    summary: str = ""  # one line for `--help`
    options: tuple[Option, ...] = ()
    numbers: tuple[str, ...] = ()  # params that must be finite numbers in a file of this method
    calibrated = False  # decided from denoising runs (on the noise axis), not from the weights
    balance_knob = False  # `--balance auto` has something to search (β, the γ scale)
    takes_static = True  # may be given static LoRAs (--lora)

    def settings(self, options: RuleOptions) -> Settings:
        """`options` checked against what this method takes, its defaults filled in."""
        taken = {option.name: option for option in self.options}
        for name, value in options.items():
            if name not in taken:
                from . import takers  # the registry: who does take it

                owners = takers(name)
                where = f"only --method {' or '.join(owners)} takes it" if owners else "no method takes it"
                raise LoraschedError(f"--{name.replace('_', '-')}: {where}")
            choices = taken[name].type if isinstance(taken[name].type, tuple) else None
            problem = f"choose from {', '.join(choices)}" if choices and value not in choices else \
                taken[name].problem(value)
            if problem:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                raise LoraschedError(f"{taken[name].cli_flag} {shown}: {problem}")
        return Settings({name: options.get(name, option.default) for name, option in taken.items()})

    def needs_probe(self, options: RuleOptions) -> bool:
        """Whether a parameter must first be measured on probe images (EST's β when not given)."""
        return False

    def prepare(self, loras: LoraSet, options: RuleOptions) -> LoraSet:
        """The LoRAs the file carries (np-lora projects the subjects; the inputs as they are otherwise)."""
        return loras

    def build(self, loras: LoraSet, options: RuleOptions, device: str | None = None, progress=iter,
              steps: int = REFERENCE_STEPS) -> tuple[Any, dict]:
        """(rule, params recorded in the file) of a weight-only method; `progress` wraps a per-module loop,
        `steps` is the reference step count."""
        raise LoraschedError(f"--method {self.name}: is calibrated from denoising runs, not built from weights")

    def rebalance(self, rule, params: dict, beta: float | None, gamma_scale: float) -> tuple[Any, dict]:
        """The same rule under another balance (what `--balance auto` chose)."""
        raise LoraschedError(f"--balance auto: {self.name} has no balance knob")

    def check_params(self, params: dict, roles: tuple[str, ...], check: ParamsCheck) -> None:
        """What a file of this method must hold in `lorasched.params` beyond `numbers`."""

    def rule_from_file(self, scheduled) -> Any:
        """The rule the file was made with, from its params and per-layer scores (what `verify` runs online)."""
        raise NotImplementedError

    def setting(self, params: dict) -> str:
        """What `inspect` prints after the method's name: its params (the nested records have lines of their own)."""
        return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def positive(value) -> str | None:
    return None if finite(value) and value > 0 else "must be a positive finite number"


def finite_number(value) -> str | None:
    return None if finite(value) else "must be a finite number"


ALPHA = Option("alpha", float, "Ramp slope α (default: the method's published value).", problem=finite_number)
BETA = Option("beta", float, "Ramp offset β; for est, β = 1 − probe similarity (default: measured from probe "
              "images).", problem=finite_number)
GAMMA_SCALE = Option("gamma_scale", float, "Multiply the pair's γ (klora, est, feature-kl): above 1 favours the "
                     "style, below 1 the subject.", default=1.0, problem=positive)


def carried(scheduled) -> dict[str, Selection]:
    """Per denoiser module of a file, the subjects and styles whose factors it carries."""
    roles = scheduled.roles
    return {name: tuple(i for i, rank in enumerate(record.ranks) if rank and roles[i] != STATIC)
            for name, record in scheduled.modules.items() if not name.startswith("text_encoder")}
