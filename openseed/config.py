"""The Hydra configs: where they are (``CONF``), and a check of a composed config against the signatures of the
objects it instantiates, before any heavy work.

Every node with a ``_target_`` is checked against the target's parameters and their annotations (``build_openseed``'s
keyword overrides against ``OpenSeeDConfig``'s fields; a mapping passed where a dataclass is expected, such as
``data.seg``, against the dataclass's fields). A value of the wrong type, or a key the target does not take, is a
``ConfigError`` that names the full key, what was expected and what was given, e.g.
``data.seg.batch_size: expected int, got 'abc' (str)``. Annotations the checker does not understand accept anything
(the target still checks its own input then).
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path, PurePath

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# conf/ of a source checkout, or openseed/conf inside an installed wheel (pyproject.toml ships them there)
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
_SOURCE_CONF = Path(__file__).resolve().parents[1] / "conf"
CONF = str(_PACKAGED_CONF if (_PACKAGED_CONF / "train.yaml").is_file() else _SOURCE_CONF)

_UNRESOLVED = object()


class ConfigError(ValueError):
    """Config values that do not fit what they configure; the message names every offending key."""


def _extra_fields(target: Callable) -> type | None:
    """The dataclass whose fields a target's ``**kwargs`` take (``build_openseed``'s overrides)."""
    from openseed.modeling.openseed import OpenSeeDConfig, build_openseed

    return OpenSeeDConfig if target is build_openseed else None


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        return getattr(origin, "__name__", str(origin)).lower()
    return getattr(hint, "__name__", str(hint))


def _shown(value) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return f"{value!r:.80} ({type(value).__name__})"


def _check(value, hint, key: str) -> list[str]:
    """Errors (``key: ...`` lines) of ``value`` against the annotation ``hint``; [] when it fits."""
    if hint is typing.Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return []
    if isinstance(value, DictConfig) and "_target_" in value:
        return check_node(value, key)  # built by its own target: checked against that
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, (DictConfig, dict)):
            for arm in args:
                if dataclasses.is_dataclass(arm):  # a mapping where a dataclass is taken: checked as that dataclass
                    return _check(value, arm, key)
        if any(_fits_arm(value, arm, key) for arm in args):
            return []
        return [f"{key}: expected {_describe(hint)}, got {_shown(value)}"]
    if origin is typing.Literal:
        return [] if value in args else [f"{key}: expected {_describe(hint)}, got {_shown(value)}"]
    if hint is type(None):
        return [] if value is None else [f"{key}: expected None, got {_shown(value)}"]
    if dataclasses.is_dataclass(hint) and isinstance(value, (DictConfig, dict)):
        return _check_fields(value, _hints(hint), key, extra_allowed=False, target=hint.__name__)
    if hint is bool:
        fits = isinstance(value, bool)
    elif hint is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        fits = isinstance(value, str)
    elif hint in (PurePath, os.PathLike) or (isinstance(hint, type) and issubclass(hint, PurePath)):
        fits = isinstance(value, str)
    elif origin in (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection) or hint in (list, tuple):
        if not isinstance(value, (ListConfig, list, tuple)):
            return [f"{key}: expected {_describe(hint)}, got {_shown(value)}"]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return [f"{key}: expected {len(args)} values, got {_shown(value)}"]
            return [e for i, (v, a) in enumerate(zip(value, args)) for e in _check(v, a, f"{key}[{i}]")]
        item = args[0] if args else typing.Any
        return [e for i, v in enumerate(value) for e in _check(v, item, f"{key}[{i}]")]
    elif origin in (dict, cabc.Mapping, cabc.MutableMapping) or hint in (dict, cabc.Mapping):
        fits = isinstance(value, (DictConfig, dict))
    else:
        return []  # a type the checker does not know: the target checks it
    return [] if fits else [f"{key}: expected {_describe(hint)}, got {_shown(value)}"]


def _fits_arm(value, arm, key: str) -> bool:
    """Whether ``value`` fits one arm of a union. A class the checker does not know (``torch.Tensor`` in
    ``float | Tensor``) takes only its own instances, which a config value never is: the union's other arms decide."""
    if isinstance(arm, type) and not _check(value, arm, key) and _is_unknown_class(arm):
        return isinstance(value, arm)
    return not _check(value, arm, key)


def _is_unknown_class(arm: type) -> bool:
    known = (bool, int, float, str, type(None), list, tuple, dict, PurePath, os.PathLike)
    return not (arm in known or issubclass(arm, PurePath) or dataclasses.is_dataclass(arm))


def _hints(target) -> dict:
    try:
        return typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve here: check nothing rather than guess
        return {}


def _value(node: DictConfig, name: str):
    try:
        return node[name]
    except OmegaConfBaseException:  # e.g. ${hydra:...} outside a Hydra run: left to instantiate
        return _UNRESOLVED


def _check_fields(node, hints: dict, key: str, extra_allowed: bool, target: str) -> list[str]:
    errors = []
    for name in node:
        if str(name).startswith("_"):
            continue
        path = f"{key}.{name}" if key else str(name)
        if name not in hints:
            if not extra_allowed:
                errors.append(f"{path}: {target} takes no such option (known: {', '.join(sorted(hints))})")
            continue
        value = _value(node, name) if isinstance(node, DictConfig) else node[name]
        if value is not _UNRESOLVED:
            errors.extend(_check(value, hints[name], path))
    return errors


def check_node(node: DictConfig, key: str = "") -> list[str]:
    """Errors of one ``_target_`` node (and the nodes inside it)."""
    from hydra.utils import get_object

    try:
        target = get_object(node["_target_"])
    except Exception as err:
        return [f"{key + '.' if key else ''}_target_: cannot import {node['_target_']!r} ({err})"]
    function = target.__init__ if inspect.isclass(target) else target
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return []
    hints = {**{n: p.annotation for n, p in parameters.items()}, **_hints(function)}
    hints = {n: h for n, h in hints.items() if n in parameters and parameters[n].kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    extra = _extra_fields(target)
    if extra is not None:
        hints.update(_hints(extra))
        takes_kwargs = False
    return _check_fields(node, hints, key, extra_allowed=takes_kwargs, target=node["_target_"])


def check_config(cfg: DictConfig, keys: tuple[str, ...] | None = None) -> None:
    """Check every ``_target_`` node of ``cfg`` (or of the top-level ``keys``), and their nested groups; raises a
    ``ConfigError`` listing every offending key."""
    errors = []

    def walk(node, key: str) -> None:
        if isinstance(node, DictConfig):
            if "_target_" in node:
                errors.extend(check_node(node, key))
                return
            for name in node:
                value = _value(node, name)
                if isinstance(value, (DictConfig, ListConfig)):
                    walk(value, f"{key}.{name}" if key else str(name))

    for name in keys if keys is not None else list(cfg):
        if name == "hydra" or name not in cfg:
            continue
        value = _value(cfg, name)
        if isinstance(value, DictConfig):
            walk(value, str(name))
    if errors:
        raise ConfigError("bad config value(s):\n  " + "\n  ".join(errors))


def check_values(cfg: DictConfig, hints: dict, key: str = "") -> None:
    """Check the plain (non-``_target_``) keys named in ``hints``; raises a ``ConfigError`` naming each bad one."""
    errors = _check_fields({k: _value(cfg, k) for k in hints if k in cfg}, hints, key, extra_allowed=True, target="")
    if errors:
        raise ConfigError("bad config value(s):\n  " + "\n  ".join(errors))
