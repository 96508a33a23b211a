"""Distillation methods as plug-ins: ``method: <name>`` selects a registered ``Method``.

Built-in: ``lm`` (one model, next-token CE), ``kd``, ``lwd``, ``ted``, ``ted_kl``, ``cr_ild`` and
``minidisc`` (teacher -> teacher assistant -> student, each hop by a registered method). A method
registers itself with ``@register`` (``registry``) when its module is imported; importing this
package imports the built-in ones. How to add one: docs/design.md, "How to add a method".
"""

from __future__ import annotations

# The built-in methods register themselves on import.
from ted_scale.distill.methods import cr_ild, kd, lm, lwd, minidisc, ted  # noqa: F401
from ted_scale.distill.methods.base import (
    ExtraModules,
    Method,
    MethodContext,
    Phase,
    PhaseKind,
    PlannedPhase,
    build_benchmarked,
)
from ted_scale.distill.methods.registry import (
    get_method,
    load_run_config,
    method_names,
    register,
    run_config_class,
)

__all__ = [
    "ExtraModules",
    "Method",
    "MethodContext",
    "Phase",
    "PhaseKind",
    "PlannedPhase",
    "build_benchmarked",
    "get_method",
    "load_run_config",
    "method_names",
    "register",
    "run_config_class",
]
