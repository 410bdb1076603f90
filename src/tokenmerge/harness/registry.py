"""Discovery of methods and built-in architectures, and parsing of ``--method`` specifications.

Methods are every :class:`tokenmerge.Method` subclass that ``tokenmerge`` exports, keyed by lower-cased class name;
architectures are every config name in ``tokenmerge.archs`` (``UNET_CONFIGS`` and, when present, ``DIT_CONFIGS``).
Both are read at call time, so methods and architectures added to the package appear here without changes.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

import tokenmerge
from tokenmerge import archs
from tokenmerge.errors import HarnessError


def methods() -> dict[str, type[tokenmerge.Method]]:
    """Lower-cased name -> method class, for every method ``tokenmerge`` exports."""
    found: dict[str, type[tokenmerge.Method]] = {}
    for name in getattr(tokenmerge, "__all__", dir(tokenmerge)):
        obj = getattr(tokenmerge, name, None)
        if isinstance(obj, type) and issubclass(obj, tokenmerge.Method) and obj is not tokenmerge.Method:
            found[name.lower()] = obj
    return found


def architectures() -> dict[str, str]:
    """Built-in architecture name -> family (``unet`` or ``dit``)."""
    found = dict.fromkeys(getattr(archs, "UNET_CONFIGS", {}), "unet")
    found.update(dict.fromkeys(getattr(archs, "DIT_CONFIGS", {}), "dit"))
    return found


def build_architecture(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A denoiser of a built-in architecture with seeded random weights."""
    family = architectures().get(name)
    if family is None:
        raise HarnessError(f"unknown architecture {name!r}; choose from {', '.join(architectures())}")
    return archs.build_unet(name, dtype=dtype) if family == "unet" else archs.build_dit(name, dtype=dtype)


@dataclass(frozen=True)
class MethodSpec:
    """A parsed ``--method``: a label for tables, and the method (``None`` for the unaccelerated baseline)."""

    label: str
    method: tokenmerge.Method | None


BASELINE = MethodSpec("baseline", None)


def _split_options(text: str) -> list[str]:
    """Split ``a=1,b=(2,3)`` on the commas outside brackets."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _takes_text(annotation: object) -> bool:
    """Whether a field annotated ``annotation`` (e.g. ``"str | int"``, ``"Literal['a', 'b']"``) takes a string."""
    members = _split_options(str(annotation).replace("|", ","))
    return any(m == "str" or m.startswith(("Literal[", "typing.Literal[")) for m in members)


def _value(text: str, field: dataclasses.Field[Any]) -> Any:
    """A Python literal, ``true``/``false``/``none`` in any case, or else the bare string when ``field`` takes text;
    anything else is a :class:`ValueError` naming the field's type."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if _takes_text(field.type):
            return text.strip()
        raise ValueError(f"{field.name} takes {field.type}, got {text.strip()!r}") from None


def parse_method(spec: str) -> MethodSpec:
    """Parse ``NAME[:OPTION=VALUE,...]`` (e.g. ``toma:ratio=0.5,tile=(2,2)``; ``baseline`` for none) into a method.

    Raises :class:`HarnessError` with a one-line message for unknown names or options and invalid values.
    """
    name, _, options = spec.partition(":")
    name = name.strip().lower()
    if name in ("baseline", "none"):
        if options.strip():
            raise HarnessError(f"--method {spec!r}: the baseline takes no options")
        return BASELINE
    registry = methods()
    if name not in registry:
        raise HarnessError(f"--method {spec!r}: unknown method {name!r}; choose from {', '.join(registry)}")
    cls = registry[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for item in _split_options(options):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise HarnessError(f"--method {spec!r}: expected OPTION=VALUE, got {item!r}")
        if key not in fields:
            raise HarnessError(f"--method {spec!r}: {name} has no option {key!r}; options: {', '.join(sorted(fields))}")
        if key in kwargs:
            raise HarnessError(f"--method {spec!r}: option {key!r} is given twice")
        try:
            value = _value(raw, fields[key])
        except ValueError as exc:
            raise HarnessError(f"--method {spec!r}: {exc}") from None
        kwargs[key] = tuple(value) if isinstance(value, list) and key == "tile" else value
    try:
        method = cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise HarnessError(f"--method {spec!r}: {exc}") from exc
    label = name if not kwargs else f"{name}:" + ",".join(f"{k}={v}" for k, v in kwargs.items())
    return MethodSpec(label.replace(" ", ""), method)
