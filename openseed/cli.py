"""``key=value`` command lines (lists as ``[a,b]``): the convention of every ``python -m openseed.*`` entry point,
of the data preparation tools (``python -m data_prep.*``) and of the experiment drivers (``experiments/*``).

``train`` and ``evaluate`` are Hydra applications (the same words, with config groups and run folders); the others
(``predict``, ``convert_checkpoint``, the evaluation tools, the converters) parse the words here, without Hydra's run
folders. Each declares its keys (``Option``) and wraps its work with ``command``: the arguments are checked before
anything is loaded, a mistake stops it with exit code 2 and one line naming the key, and ``--help`` lists the keys
with their defaults and help."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

HELP_WORDS = ("-h", "--help", "help")


class UsageError(ValueError):
    """A command line that cannot be used as it is; the message says what to fix."""


def parse_key_values(argv: Sequence[str] | None, defaults: dict, required: Sequence[str] = ()) -> dict:
    """Parse ``key=value`` arguments (``argv``, or ``sys.argv[1:]`` when None) over ``defaults``; unknown or missing
    keys raise ``UsageError``."""
    from omegaconf import OmegaConf

    argv = sys.argv[1:] if argv is None else argv
    bare = [word for word in argv if "=" not in word]
    if bare:
        raise UsageError(f"{bare[0]!r} is not a key=value word; write key=value (lists as [a,b])")
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


def number(value, key: str, above: float | None = None) -> float:
    """A finite real number argument (greater than ``above`` when given); a ``UsageError`` naming the key
    otherwise."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{key} must be a number, got {value!r}")
    if above is not None and value <= above:
        raise UsageError(f"{key} must be > {above}, got {value!r}")
    return float(value)


def integer(minimum: int = 1) -> Callable[[Any, str], int]:
    """The check of an integer key (``Option.check``): ``minimum`` or more."""
    def check(value, key: str) -> int:
        if value is None:
            raise UsageError(f"{key} must be an integer >= {minimum}, got None")
        return optional_int(value, key, minimum)
    return check


def one_of(options: Sequence[str]) -> Callable[[Any, str], str]:
    """The check of a key that takes one of ``options``."""
    return lambda value, key: choice(value, key, options)


def some_of(options: Sequence[str], allow_empty: bool = False) -> Callable[[Any, str], list[str]]:
    """The check of a list key whose entries each come from ``options`` (``key=[a,b]``, or ``key=a``)."""
    def check(value, key: str) -> list[str]:
        names = string_list(value, key, allow_empty=allow_empty)
        for index, name in enumerate(names):
            choice(name, f"{key}[{index}]", options)
        return names
    return check


@dataclass(frozen=True)
class Option:
    """One key of a command line: a line of help, the default, and the check that turns the given value into the one
    the tool uses (``check(value, key)``, raising ``UsageError``; a key whose default is None also takes ``key=null``,
    unchecked). A ``required`` key has no default; a bool default makes the key a ``key=true|false`` switch checked by
    ``flag``."""

    help: str
    default: Any = None
    check: Callable[[Any, str], Any] | None = None
    required: bool = False


def usage(command: str, summary: str, options: Mapping[str, Option]) -> str:
    """The ``--help`` text: the command with its required keys, the summary, one line per key."""
    required = " ".join(f"{key}=..." for key, option in options.items() if option.required)
    lines = [f"usage: {command} {required} [key=value ...]".replace("  ", " "), "", summary.strip(), "", "keys:"]
    width = max(len(key) for key in options)
    for key, option in options.items():
        default = "required" if option.required else f"default {_shown(option.default)}"
        lines.append(f"  {key:<{width}}  {option.help} ({default})")
    return "\n".join(lines)


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def parse_options(argv: Sequence[str] | None, options: Mapping[str, Option], command: str,
                  summary: str) -> SimpleNamespace:
    """Parse ``key=value`` words (``sys.argv[1:]`` when None) against declared ``options``: the values, checked, as
    attributes. A help word (``-h``, ``--help``, ``help``) prints ``usage`` and exits 0; a mistake is a
    ``UsageError`` naming the key."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(word in HELP_WORDS for word in argv):
        print(usage(command, summary, options))
        raise SystemExit(0)
    required = [key for key, option in options.items() if option.required]
    given = parse_key_values(argv, {key: option.default for key, option in options.items()}, required)
    values = {}
    for key, option in options.items():
        check = option.check or (flag if isinstance(option.default, bool) else None)
        value = given[key]
        values[key] = value if check is None or (value is None and option.default is None) else check(value, key)
    return SimpleNamespace(**values)


def command(options: Mapping[str, Option], name: str, doc: str | None) -> Callable:
    """Make ``run(args) -> int`` a tool's ``main(argv=None) -> int``: the words are parsed against ``options``
    (``parse_options``; ``--help`` shows ``name`` and the first paragraph of ``doc``), and a mistake prints one
    ``error:`` line and returns 2 before ``run`` is called."""
    summary = (doc or "").split("\n\n")[0]

    def wrap(run: Callable[[SimpleNamespace], int]) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(run)
        def main(argv: Sequence[str] | None = None) -> int:
            try:
                args = parse_options(argv, options, name, summary)
            except UsageError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            return run(args)
        return main
    return wrap
