"""The method registry: ``@register`` makes a ``Method`` selectable as ``method: <name>``, and the
run configuration gains its config section (``run_config_class``, ``load_run_config``).

Below every method module (each imports ``register`` from here); ``ted_scale.distill.methods``
imports the built-in methods, so importing the package registers them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os

from ted_scale.config.parse import ConfigError, load_config
from ted_scale.config.schema import RunConfig
from ted_scale.distill.methods.base import Method

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


def load_run_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """The run configuration from a YAML file plus ``a.b=value`` overrides, with the sections of
    every registered method (built-in ones and plug-ins imported before the call)."""
    return load_config(run_config_class(), path, list(overrides))
