"""``key=value`` command lines (lists as ``[a,b]``): the convention of every ``python -m openseed.*`` entry point.

``train`` and ``evaluate`` are Hydra applications (the same words, with config groups and run folders); the others
(``predict``, ``convert_checkpoint``, the evaluation tools) parse the words here, without Hydra's run folders.
Each checks its arguments before loading anything and stops with exit code 2 and one line naming the key."""

from __future__ import annotations

from collections.abc import Sequence


class UsageError(ValueError):
    """A command line that cannot be used as it is; the message says what to fix."""


def parse_key_values(argv: Sequence[str] | None, defaults: dict, required: Sequence[str] = ()) -> dict:
    """Parse ``key=value`` arguments (``argv``, or ``sys.argv[1:]`` when None) over ``defaults``; unknown or missing
    keys raise ``UsageError``."""
    import sys

    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else argv

    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except Exception as err:  # OmegaConf's grammar errors come in several types
        raise UsageError(f"cannot parse the arguments ({err}); use key=value, lists as [a,b]") from None
    unknown = sorted(set(given) - set(defaults))
    missing = [key for key in required if given.get(key) is None]
    if unknown or missing:
        problems = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing)
        raise UsageError(f"{'; '.join(problems)}; keys: {sorted(defaults)}")
    empty = [key for key in required if given.get(key) in ([], "")]
    if empty:
        raise UsageError(f"{', '.join(f'{key}=[]' for key in empty)}: empty; give at least one value, "
                         f"e.g. {empty[0]}=[a,b]")
    return {**defaults, **given}


def string_list(value, key: str, allow_empty: bool = False) -> list[str]:
    """A ``key=[a,b]`` (or ``key=a``) value as a list of non-empty strings, stripped.

    OmegaConf reads ``null``, ``true`` and ``7`` as None, True and 7: such entries are a ``UsageError`` naming the key,
    the index and the value, not silently renamed "None", "True", "7" (quote them, ``'7'``, to mean the text)."""
    items = value if isinstance(value, list) else [value]
    if not items and not allow_empty:
        raise UsageError(f"{key}=[]: empty; give at least one value, e.g. {key}=[a,b]")
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            hint = f" (quote it, {key}=['{item}'], to mean the text)" if isinstance(item, (bool, int, float)) else ""
            raise UsageError(f"{key}[{index}] must be a non-empty string, got {item!r}{hint}")
    return [item.strip() for item in items]


def path(value, key: str) -> str:
    """A file or folder argument as text (a bare number such as ``out=2024`` is a name too)."""
    if value is None or isinstance(value, (bool, list, dict)) or str(value) == "":
        raise UsageError(f"{key} must be a path, got {value!r}")
    return str(value)


def choice(value, key: str, options: Sequence[str]) -> str:
    """One of ``options``; a ``UsageError`` listing them otherwise."""
    if value not in options:
        raise UsageError(f"{key} must be one of {list(options)}, got {value!r}")
    return value


def flag(value, key: str) -> bool:
    """A ``key=true`` / ``key=false`` switch."""
    if not isinstance(value, bool):
        raise UsageError(f"{key} must be true or false, got {value!r}")
    return value


def optional_int(value, key: str, minimum: int = 1) -> int | None:
    """An integer argument (None stays None); a ``UsageError`` naming the key when it is not one or below
    ``minimum``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def number(value, key: str) -> float:
    """A finite real number argument; a ``UsageError`` naming the key otherwise."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{key} must be a number, got {value!r}")
    return float(value)
