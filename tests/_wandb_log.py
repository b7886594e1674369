"""Reads an offline W&B run's transaction log (``run-<id>.wandb``) into protobuf records.

The file is a 7-byte header (``:W&B``, magic, version) followed by a LevelDB-style log: 32 KiB blocks of
chunks, each with a 7-byte header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); a
block's tail shorter than a header is padding. Grepping the raw bytes is unreliable (a key can straddle a block
boundary), and W&B's service may still be writing the file for a moment after ``wandb.finish`` returns, so
:func:`wait_for_records` waits for the run's exit record.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    records, payload, pos = [], b"", 7
    while pos + CHUNK_HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK_HEADER:  # block padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0:  # zero-filled tail of a file still being written
            break
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if len(chunk) < length:  # a chunk not fully written yet
            break
        pos += CHUNK_HEADER + length
        payload = chunk if kind in (FULL, FIRST) else payload + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wait_for_records(path: Path, timeout: float = 60.0) -> list:
    """The log's records once it holds the run's exit record (W&B's service finishes writing it asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise TimeoutError(f"{path}: no exit record after {timeout} s; last records {kinds[-5:]}")
        time.sleep(0.2)


def _values(records: list, kind: str, items) -> dict:
    """Key -> the list of its JSON-encoded values, in logging order, over the records of one kind."""
    values: dict = {}
    for record in records:
        if record.WhichOneof("record_type") == kind:
            for item in items(record):
                values.setdefault(item.key or "/".join(item.nested_key), []).append(item.value_json)
    return values


def history_values(records: list) -> dict:
    """Every logged history key -> the list of its JSON-encoded values, in logging order."""
    return _values(records, "history", lambda record: record.history.item)


def config_values(records: list) -> dict:
    """Every top-level config key -> the JSON-encoded values of its updates, in logging order."""
    return _values(records, "config", lambda record: record.config.update)
