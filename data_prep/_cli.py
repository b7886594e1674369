"""Options and output shared by the shard converters."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from openseed.data.coco import DataError


def converter_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="output folder (shards, manifest.json, vocab.json)")
    parser.add_argument("--name", required=True, help="data set name; prefix of the shard files (no dots)")
    parser.add_argument("--maxcount", type=int, default=1000, help="images per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="encoding processes; 0 = in the main process (default: all cores)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="count and skip images whose file is missing instead of stopping")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(convert, args: argparse.Namespace) -> int:
    """Run a conversion, print its summary; a data problem ends with a one-line error and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.maxcount < 1:
        print("error: --maxcount must be >= 1", file=sys.stderr)
        return 2
    try:
        summary = convert(args)
    except (DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0
