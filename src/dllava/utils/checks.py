"""Type and range checks for config values, one home for every settings class and entry point.

A Hydra override is parsed into whatever type it looks like (``sparsity.layer=2.5`` is a float,
``sparsity.vision=maybe`` a string), and Python compares most of them without complaint, so a wrong
value would otherwise train the wrong model or fail far from its key. Each helper takes the full key
(``"sparsity.layer"``) and raises with a message that starts with it and says what is accepted::

    sparsity.layer must be an integer >= 1, got 2.5 (float)

Types: ``bool`` is never a number (``True`` is not layer 1); an ``int`` is accepted where a float is
(``optim.lr=1`` means 1.0); a string is never a number (``"1e-4"`` is refused rather than converted);
floats must be finite. A wrong type raises ``TypeError``, a value out of range ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Iterable


def describe(value: Any) -> str:
    """``2.5 (float)``: the value and its type name, for error messages."""
    return f"{value!r} ({type(value).__name__})"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def _or_null(text: str, optional: bool) -> str:
    return f"{text} or null" if optional else text


def _in_range(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool (a string never counts)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(
    key: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False,
    also: Iterable[int] = (),
) -> int | None:
    """``value`` as an int in [low, high] (or one of ``also``, e.g. -1 for "unlimited"); None if ``optional``."""
    if value is None and optional:
        return None
    allowed = tuple(also)
    extra = "".join(f" or {a}" for a in allowed)
    wanted = _or_null(f"an integer{_range_text(low, high, False, False)}{extra}", optional)
    if not is_int(value):
        raise TypeError(f"{key} must be {wanted}, got {describe(value)}")
    if value not in allowed and not _in_range(value, low, high, False, False):
        raise ValueError(f"{key} must be {wanted}, got {value}")
    return value


def check_float(
    key: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, optional: bool = False,
) -> float | None:
    """``value`` (an int or a finite float) as a float within the bounds; None if ``optional``."""
    if value is None and optional:
        return None
    wanted = _or_null(f"a number{_range_text(low, high, low_open, high_open)}", optional)
    if not is_number(value):
        raise TypeError(f"{key} must be {wanted}, got {describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")
    if not _in_range(value, low, high, low_open, high_open):
        raise ValueError(f"{key} must be {wanted}, got {value:g}")
    return value


def check_bool(key: str, value: Any, *, optional: bool = False) -> bool | None:
    """``value`` as a bool (true/false only: not 0/1, not "yes"); None if ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{key} must be {_or_null('true or false', optional)}, got {describe(value)}")
    return value


def check_str(key: str, value: Any, *, optional: bool = False, nonempty: bool = True) -> str | None:
    """``value`` as a string (non-empty unless ``nonempty=False``); None if ``optional``."""
    if value is None and optional:
        return None
    wanted = _or_null("a non-empty string" if nonempty else "a string", optional)
    if not isinstance(value, str):
        raise TypeError(f"{key} must be {wanted}, got {describe(value)}")
    if nonempty and not value:
        raise ValueError(f"{key} must be {wanted}, got ''")
    return value


def check_choice(key: str, value: Any, choices: Sequence[Any], *, optional: bool = False) -> Any:
    """``value`` as one of ``choices`` (compared by type and value, so ``True`` is not ``1``)."""
    if value is None and optional:
        return None
    if not any(type(value) is type(c) and value == c for c in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{key} must be {_or_null(f'one of {listed}', optional)}, got {describe(value)}")
    return value


def check_str_list(
    key: str, value: Any, *, optional: bool = False, choices: Sequence[str] | None = None, nonempty: bool = False,
) -> list[str] | None:
    """``value`` as a list of strings (a bare string is refused: ``[a, b]`` is meant), each one of ``choices``."""
    if value is None and optional:
        return None
    wanted = _or_null("a list of strings", optional)
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{key} must be {wanted}, e.g. [a, b], got {describe(value)}")
    items = list(value)
    for index, item in enumerate(items):
        check_str(f"{key}[{index}]", item)
        if choices is not None and item not in choices:
            raise ValueError(f"{key}[{index}] must be one of {list(choices)}, got {item!r}")
    if nonempty and not items:
        raise ValueError(f"{key} must not be empty")
    return items


def check_urls(key: str, value: Any, *, optional: bool = False) -> str | list[str] | None:
    """Shard locations: a string (brace pattern, glob) or a non-empty list of strings."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        return check_str(key, value)
    if isinstance(value, Sequence) and not isinstance(value, (bytes, Mapping)):
        return check_str_list(key, value, nonempty=True)
    raise TypeError(f"{key} must be {_or_null('a path pattern or a list of them', optional)}, got {describe(value)}")


def check_mapping(key: str, value: Any, *, optional: bool = False) -> Mapping[str, Any] | None:
    """``value`` as a mapping (a config group such as ``model.architecture``)."""
    if value is None and optional:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be {_or_null('a mapping', optional)}, got {describe(value)}")
    return value


def check_keys(key: str, value: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse keys of ``value`` outside ``known`` (a typo would otherwise be ignored or fail unnamed)."""
    unknown = sorted(set(value) - set(known))
    if unknown:
        names = ", ".join(f"{key}.{name}" if key else name for name in unknown)
        verb = "is not a known setting" if len(unknown) == 1 else "are not known settings"
        raise ValueError(f"{names} {verb} (a typo?); known: {', '.join(sorted(known))}")
