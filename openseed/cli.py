"""``key=value`` command lines (lists as ``[a,b]``), shared by ``openseed.predict`` and the evaluation runner."""

from __future__ import annotations

from collections.abc import Sequence


class UsageError(ValueError):
    """A command line that cannot be used as it is; the message says what to fix."""


def parse_key_values(argv: Sequence[str], defaults: dict, required: Sequence[str] = ()) -> dict:
    """Parse ``key=value`` arguments over ``defaults``; unknown or missing keys raise ``UsageError``."""
    from omegaconf import OmegaConf

    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(list(argv)))
    except Exception as err:  # OmegaConf's grammar errors come in several types
        raise UsageError(f"cannot parse the arguments ({err}); use key=value, lists as [a,b]") from None
    unknown = sorted(set(given) - set(defaults))
    missing = [key for key in required if given.get(key) is None]
    if unknown or missing:
        problems = [f"unknown keys {unknown}"] * bool(unknown) + [f"missing {missing}"] * bool(missing)
        raise UsageError(f"{'; '.join(problems)}; keys: {sorted(defaults)}")
    return {**defaults, **given}
