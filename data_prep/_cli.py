"""Options and output shared by the shard converters (``key=value`` words, ``openseed.cli``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace

from openseed.cli import Option, UsageError, integer, parse_options, path
from openseed.data.coco import DataError

CONVERTER_OPTIONS = {
    "out": Option("output folder (shards, manifest.json, vocab.json)", required=True, check=path),
    "name": Option("data set name; prefix of the shard files (no dots)", required=True, check=path),
    "maxcount": Option("images per shard", 1000, integer(1)),
    "workers": Option("encoding processes; 0 = in the main process", os.cpu_count() or 1, integer(0)),
    "skip_missing": Option("count and skip images whose file is missing instead of stopping", False),
    "limit": Option("convert only the first N images (null: all)", None, integer(1)),
    "progress": Option("show a progress bar", True),
}


def converter_options(**own: Option) -> dict[str, Option]:
    """A converter's own keys (its inputs first), then the ones every converter has."""
    return {**own, **CONVERTER_OPTIONS}


def run(convert: Callable[[SimpleNamespace], object], argv: Sequence[str] | None, options: Mapping[str, Option],
        command: str, summary: str) -> int:
    """Parse the words, run a conversion, print its summary; a usage mistake or a data problem ends with a one-line
    error and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = parse_options(argv, options, command, summary)
        summary_ = convert(args)
    except (UsageError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_.report())
    return 0
