"""The method registry: each method is one module here whose `METHOD` says everything lorasched needs of it
(`method.Method`: name, options, how it schedules, its params and their checks, its rule read back from a file,
what `inspect` prints). The CLI's options, the converter and the file checker ask the registry, never a name."""

from __future__ import annotations

from ..errors import LoraschedError
from ..lora import LoraSet
from ..schedule import REFERENCE_STEPS
from . import blocks, direct, est, feature_kl, klora, lora_switch, np_lora, windows
from .method import Method, Option, ParamsCheck, RuleOptions

__all__ = ["Method", "Option", "ParamsCheck", "RuleOptions", "all_options", "build", "from_file", "get", "names",
           "register", "takers", "unregister"]

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (its name must be new); returns it, so a module may write `METHOD = register(MyMethod())`."""
    if not method.name or method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} is empty or taken")
    _REGISTRY[method.name] = method
    return method


for _module in (klora, est, direct, feature_kl, np_lora, lora_switch, windows, blocks):
    register(_module.METHOD)


def unregister(name: str) -> None:
    """Remove a method added with `register` (a plugin unloading, a test cleaning up)."""
    _REGISTRY.pop(name)


def get(name: str) -> Method:
    """The method of that name, or a one-line error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoraschedError(f"unknown method {name!r} (choose from {', '.join(_REGISTRY)})") from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def takers(option: str) -> list[str]:
    """The methods that take an option."""
    return [method.name for method in _REGISTRY.values() if any(o.name == option for o in method.options)]


def all_options() -> list[Option]:
    """Every method's options, each once (shared ones are one object), in the registry's order: the CLI's flags."""
    seen: dict[str, Option] = {}
    for method in _REGISTRY.values():
        for option in method.options:
            if seen.setdefault(option.name, option) is not option:
                raise ValueError(f"two methods declare different options named {option.name!r}")
    return list(seen.values())


def build(name: str, loras: LoraSet, options: RuleOptions = RuleOptions(), device: str | None = None,
          progress=iter, steps: int = REFERENCE_STEPS):
    """(rule, params) of a weight-only method by name (a convenience for tests and benchmarks)."""
    return get(name).build(loras, options, device, progress, steps)


def from_file(scheduled):
    """The rule a scheduled file (`fileformat.ScheduledFile`) was made with: what `verify` runs online."""
    return get(scheduled.method).rule_from_file(scheduled)
