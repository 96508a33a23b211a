"""Distillation methods as plug-ins: ``method: <name>`` selects a registered ``Method``.

Built-in: ``lm`` (one model, next-token CE), ``kd``, ``lwd``, ``ted``, ``ted_kl``, ``cr_ild`` and
``minidisc`` (teacher -> teacher assistant -> student, each hop by a registered method). A method
registers itself with ``@register`` when its module is imported; the run configuration gains its
config section (``run_config_class``). How to add one: docs/design.md, "How to add a method".
"""

from __future__ import annotations

import dataclasses
import difflib
import functools

from ted_scale.config.parse import ConfigError
from ted_scale.config.schema import RunConfig
from ted_scale.distill.methods.base import (
    Method,
    MethodContext,
    Phase,
    PhaseKind,
    PlannedPhase,
    build_benchmarked,
)

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method: cls.name``."""
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"method {cls.name!r} is registered twice ({known} and {cls})")
    _REGISTRY[cls.name] = cls
    run_config_class.cache_clear()
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    """The registered method called ``name``; an unknown name names the closest valid one."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"method must be one of {', '.join(map(repr, method_names()))}, got {name!r}{hint}"
        )
    return _REGISTRY[name]()


@functools.cache
def run_config_class() -> type[RunConfig]:
    """``RunConfig`` with one more section per registered method that has one (``filters`` for
    TED, ...), and ``method`` checked against the registry."""
    core = {f.name for f in dataclasses.fields(RunConfig)}
    sections: dict[str, type] = {}
    for cls in _REGISTRY.values():
        if cls.section is None:
            continue
        key, section = cls.section
        if key in core or sections.get(key, section) is not section:
            raise ValueError(f"method {cls.name!r}: config section {key!r} is already taken")
        sections[key] = section

    def __post_init__(self) -> None:
        RunConfig.__post_init__(self)
        get_method(self.method)

    fields = [(key, tp, dataclasses.field(default_factory=tp)) for key, tp in sections.items()]
    return dataclasses.make_dataclass(
        "RunConfig",
        fields,
        bases=(RunConfig,),
        namespace={"__post_init__": __post_init__, "__module__": __name__},
    )


# The built-in methods register themselves on import.
from ted_scale.distill.methods import cr_ild, kd, lm, lwd, minidisc, ted  # noqa: E402, F401

__all__ = [
    "Method",
    "MethodContext",
    "Phase",
    "PhaseKind",
    "PlannedPhase",
    "build_benchmarked",
    "get_method",
    "method_names",
    "register",
    "run_config_class",
]
